"""zerosearch-jax: ZeroSearch (arXiv 2505.04588) in JAX/Flax.

An LLM policy learns by RL to answer questions with a multi-turn search loop, while a second
LLM (the simulator) writes the search results during training. Sub-packages:

- `models`: the Flax decoder family (Llama 3.x, Qwen2/2.5, Qwen3, SmolLM2) and weight I/O.
- `tokenizer`: chat template, pad/eos conventions and agent tag ids.
- `data`, `search`, `rewards`, `curriculum`: the environment.
"""

__version__ = "0.1.0"
