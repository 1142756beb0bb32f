"""Chat with a model from the command line (the embedded SmolLM2-135M-Instruct by default).

    python -m zerosearch_jax.chat "What is the capital of France?" "Who wrote Hamlet?"
    python -m zerosearch_jax.chat --model Qwen/Qwen2.5-3B-Instruct --dtype bfloat16 --sampler top_p
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

from zerosearch_jax import models, sampling
from zerosearch_jax.cli import setup_logging
from zerosearch_jax.tokenizer import Tokenizer

DEFAULT_PROMPTS = ("What is the capital of France?",
                   "Give me three tips for writing a good search query.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="*", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--model", default=models.DEFAULT_MODEL,
                        help="embedded name, HF directory, .gguf file or hub id")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--sampler", default="greedy", choices=sorted(sampling.SAMPLERS))
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()

    sampler_kwargs = {} if args.temperature is None else {"temperature": args.temperature}
    try:
        sampler = sampling.make_sampler(args.sampler, **sampler_kwargs)
        t0 = time.perf_counter()
        config, params = models.load_pretrained(args.model, dtype=jnp.dtype(args.dtype))
        tokenizer = Tokenizer.from_pretrained(args.model)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded {args.model} ({config.num_layers} layers, {args.dtype}) in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    replies = sampling.generate_text(config, params, tokenizer, args.prompts, sampler,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed)
    elapsed = time.perf_counter() - t0
    for prompt, reply in zip(args.prompts, replies, strict=True):
        print(f"\n>>> {prompt}\n{reply.strip()}")
    print(f"\n[{len(replies)} replies in {elapsed:.1f}s, compilation included]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
