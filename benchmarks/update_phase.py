"""The default job's update phase (scoring + update) on a real rollout's batch, packed vs padded.

    python benchmarks/update_phase.py --policy runs/default/warmup/hf \\
        --simulator runs/default/simulator_sft/hf [--repeats 2] [--batch-file /tmp/batch.npz]

Rolls out once as the default job does (configs/default.py: 16 episodes, the warmed-up policy
searching, the tuned simulator answering at noise 0.25), cuts the batch as the trainer does,
then times the trainer's jitted score and update on it with the default's packing
(`algorithm.pack_length` tokens a row, `algorithm.micro_batch_size` rows a micro-batch), the
same packing at the other of 1 or 2 rows a micro-batch, and unpacked (one episode a row, 4 rows
a micro-batch, the layout before packing). Prints for each: real tokens/s of score +
update, the padding fraction, the reference pass's share, and the update alone in real tokens/s
against a dense update of the same model in the same run (all-real [4, 256] rows, the
`train_step.py` benchmark's shape). `--batch-file` keeps the rollout's batch for reruns.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from zerosearch_jax import (  # noqa: E402
    agent,
    models,
    packing,
    search,
    sweep,
    train,
    training,
)
from zerosearch_jax.data import synthetic  # noqa: E402
from zerosearch_jax.rl import train_step as ts  # noqa: E402
from zerosearch_jax.tokenizer import Tokenizer  # noqa: E402

KEYS = ("tokens", "attention_mask", "positions", "loss_mask", "logprobs", "rewards", "group")


def rollout_batch(args, c, settings) -> dict[str, np.ndarray]:
    """One rollout of the default job's shapes, cut as the trainer cuts it."""
    tok = Tokenizer.from_pretrained(args.policy)
    config, params = models.load_pretrained(args.policy, dtype=jnp.bfloat16)
    sim_config, sim_params = models.load_pretrained(args.simulator, dtype=jnp.bfloat16)
    rc = settings.rollout
    B = c.prompts_per_step * rc.samples_per_prompt
    sim = search.LLMSimulator(sim_config, sim_params, Tokenizer.from_pretrained(args.simulator),
                              max_new_tokens=c.simulator.max_new_tokens, noise_probability=0.25,
                              batch_size=B)
    questions = synthetic.build_world().questions("train")[: c.prompts_per_step]
    batch, stats = agent.rollout(config, params, tok, questions, sim, rollout_config=rc,
                                 sampler=settings.sampler, rng=0)
    batch = train.trim_response(batch, train.response_width(rc))
    out = {k: np.asarray(getattr(batch, k)) for k in KEYS}
    out["prompt_length"] = np.int32(batch.prompt_length)
    print(f"rollout: {B} episodes, {stats.engine_calls.mean():.2f} searches each, "
          f"{int(batch.attention_mask.sum())} real tokens in [{B}, {batch.tokens.shape[1]}]")
    return out


def time_phase(uc, config, params, batch, repeats) -> dict[str, float]:
    fns = ts.make_train_fns(config, uc, training.make_optimizer(1e-6, 100))
    state = fns.init_state(jax.tree.map(jnp.copy, params))
    ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    plan = packing.plan(batch["attention_mask"], seed=0, tokens=batch["tokens"],
                        group=batch["group"], prompt_length=int(batch["prompt_length"]),
                        **uc.packing_args)
    layout = fns.place_layout(plan)
    score_s, update_s = [], []
    for _ in range(repeats + 1):  # the first compiles
        t = time.perf_counter()
        scored = jax.block_until_ready(fns.score(state.params, ref, None, batch, layout))
        t1 = time.perf_counter()
        state, m = fns.update(state, scored, layout)
        jax.block_until_ready(m)
        score_s.append(t1 - t)
        update_s.append(time.perf_counter() - t1)
    return {"score_s": statistics.median(score_s[1:]), "update_s": statistics.median(update_s[1:]),
            "padding": packing.padding_fraction(plan), "slots": int(plan.score_used)
            * plan.score_index.shape[1] * plan.score_index.shape[2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=models.DEFAULT_MODEL)
    ap.add_argument("--simulator", default=models.DEFAULT_MODEL)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-file", default="")
    args = ap.parse_args()

    c = sweep.resolve_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                          "default.py"), ())
    settings = train.build_settings(c)
    if args.batch_file and os.path.exists(args.batch_file):
        batch = dict(np.load(args.batch_file))
    else:
        batch = rollout_batch(args, c, settings)
        if args.batch_file:
            np.savez(args.batch_file, **batch)
    real = int(batch["attention_mask"].sum())
    config, params = models.load_pretrained(args.policy, dtype=jnp.float32)
    packed_uc = settings.update
    other_rows = 2 if packed_uc.micro_batch_size == 1 else 1
    modes = {f"packed, {packed_uc.micro_batch_size} row(s) a micro-batch": packed_uc,
             f"packed, {other_rows} row(s) a micro-batch": dataclasses.replace(
                 packed_uc, micro_batch_size=other_rows),
             "padded (a row an episode)": dataclasses.replace(packed_uc, pack_length=0,
                                                                micro_batch_size=4)}
    B, T = batch["tokens"].shape
    print(f"update phase, SmolLM2-135M, {B} episodes, {real} real tokens "
          f"(batch [{B}, {T}] = {B * T} slots)")
    results = {}
    for name, uc in modes.items():
        r = results[name] = time_phase(uc, config, params, batch, args.repeats)
        total = r["score_s"] + r["update_s"]
        print(f"  {name:<34} score+update {real / total:7.1f} real tok/s ({total:.1f} s: score "
              f"{r['score_s']:.1f}, update {r['update_s']:.1f}); padding {r['padding']:.1%} of "
              f"{r['slots']} slots; reference pass {r['score_s'] / total:.0%}")
    # A dense update of the same model: every slot a real token ([4, 256], train_step.py's).
    rng = np.random.default_rng(0)
    loss_mask = np.ones((4, 256), np.float32)
    loss_mask[:, :64] = 0  # a prompt quarter
    rewards = np.zeros((4, 256), np.float32)
    rewards[:, -1] = rng.random(4)
    dense = {"tokens": rng.integers(3, config.vocab_size, (4, 256)).astype(np.int32),
             "attention_mask": np.ones((4, 256), bool),
             "positions": np.tile(np.arange(256, dtype=np.int32), (4, 1)),
             "loss_mask": loss_mask, "logprobs": np.zeros((4, 256), np.float32),
             "rewards": rewards, "group": np.arange(4, dtype=np.int32),
             "prompt_length": np.int32(0)}
    d = time_phase(dataclasses.replace(packed_uc, pack_length=0, micro_batch_size=4), config,
                   params, dense, args.repeats)
    dense_rate = 4 * 256 / d["update_s"]
    print(f"  dense update [4, 256]: {dense_rate:.1f} tok/s (same run)")
    for name, r in results.items():
        print(f"  {name:<34} update alone {real / r['update_s']:7.1f} real tok/s = "
              f"{real / r['update_s'] / dense_rate:.0%} of dense")
    p, _, u = (results[k] for k in modes)
    print(f"  packed / padded, score+update: "
          f"{(u['score_s'] + u['update_s']) / (p['score_s'] + p['update_s']):.2f}x")


if __name__ == "__main__":
    main()
