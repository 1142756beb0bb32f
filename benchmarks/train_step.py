"""One RL update on SmolLM2-135M vs PyTorch `transformers` doing the same work, same batch.

    python benchmarks/train_step.py [--batch 4] [--seq 256] [--dtype bfloat16]

Ours: the jitted update (forward, backward, AdamW, loss masks, clipped surrogate, KL to the
reference and entropy terms) on a [batch, seq] rollout-like batch, micro-batch = batch.
Peer: `transformers` forward + token log-probs + masked policy-gradient loss + backward + AdamW
on the same tokens and dtype. Prints tokens/s of both, the ratio, and peak memory (process peak
RSS growth during the timed steps, measured in a fresh subprocess for each side).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(B, T, vocab, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (B, T)).astype(np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, T // 4:] = 1.0  # a prompt quarter, then response
    loss_mask[:, T // 2:T // 2 + 16] = 0.0  # an inserted observation
    adv = rng.normal(size=(B, 1)).astype(np.float32) * loss_mask
    return tokens, loss_mask, adv


def update_program(config, params, B, T, dtype):
    """The trainer's jitted update (`TrainFns.update`, state donated) and its arguments on one
    [B, T] rollout-like batch, scored once as the trainer scores it: (update, state, scored,
    layout); call `update(state, scored, layout)` -> (state, metrics). config / params: the
    model (float32 master weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from zerosearch_jax import training
    from zerosearch_jax.rl import train_step as ts

    tokens, loss_mask, adv = _batch(B, T, config.vocab_size)
    rewards = np.zeros((B, T), np.float32)
    rewards[:, -1] = adv[:, -1]  # one reward per episode at its last token
    uc = ts.UpdateConfig(advantage_estimator="reinforce", micro_batch_size=B, remat=False,
                         compute_dtype=dtype)
    fns = ts.make_train_fns(config, uc, training.make_optimizer(1e-6, 100))
    state = fns.init_state(params)
    batch = {"tokens": tokens, "attention_mask": np.ones((B, T), bool),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "loss_mask": loss_mask, "logprobs": np.zeros((B, T), np.float32),
             "rewards": rewards, "group": np.arange(B, dtype=np.int32)}
    layout = fns.plan(batch["attention_mask"])  # unpacked: the B rows are one micro-batch
    ref = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    scored = jax.block_until_ready(fns.score(state.params, ref, None, batch, layout))
    return fns.update, state, scored, layout


def time_update(config, params, B, T, dtype, steps) -> dict:
    """`update_program`'s update: seconds per update (median of `steps` after a compiling one)."""
    import jax
    import numpy as np

    update, state, scored, layout = update_program(config, params, B, T, dtype)
    t = time.perf_counter()
    state, m = update(state, scored, layout)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    before = _peak_rss_mb()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = update(state, scored, layout)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    if not np.isfinite(float(m["loss"])):
        raise RuntimeError(f"the update's loss is {float(m['loss'])}")
    return {"step_s": statistics.median(times), "compile_s": compile_s,
            "peak_rss_mb": _peak_rss_mb(), "rss_growth_mb": _peak_rss_mb() - before}


def run_ours(B, T, dtype, steps):
    import jax.numpy as jnp

    from zerosearch_jax import models

    # float32 master weights and Adam moments, matmuls in `dtype` (mixed precision), as the
    # trainer runs; PyTorch gets its weights in `dtype` (its usual bf16 fine-tuning set-up).
    config, params = models.load_pretrained(models.DEFAULT_MODEL, dtype=jnp.float32)
    return time_update(config, params, B, T, dtype, steps)


def run_torch(B, T, dtype, steps):
    import tempfile

    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from zerosearch_jax import models

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with tempfile.TemporaryDirectory() as d:
        config, params = models.load_pretrained(models.DEFAULT_MODEL)
        models.save_pretrained(config, jax.tree.map(lambda x: x.astype(jnp.float32), params), d)
        del params
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch_dtype)
    model.train()
    tokens, loss_mask, adv = (torch.tensor(x) for x in _batch(B, T, config.vocab_size))
    tokens = tokens.long()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)

    def step():
        logits = model(input_ids=tokens).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
        mask, a = loss_mask[:, 1:], adv[:, 1:]
        loss = -(logp * a * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    before = _peak_rss_mb()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "peak_rss_mb": _peak_rss_mb(),
            "rss_growth_mb": _peak_rss_mb() - before}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--side", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        fn = run_ours if args.side == "ours" else run_torch
        print(json.dumps(fn(args.batch, args.seq, args.dtype, args.steps)))
        return
    results = {}
    for side in ("ours", "torch"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--batch",
                              str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype,
                              "--steps", str(args.steps)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    tokens = args.batch * args.seq
    o, t = results["ours"], results["torch"]
    print(f"RL update, SmolLM2-135M, batch {args.batch} x {args.seq} tokens, {args.dtype}")
    print(f"  ours (jax):    {tokens / o['step_s']:8.1f} tokens/s  ({o['step_s']:.2f} s/step, "
          f"compile {o['compile_s']:.1f} s, peak RSS {o['peak_rss_mb']:.0f} MB)")
    print(f"  transformers:  {tokens / t['step_s']:8.1f} tokens/s  ({t['step_s']:.2f} s/step, "
          f"peak RSS {t['peak_rss_mb']:.0f} MB)")
    print(f"  ratio ours/transformers: {t['step_s'] / o['step_s']:.2f}x")


if __name__ == "__main__":
    main()
