"""The rollout the default job runs, timed: a policy that searches, the simulator answering.

    python benchmarks/rollout.py --policy runs/default/warmup/hf \\
        --simulator runs/default/simulator_sft/hf [--repeats 3] [--sim-batch 16]

Defaults are the default job's shapes (configs/default.py): 4 questions x 4 samples = 16
episodes, max_turns 2, 48 tokens per policy turn, 128-token observations, 128 simulator
tokens, top-p 0.95, noise probability 0.25. Point `--policy` / `--simulator` at a default run's
warmed-up policy and tuned simulator: the embedded model (the fallback) almost never searches,
so without them the figure is policy decoding alone.

Prints, for each engine of `--engines` (default: host,in_graph), the first call's time
(compilation included) and every later one, episodes/s, policy and simulator tokens, and the
rollout's tokens/s as a fraction of plain decoding at the rollout's batch in the same run
(`sampling.generate`, greedy, no early stop, as `benchmarks/decode.py`); then each engine
against the host loop. Engines: `host`, the text-level host loop (`agent.rollout`, kept as the
baseline and for external engines), with its split by phase; `in_graph`, the whole rollout as
one program (`agent.episode.rollout`); `stepped`, the in-graph pieces called one at a time.
`--sim-batch 0` lets the host loop's simulator batch follow each turn's number of searches.

Where no trained model can be loaded (an accelerator machine without the hub), `--policy
scripted:<shape>` is the tests' scripted policy (tests/scripted_policy.py: it searches once,
reads the page and answers) at a `decode.py` shape, and `--simulator random:<shape>` random
weights, which write every page to its cap as the tuned simulator's pages do in the default;
`--tokenizer` names a tokenizer directory (e.g. a `save_pretrained` export) for both. A
shape's vocabulary is cut to the tokenizer's, so that every sampled token decodes (for
qwen2.5-3b the LM head reads 49152 of its 151936 rows: 0.10B parameters instead of 0.31B of
3.09B; the scripted policy's head is its own, untied, matrix).
`benchmarks/device_checks.sh` runs these on an accelerator in one call. `--json` writes
the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from benchmarks import decode  # noqa: E402
from tests.scripted_policy import scripted_policy  # noqa: E402
from zerosearch_jax import agent, models, sampling, search  # noqa: E402
from zerosearch_jax.data import synthetic  # noqa: E402
from zerosearch_jax.tokenizer import Tokenizer  # noqa: E402


def decode_rate(config, params, batch: int, new_tokens: int) -> float:
    """Tokens/s of plain decoding at `batch` rows (40-token prompts, warm program)."""
    prompts = [[1] + [100 + i] * 39 for i in range(batch)]
    stop = sampling.StopConditions(pad_id=2)  # no EOS: every row generates new_tokens
    sampling.generate(config, params, prompts, max_new_tokens=new_tokens, stop=stop)
    t = time.perf_counter()
    sampling.generate(config, params, prompts, max_new_tokens=new_tokens, stop=stop)
    return batch * new_tokens / (time.perf_counter() - t)


def load(name: str, tokenizer: Tokenizer):
    """(config, bfloat16 params) of `--policy` / `--simulator`: a loadable model, or
    random:<shape> / scripted:<shape> (`decode.RANDOM_SHAPES`, the vocabulary cut to the
    tokenizer's)."""
    kind, _, shape = name.partition(":")
    if kind not in ("random", "scripted"):
        return models.load_pretrained(name, dtype=jnp.bfloat16)
    config, _ = decode.load_model(f"random:{shape}", init=False)
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    if kind == "scripted":  # sure of its script even when sampled over the whole vocabulary
        return scripted_policy(tokenizer, margin=30.0, config=config, dtype=jnp.bfloat16)
    return config, models.init_params(config, 0, dtype=jnp.bfloat16)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=models.DEFAULT_MODEL,
                    help="a model to load, or scripted:<shape> / random:<shape>")
    ap.add_argument("--simulator", default=models.DEFAULT_MODEL,
                    help="a model to load, or random:<shape>")
    ap.add_argument("--tokenizer", default=None,
                    help="default: the policy's (the embedded model's for a shape)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-obs-tokens", type=int, default=128)
    ap.add_argument("--sim-new-tokens", type=int, default=128)
    ap.add_argument("--sim-batch", type=int, default=-1,
                    help="simulator batch padding: -1 = the rollout's rows (the trainer's), "
                         "0 = none (a program per batch size)")
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="host,in_graph",
                    help="comma-separated: host (the text-level host loop), stepped (the "
                         "in-graph pieces, one jitted call each), in_graph (one program)")
    args = ap.parse_args(argv)

    B = args.questions * args.samples

    def tokenizer_of(name):
        if args.tokenizer:
            return Tokenizer.from_pretrained(args.tokenizer)
        return Tokenizer.from_pretrained(models.DEFAULT_MODEL if ":" in name else name)

    tok = tokenizer_of(args.policy)
    config, params = load(args.policy, tok)
    sim_tok = tokenizer_of(args.simulator)
    sim_config, sim_params = load(args.simulator, sim_tok)
    sim = search.LLMSimulator(sim_config, sim_params, sim_tok,
                              max_new_tokens=args.sim_new_tokens, noise_probability=args.noise,
                              batch_size=B if args.sim_batch < 0 else args.sim_batch)
    questions = synthetic.build_world().questions("train")[: args.questions]
    rc = agent.RolloutConfig(samples_per_prompt=args.samples, max_turns=args.max_turns,
                             max_new_tokens=args.max_new_tokens,
                             max_obs_tokens=args.max_obs_tokens)
    rate = decode_rate(config, params, B, 128)
    print(f"rollout: {B} episodes ({args.questions} questions x {args.samples}), max_turns="
          f"{args.max_turns}, {args.max_new_tokens} tokens/turn, policy {args.policy}, "
          f"simulator {args.simulator} (host-loop batch padding {sim.batch_size}); plain "
          f"decoding at batch {B}: {rate:.1f} tok/s (same run)")
    engines = {
        "host": agent.rollout,  # the text-level host loop (every engine; the baseline)
        "stepped": functools.partial(agent.episode.rollout, stepped=True),
        "in_graph": agent.episode.rollout,  # one program per rollout
    }
    medians, results = {}, {"episodes": B, "policy": args.policy, "simulator": args.simulator,
                            "decode_tokens_per_s": rate, "engines": {}}
    for name in args.engines.split(","):
        runs = []
        for r in range(args.repeats + 1):
            sim_before = sim.generated_tokens
            t = time.perf_counter()
            _, stats = engines[name](config, params, tok, questions, sim, rollout_config=rc,
                                     sampler=sampling.TopP(0.95), rng=r,
                                     noise_probability=args.noise)
            runs.append((time.perf_counter() - t, stats, sim.generated_tokens - sim_before))
        steady = runs[1:]
        total = statistics.median(t for t, _, _ in steady)
        policy_tokens = statistics.median(s.generated_tokens for _, s, _ in steady)
        sim_tokens = statistics.median(n for _, _, n in steady)
        searches = statistics.median(float(s.engine_calls.mean()) for _, s, _ in steady)
        f1 = statistics.mean(float(s.f1.mean()) for _, s, _ in steady)
        all_rate = (policy_tokens + sim_tokens) / total
        medians[name] = (total, all_rate)
        results["engines"][name] = dict(
            seconds=[t for t, _, _ in runs], episodes_per_s=B / total,
            policy_tokens=policy_tokens, simulator_tokens=sim_tokens, engine_calls=searches,
            tokens_per_s=all_rate, share_of_decode=all_rate / rate)
        print(f"[{name}]")
        print("  seconds per rollout  " + " ".join(f"{t:.1f}" for t, _, _ in runs)
              + "   (the first compiles)")
        print(f"  episodes/s           {B / total:8.3f}   ({total:.1f} s per rollout, median of "
              f"{len(steady)})")
        print(f"  policy tokens        {policy_tokens:8.0f}   ({searches:.2f} engine calls per "
              f"episode, mean F1 {f1:.3f})")
        print(f"  simulator tokens     {sim_tokens:8.0f}")
        print(f"  all tokens/s         {all_rate:8.1f}   = {all_rate / rate:.0%} of plain "
              f"decoding at batch {B}")
        if name == "host":
            for k in ("policy_s", "search_s", "insert_s"):
                v = statistics.median(s.timings[k] for _, s, _ in steady)
                print(f"  {k:<20} {v:8.2f} s  ({100 * v / total:.0f}%)")
    if "host" in medians:
        for name, (total, all_rate) in medians.items():
            if name != "host":
                print(f"{name} / host: {medians['host'][0] / total:.2f}x episodes/s, "
                      f"{all_rate / medians['host'][1]:.2f}x tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
