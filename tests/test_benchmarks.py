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

from benchmarks import decode, profile_ops, update_phase
from benchmarks import train_step as train_step_bench
from zerosearch_jax import models
from zerosearch_jax.rl import train_step as ts


def test_train_step_benchmark_times_the_trainers_update():
    config = toy_config()
    params = models.init_params(config, 0)
    r = train_step_bench.time_update(config, params, 2, 16, "bfloat16", steps=2)
    assert r["step_s"] > 0 and r["compile_s"] > 0


@pytest.mark.parametrize("program", ["update", "decode"])
def test_profile_ops_splits_a_calls_time_by_part(program):
    """profile_ops.py traces one call of the update / the windowed decode loop and splits its
    time among the ops running at each moment: the parts, idle included, add up to the traced
    span, matmuls (plain; batched for attention's) are found through the compiled program, and
    the source ops name the model's layers."""
    if program == "update":
        config = toy_config()
        params = models.init_params(config, 0)
        update, state, scored, layout = train_step_bench.update_program(
            config, params, 2, 48, "bfloat16")
        r = profile_ops.profile(update, (state, scored, layout),
                                out_of=lambda out: (out[0], scored, layout))
    else:
        config, params = decode.load_model("random:tiny")
        run = decode.window_program(config, steps=4)
        logits = jnp.zeros((2, config.vocab_size), jnp.float32)
        cache = decode.window_cache(config, 2, 24, 16, steps=4)
        r = profile_ops.profile(run, (params, cache, logits, 16),
                                out_of=lambda out: (params, out, logits, 16), static_argnums=(3,))
    parts = r["parts"]
    assert set(parts) == set(profile_ops.PARTS)
    assert sum(parts.values()) == pytest.approx(r["span_s"], rel=1e-6)
    assert 0 < r["span_s"] <= r["wall_s"]
    assert parts["matmuls"] > 0 and parts["attention matmuls"] > 0
    sources = {source for _, source, _ in r["sources"]}
    assert any(s.startswith("layer_N/attn/") or "/layer_N/attn/" in s for s in sources)
    assert "matmuls" in profile_ops.report(r, top=3)


def test_profile_ops_reads_matmuls_and_sources_from_hlo():
    mlp = 'op_name="jit(f)/Transformer/layer_7/mlp/dot_general"'
    hlo = f"""HloModule m

%fused_computation.1 (param_0: bf16[4,8], param_1: bf16[8,8]) -> f32[4,8] {{
  %param_0 = bf16[4,8]{{1,0}} parameter(0)
  %param_1 = bf16[8,8]{{1,0}} parameter(1)
  ROOT %dot.1 = f32[4,8]{{1,0}} dot(%param_0, %param_1), lhs_contracting_dims={{1}},
    rhs_contracting_dims={{0}}, metadata={{{mlp}}}
}}

%fused_computation.2 (p: bf16[2,4,8], q: bf16[2,8,4]) -> f32[2,4,4] {{
  %p = bf16[2,4,8]{{2,1,0}} parameter(0)
  %q = bf16[2,8,4]{{2,1,0}} parameter(1)
  ROOT %dot.2 = f32[2,4,4]{{2,1,0}} dot(%p, %q), lhs_batch_dims={{0}}, lhs_contracting_dims={{2}}
}}

ENTRY %main (a: bf16[4,8], b: bf16[8,8], c: bf16[2,4,8], d: bf16[2,8,4]) -> f32[4,8] {{
  %ynn_fusion.3 = f32[4,8]{{1,0}} fusion(%a, %b), calls=%fused_computation.1, metadata={{{mlp}}}
  %ynn_fusion.4 = f32[2,4,4]{{2,1,0}} fusion(%c, %d), kind=kCustom, calls=%fused_computation.2
  %copy_bitcast_fusion.5 = bf16[8,4]{{1,0}} fusion(%a), kind=kLoop, calls=%fused_computation.9
  %reduce_max.6 = f32[4]{{0}} reduce(%x), metadata={{op_name="jit(f)/Transformer/layer_2/attn/m"}}
  ROOT %while.7 = (s32[], f32[4]) while(%t), condition=%c, body=%b
}}
"""
    ops = profile_ops.hlo_ops(hlo)
    assert ops["ynn_fusion.3"].matmul == "plain" and ops["ynn_fusion.4"].matmul == "batched"
    assert profile_ops.part_of(ops["ynn_fusion.3"]) == "matmuls"
    assert profile_ops.part_of(ops["ynn_fusion.4"]) == "attention matmuls"
    assert profile_ops.part_of(ops["copy_bitcast_fusion.5"]) == "copies and transposes (no source)"
    assert profile_ops.part_of(ops["reduce_max.6"]) == "attention, other"
    assert ops["while.7"].opcode == "while"
    assert ops["copy_bitcast_fusion.5"].stem == "copy_bitcast_fusion"
    assert profile_ops.source_key(ops["reduce_max.6"].source) == "Transformer/layer_N/attn/m"


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
