"""Decode throughput: this sampler vs Hugging Face `generate`, SmolLM2-135M, on this machine.

    python benchmarks/decode.py [--batches 1 8 32] [--new-tokens 128] [--prompt-tokens 40]
    python benchmarks/decode.py --batches 16 --windows 128 384 640 768 [--cache-slots 768]
    python benchmarks/decode.py --model random:qwen2.5-3b --no-hf --batches 1 8 32

`--model` takes what `models.load_pretrained` takes (default: the embedded SmolLM2-135M), or
`random:<shape>` for random bfloat16 weights of a known shape (`RANDOM_SHAPES`): a decode
step's time depends on the shapes, not on the values, so a machine without the weights (an
accelerator that cannot fetch them) still measures the step and its bandwidth floor.

For each batch size: tokens/s of the jitted sampler (bfloat16 weights, greedy, no early stop)
and of `transformers` `generate` in float32 and bfloat16 (the better one is the peer), their
ratio, our compile time (first call minus a warm call), and the fraction of the memory-bandwidth
floor reached: bytes one decode step must read (every weight once + the KV cache) divided by
the bandwidth measured here with a jitted read, over the measured step time.

With `--windows`: ms per decode step over a cache read through narrower attention windows (as
the multi-turn rollouts read theirs), a plain bfloat16 cache against a windowed one
(`models.init_cache(windowed=True)`), side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from zerosearch_jax import models, sampling  # noqa: E402
from zerosearch_jax.sampling import StopConditions  # noqa: E402

# `config.json` fields of the models `--model random:<shape>` builds (the published configs).
RANDOM_SHAPES = {
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen2.5-3b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768),
    # Two layers of SmolLM2's kind: the CPU smoke run of device_checks.sh (tests).
    "tiny": dict(
        model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
}


def load_model(name: str, init: bool = True):
    """(config, bfloat16 params) of `--model`: a loadable model, or random:<RANDOM_SHAPES key>
    (params None unless `init`)."""
    if not name.startswith("random:"):
        return models.load_pretrained(name, dtype=jnp.bfloat16)
    shape = name.split(":", 1)[1]
    if shape not in RANDOM_SHAPES:
        raise SystemExit(f"--model {name}: unknown shape {shape!r}; known: "
                         f"{', '.join(sorted(RANDOM_SHAPES))}")
    config = models.ModelConfig.from_hf_dict(RANDOM_SHAPES[shape], source=name)
    return config, models.init_params(config, 0, dtype=jnp.bfloat16) if init else None


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Bytes/s of a jitted read of a 1 GiB random float32 buffer (median of `repeats`).

    Random contents and a buffer far larger than the caches keep the read honest; the median
    keeps one lucky run from setting the floor.
    """
    x = jax.random.uniform(jax.random.key(0), (nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.max(a))
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times)


def ours(config, params, prompts, new_tokens, repeats):
    stop = StopConditions(pad_id=2)  # no EOS: every row generates exactly new_tokens
    t = time.perf_counter()
    out = sampling.generate(config, params, prompts, max_new_tokens=new_tokens, stop=stop)
    first = time.perf_counter() - t
    assert (out["lengths"] == new_tokens).all()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sampling.generate(config, params, prompts, max_new_tokens=new_tokens, stop=stop)
        times.append(time.perf_counter() - t)
    return statistics.median(times), first - statistics.median(times)


def hf(model, prompts, new_tokens, repeats):
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=2, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **kw)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            times.append(time.perf_counter() - t)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return statistics.median(times)


def load_hf_peers(config, params) -> dict:
    """The same weights as a dense HF safetensors model (what users serve), in float32 and
    bfloat16. (transformers' own GGUF loader may keep the weights quantized, which is not the
    usual serving path, so the peer is built from an export instead.)"""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    out = {}
    with tempfile.TemporaryDirectory() as d:
        f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        models.save_pretrained(config, f32, d)
        for dtype in (torch.float32, torch.bfloat16):
            out[str(dtype).split(".")[-1]] = AutoModelForCausalLM.from_pretrained(
                d, dtype=dtype).eval()
    return out


def window_program(config, steps: int = 32):
    """`steps` greedy decode steps over a cache read through a static attention window, jitted
    (cache donated): run(params, cache, logits [B, V], W) -> cache, whose write index is put
    back so the next call writes the same slots."""
    stop = StopConditions(pad_id=2)

    def run(params, cache, logits, W):
        _, cache = sampling.decode(config, params, cache, logits, jax.random.key(0),
                                   sampler=sampling.Greedy(), max_new_tokens=steps, stop=stop,
                                   kv_length=W)
        return cache.replace(index=jnp.int32(W - steps))

    return jax.jit(run, static_argnums=3, donate_argnums=1)


def window_cache(config, batch: int, cache_slots: int, window: int, steps: int = 32,
                 windowed: bool = True):
    """A bfloat16 cache of `cache_slots` slots, every slot a key, whose next `steps` writes
    end at slot `window` (what `window_program` reads through that window)."""
    cache = models.init_cache(config, batch, cache_slots, jnp.bfloat16, windowed=windowed)
    return cache.replace(index=jnp.int32(window - steps),
                         key_mask=jnp.ones((batch, cache_slots), bool))


def window_steps(config, params, batch: int, cache_slots: int, windows, steps: int = 32,
                 repeats: int = 3) -> list[dict]:
    """ms per decode step over a cache of `cache_slots` slots read through each attention
    window (`extend(kv_length=W)`, as a multi-turn rollout reads it), for a plain bfloat16
    cache and a windowed one (`models.init_cache(windowed=True)`), side by side."""
    logits = jnp.zeros((batch, config.vocab_size), jnp.float32)
    run = window_program(config, steps)
    rows = []
    for W in windows:
        row = dict(batch=batch, cache_slots=cache_slots, window=W)
        for name, windowed in (("plain", False), ("windowed", True)):
            cache = window_cache(config, batch, cache_slots, W, steps, windowed)
            cache = jax.block_until_ready(run(params, cache, logits, W))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                cache = jax.block_until_ready(run(params, cache, logits, W))
                times.append(time.perf_counter() - t)
            row[f"{name}_ms"] = 1e3 * statistics.median(times) / steps
        rows.append(row)
        print(f"{batch:>5} {cache_slots:>6} {W:>6} {row['plain_ms']:>9.1f} "
              f"{row['windowed_ms']:>11.1f} {row['plain_ms'] / row['windowed_ms']:>7.2f}x",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--windows", type=int, nargs="*",
                    help="instead: ms per decode step at the first of --batches, over a cache of "
                         "--cache-slots slots read through each of these attention windows, "
                         "plain vs windowed cache")
    ap.add_argument("--cache-slots", type=int, default=768)
    ap.add_argument("--model", default=models.DEFAULT_MODEL,
                    help="a model load_pretrained takes, or random:<shape> (random weights; "
                         f"shapes: {', '.join(sorted(RANDOM_SHAPES))})")
    args = ap.parse_args()

    config, params = load_model(args.model)
    if args.windows:
        print(f"{'batch':>5} {'slots':>6} {'window':>6} {'plain ms':>9} {'windowed ms':>11} "
              f"{'ratio':>8}")
        rows = window_steps(config, params, args.batches[0], args.cache_slots, args.windows,
                            repeats=args.repeats)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(rows=rows), f, indent=2)
        return
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    bandwidth = measure_bandwidth()
    print(f"model: {args.model}, device: {jax.devices()[0].device_kind}, threads: "
          f"{os.cpu_count()}, measured read bandwidth {bandwidth / 1e9:.1f} GB/s, weights "
          f"{param_bytes / 1e6:.0f} MB")

    hf_models = {}
    if not args.no_hf:
        hf_models = load_hf_peers(config, params)
    rng = np.random.default_rng(0)
    rows = []
    header = (f"{'batch':>5} {'ours tok/s':>10} {'compile s':>9} {'step ms':>8} {'floor %':>7} "
              + " ".join(f"{'hf ' + k + ' tok/s':>16}" for k in hf_models)
              + (f" {'ours/best hf':>12}" if hf_models else ""))
    print(header)
    for B in args.batches:
        prompts = rng.integers(100, config.vocab_size, (B, args.prompt_tokens)).tolist()
        t, compile_s = ours(config, params, prompts, args.new_tokens, args.repeats)
        tps = B * args.new_tokens / t
        step = t / args.new_tokens
        S = sampling.bucket_length(args.prompt_tokens) + args.new_tokens
        kv_bytes = (2 * config.num_layers * sampling.bucket_batch(B) * S * config.num_kv_heads
                    * config.head_dim * 2)
        floor = (param_bytes + kv_bytes) / bandwidth
        row = dict(batch=B, ours_tok_s=tps, compile_s=compile_s, step_ms=1e3 * step,
                   floor_ms=1e3 * floor, floor_fraction=floor / step)
        for k, m in hf_models.items():
            row[f"hf_{k}_tok_s"] = B * args.new_tokens / hf(m, prompts, args.new_tokens,
                                                             args.repeats)
        if hf_models:
            row["ratio_vs_best_hf"] = tps / max(row[f"hf_{k}_tok_s"] for k in hf_models)
        rows.append(row)
        print(f"{B:>5} {tps:>10.1f} {compile_s:>9.1f} {1e3 * step:>8.1f} "
              f"{100 * floor / step:>6.0f}% "
              + " ".join(f"{row[f'hf_{k}_tok_s']:>16.1f}" for k in hf_models)
              + (f" {row['ratio_vs_best_hf']:>11.2f}x" if hf_models else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth_gb_s=bandwidth / 1e9, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
