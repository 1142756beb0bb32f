"""The jitted RL update: learning on a toy task, exact micro-batching, skipped bad steps,
and one train step sharded over 8 fake devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.rl_toy import toy_batch, toy_config, train_toy
from zerosearch_jax import models, training
from zerosearch_jax.rl import train_step as ts


@pytest.mark.parametrize("estimator", ["reinforce", "grpo", "gae", "reinforce_pp"])
def test_mean_reward_rises_on_the_toy_task(estimator):
    """Fails if the update's sign, masking or normalization is wrong: the share of target tokens
    starts near 1/16 and must clearly rise within 25 steps."""
    curve, _, _ = train_toy(estimator, steps=25)
    start, end = np.mean(curve[:5]), np.mean(curve[-5:])
    assert end > start + 0.3 and end > 0.45, (estimator, curve)


def _one_update(micro_batch_size, batch, params, estimator="grpo"):
    config = toy_config()
    uc = ts.UpdateConfig(advantage_estimator=estimator, micro_batch_size=micro_batch_size,
                         num_minibatches=2, remat=False)
    # Plain SGD: the update is linear in the gradient, so summation-order noise stays at float
    # epsilon (Adam's first step is ~lr * sign(g) and would flip on near-zero gradients).
    opt = optax.sgd(0.5)
    critic_opt = optax.sgd(0.5) if uc.uses_critic else None
    fns = ts.make_train_fns(config, uc, opt, critic_opt)
    critic = ts.init_critic(config, params, jax.random.key(0)) if uc.uses_critic else None
    state = fns.init_state(jax.tree.map(jnp.copy, params), critic)
    layout = fns.plan(batch["attention_mask"])
    scored = fns.score(state.params, params, state.critic_params, batch, layout)
    return fns.update(state, scored, layout)


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_micro_batch_size_does_not_change_the_update(estimator):
    config = toy_config()
    params = models.init_params(config, 1)
    batch, _ = toy_batch(config, params, jax.random.key(0))
    s2, m2 = _one_update(2, batch, params, estimator)
    s8, m8 = _one_update(8, batch, params, estimator)
    for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s8.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    np.testing.assert_allclose(float(m2["loss"]), float(m8["loss"]), atol=1e-6)
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(s2.params), jax.tree.leaves(params), strict=True))
    assert moved > 1e-4  # the update did something


def test_cpu_compiler_options_keep_the_update(monkeypatch):
    """The training programs' CPU code-generation level (`training.compiler_options`) is a
    speed choice only: the update with it matches the update at XLA's default to float
    tolerance; XLA_FLAGS naming the level turns it off."""
    assert training.compiler_options() == training.CPU_TRAINING_COMPILER_OPTIONS
    config = toy_config()
    params = models.init_params(config, 3)
    batch, _ = toy_batch(config, params, jax.random.key(1))
    tuned, tuned_metrics = _one_update(2, batch, params)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert training.compiler_options() is None
    default, default_metrics = _one_update(2, batch, params)
    np.testing.assert_allclose(float(tuned_metrics["loss"]), float(default_metrics["loss"]),
                               rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(tuned.params), jax.tree.leaves(default.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_nonfinite_step_is_skipped():
    config = toy_config()
    params = models.init_params(config, 2)
    batch, _ = toy_batch(config, params, jax.random.key(0))
    batch["rewards"] = np.where(batch["rewards"] != 0, np.nan, 0.0).astype(np.float32)
    state, metrics = _one_update(4, batch, params)
    assert float(metrics["nonfinite"]) == 2  # both mini-batches skipped
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == 1


def test_bad_update_config():
    with pytest.raises(ValueError, match="unknown advantage_estimator 'ppo'"):
        ts.UpdateConfig(advantage_estimator="ppo")
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        ts.UpdateConfig(micro_batch_size=3).check_batch_size(16)
    with pytest.raises(ValueError, match="needs a critic optimizer"):
        ts.make_train_fns(toy_config(), ts.UpdateConfig(advantage_estimator="gae"),
                          training.make_optimizer(1e-3, 1))


def test_sharded_step_on_8_devices_matches_one_device():
    """Runs tests/mesh_check.py in a fresh process with 8 fake CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "mesh_check.py")],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "meshes agree" in proc.stdout
