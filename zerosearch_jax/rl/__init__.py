"""RL for the search agent: advantage estimators, KL estimators and losses (pure JAX).

    estimator = rl.get_advantage_estimator("grpo")
    adv, _ = estimator(batch.rewards, batch.loss_mask, group_ids=batch.group)
    loss_sum, count, metrics = rl.ppo_actor_loss(logp, old_logp, ref_logp, adv,
                                                 batch.loss_mask, entropy, rl.LossConfig())
"""

from zerosearch_jax.rl.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    AdvantageConfig,
    AdvantageEstimator,
    KLEstimator,
    LossConfig,
    entropy_loss,
    gae_advantages,
    get_advantage_estimator,
    get_kl_estimator,
    grpo_advantages,
    kl_abs,
    kl_k1,
    kl_loss,
    kl_low_var,
    kl_mse,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    ppo_actor_loss,
    reinforce_advantages,
    reinforce_pp_advantages,
    value_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "AdvantageConfig", "AdvantageEstimator",
    "KLEstimator", "LossConfig", "entropy_loss", "gae_advantages", "get_advantage_estimator",
    "get_kl_estimator", "grpo_advantages", "kl_abs", "kl_k1", "kl_loss", "kl_low_var", "kl_mse",
    "masked_mean", "masked_var", "masked_whiten", "policy_loss", "ppo_actor_loss",
    "reinforce_advantages", "reinforce_pp_advantages", "value_loss",
]
