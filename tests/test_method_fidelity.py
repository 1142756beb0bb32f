"""Method fidelity against upstream ZeroSearch: the RL settings a line-by-line review found
different (issue 14). Each test pins upstream's behaviour on a small hand-computed example; the
prompts, F1 and end-of-turn tests live beside their modules (test_simulator.py,
test_rewards.py)."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import default, zerosearch_qwen2_5_3b
from tests.rl_toy import toy_batch, toy_config
from zerosearch_jax import models, packing, sampling, train, training
from zerosearch_jax.rl import train_step as ts


def _paper_update_config(estimator: str) -> ts.UpdateConfig:
    return train.build_settings(zerosearch_qwen2_5_3b.get_config(estimator=estimator)).update


@pytest.mark.parametrize("estimator", ["reinforce_pp", "gae"])
def test_reinforce_pp_and_ppo_token_rewards_carry_the_k1_penalty(estimator):
    """Upstream PPO (`kl_penalty: kl`) and REINFORCE++ put -kl_coef * (logp - ref_logp) into
    every policy token's reward before the return, with no KL loss term. With gamma = lambda
    = 1 the return of token t is the sum of the penalized rewards from t to the episode's end
    (observation tokens carry nothing), for both estimators."""
    uc = _paper_update_config(estimator)
    assert uc.kl_in_reward and uc.loss.kl_estimator == "k1" and not uc.loss.use_kl_loss
    assert uc.loss.kl_coef == 0.001 and not uc.needs_old_logprobs

    config = toy_config()
    params = models.init_params(config, 0)
    # One row: prompt (2 tokens), policy tokens at 2, 3, an observation at 4, policy at 5, 6.
    tokens = np.array([[1, 4, 7, 7, 3, 7, 7]], np.int32)
    T = tokens.shape[1]
    mask = np.array([[0, 0, 1, 1, 0, 1, 1]], np.float32)
    batch = {"tokens": tokens, "attention_mask": np.ones((1, T), bool),
             "positions": np.arange(T, dtype=np.int32)[None], "loss_mask": mask,
             "rewards": np.array([[0, 0, 0, 0, 0, 0, 0.8]], np.float32),
             "group": np.zeros(1, np.int32)}
    ref, _ = training.policy_logprobs(config, params, tokens, batch["attention_mask"],
                                      batch["positions"])
    # The rollout's own log-probs stand for the current policy's (one epoch, one mini-batch).
    delta = np.array([[0, 0, 0.5, -0.2, 9.0, 0.1, 0.3]], np.float32)  # k1 where mask is 1
    batch["logprobs"] = np.asarray(ref) + delta
    critic = ts.init_critic(config, params, jax.random.key(0)) if uc.uses_critic else None
    uc = dataclasses.replace(uc, compute_dtype=None)
    out = ts.score_batch(config, uc, params, params, critic, batch,
                        packing.plan(batch["attention_mask"], 1))
    r = [0, 0, -0.001 * 0.5, 0.001 * 0.2, 0, -0.001 * 0.1, 0.8 - 0.001 * 0.3]
    expected = [sum(r[t:]) * m for t, m in enumerate(mask[0])]  # obs reward is 0 (masked)
    np.testing.assert_allclose(np.asarray(out.returns)[0], expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.token_kl)[0], delta[0] * mask[0], atol=1e-5)


def test_reinforce_and_grpo_keep_the_low_variance_kl_loss():
    for estimator in ("reinforce", "grpo"):
        uc = _paper_update_config(estimator)
        assert not uc.kl_in_reward and uc.loss.use_kl_loss
        assert uc.loss.kl_estimator == "low_var_kl"


def test_paper_configs_match_upstream():
    ppo = zerosearch_qwen2_5_3b.get_config(estimator="gae")
    assert ppo.optim.critic_warmup_ratio == 0.015 and ppo.optim.warmup_ratio == 0.285
    for estimator in ("reinforce", "grpo", "gae", "reinforce_pp"):
        assert zerosearch_qwen2_5_3b.get_config(estimator=estimator).validation.topk == 5


def test_lr_schedule_counts_rl_steps():
    """2 mini-batches x 2 epochs = 4 optimizer updates per RL step: the warm-up (50% of 10 RL
    steps) lasts 5 RL steps = 20 updates, and all updates of one RL step share a rate."""
    uc = ts.UpdateConfig(num_minibatches=2, ppo_epochs=2)
    assert uc.updates_per_step == 4
    lr = 1e-2
    opt = training.make_optimizer(lr, total_steps=10, warmup_ratio=0.5, weight_decay=0.0,
                                  grad_clip=1e9, updates_per_step=uc.updates_per_step)
    params = {"w": np.zeros((), np.float32)}
    state = opt.init(params)
    moves = []
    for _ in range(7 * 4):  # 7 RL steps
        updates, state = opt.update({"w": np.ones((), np.float32)}, state, params)
        moves.append(-float(updates["w"]))  # Adam on a constant gradient moves by ~lr_t
    per_step = np.array(moves).reshape(7, 4)
    np.testing.assert_allclose(per_step, np.repeat(
        lr * np.minimum(np.arange(7) / 5, 1.0)[:, None], 4, axis=1), rtol=1e-4, atol=1e-9)


def test_trainer_schedules_the_update_per_rl_step():
    c = default.get_config()
    c.algorithm.num_minibatches, c.algorithm.ppo_epochs = 2, 2
    assert train.build_settings(c).update.updates_per_step == 4
    # Update 8 is RL step 2 of a 5-step warm-up.
    assert float(training.lr_schedule(1.0, 10, 0.5, updates_per_step=4)(8)) == pytest.approx(0.4)


@pytest.mark.parametrize("sampler", [sampling.Temperature(0.7), sampling.TopP(0.8, 0.7)])
def test_on_policy_ratio_is_one_at_the_sampling_temperature(sampler):
    """The rollout samples at T = 0.7: the old log-probs that scoring computes (the update's
    importance-ratio denominator) equal the log-probs the rollout recorded, because both divide
    the logits by T (veRL's convention; top-p truncation is not part of the policy's
    log-prob). The trainer passes rollout.temperature into the update."""
    config = toy_config()
    params = models.init_params(config, 3)
    batch, _ = toy_batch(config, params, jax.random.key(0), sampler=sampler)
    uc = ts.UpdateConfig(temperature=0.7, ppo_epochs=2, micro_batch_size=4, remat=False)
    out = ts.score_batch(config, uc, params, params, None, batch,
                        packing.plan(batch["attention_mask"], 4))
    mask = batch["loss_mask"] > 0
    ratio = np.exp(np.asarray(out.old_logprobs) - batch["logprobs"])[mask]
    np.testing.assert_allclose(ratio, 1.0, atol=2e-4)
    c = default.get_config()
    c.rollout.temperature = 0.7
    assert train.build_settings(c).update.temperature == 0.7


def test_the_no_mask_ablation_trains_on_inserted_tokens():
    """`mask_observations=False` (the paper's loss-masking ablation): the loss covers every real
    token from the first policy token on, the observation included, and not the prompt or the
    padding; the default covers the policy's tokens only."""
    config = toy_config()
    params = models.init_params(config, 0)
    # Row 0: pad, prompt (2), policy 2, observation 2, policy 1, pad. Row 1: no policy token.
    tokens = np.array([[0, 1, 4, 7, 7, 3, 3, 7, 0], [0, 1, 4, 0, 0, 0, 0, 0, 0]], np.int32)
    attention = tokens > 0
    loss = np.array([[0, 0, 0, 1, 1, 0, 0, 1, 0], [0] * 9], np.float32)
    batch = {"tokens": tokens, "attention_mask": attention,
             "positions": np.maximum(np.cumsum(attention, 1) - 1, 0).astype(np.int32),
             "loss_mask": loss, "rewards": loss * 0.5, "group": np.zeros(2, np.int32),
             "logprobs": np.zeros(tokens.shape, np.float32)}
    layout = packing.plan(attention, 2)
    for masked, expected in ((True, loss[0]), (False, [0, 0, 0, 1, 1, 1, 1, 1, 0])):
        uc = ts.UpdateConfig(advantage_estimator="grpo", micro_batch_size=2, remat=False,
                             mask_observations=masked)
        out = ts.score_batch(config, uc, params, params, None, batch, layout)
        np.testing.assert_array_equal(np.asarray(out.loss_mask), [expected, [0] * 9])
    uc = ts.UpdateConfig(mask_observations=False, kl_in_reward=True)
    assert uc.needs_old_logprobs  # the rollout has no log-probs of the inserted tokens
    c = default.get_config()
    c.algorithm.mask_observations = False
    assert not train.build_settings(c).update.mask_observations
