"""A toy RL task for the update: reward = share of generated tokens equal to a target token."""

import jax
import jax.numpy as jnp
import numpy as np

from zerosearch_jax import models, sampling, training
from zerosearch_jax.rl import train_step as ts

TARGET = 7
GEN = 6


def toy_config():
    return models.tiny_config("llama", vocab_size=16, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def toy_batch(config, params, rng, prompts_per_step=4, samples=4,
              sampler=sampling.Temperature(1.0)):
    """Samples GEN tokens after each prompt and packs a RolloutBatch-like dict.

    Between prompt and generation sit three inserted tokens (loss mask 0), like documents.
    """
    prompts = [[1, 4 + i % 3, 5, 3, 3, 3] for i in range(prompts_per_step)]
    rows = [p for p in prompts for _ in range(samples)]
    out = sampling.generate(config, params, rows, sampler,
                            max_new_tokens=GEN, rng=rng, stop=sampling.StopConditions(pad_id=0))
    P = len(rows[0])
    tokens = np.concatenate([np.array(rows), out["tokens"]], axis=1).astype(np.int32)
    B, T = tokens.shape
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, P:] = 1.0
    reward = (out["tokens"] == TARGET).mean(axis=1).astype(np.float32)
    rewards = np.zeros((B, T), np.float32)
    rewards[:, -1] = reward
    logprobs = np.zeros((B, T), np.float32)
    logprobs[:, P:] = out["logprobs"]
    batch = {"tokens": tokens, "attention_mask": np.ones((B, T), bool),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "loss_mask": loss_mask, "logprobs": logprobs, "rewards": rewards,
             "group": np.repeat(np.arange(prompts_per_step), samples).astype(np.int32)}
    return batch, float(reward.mean())


def train_toy(estimator: str, steps: int, lr: float = 3e-3, seed: int = 0, **uc_kwargs):
    """Returns the mean reward per step."""
    config = toy_config()
    params = models.init_params(config, seed)
    uc = ts.UpdateConfig(advantage_estimator=estimator, micro_batch_size=4, remat=False,
                         **uc_kwargs)
    opt = training.make_optimizer(lr, steps, weight_decay=0.0)
    critic_opt = (training.make_optimizer(lr * 3, steps, weight_decay=0.0) if uc.uses_critic
                  else None)
    fns = ts.make_train_fns(config, uc, opt, critic_opt)
    critic = ts.init_critic(config, params, jax.random.key(seed)) if uc.uses_critic else None
    state = fns.init_state(params, critic)
    ref = jax.tree.map(jnp.copy, params)
    curve = []
    for step in range(steps):
        batch, reward = toy_batch(config, state.params, jax.random.key(1000 + step))
        curve.append(reward)
        layout = fns.plan(batch["attention_mask"], seed=step)
        scored = fns.score(state.params, ref, state.critic_params, batch, layout)
        state, metrics = fns.update(state, scored, layout)
        assert float(metrics["nonfinite"]) == 0
    return curve, state, metrics
