"""Tests for zerosearch_jax.rl.algorithms (docs/method.md §7).

Expected numbers are derived by hand in the comments; each test compares against them.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zerosearch_jax import models, rl

NO_WHITEN = rl.AdvantageConfig(whiten=False)


def outcome_rewards(mask, scores):
    """[B, T] token rewards with scores[i] on the last mask-1 token of row i (the rollout's
    layout)."""
    mask = np.asarray(mask, np.float32)
    rewards = np.zeros_like(mask)
    for i, score in enumerate(scores):
        rewards[i, np.nonzero(mask[i])[0][-1]] = score
    return jnp.asarray(rewards)


# ---------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------


def test_reinforce_broadcasts_episode_reward_without_baseline():
    mask = jnp.array([[0, 1, 1, 0, 1, 0],
                      [0, 0, 1, 1, 1, 1.]])
    rewards = outcome_rewards(mask, [0.5, 0.0])
    adv, returns = rl.reinforce_advantages(rewards, mask)
    expected = np.array([[0, .5, .5, 0, .5, 0],
                         [0, 0, 0, 0, 0, 0.]])
    np.testing.assert_array_equal(adv, expected)
    np.testing.assert_array_equal(returns, expected)
    # No baseline: a batch of all-positive rewards gives all-positive advantages.
    adv, _ = rl.reinforce_advantages(outcome_rewards(mask, [0.5, 1.0]), mask)
    np.testing.assert_array_equal(adv[1], [0, 0, 1, 1, 1, 1])


def test_grpo_hand_computed():
    # Groups [0, 0, 1, 1, 1], rewards [1, 0, 0.5, 1, 0]:
    #   group 0: mean 0.5, unbiased var (0.25 + 0.25) / 1 = 0.5, std sqrt(0.5) = 0.7071068
    #            -> +-0.5 / (0.7071068 + 1e-6) = +-0.7071058
    #   group 1: mean 0.5, unbiased var (0 + 0.25 + 0.25) / 2 = 0.25, std 0.5
    #            -> 0, +-0.5 / 0.500001 = +-0.999998
    mask = jnp.array([[0, 1, 1]] * 5, jnp.float32)
    rewards = outcome_rewards(mask, [1, 0, 0.5, 1, 0])
    adv, returns = rl.grpo_advantages(rewards, mask, group_ids=jnp.array([0, 0, 1, 1, 1]))
    expected = np.array([0.7071058, -0.7071058, 0.0, 0.999998, -0.999998])
    np.testing.assert_allclose(adv[:, 1], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(adv[:, 2], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(adv[:, 0], 0.0)  # prompt token
    np.testing.assert_array_equal(returns, adv)


def test_grpo_singleton_group_and_arbitrary_ids():
    # Ids need not be 0..B-1. Group 1000 has one row: mean 0, std 1 (veRL) -> 0.8 / (1 + 1e-6).
    # Group -3: rewards [1, 0] -> +-0.5 / (sqrt(0.5) + 1e-6) = +-0.7071058.
    # Group 7: constant rewards -> 0 (std 0, divided by eps only).
    mask = jnp.ones((5, 2))
    rewards = outcome_rewards(mask, [0.8, 1.0, 0.0, 0.3, 0.3])
    adv, _ = rl.grpo_advantages(rewards, mask, group_ids=jnp.array([1000, -3, -3, 7, 7]))
    np.testing.assert_allclose(adv[:, 0], [0.7999992, 0.7071058, -0.7071058, 0.0, 0.0],
                               rtol=1e-6, atol=1e-7)


def test_grpo_groups_follow_the_prompt_ids():
    rng = np.random.default_rng(0)
    mask = jnp.asarray(rng.random((12, 6)) < 0.7, jnp.float32).at[:, -1].set(1.0)
    rewards = outcome_rewards(mask, rng.random(12))
    ids = jnp.asarray(rng.permutation(np.repeat([5, 11, 2, 40], 3)))
    adv, _ = rl.grpo_advantages(rewards, mask, group_ids=ids)
    perm = rng.permutation(12)
    adv_perm, _ = rl.grpo_advantages(rewards[perm], mask[perm], group_ids=ids[perm])
    np.testing.assert_allclose(adv_perm, adv[perm], atol=1e-5)  # summation order differs
    # Grouping matters: the same rows under other ids normalize differently.
    other, _ = rl.grpo_advantages(rewards, mask, group_ids=jnp.arange(12) // 3)
    assert not np.allclose(other, adv)
    # Each group is centered: its scores sum to 0.
    scores = adv[:, -1]
    for g in np.unique(ids):
        assert abs(float(scores[ids == g].sum())) < 1e-5


# One row through a multi-turn episode: prompt, two policy tokens, two observation tokens, one
# policy token with the reward, padding. Values at mask-0 positions are junk and must be unused.
GAP_MASK = jnp.array([[0, 1, 1, 0, 0, 1, 0.]])
GAP_VALUES = jnp.array([[9.0, 0.1, 0.2, 5.0, 6.0, 0.4, 7.0]])
GAP_REWARDS = jnp.array([[0, 0, 0, 0, 0, 1.0, 0]])


def test_gae_gamma_lambda_one_skips_the_observation_gap():
    # Over the policy subsequence V = [0.1, 0.2, 0.4], r = [0, 0, 1], gamma = lam = 1:
    #   A_t = sum of later rewards - V_t (telescoping) = [0.9, 0.8, 0.6]; returns = A + V = 1.
    adv, returns = rl.gae_advantages(GAP_REWARDS, GAP_MASK, values=GAP_VALUES, config=NO_WHITEN)
    np.testing.assert_allclose(adv, [[0, 0.9, 0.8, 0, 0, 0.6, 0]], atol=1e-6)
    np.testing.assert_allclose(returns, [[0, 1, 1, 0, 0, 1, 0]], atol=1e-6)


def test_gae_discounted_hand_computed():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72) over V = [0.1, 0.2, 0.4], r = [0, 0, 1]:
    #   last:   delta = 1 - 0.4 = 0.6;                 A = 0.6
    #   second: delta = 0.9 * 0.4 - 0.2 = 0.16;        A = 0.16 + 0.72 * 0.6 = 0.592
    #   first:  delta = 0.9 * 0.2 - 0.1 = 0.08;        A = 0.08 + 0.72 * 0.592 = 0.50624
    #   returns = A + V = [0.60624, 0.792, 1.0]
    config = rl.AdvantageConfig(gamma=0.9, lam=0.8, whiten=False)
    adv, returns = rl.gae_advantages(GAP_REWARDS, GAP_MASK, values=GAP_VALUES, config=config)
    np.testing.assert_allclose(adv, [[0, 0.50624, 0.592, 0, 0, 0.6, 0]], atol=1e-6)
    np.testing.assert_allclose(returns, [[0, 0.60624, 0.792, 0, 0, 1.0, 0]], atol=1e-6)
    # Same numbers as the row with the mask-0 columns removed: the gap is transparent.
    dense, _ = rl.gae_advantages(GAP_REWARDS[:, [1, 2, 5]], jnp.ones((1, 3)),
                                 values=GAP_VALUES[:, [1, 2, 5]], config=config)
    np.testing.assert_allclose(dense[0], adv[0, [1, 2, 5]], atol=1e-6)


def test_gae_whitens_over_the_mask():
    # A = [0.9, 0.8, 0.6]: mean 0.7666667, deviations [0.1333333, 0.0333333, -0.1666667],
    # unbiased var 0.0466667 / 2 = 0.0233333, std 0.1527525
    #   -> [0.8728716, 0.2182179, -1.0910895]; returns are not whitened.
    adv, returns = rl.gae_advantages(GAP_REWARDS, GAP_MASK, values=GAP_VALUES)
    np.testing.assert_allclose(adv, [[0, 0.8728716, 0.2182179, 0, 0, -1.0910895, 0]], atol=1e-5)
    np.testing.assert_allclose(returns, [[0, 1, 1, 0, 0, 1, 0]], atol=1e-6)


def test_gae_kl_in_reward():
    # kl_coef 0.5, token_kl [_, 0.2, 0.4, _, _, 1.0, _] -> r = [-0.1, -0.2, 0.5]; gamma = lam = 1:
    #   A = [-0.1 - 0.2 + 0.5 - 0.1, -0.2 + 0.5 - 0.2, 0.5 - 0.4] = [0.1, 0.1, 0.1]
    token_kl = jnp.array([[50.0, 0.2, 0.4, 50.0, 50.0, 1.0, 50.0]])
    config = rl.AdvantageConfig(whiten=False)
    adv, _ = rl.gae_advantages(GAP_REWARDS, GAP_MASK, values=GAP_VALUES,
                               kl_penalty=0.5 * token_kl, config=config)
    np.testing.assert_allclose(adv, [[0, 0.1, 0.1, 0, 0, 0.1, 0]], atol=1e-6)


def test_reinforce_pp_hand_computed():
    # kl_coef 0.1, gamma 1. Row 0: mask [0, 1, 1, 0, 1], reward 1 on the last token,
    # token_kl [_, 0.5, 1.0, _, 2.0] -> r = [-0.05, -0.1, 0.8] -> G = [0.65, 0.7, 0.8].
    # Row 1: mask [1, 1, 0, 0, 0], reward 0, token_kl [1.0, 0] -> r = [-0.1, 0] -> G = [-0.1, 0].
    # Whitened over all five policy tokens of the batch: mean 2.05 / 5 = 0.41, deviations
    # [0.24, 0.29, 0.39, -0.51, -0.41], unbiased var 0.722 / 4 = 0.1805, std 0.4248529
    #   -> [0.5649013, 0.6825891, 0.9179647, -1.2004153, -0.9650398]
    mask = jnp.array([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0.]])
    rewards = outcome_rewards(mask, [1.0, 0.0])
    token_kl = jnp.array([[9.0, 0.5, 1.0, 9.0, 2.0], [1.0, 0, 0, 0, 0]])
    adv, returns = rl.reinforce_pp_advantages(rewards, mask, kl_penalty=0.1 * token_kl)
    np.testing.assert_allclose(returns, [[0, 0.65, 0.7, 0, 0.8], [-0.1, 0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(adv, [[0, 0.5649013, 0.6825891, 0, 0.9179647],
                                     [-1.2004153, -0.9650398, 0, 0, 0]], atol=1e-5)
    # Whitened over the batch, not per row: batch mean 0 and unbiased variance 1 on the mask.
    assert abs(float(rl.masked_mean(adv, mask))) < 1e-6
    assert float(rl.masked_var(adv, mask)) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(rl.masked_mean(adv[:1], mask[:1]))) > 0.5


def test_reinforce_pp_discount_through_gap():
    # gamma 0.5, no KL, reward 1 on the last policy token of GAP_MASK: G = [0.25, 0.5, 1.0]
    # (one discount per policy token, none for the two observation tokens).
    config = rl.AdvantageConfig(gamma=0.5, whiten=False)
    adv, returns = rl.reinforce_pp_advantages(GAP_REWARDS, GAP_MASK, config=config)
    np.testing.assert_allclose(returns, [[0, 0.25, 0.5, 0, 0, 1.0, 0]], atol=1e-7)
    np.testing.assert_array_equal(adv, returns)


def test_estimator_registry_and_inputs():
    assert set(rl.ADVANTAGE_ESTIMATORS) == {"reinforce", "grpo", "gae", "reinforce_pp"}
    assert rl.get_advantage_estimator("grpo") is rl.grpo_advantages
    with pytest.raises(ValueError, match=r"'ppo'.*valid names.*'gae'"):
        rl.get_advantage_estimator("ppo")
    mask = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="group_ids"):
        rl.grpo_advantages(mask, mask)
    with pytest.raises(ValueError, match="values"):
        rl.gae_advantages(mask, mask)
    with pytest.raises(ValueError, match="gamma must be in \\[0, 1\\], got 1.5"):
        rl.AdvantageConfig(gamma=1.5)
    with pytest.raises(ValueError, match="kl_coef must be >= 0, got -0.1"):
        rl.LossConfig(kl_coef=-0.1)


def test_masked_helpers():
    x = jnp.array([[1.0, 2.0, jnp.inf], [3.0, jnp.nan, 5.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    assert float(rl.masked_mean(x, mask)) == pytest.approx(2.0)
    np.testing.assert_allclose(rl.masked_mean(x, mask, axis=1), [1.5, 3.0])
    assert float(rl.masked_var(x, mask)) == pytest.approx(1.0)  # (1 + 0 + 1) / 2
    assert float(rl.masked_var(x, mask, unbiased=False)) == pytest.approx(2 / 3)
    # (x - 2) / sqrt(1 + 1e-8); zeros off the mask; shift_mean=False adds the mean back.
    np.testing.assert_allclose(rl.masked_whiten(x, mask), [[-1, 0, 0], [1, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(rl.masked_whiten(x, mask, shift_mean=False),
                               [[1, 2, 0], [3, 0, 0]], atol=1e-6)
    assert float(rl.masked_mean(x, jnp.zeros_like(mask))) == 0.0


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_match_formulas():
    logp = jnp.array([-1.0, -2.0, -0.5, -3.0])
    ref = jnp.array([-1.5, -1.0, -0.5, -2.0])
    d = np.array([0.5, -1.0, 0.0, -1.0])  # logp - ref
    np.testing.assert_allclose(rl.get_kl_estimator("k1")(logp, ref), d, atol=1e-7)
    np.testing.assert_allclose(rl.get_kl_estimator("abs")(logp, ref), np.abs(d), atol=1e-7)
    np.testing.assert_allclose(rl.get_kl_estimator("mse")(logp, ref), 0.5 * d**2, atol=1e-7)
    # k3 = e^(ref - logp) - (ref - logp) - 1 = e^-d + d - 1:
    #   d = 0.5 -> 0.6065307 - 0.5 = 0.1065307; d = -1 -> 2.7182818 - 2 = 0.7182818; d = 0 -> 0.
    np.testing.assert_allclose(rl.get_kl_estimator("low_var_kl")(logp, ref),
                               [0.1065307, 0.7182818, 0.0, 0.7182818], atol=1e-6)
    with pytest.raises(ValueError, match=r"'k4'.*valid names.*'low_var_kl'"):
        rl.get_kl_estimator("k4")


def test_low_var_kl_nonnegative_clamped_and_finite_gradient():
    d = jnp.linspace(-60.0, 60.0, 241)
    kl = rl.kl_low_var(d, jnp.zeros_like(d))
    assert float(kl.min()) >= 0.0
    assert float(kl.max()) == 10.0
    assert float(rl.kl_low_var(jnp.array(-30.0), jnp.array(0.0))) == 10.0  # e^30 clamped
    assert float(rl.kl_low_var(jnp.array(15.0), jnp.array(0.0))) == 10.0  # 14 clamped
    grad = jax.vmap(jax.grad(rl.kl_low_var))(d, jnp.zeros_like(d))
    assert np.isfinite(grad).all()
    # Inside the clamp: d/dlogp (e^-d + d - 1) = 1 - e^-d.
    np.testing.assert_allclose(jax.grad(rl.kl_low_var)(0.5, 0.0), 1 - math.exp(-0.5), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def test_policy_loss_and_clip_fraction():
    # ratio, advantage -> loss max(-A r, -A clip(r, 0.8, 1.2)), clipped term larger?
    #   1.5, +1  -> max(-1.5, -1.2) = -1.2   clipped
    #   0.5, +1  -> max(-0.5, -0.8) = -0.5   not
    #   0.5, -1  -> max( 0.5,  0.8) =  0.8   clipped
    #   1.5, -1  -> max( 1.5,  1.2) =  1.5   not
    #   1.1, +2  -> max(-2.2, -2.2) = -2.2   not (inside the trust region)
    #   3.0, +1, masked                        ignored
    ratio = jnp.array([[1.5, 0.5, 0.5, 1.5, 1.1, 3.0]])
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0, 2.0, 1.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0]])
    old = jnp.full((1, 6), -1.0)
    logp = old + jnp.log(ratio)
    loss_sum, count, metrics = rl.policy_loss(logp, old, adv, mask)
    assert float(count) == 5
    assert float(loss_sum) == pytest.approx(-1.2 - 0.5 + 0.8 + 1.5 - 2.2, abs=1e-5)
    assert float(metrics["pg_clipfrac"]) == 2
    d = np.log([1.5, 0.5, 0.5, 1.5, 1.1])
    assert float(metrics["ppo_kl"]) == pytest.approx(float(np.sum(0.5 * d**2)), rel=1e-5)
    # Clip-higher: with clip_high 0.6 the first token (ratio 1.5 < 1.6) is no longer clipped.
    loss_sum, _, metrics = rl.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert float(metrics["pg_clipfrac"]) == 1
    assert float(loss_sum) == pytest.approx(-1.5 - 0.5 + 0.8 + 1.5 - 2.2, abs=1e-5)


def test_value_loss_hand_computed():
    # clip 0.5. v, v_old, R -> 0.5 * max((v - R)^2, (clip(v, v_old +- 0.5) - R)^2):
    #   2.0, 1.0, 2.0 -> 0.5 * max(0, (1.5 - 2)^2) = 0.125
    #   1.2, 1.0, 0.0 -> 0.5 * max(1.44, 1.44)     = 0.72
    #   0.0, 1.0, 0.0 -> 0.5 * max(0, 0.25)         = 0.125
    #   9.0, 0.0, 0.0 (masked)                       ignored
    values = jnp.array([[2.0, 1.2, 0.0, 9.0]])
    old = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    returns = jnp.array([[2.0, 0.0, 0.0, 0.0]])
    loss_sum, count = rl.value_loss(values, old, returns, jnp.array([[1, 1, 1, 0]]), clip=0.5)
    assert float(count) == 3
    assert float(loss_sum) == pytest.approx(0.125 + 0.72 + 0.125, abs=1e-6)


def test_actor_loss_composition_and_kl_sign():
    # loss = pg + kl_coef * kl - entropy_coef * H; upstream: pg - kl_coef * kl - entropy_coef * H.
    # On-policy (ratio 1), A = [1, -2] -> pg = -1 + 2 = 1; logp - ref = [0.5, -1]:
    #   low_var_kl = [0.1065307, 0.7182818] -> 0.8248125; H = [2, 3] -> 5.
    logp = jnp.array([[-1.0, -2.0, -7.0]])
    ref = jnp.array([[-1.5, -1.0, 0.0]])
    adv = jnp.array([[1.0, -2.0, 5.0]])
    entropy = jnp.array([[2.0, 3.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    config = rl.LossConfig(entropy_coef=0.1, kl_coef=0.5)
    total, count, metrics = rl.ppo_actor_loss(logp, logp, ref, adv, mask, entropy, config)
    assert float(count) == 2
    assert float(total) == pytest.approx(1.0 + 0.5 * 0.8248125 - 0.1 * 5.0, abs=1e-5)
    assert float(metrics["kl_loss"]) == pytest.approx(0.8248125, abs=1e-5)
    assert float(metrics["entropy"]) == pytest.approx(5.0)
    assert float(metrics["pg_loss"]) == pytest.approx(1.0)
    assert float(metrics["loss"]) == pytest.approx(float(total))
    upstream = dataclasses.replace(config, upstream_kl_sign=True)
    total_up, _, _ = rl.ppo_actor_loss(logp, logp, ref, adv, mask, entropy, upstream)
    assert float(total_up) == pytest.approx(1.0 - 0.5 * 0.8248125 - 0.1 * 5.0, abs=1e-5)
    # The KL is still reported, but not in the loss, when use_kl_loss is False.
    no_kl = dataclasses.replace(config, use_kl_loss=False)
    total_no, _, metrics = rl.ppo_actor_loss(logp, logp, ref, adv, mask, entropy, no_kl)
    assert float(total_no) == pytest.approx(1.0 - 0.5, abs=1e-5)
    assert float(metrics["kl_loss"]) == pytest.approx(0.8248125, abs=1e-5)
    with pytest.raises(ValueError, match="ref_logp is None"):
        rl.ppo_actor_loss(logp, logp, None, adv, mask, entropy, config)
    with pytest.raises(ValueError, match="entropy is None"):
        rl.ppo_actor_loss(logp, logp, ref, adv, mask, None, config)


def test_loss_config_validation():
    with pytest.raises(ValueError, match=r"unknown kl_estimator 'kl3'.*'low_var_kl'"):
        rl.LossConfig(kl_estimator="kl3")
    with pytest.raises(ValueError, match="entropy_coef must be >= 0, got -0.001"):
        rl.LossConfig(entropy_coef=-0.001)
    with pytest.raises(ValueError, match="kl_coef must be >= 0, got nan"):
        rl.LossConfig(kl_coef=float("nan"))
    with pytest.raises(ValueError, match=r"clip_low must be in \[0, 1\), got 1.0"):
        rl.LossConfig(clip_low=1.0)
    with pytest.raises(ValueError, match="value_clip must be > 0, got 0"):
        rl.LossConfig(value_clip=0)
    with pytest.raises(ValueError, match=r"unknown KL estimator 'nope'"):
        rl.kl_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), "nope")


def test_actor_loss_gradient_is_exactly_zero_off_the_mask():
    rng = np.random.default_rng(1)
    shape = (3, 8)
    mask = jnp.asarray(rng.random(shape) < 0.5, jnp.float32).at[:, 0].set(0.0).at[:, 1].set(1.0)
    off = mask == 0
    # Garbage at masked positions (as from padding / inserted tokens) must not leak.
    logp = jnp.where(off, -1e30, jnp.asarray(-rng.random(shape) * 3, jnp.float32))
    old = jnp.where(off, jnp.inf, logp + jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32))
    ref = jnp.where(off, jnp.nan, logp + jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32))
    adv = jnp.where(off, jnp.nan, jnp.asarray(rng.normal(size=shape), jnp.float32))
    entropy = jnp.where(off, jnp.inf, jnp.asarray(rng.random(shape), jnp.float32))
    config = rl.LossConfig(entropy_coef=0.01, kl_coef=0.1)

    def loss(logp, entropy):
        total, count, _ = rl.ppo_actor_loss(logp, old, ref, adv, mask, entropy, config)
        return total / count

    g_logp, g_ent = jax.grad(loss, argnums=(0, 1))(logp, entropy)
    assert np.isfinite(float(loss(logp, entropy)))
    assert np.isfinite(g_logp).all() and np.isfinite(g_ent).all()
    np.testing.assert_array_equal(g_logp[off], 0.0)
    np.testing.assert_array_equal(g_ent[off], 0.0)
    assert (g_logp[~off] != 0).all()
    np.testing.assert_allclose(g_ent[~off], -0.01 / float(mask.sum()), rtol=1e-6)


# Toy categorical policy: a logits vector, tokens sampled from it, no model.
VOCAB = 6
REF_LOGITS = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5, -0.5])
START_LOGITS = jnp.array([-1.0, 0.5, 2.0, 0.0, -2.0, 1.0])


def exact_kl(logits, ref_logits):
    p = jax.nn.softmax(logits)
    return float(jnp.sum(p * (jax.nn.log_softmax(logits) - jax.nn.log_softmax(ref_logits))))


@pytest.mark.parametrize("upstream_sign", [False, True])
def test_kl_loss_pulls_toward_reference(upstream_sign):
    tokens = jax.random.categorical(jax.random.key(0), START_LOGITS, shape=(32, 64))
    mask = jnp.ones(tokens.shape)
    ref_logp = jax.nn.log_softmax(REF_LOGITS)[tokens]
    config = rl.LossConfig(entropy_coef=0.0, kl_coef=1.0, upstream_kl_sign=upstream_sign)

    def loss(logits):
        logp = jax.nn.log_softmax(logits)[tokens]
        # Only the KL term: zero advantages, on-policy old log-probs.
        total, count, _ = rl.ppo_actor_loss(logp, jax.lax.stop_gradient(logp), ref_logp,
                                            jnp.zeros(tokens.shape), mask, None, config)
        return total / count

    before = exact_kl(START_LOGITS, REF_LOGITS)
    after = exact_kl(START_LOGITS - 0.5 * jax.grad(loss)(START_LOGITS), REF_LOGITS)
    if upstream_sign:
        assert after > before + 0.05  # upstream's sign drives the policy away
    else:
        assert after < before - 0.05


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_policy_gradient_step_moves_sampled_token(advantage):
    tokens = jnp.array([[2, 4]])
    mask = jnp.array([[0.0, 1.0]])  # only token 4 was sampled by the policy
    config = rl.LossConfig(entropy_coef=0.0, use_kl_loss=False)

    def loss(logits):
        logp = jax.nn.log_softmax(logits)[tokens]
        total, count, _ = rl.ppo_actor_loss(logp, jax.lax.stop_gradient(logp), None,
                                            jnp.full(tokens.shape, advantage), mask, None, config)
        return total / count

    new_logits = START_LOGITS - 0.1 * jax.grad(loss)(START_LOGITS)
    before = float(jax.nn.log_softmax(START_LOGITS)[4])
    after = float(jax.nn.log_softmax(new_logits)[4])
    assert (after > before) if advantage > 0 else (after < before)


def test_micro_batches_sum_to_the_full_batch_token_mean():
    rng = np.random.default_rng(2)
    shape = (6, 10)
    # Rows with very different token counts, so a mean of micro-batch means would be wrong.
    mask = jnp.asarray(rng.random(shape) < np.linspace(0.1, 0.95, 6)[:, None], jnp.float32)
    mask = mask.at[:, 1].set(1.0)
    logp = jnp.asarray(-rng.random(shape) * 2, jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32)
    ref = logp + jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32)
    adv = jnp.asarray(rng.normal(size=shape), jnp.float32)
    entropy = jnp.asarray(rng.random(shape), jnp.float32)
    config = rl.LossConfig()

    def parts(rows):
        return rl.ppo_actor_loss(logp[rows], old[rows], ref[rows], adv[rows], mask[rows],
                                 entropy[rows], config)

    full_sum, full_count, full_metrics = parts(slice(None))
    a_sum, a_count, a_metrics = parts(slice(0, 2))
    b_sum, b_count, b_metrics = parts(slice(2, 6))
    assert float(a_count + b_count) == float(full_count) == float(mask.sum())
    full_mean = float(full_sum / full_count)
    assert float((a_sum + b_sum) / (a_count + b_count)) == pytest.approx(full_mean, rel=1e-6)
    for key, value in full_metrics.items():
        assert float(a_metrics[key] + b_metrics[key]) == pytest.approx(float(value), rel=1e-5,
                                                                        abs=1e-6)
    # The per-micro-batch mean average is not the token mean here (the test can fail).
    assert abs(float((a_sum / a_count + b_sum / b_count) / 2) - full_mean) > 1e-3
    # Same for the critic loss and the entropy / KL pairs.
    v, v_old, ret = adv, adv + 0.3, adv - 0.2
    vs, vc = rl.value_loss(v, v_old, ret, mask)
    va = rl.value_loss(v[:2], v_old[:2], ret[:2], mask[:2])
    vb = rl.value_loss(v[2:], v_old[2:], ret[2:], mask[2:])
    assert float((va[0] + vb[0]) / (va[1] + vb[1])) == pytest.approx(float(vs / vc), rel=1e-6)


def test_everything_runs_under_jit():
    rng = np.random.default_rng(3)
    B, T, V = 4, 6, 11
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32).at[:, -1].set(1.0)
    rewards = outcome_rewards(mask, rng.random(B))
    values = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    token_kl = jnp.asarray(rng.random((B, T)), jnp.float32)
    group = jnp.array([3, 9, 3, 9])
    config = rl.AdvantageConfig(gamma=0.95, lam=0.9)
    for name, fn in rl.ADVANTAGE_ESTIMATORS.items():
        kwargs = dict(group_ids=group, values=values, kl_penalty=token_kl, config=config)
        jitted = jax.jit(fn, static_argnames="config")(rewards, mask, **kwargs)
        eager = fn(rewards, mask, **kwargs)
        for j, e in zip(jitted, eager, strict=True):
            np.testing.assert_allclose(j, e, rtol=1e-5, atol=1e-6, err_msg=name)

    logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    logp = jax.jit(models.shifted_logprobs)(logits, tokens)
    np.testing.assert_allclose(logp, models.shifted_logprobs(logits, tokens), atol=1e-6)
    jax.jit(models.token_logprobs)(logits, tokens)
    entropy = jax.jit(models.entropy_from_logits)(logits)
    for name in rl.KL_ESTIMATORS:
        jax.jit(rl.kl_loss, static_argnames="estimator")(logp, logp + 0.1, mask, estimator=name)
    jax.jit(rl.entropy_loss)(entropy, mask)
    jax.jit(rl.value_loss)(values, values + 0.1, values - 0.1, mask)
    jax.jit(rl.policy_loss)(logp, logp - 0.1, values, mask)
    jax.jit(rl.masked_whiten)(values, mask)
    loss_config = rl.LossConfig()
    actor = jax.jit(rl.ppo_actor_loss, static_argnames="config")
    jitted = actor(logp, logp - 0.1, logp + 0.1, values, mask, entropy, config=loss_config)
    eager = rl.ppo_actor_loss(logp, logp - 0.1, logp + 0.1, values, mask, entropy, loss_config)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-5)

    def total(logits):
        lp = models.shifted_logprobs(logits, tokens)
        s, c, _ = rl.ppo_actor_loss(lp, jax.lax.stop_gradient(lp), lp + 0.1, values, mask,
                                    models.entropy_from_logits(logits), loss_config)
        return s / c

    assert np.isfinite(jax.jit(jax.grad(total))(logits)).all()
