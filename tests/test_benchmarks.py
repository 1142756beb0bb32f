"""The update benchmarks run the trainer's own functions: they must keep running as the trainer's
signatures change (a tiny model here; the benchmarks load SmolLM2-135M)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from rl_toy import toy_batch, toy_config

from benchmarks import train_step as train_step_bench
from benchmarks import update_phase
from zerosearch_jax import models
from zerosearch_jax.rl import train_step as ts


def test_train_step_benchmark_times_the_trainers_update():
    config = toy_config()
    params = models.init_params(config, 0)
    r = train_step_bench.time_update(config, params, 2, 16, "bfloat16", steps=2)
    assert r["step_s"] > 0 and r["compile_s"] > 0


def test_update_phase_benchmark_times_each_layout():
    config = toy_config()
    params = jax.tree.map(lambda x: x.astype(jnp.float32), models.init_params(config, 0))
    batch, _ = toy_batch(config, params, jax.random.key(0))
    batch["prompt_length"] = np.int32(6)
    packed = ts.UpdateConfig(advantage_estimator="grpo", micro_batch_size=1, pack_length=40,
                             remat=False)
    p = update_phase.time_phase(packed, config, params, batch, repeats=1)
    u = update_phase.time_phase(dataclasses.replace(packed, pack_length=0, micro_batch_size=4),
                                config, params, batch, repeats=1)
    B, T = batch["tokens"].shape
    assert u["slots"] == B * T and u["padding"] == 0.0  # toy rows are all real tokens
    # Packed, a group's 5 shared prompt tokens are computed once in its row: 4 rows of 40
    # slots, each a group's 5 + 4 x 7 tokens.
    assert p["slots"] == 4 * 40
    assert round(p["slots"] * (1 - p["padding"])) == 4 * (5 + 4 * 7) < B * T
    assert min(p["score_s"], p["update_s"], u["score_s"], u["update_s"]) > 0
