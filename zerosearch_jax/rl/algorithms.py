"""RL algorithm core: advantage estimators, KL estimators and the actor / critic losses.

Pure, jit-friendly functions on [B, T] arrays (B trajectories, T = prompt + response tokens,
laid out as in `agent.RolloutBatch`). Each variant is one small function with its equation in
the docstring, chosen by name from a registry (`ADVANTAGE_ESTIMATORS`, `KL_ESTIMATORS`); the
configs are frozen dataclasses, validated when built and static under `jax.jit`.

Conventions (docs/method.md §7):
- `mask` / `response_mask` is the rollout's `loss_mask`: 1 exactly on tokens the policy sampled.
  Prompt, padding and everything the environment inserted (information blocks, invalid-action
  messages) are 0 and take no part in any loss, entropy or KL term, nor in any statistic.
  Inputs at mask-0 positions may hold anything (even inf/nan): they are replaced before any
  arithmetic, so values and gradients there are exactly 0.
- `token_rewards` holds the scalar episode reward on the last policy token, 0 elsewhere.
- Log-probs are indexed by the token's own position: entry t is log p(tokens[t] | tokens[<t])
  (`models.shifted_logprobs` builds them from logits, `training.policy_logprobs` from the
  model).
- Advantages are computed once on the whole rollout batch (GRPO groups and whitening use batch
  statistics); losses return (sum, count) so a step split into micro-batches, or sharded over
  data-parallel devices, divides once by the total count and gets the exact token mean.

Sequential estimators (`gae`, `reinforce_pp`) run over the *subsequence of policy tokens*: the
"next" value / advantage / return of a policy token is that of the next policy token of its row,
skipping the observation tokens in between (as veRL's multi-turn GAE does), and 0 after the
last one. A multi-turn episode is thus treated as one decision sequence; the inserted documents
are part of the environment's transition, not actions.

The actor loss is

    loss = pg + kl_coef * kl - entropy_coef * entropy      (token means over the mask)

Upstream ZeroSearch subtracts the KL term (rewarding drift from the reference); this project
adds it, and `LossConfig(upstream_kl_sign=True)` reproduces upstream's sign for comparisons.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from zerosearch_jax.settings import lookup

Array = jax.Array

# Log-ratios are clamped before `exp` (as veRL does) so a garbage or extreme log-prob can give
# neither inf values nor nan gradients; |log ratio| <= 20 is never reached by a sane policy.
_MAX_LOG_RATIO = 20.0
_WHITEN_EPS = 1e-8  # veRL's masked_whiten constant.


def _as_mask(mask: Array) -> Array:
    return jnp.asarray(mask).astype(jnp.float32)


def _where_mask(x: Array, mask: Array) -> Array:
    """x at mask-1 positions, 0 elsewhere (a select, so masked garbage never leaks, not even
    into gradients as nan = 0 * inf would)."""
    return jnp.where(mask > 0, x, jnp.zeros_like(x))


def _masked_sum(x: Array, mask: Array) -> Array:
    return jnp.sum(_where_mask(x, mask))


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """sum(x * mask) / sum(mask) over `axis` (all by default); 0 where the mask is empty."""
    mask = _as_mask(mask)
    total = jnp.sum(_where_mask(x, mask), axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of x over the mask-1 entries (scalar); Bessel-corrected by default, as veRL."""
    mask = _as_mask(mask)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(x - mean) * rsqrt(var + 1e-8) with mean / unbiased var over the mask-1 entries of the
    whole array; `shift_mean=False` adds the mean back. Entries outside the mask are 0."""
    mask = _as_mask(mask)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return _where_mask(whitened, mask)


# ---------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """Hyper-parameters of the advantage estimators (docs/method.md §7 defaults)."""

    gamma: float = 1.0  # discount (gae, reinforce_pp).
    lam: float = 1.0  # GAE lambda (gae).
    whiten: bool = True  # whiten token advantages over the batch's mask (gae, reinforce_pp).
    eps: float = 1e-6  # GRPO: (r - mean) / (std + eps).

    def __post_init__(self):
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not self.eps > 0.0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")


class AdvantageEstimator(Protocol):
    def __call__(self, token_rewards: Array, response_mask: Array, *,
                 group_ids: Array | None = None, values: Array | None = None,
                 kl_penalty: Array | None = None,
                 config: AdvantageConfig = AdvantageConfig()) -> tuple[Array, Array]: ...


def _episode_scores(token_rewards: Array) -> Array:
    """[B, T] -> [B]: the scalar episode reward (upstream sums the token rewards of a row)."""
    return jnp.sum(token_rewards.astype(jnp.float32), axis=-1)


def _kl_penalized(token_rewards: Array, kl_penalty: Array | None) -> Array:
    """r_t - kl_penalty_t (veRL's KL-in-reward: the penalty is kl_coef * KL_t, scaled by the
    caller, whose loss config holds the one kl_coef); the rewards unchanged when None."""
    rewards = token_rewards.astype(jnp.float32)
    if kl_penalty is None:
        return rewards
    return rewards - kl_penalty.astype(jnp.float32)


def _masked_gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float) -> Array:
    """GAE over the mask-1 subsequence of each row -> advantages [B, T] (0 off the mask).

        delta_t = r_t + gamma * V_next(t) - V_t
        A_t     = delta_t + gamma * lam * A_next(t)

    where next(t) is the next mask-1 position of the row (V, A = 0 past the last one). A reverse
    `lax.scan` carries the last policy token's (V, A) through mask-0 positions unchanged, so
    their rewards and values are never read. With values = 0 and lam = 1 this is the discounted
    return G_t = r_t + gamma * G_next(t).
    """

    def step(carry, xs):
        next_value, next_adv = carry
        reward, value, valid = xs
        adv = reward + gamma * next_value - value + gamma * lam * next_adv
        carry = (jnp.where(valid, value, next_value), jnp.where(valid, adv, next_adv))
        return carry, jnp.where(valid, adv, 0.0)

    valid = _as_mask(mask) > 0
    rewards = _where_mask(rewards.astype(jnp.float32), valid)
    values = _where_mask(values.astype(jnp.float32), valid)
    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    # Scan over time: [B, T] -> [T, B], newest step first.
    _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True)
    return adv.T


def reinforce_advantages(token_rewards: Array, response_mask: Array, *,
                         group_ids: Array | None = None, values: Array | None = None,
                         kl_penalty: Array | None = None,
                         config: AdvantageConfig = AdvantageConfig()) -> tuple[Array, Array]:
    """REINFORCE (Williams 1992), the ZeroSearch default: no baseline, no whitening.

        A_t = G_t = R = sum_t r_t      on every response token (mask 1), 0 elsewhere

    token_rewards, response_mask [B, T] -> (advantages, returns) [B, T] float32. group_ids,
    values, kl_penalty and config are unused (the KL term lives in the loss).
    """
    mask = _as_mask(response_mask)
    adv = _where_mask(jnp.broadcast_to(_episode_scores(token_rewards)[:, None], mask.shape), mask)
    return adv, adv


def grpo_advantages(token_rewards: Array, response_mask: Array, *,
                    group_ids: Array | None = None, values: Array | None = None,
                    kl_penalty: Array | None = None,
                    config: AdvantageConfig = AdvantageConfig()) -> tuple[Array, Array]:
    """GRPO (Shao et al. 2024, DeepSeekMath) outcome advantages, normalized within a prompt.

        A_i = (R_i - mean_g(R)) / (std_g(R) + eps)    on every response token of row i

    where g = group_ids[i] (rows sampled from the same prompt) and std is unbiased (torch.std).
    A group of one row has no statistics: as veRL, mean 0 and std 1, so A_i = R_i / (1 + eps).

    token_rewards, response_mask [B, T]; group_ids [B] int (any values, not necessarily
    0..B-1) -> (advantages, returns) [B, T] float32, both the same normalized score.
    """
    if group_ids is None:
        raise ValueError("grpo needs group_ids ([B] prompt ids), got None")
    mask = _as_mask(response_mask)
    scores = _episode_scores(token_rewards)  # [B]
    # Same-group indicator [B, B]: works for arbitrary ids under jit; B is a few hundred.
    same = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)
    size = jnp.sum(same, axis=1)
    mean = same @ scores / size
    # Row j's deviation from its own group's mean; summed within each group (two-pass variance).
    var = same @ jnp.square(scores - mean) / jnp.maximum(size - 1.0, 1.0)
    single = size < 2
    mean = jnp.where(single, 0.0, mean)
    std = jnp.where(single, 1.0, jnp.sqrt(var))
    normalized = (scores - mean) / (std + config.eps)
    adv = _where_mask(jnp.broadcast_to(normalized[:, None], mask.shape), mask)
    return adv, adv


def gae_advantages(token_rewards: Array, response_mask: Array, *,
                   group_ids: Array | None = None, values: Array | None = None,
                   kl_penalty: Array | None = None,
                   config: AdvantageConfig = AdvantageConfig()) -> tuple[Array, Array]:
    """PPO's GAE (Schulman et al. 2016) with a critic, over the response tokens only.

        r_t     = token_rewards_t - kl_penalty_t                (KL in the reward, if given)
        delta_t = r_t + gamma * V_next(t) - V_t
        A_t     = delta_t + gamma * lam * A_next(t)
        returns = A + V                      (before whitening; the critic's target)
        A       = whiten(A) over all mask-1 tokens of the batch   (if config.whiten)

    next(t) is the next policy token of the row (observation tokens are skipped, see the module
    docstring). token_rewards, response_mask, values, kl_penalty [B, T] -> (advantages, returns)
    [B, T] float32, 0 off the mask.
    """
    if values is None:
        raise ValueError("gae needs values ([B, T] critic values), got None")
    mask = _as_mask(response_mask)
    rewards = _kl_penalized(token_rewards, kl_penalty)
    adv = _masked_gae(rewards, values, mask, config.gamma, config.lam)
    returns = _where_mask(adv + values.astype(jnp.float32), mask)
    if config.whiten:
        adv = masked_whiten(adv, mask)
    return adv, returns


def reinforce_pp_advantages(token_rewards: Array, response_mask: Array, *,
                            group_ids: Array | None = None, values: Array | None = None,
                            kl_penalty: Array | None = None,
                            config: AdvantageConfig = AdvantageConfig()
                            ) -> tuple[Array, Array]:
    """REINFORCE++ (Hu 2025): critic-free token-level returns, normalized over the batch.

        r_t = token_rewards_t - kl_penalty_t                  (per-token KL penalty, if given)
        G_t = r_t + gamma * G_next(t)
        A   = whiten(G) over all mask-1 tokens of the batch   (if config.whiten)

    next(t) is the next policy token of the row (observation tokens are skipped; veRL instead
    resets the return at every mask-0 token, which would cut a multi-turn episode at its first
    observation). token_rewards, response_mask, kl_penalty [B, T] -> (advantages, returns)
    [B, T] float32, 0 off the mask.
    """
    mask = _as_mask(response_mask)
    rewards = _kl_penalized(token_rewards, kl_penalty)
    returns = _masked_gae(rewards, jnp.zeros_like(rewards), mask, config.gamma, 1.0)
    adv = masked_whiten(returns, mask) if config.whiten else returns
    return adv, returns


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "reinforce": reinforce_advantages,
    "grpo": grpo_advantages,
    "gae": gae_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered under `name` (one of `ADVANTAGE_ESTIMATORS`)."""
    return lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


# ---------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020): samples y ~ pi, elementwise.
# ---------------------------------------------------------------------------------------------


class KLEstimator(Protocol):
    def __call__(self, logp: Array, ref_logp: Array) -> Array: ...


def kl_k1(logp: Array, ref_logp: Array) -> Array:
    """k1 = logp - ref_logp: unbiased for KL(pi || ref), high variance, can be negative."""
    return logp - ref_logp


def kl_abs(logp: Array, ref_logp: Array) -> Array:
    """|logp - ref_logp|."""
    return jnp.abs(logp - ref_logp)


def kl_mse(logp: Array, ref_logp: Array) -> Array:
    """k2 = 0.5 * (logp - ref_logp)^2: low variance, >= 0."""
    return 0.5 * jnp.square(logp - ref_logp)


def kl_low_var(logp: Array, ref_logp: Array) -> Array:
    """k3 = clamp(exp(ref - logp) - (ref - logp) - 1, -10, 10): unbiased, low variance, >= 0.

    ZeroSearch's KL loss (veRL `low_var_kl`). ref - logp is clamped to +-20 first, which changes
    no value (the result is clamped at 10 long before) but keeps gradients finite.
    """
    log_ratio = jnp.clip(ref_logp - logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)


KL_ESTIMATORS: dict[str, KLEstimator] = {
    "k1": kl_k1,
    "abs": kl_abs,
    "mse": kl_mse,
    "low_var_kl": kl_low_var,
}


def get_kl_estimator(name: str) -> KLEstimator:
    """The KL estimator registered under `name` (one of `KL_ESTIMATORS`)."""
    return lookup(KL_ESTIMATORS, name, "KL estimator")


# ---------------------------------------------------------------------------------------------
# Losses: (sum, count) over the mask; divide once by the total count of the step.
# ---------------------------------------------------------------------------------------------


def policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array,
                clip_low: float = 0.2, clip_high: float = 0.2
                ) -> tuple[Array, Array, dict[str, Array]]:
    """PPO clipped surrogate (Schulman et al. 2017), summed over the mask.

        ratio_t = exp(logp_t - old_logp_t)
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))

    logp, old_logp, advantages, mask [B, T] -> (loss_sum, count, metric sums) with
    `pg_clipfrac` (tokens where the clipped term is the larger, as veRL) and `ppo_kl`
    (0.5 * (logp - old_logp)^2). old_logp and advantages are constants (no gradient).
    """
    mask = _as_mask(mask)
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    log_ratio = logp.astype(jnp.float32) - jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    log_ratio = _where_mask(jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO), mask)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_sum = _masked_sum(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "pg_loss": loss_sum,
        "pg_clipfrac": _masked_sum((clipped > unclipped).astype(jnp.float32), mask),
        "ppo_kl": _masked_sum(0.5 * jnp.square(jax.lax.stop_gradient(log_ratio)), mask),
    }
    return loss_sum, jnp.sum(mask), jax.lax.stop_gradient(metrics)


def entropy_loss(entropy: Array, mask: Array) -> tuple[Array, Array]:
    """(sum of the token entropies over the mask, count); entropy, mask [B, T].

    This is a bonus: the actor loss *subtracts* entropy_coef * entropy (higher entropy, lower
    loss), which keeps the policy exploring.
    """
    mask = _as_mask(mask)
    return _masked_sum(entropy.astype(jnp.float32), mask), jnp.sum(mask)


def kl_loss(logp: Array, ref_logp: Array, mask: Array,
            estimator: str = "low_var_kl") -> tuple[Array, Array]:
    """(sum of estimator(logp, ref_logp) over the mask, count); [B, T] inputs.

    Minimizing it pulls the policy toward the frozen reference (ref_logp has no gradient).
    Masked entries are zeroed before the estimator, so their value and gradient are exactly 0.
    """
    fn = get_kl_estimator(estimator)
    mask = _as_mask(mask)
    logp = _where_mask(logp.astype(jnp.float32), mask)
    ref_logp = _where_mask(jax.lax.stop_gradient(ref_logp.astype(jnp.float32)), mask)
    return _masked_sum(fn(logp, ref_logp), mask), jnp.sum(mask)


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
               clip: float = 0.5) -> tuple[Array, Array]:
    """PPO's clipped critic loss, summed over the mask.

        loss_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2)

    values, old_values, returns, mask [B, T] -> (loss_sum, count).
    """
    mask = _as_mask(mask)
    values = values.astype(jnp.float32)
    old_values = jax.lax.stop_gradient(old_values.astype(jnp.float32))
    returns = jax.lax.stop_gradient(returns.astype(jnp.float32))
    clipped = jnp.clip(values, old_values - clip, old_values + clip)
    loss = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))
    return _masked_sum(loss, mask), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Actor / critic loss hyper-parameters (docs/method.md §7 defaults)."""

    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low.
    clip_high: float = 0.2  # ratio clipped above at 1 + clip_high (> clip_low: "clip-higher").
    entropy_coef: float = 0.001  # entropy bonus, subtracted from the loss.
    kl_coef: float = 0.001  # KL-to-reference loss coefficient.
    kl_estimator: str = "low_var_kl"  # one of KL_ESTIMATORS.
    use_kl_loss: bool = True  # False for PPO with the KL in the reward instead.
    upstream_kl_sign: bool = False  # True reproduces upstream's bug: loss = pg - kl_coef * kl.
    value_clip: float = 0.5  # critic: values move at most this far from the rollout's values.

    def __post_init__(self):
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low!r}")
        for name in ("clip_high", "entropy_coef", "kl_coef"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not self.value_clip > 0.0:
            raise ValueError(f"value_clip must be > 0, got {self.value_clip!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; valid names: "
                             f"{sorted(KL_ESTIMATORS)}")


def ppo_actor_loss(logp: Array, old_logp: Array, ref_logp: Array | None, advantages: Array,
                   mask: Array, entropy: Array | None,
                   config: LossConfig = LossConfig()) -> tuple[Array, Array, dict[str, Array]]:
    """The actor's loss, every term a sum over the same mask:

        loss_t = pg_t + s * kl_coef * kl_t - entropy_coef * H_t,   s = +1 (-1 if upstream sign)

    logp, old_logp, ref_logp, advantages, mask, entropy [B, T] -> (loss_sum, count, metric
    sums: loss, pg_loss, pg_clipfrac, ppo_kl, plus entropy / kl_loss when given). The caller
    sums the pairs over micro-batches / devices and divides by the total count once. ref_logp
    may be None when the KL loss is off (use_kl_loss False or kl_coef 0), entropy when
    entropy_coef is 0; when given they are always reported (the KL also with use_kl_loss False,
    e.g. PPO with the KL in the reward).
    """
    loss_sum, count, metrics = policy_loss(logp, old_logp, advantages, mask,
                                           config.clip_low, config.clip_high)
    metrics = dict(metrics)
    if entropy is not None:
        entropy_sum, _ = entropy_loss(entropy, mask)
        loss_sum = loss_sum - config.entropy_coef * entropy_sum
        metrics["entropy"] = jax.lax.stop_gradient(entropy_sum)
    elif config.entropy_coef > 0:
        raise ValueError(f"entropy_coef is {config.entropy_coef} but entropy is None")
    if ref_logp is not None:
        kl_sum, _ = kl_loss(logp, ref_logp, mask, config.kl_estimator)
        if config.use_kl_loss:
            sign = -1.0 if config.upstream_kl_sign else 1.0
            loss_sum = loss_sum + sign * config.kl_coef * kl_sum
        metrics["kl_loss"] = jax.lax.stop_gradient(kl_sum)
    elif config.use_kl_loss and config.kl_coef > 0:
        raise ValueError(f"use_kl_loss is True (kl_coef {config.kl_coef}) but ref_logp is None")
    metrics["loss"] = jax.lax.stop_gradient(loss_sum)
    return loss_sum, count, metrics
