"""Where a jitted program's time goes, by part of the model: one call under `jax.profiler`.

    python benchmarks/profile_ops.py update [--batch 1] [--seq 944]
    python benchmarks/profile_ops.py decode [--batch 16] [--window 512] [--cache-slots 768]
    python benchmarks/profile_ops.py decode --model random:qwen2.5-3b --top 20 --json out.json

`update` is `train_step.py`'s program (the trainer's jitted update on a [batch, seq] batch,
float32 master weights, bfloat16 matmuls); `decode` is `decode.py --windows`' (32 greedy
decode steps of a bfloat16 model over a windowed cache read through `--window` slots).

After a compiling call and a warm one, one more call runs under the profiler. Each XLA op of
its trace gets the time it ran, split evenly among the ops running at the same moment, so the
parts add up to the call's wall time with the time no op ran ("idle") beside them, whatever
the number of threads. A matmul that spreads over every core by itself (YNNPACK, oneDNN)
counts once. The ops are named back to their source through the compiled program's metadata
(`op_name`: the jitted function's path, e.g. `Transformer/layer_3/attn/...`) and grouped:
matmuls (plain, or batched: attention's scores and values), then the rest of attention, of
the MLP, the norms, the rest of the model, what runs outside the model (loss, optimizer,
sampler), and the copies and transposes XLA adds (ops without a source). Loops and
conditionals are not counted themselves: the ops inside them are.

XLA:CPU only: its trace events are the compiled program's instructions, by name. A GPU's or
TPU's trace holds device kernels under other names (cuBLAS, Triton, fusions renamed), so there
use `--trace-dir` and TensorBoard's profile plugin (or Perfetto) instead.

The tables in docs/benchmarks.md ("Where the update's time goes", "Where a wide-window decode
step goes") come from this. `python benchmarks/profile_ops.py update --seq 944` prints them
for the default's packed row on the machine at hand; `--top` lists the costliest source ops.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

# The parts, in the order they print.
PARTS = ("matmuls", "attention matmuls", "attention, other", "MLP, other", "norms",
         "model, other", "outside the model", "copies and transposes (no source)", "idle")
_CONTROL_FLOW = ("while", "conditional", "call")


@dataclasses.dataclass(frozen=True)
class Op:
    """One instruction of a compiled program: its source path (`op_name` metadata, '' when XLA
    made it) and whether it is, or fuses, a matmul ('' / 'plain' / 'batched')."""

    source: str
    matmul: str
    opcode: str
    stem: str  # the instruction's name without its number: 'ynn_fusion', 'copy_bitcast_fusion'


def hlo_ops(hlo_text: str) -> dict[str, Op]:
    """Instruction name -> Op for every instruction of a compiled program's HLO text
    (`jitted.lower(...).compile().as_text()`)."""
    # Which computations hold a matmul, and of which kind.
    comp_matmul: dict[str, str] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            continue
        if line.startswith("}"):
            current = None
            continue
        if current and re.search(r"\bdot\(", line):
            kind = "batched" if "lhs_batch_dims" in line else "plain"
            if comp_matmul.get(current) != "batched":
                comp_matmul[current] = kind
    ops = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = .*?\b([a-z][\w-]*)\((.*)$", hlo_text, re.M):
        name, opcode, rest = m.groups()
        source = re.search(r'op_name="([^"]*)"', rest)
        called = re.search(r"calls=%([\w.-]+)", rest)
        if opcode == "dot":
            matmul = "batched" if "lhs_batch_dims" in rest else "plain"
        else:
            matmul = comp_matmul.get(called.group(1), "") if called else ""
        ops[name] = Op(source.group(1) if source else "", matmul, opcode,
                       re.sub(r"\.\d+$", "", name))
    return ops


def part_of(op: Op) -> str:
    """The part of `PARTS` an op's time counts to."""
    if op.matmul:
        return "attention matmuls" if op.matmul == "batched" else "matmuls"
    if not op.source:
        return "copies and transposes (no source)"
    if "Transformer" not in op.source:
        return "outside the model"
    if "/attn/" in op.source:
        return "attention, other"
    if "/mlp/" in op.source:
        return "MLP, other"
    if "norm" in op.source:
        return "norms"
    return "model, other"


def source_key(source: str) -> str:
    """A source path with the layer index and the jit / transformation prefix dropped, so one
    op of every layer adds up: '.../layer_3/attn/reduce_max' -> 'layer_N/attn/reduce_max'."""
    source = re.sub(r"layer_\d+", "layer_N", source)
    source = re.sub(r"^jit\([^)]*\)/", "", source)
    return re.sub(r"(while/body/|closed_call/)+", "", source)


def wall_shares(trace_file: str, ops: dict[str, Op]) -> tuple[dict[str, float], dict, float]:
    """(seconds by part incl. 'idle', seconds by source op, the traced span in seconds) of a
    Perfetto trace (`*.trace.json.gz`): every interval's length split evenly among the ops
    running then (ops of `ops` only; loops and conditionals, which contain other ops' events,
    are left out)."""
    with gzip.open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    # (start, end, part, source) of each op's run; the part and source once per op.
    label = {name: (part_of(op), source_key(op.source) or f"(no source) {op.stem}")
             for name, op in ops.items() if op.opcode not in _CONTROL_FLOW}
    spans = [(e["ts"], e["ts"] + e["dur"], *label[e["name"]]) for e in events
             if e.get("ph") == "X" and e.get("name") in label and e.get("dur", 0) > 0]
    if not spans:
        raise RuntimeError(f"{trace_file} holds no event of the program's ops")
    points = sorted([(span[0], 1, i) for i, span in enumerate(spans)]
                    + [(span[1], -1, i) for i, span in enumerate(spans)])
    parts = collections.Counter({p: 0.0 for p in PARTS})
    sources = collections.Counter()
    active: set[int] = set()
    last = points[0][0]
    for t, kind, i in points:
        if t > last:
            if active:
                share = (t - last) / len(active)
                for j in active:
                    _, _, part, source = spans[j]
                    parts[part] += share
                    sources[(part, source)] += share
            else:
                parts["idle"] += t - last
        last = t
        (active.add if kind == 1 else active.discard)(i)
    span = (points[-1][0] - points[0][0]) / 1e6
    return ({k: v / 1e6 for k, v in parts.items()},
            {k: v / 1e6 for k, v in sources.items()}, span)


def profile(fn, args: tuple, out_of=lambda out: None, static_argnums: tuple[int, ...] = (),
            trace_dir: str | None = None) -> dict:
    """Compiles `fn` (a jitted function) for `args`, calls it twice, then once under the
    profiler, and splits that call's time by part. `out_of(out)` gives the next call's args
    when `fn` donates them (None: the same args again); `static_argnums` are `fn`'s static
    arguments, passed to `lower` only. Returns {'wall_s', 'span_s', 'parts': {part: s},
    'sources': [(part, source, s)], 'trace'} ('trace': the trace file under `trace_dir`, None
    without one: the trace is then written to a temporary directory and removed)."""
    compiled = fn.lower(*args).compile()  # one compile: its HLO names the trace's ops

    def call(args):
        return compiled(*(a for i, a in enumerate(args) if i not in static_argnums))

    ops = hlo_ops(compiled.as_text())
    for _ in range(2):
        args = out_of(jax.block_until_ready(call(args))) or args
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = trace_dir or tmp
        jax.profiler.start_trace(trace_dir)
        t = time.perf_counter()
        jax.block_until_ready(call(args))
        wall = time.perf_counter() - t
        jax.profiler.stop_trace()
        traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                                  recursive=True), key=os.path.getmtime)
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
        parts, sources, span = wall_shares(traces[-1], ops)
    ranked = sorted(((p, s, v) for (p, s), v in sources.items()), key=lambda r: -r[2])
    return dict(wall_s=wall, span_s=span, parts=parts, sources=ranked,
                trace=traces[-1] if trace_dir != tmp else None)


def report(result: dict, top: int = 0) -> str:
    span = result["span_s"]
    lines = [f"one call: {result['wall_s']:.3f} s wall, {span:.3f} s from its first op to its "
             f"last", f"{'part':<36} {'s':>8} {'share':>6}"]
    for part in PARTS:
        v = result["parts"][part]
        lines.append(f"{part:<36} {v:>8.3f} {100 * v / span:>5.1f}%")
    if top:
        lines.append(f"\nthe {top} costliest source ops (every layer's together):")
        for part, source, v in result["sources"][:top]:
            lines.append(f"{v:>8.3f} s {100 * v / span:>5.1f}%  [{part}] {source}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("program", choices=["update", "decode"])
    ap.add_argument("--batch", type=int, help="rows (update: 1; decode: 16)")
    ap.add_argument("--seq", type=int, default=944, help="update: tokens a row")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="update: matmul input dtype")
    ap.add_argument("--window", type=int, default=512, help="decode: attention window")
    ap.add_argument("--cache-slots", type=int, default=768, help="decode: cache slots")
    ap.add_argument("--model", default=None,
                    help="a model load_pretrained takes, or random:<shape> (decode.py's shapes); "
                         "default: the embedded SmolLM2-135M")
    ap.add_argument("--top", type=int, default=12, help="list this many source ops")
    ap.add_argument("--trace-dir", help="keep the trace here (TensorBoard / Perfetto)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    import jax.numpy as jnp

    from benchmarks import decode
    from benchmarks import train_step as train_step_bench
    from zerosearch_jax import models

    if jax.default_backend() != "cpu":
        raise SystemExit(f"profile_ops.py splits XLA:CPU traces; the backend is "
                         f"{jax.default_backend()} (JAX_PLATFORMS=cpu, or read a --trace-dir "
                         f"with TensorBoard's profile plugin)")
    name = args.model or models.DEFAULT_MODEL
    if args.program == "update":
        config, params = decode.load_model(name)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # master weights
        batch = args.batch or 1
        update, state, scored, layout = train_step_bench.update_program(
            config, params, batch, args.seq, args.dtype)
        result = profile(update, (state, scored, layout),
                         out_of=lambda out: (out[0], scored, layout), trace_dir=args.trace_dir)
        what = f"update, {name}, [{batch}, {args.seq}] {args.dtype}"
    else:
        config, params = decode.load_model(name)
        batch = args.batch or 16
        run = decode.window_program(config)
        logits = jnp.zeros((batch, config.vocab_size), jnp.float32)
        cache = decode.window_cache(config, batch, args.cache_slots, args.window)
        result = profile(run, (params, cache, logits, args.window),
                         out_of=lambda out: (params, out, logits, args.window),
                         static_argnums=(3,), trace_dir=args.trace_dir)
        what = (f"32 decode steps, {name}, batch {batch}, window {args.window} of "
                f"{args.cache_slots} slots")
    print(f"{what}, {jax.devices()[0].device_kind}")
    print(report(result, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(program=what, **{k: v for k, v in result.items() if k != "trace"}),
                      f, indent=2)


if __name__ == "__main__":
    main()
