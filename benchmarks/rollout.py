"""Full multi-turn rollout throughput: SmolLM2-135M policy + SmolLM2-135M simulator.

    python benchmarks/rollout.py [--questions 8] [--samples 2] [--max-turns 2] [--repeats 2]

Runs the host-loop rollout (jitted prefill / turn decode / observation insert, engine calls on
the host) on synthetic-world questions and prints episodes/s, generated tokens/s (policy and
simulator), and the time split by phase; the first run's extra time is the compilation. The
simulator is also timed alone on a batch of queries. (The in-graph episode loop does not exist
yet, so there is no in-graph/host ratio to print.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402

from zerosearch_jax import agent, models, sampling, search  # noqa: E402
from zerosearch_jax.data import synthetic  # noqa: E402
from zerosearch_jax.tokenizer import Tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sim-new-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    tok = Tokenizer.from_pretrained(models.DEFAULT_MODEL)
    config, params = models.load_pretrained(models.DEFAULT_MODEL, dtype=jnp.bfloat16)
    sim = search.LLMSimulator(config, params, tok, max_new_tokens=args.sim_new_tokens,
                              noise_probability=0.25)
    questions = synthetic.build_world().questions("train")[: args.questions]
    rc = agent.RolloutConfig(samples_per_prompt=args.samples, max_turns=args.max_turns,
                             max_new_tokens=args.max_new_tokens, max_obs_tokens=256)
    runs = []
    for r in range(args.repeats + 1):
        sim_before = sim.generated_tokens
        t = time.perf_counter()
        _, stats = agent.rollout(config, params, tok, questions, sim, rollout_config=rc,
                                 sampler=sampling.TopP(0.95), rng=r)
        runs.append((time.perf_counter() - t, stats, sim.generated_tokens - sim_before))
    first = runs[0][0]
    steady = runs[1:]
    total = statistics.median(t for t, _, _ in steady)
    B = args.questions * args.samples
    policy_tokens = statistics.median(s.generated_tokens for _, s, _ in steady)
    sim_tokens = statistics.median(n for _, _, n in steady)
    phases = {k: statistics.median(s.timings[k] for _, s, _ in steady)
              for k in ("policy_s", "search_s", "insert_s")}
    searches = statistics.median(float(s.engine_calls.mean()) for _, s, _ in steady)
    print(f"rollout: {B} episodes ({args.questions} questions x {args.samples}), "
          f"max_turns={args.max_turns}, {args.max_new_tokens} tokens/turn")
    print(f"  episodes/s           {B / total:8.2f}   ({total:.1f} s per rollout; first run "
          f"+{first - total:.1f} s compile)")
    print(f"  policy tokens/s      {policy_tokens / total:8.1f}   ({policy_tokens:.0f} tokens)")
    print(f"  simulator tokens/s   {sim_tokens / max(phases['search_s'], 1e-9):8.1f}   "
          f"({sim_tokens:.0f} tokens, {searches:.2f} engine calls per episode)")
    print(f"  all tokens/s         {(policy_tokens + sim_tokens) / total:8.1f}")
    for k, v in phases.items():
        print(f"  {k:<20} {v:8.2f} s  ({100 * v / total:.0f}%)")

    queries = [f"founder of company {i}" for i in range(B)]
    ctxs = [search.QueryContext(q.question, q.golden_answers) for q in
            (questions * args.samples)[:B]]
    sim.search(queries, contexts=ctxs)  # compile
    before = sim.generated_tokens
    t = time.perf_counter()
    sim.search(queries, contexts=ctxs)
    dt = time.perf_counter() - t
    print(f"simulator alone: {B} queries in {dt:.2f} s, "
          f"{(sim.generated_tokens - before) / dt:.1f} tokens/s")


if __name__ == "__main__":
    main()
