"""The format warm-up's step on its real demonstrations, packed vs one demonstration a row.

    python benchmarks/sft_step.py [--policy smollm2-135m-instruct] [--steps 3]
        [--layouts 0:4,1024:1,1024:2]

Builds the default job's demonstrations (configs/default.py: the synthetic world, its BM25
engine, `warmup.num_questions` questions), then times `simulator_sft.finetune.sft_step` (the
step the warm-up and the simulator's SFT run, jitted) on the same batches of `warmup.batch_size`
demonstrations for each layout `pack_length:micro_batch_size` (0: one demonstration a row of
the bucketed width, the step before packing). Prints per layout: seconds per step after the
compiling one, token slots run, real tokens, padding, and the first step's loss (equal up to
bfloat16 rounding: packing changes no result).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from zerosearch_jax import inputs, models, stages, train, training  # noqa: E402
from zerosearch_jax.simulator_sft import finetune  # noqa: E402
from zerosearch_jax.tokenizer import Tokenizer  # noqa: E402


def time_layout(config, params, data, batches, c, pack_length: int, micro: int) -> dict:
    sc = finetune.SFTConfig(steps=len(batches), batch_size=c.warmup.batch_size, lr=c.warmup.lr,
                            max_length=data["tokens"].shape[1], weight_decay=0.01,
                            compute_dtype=c.compute_dtype, remat=c.remat,
                            pack_length=pack_length, micro_batch_size=micro)
    opt = training.make_optimizer(sc.lr, sc.steps, weight_decay=sc.weight_decay)
    state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=opt.init(params))
    step = jax.jit(lambda s, b, lay: finetune.sft_step(config, sc, opt, s, b, lay))
    times, first = [], None
    for idx in batches:  # every layout steps from the same state: the same first loss
        batch = {k: v[idx] for k, v in data.items()}
        t = time.perf_counter()
        _, m = step(state, batch, sc.plan(batch["attention_mask"]))
        m = jax.device_get(m)
        times.append(time.perf_counter() - t)
        first = first or m
    slots, real = float(m["token_slots"]), float(m["real_tokens"])
    return {"s_per_step": statistics.median(times[1:]), "compile_s": times[0], "slots": slots,
            "real": real, "padding": 1 - real / slots, "loss": float(first["loss"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None, help="default: configs/default.py's policy")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    ap.add_argument("--layouts", default="0:4,1024:1,1024:2")
    args = ap.parse_args()
    c = default.get_config()
    settings = train.build_settings(c)
    tokenizer = Tokenizer.from_pretrained(c.tokenizer or c.policy)
    data, _ = stages.demonstrations(c, settings.rollout, tokenizer,
                                     inputs.make_validation_engine(c))
    config, params = models.load_pretrained(args.policy or c.policy, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(data["tokens"]), c.warmup.batch_size, replace=False)
               for _ in range(args.steps + 1)]
    print(f"{len(data['tokens'])} demonstrations, rows of {data['tokens'].shape[1]} tokens, "
          f"{c.warmup.batch_size} a step")
    results = {}
    for layout in args.layouts.split(","):
        pack, micro = map(int, layout.split(":"))
        r = results[layout] = time_layout(config, params, data, batches, c, pack, micro)
        print(f"pack_length {pack:5d}, {micro} rows a micro-batch: {r['s_per_step']:6.2f} s/step "
              f"(first {r['compile_s']:.0f} s), {r['slots']:.0f} slots for {r['real']:.0f} "
              f"real tokens (padding {r['padding']:.0%}), first loss {r['loss']:.5f}", flush=True)
    base = results.get("0:4") or next(iter(results.values()))
    for layout, r in results.items():
        print(f"{layout}: {base['s_per_step'] / r['s_per_step']:.2f}x the first layout")


if __name__ == "__main__":
    main()
