"""A scripted policy for rollout tests: a one-layer bigram model on the real tokenizer.

Its next token depends only on the current one, through a chain written into the weights:

    prompt's last "\\n" -> <search> capital </search>          (turn 0: a search)
    an observation's last "\\n\\n" -> <answer>? Paris</answer>?   (turn 1: the answer)

("?" is a `>`-initial token other than `>` itself, so the two chains never share a bigram.)
The attention and MLP write nothing, so the residual stream is the token's embedding and the
logits are a lookup. `margin` sets how sure it is: large is deterministic even when sampling,
small lets sampled rows wander off the script. Any model shape can carry the script (every
layer still runs, at that shape's cost): `benchmarks/rollout.py --policy scripted:<shape>`
times the rollout with it where no trained policy can be loaded (an accelerator machine).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from zerosearch_jax import models


def tiny_config(vocab_size: int) -> models.ModelConfig:
    return models.ModelConfig(model_type="llama", vocab_size=vocab_size, hidden_size=64,
                              intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                              head_dim=16)


def _gt_token(tokenizer) -> int:
    """A token starting with '>' other than '>' (ends both an opening and a closing tag)."""
    plain = tokenizer.encode(">")[0]
    for p in tokenizer.stop_patterns("</answer>"):
        for i in sorted(p.sets[-1]):
            if i != plain and tokenizer.hf.decode([i]).startswith(">") and \
                    tokenizer.hf.decode([i]).strip(">") in (",", ".", ";", ":"):
                return i
    raise RuntimeError("no '>'-initial punctuation token")


def script(tokenizer, repeat_search: bool = False) -> dict[int, int]:
    """token -> next token. repeat_search: an observation's last "\\n\\n" leads to the same
    search again instead of the answer."""
    e = tokenizer.encode
    gt = _gt_token(tokenizer)
    search = [e("\n")[0], e("<")[0], e("search")[0], e(">")[0], e(" capital")[0], e(" </")[0],
              e("search")[0], e(">")[0]]
    answer = [e("\n\n")[0], e(" <")[0], e("answer")[0], gt, e(" Paris")[0], e("</")[0],
              e("answer")[0], gt]
    if repeat_search:
        answer = [e("\n\n")[0], e("<")[0]]  # into the search chain
    chain = {}
    for seq in (search, answer):
        for a, b in zip(seq[:-1], seq[1:], strict=True):
            assert chain.get(a, b) == b, (a, chain[a], b)
            chain[a] = b
    return chain


def scripted_policy(tokenizer, margin: float = 10.0, seed: int = 0,
                    repeat_search: bool = False, config: models.ModelConfig | None = None,
                    dtype=jnp.float32):
    """(config, params) of the bigram policy (`script`'s chain): `tiny_config`'s shape, or
    `config`'s (its vocabulary at least the tokenizer's; tied embeddings are untied, since
    the chain needs its own head), params in `dtype`."""
    V = tokenizer.vocab_size
    config = config or tiny_config(V)
    if config.vocab_size < V:
        raise ValueError(f"vocab_size {config.vocab_size} < the tokenizer's {V}")
    config = dataclasses.replace(config, tie_word_embeddings=False)
    V = config.vocab_size
    params = models.init_params(config, seed, dtype=dtype)
    chain = script(tokenizer, repeat_search)
    tokens = sorted(set(chain) | set(chain.values()))
    slot = {t: i for i, t in enumerate(tokens)}
    E = config.hidden_size
    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 0.02, (V, E)).astype(np.float32)
    emb[:, :len(tokens)] = 0.0  # only script tokens light up the script's coordinates
    head = rng.normal(0, 0.02, (V, E)).astype(np.float32)
    head[:, :len(tokens)] = 0.0
    for a, b in chain.items():
        emb[a] = 0.0
        emb[a, slot[a]] = 1.0
        head[b, slot[a]] = margin / np.sqrt(E)  # RMSNorm scales the one-hot by sqrt(E)
    params = dict(params)
    params["embedder"] = {"embedding": jnp.asarray(emb, dtype)}
    params["lm_head"] = {"weight": jnp.asarray(head, dtype)}
    for i in range(config.num_layers):
        layer = dict(params[f"layer_{i}"])
        layer["attn"] = dict(layer["attn"], o_weight=jnp.zeros_like(layer["attn"]["o_weight"]))
        layer["mlp"] = dict(layer["mlp"], down=jnp.zeros_like(layer["mlp"]["down"]))
        params[f"layer_{i}"] = layer
    return config, params
