"""The benchmarks run the package's own functions: they must keep running as its signatures
change (a tiny model here; the benchmarks load SmolLM2-135M), and decode.py's random-weight
shapes must stay the models they name."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_toy import toy_batch, toy_config

from benchmarks import decode, update_phase
from benchmarks import train_step as train_step_bench
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


def test_decode_benchmarks_random_shapes_are_the_published_models(smollm2_gguf):
    """`decode.py --model random:<shape>` times a model of the named shape: the SmolLM2 shape
    is the embedded model's architecture (read from its GGUF), the Qwen2.5-3B one has its
    published parameter count (3.09B), and an unknown shape is a clear error."""
    embedded = models.GGUFSource(smollm2_gguf).model_config()
    shaped = models.ModelConfig.from_hf_dict(decode.RANDOM_SHAPES["smollm2-135m"])
    assert shaped.rms_norm_eps == pytest.approx(embedded.rms_norm_eps)  # float32 in the GGUF
    same = ("bos_token_id", "eos_token_ids", "pad_token_id", "max_position_embeddings",
            "rms_norm_eps")
    assert dataclasses.replace(shaped, **{k: getattr(embedded, k) for k in same}) == embedded
    qwen = models.ModelConfig.from_hf_dict(decode.RANDOM_SHAPES["qwen2.5-3b"])
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(models.param_shapes(qwen)))
    assert round(count / 1e9, 2) == 3.09 and qwen.qkv_bias and qwen.tie_word_embeddings
    with pytest.raises(SystemExit, match="unknown shape 'gpt-9'"):
        decode.load_model("random:gpt-9")


def test_device_checks_script_runs_at_a_tiny_shape(tmp_path, smollm2_tokenizer):
    """benchmarks/device_checks.sh, prepared for an accelerator machine, runs as it will there
    (a tokenizer directory, scripted policy, random simulator, JSON figures in $OUT) at a
    two-layer shape on the CPU: a break in it would otherwise show only when a device is lent."""
    smollm2_tokenizer.save_pretrained(str(tmp_path / "tok"))
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), SHAPES="tiny", BATCHES="2", REPEATS="1",
               JAX_PLATFORMS="cpu", TOKENIZER=str(tmp_path / "tok"), PYTHON=sys.executable)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["bash", os.path.join(root, "benchmarks", "device_checks.sh")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device_checks: exit 0" in (out / "device_checks.log").read_text()
    decode_rows = json.loads((out / "decode_tiny.json").read_text())["rows"]
    assert [r["batch"] for r in decode_rows] == [2] and decode_rows[0]["step_ms"] > 0
    rollout = json.loads((out / "rollout_tiny.json").read_text())
    assert rollout["episodes"] == 16 and set(rollout["engines"]) == {"host", "in_graph"}
    for engine in rollout["engines"].values():
        # The scripted policy searches once and answers; the random simulator writes pages.
        assert engine["engine_calls"] == 1.0, engine
        assert engine["policy_tokens"] > 0 and engine["simulator_tokens"] > 0
        assert engine["episodes_per_s"] > 0 and len(engine["seconds"]) == 2
