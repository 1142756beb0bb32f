"""Jitted batched generation with a KV cache, stop conditions and sampling methods.

    stop = StopConditions.for_tokenizer(tok, ["</search>"])
    out = sampling.generate(config, params, [ids_a, ids_b], sampling.TopP(0.95),
                            max_new_tokens=128, stop=stop)
    texts = sampling.generate_text(config, params, tok, ["What is the capital of France?"])
"""

from zerosearch_jax.sampling.loop import (
    GenerationOutput,
    StopConditions,
    bucket_batch,
    bucket_length,
    decode,
    generate,
    generate_text,
    pad_banned,
    prefill_and_decode,
)
from zerosearch_jax.sampling.methods import SAMPLERS, Greedy, Temperature, TopK, TopP, make_sampler

__all__ = [
    "SAMPLERS", "GenerationOutput", "Greedy", "StopConditions", "Temperature", "TopK", "TopP",
    "bucket_batch", "bucket_length", "decode", "generate", "generate_text", "make_sampler",
    "pad_banned", "prefill_and_decode",
]
