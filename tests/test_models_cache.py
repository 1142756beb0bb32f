"""The KV cache: prefill + one-token steps give the full forward pass's logits."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_utils import left_padded_batch
from zerosearch_jax import models, sampling


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_cached_decoding_matches_full_forward(model_type):
    config = models.tiny_config(model_type, tie_word_embeddings=model_type == "llama")
    params = models.init_params(config, 1)
    lengths, steps = [9, 4, 7], 6
    ids, mask = left_padded_batch(config.vocab_size, lengths, seed=5)
    P = ids.shape[1]
    rng = np.random.default_rng(0)
    new = rng.integers(3, config.vocab_size, (len(lengths), steps))
    full_ids = np.concatenate([ids, new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    ref = np.asarray(models.forward(config, params, full_ids, full_mask))

    extend = jax.jit(models.extend, static_argnums=0, static_argnames=("last_only",))
    cache = models.init_cache(config, len(lengths), P + steps + 3, dtype=jnp.float32)
    logits, cache = extend(config, params, ids, mask.astype(bool), cache)
    m = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[m], ref[:, :P][m], atol=1e-4)
    for t in range(steps):
        step_logits, cache = extend(config, params, new[:, t:t + 1], np.ones((3, 1), bool),
                                    cache, last_only=True)
        np.testing.assert_allclose(np.asarray(step_logits), ref[:, P + t], atol=1e-4)
    assert int(cache.index) == P + steps
    np.testing.assert_array_equal(np.asarray(cache.next_position), np.array(lengths) + steps)


def test_chunk_with_padding_inside_cache():
    """An inserted chunk with its own padding (observations in a rollout) is skipped exactly."""
    config = models.tiny_config("qwen2")
    params = models.init_params(config, 2)
    a = np.array([[5, 6, 7]])
    b = np.array([[0, 0, 8, 9]])  # two pad slots, then two tokens
    cache = models.init_cache(config, 1, 16, dtype=jnp.float32)
    _, cache = models.extend(config, params, a, np.ones_like(a, bool), cache)
    logits, cache = models.extend(config, params, b, b != 0, cache)
    ref = np.asarray(models.forward(config, params, np.array([[5, 6, 7, 8, 9]])))
    np.testing.assert_allclose(np.asarray(logits)[0, 2:], ref[0, 3:], atol=1e-4)


def test_bf16_cache_decoding_close():
    config = models.tiny_config("llama")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), models.init_params(config, 3))
    ids, mask = left_padded_batch(config.vocab_size, [5, 8], seed=6)
    ref = np.asarray(models.forward(config, params, ids, mask))
    cache = models.init_cache(config, 2, 12, dtype=jnp.bfloat16)
    logits, _ = models.extend(config, params, ids, mask.astype(bool), cache)
    m = mask.astype(bool)
    assert np.abs(np.asarray(logits)[m] - ref[m]).max() < 0.05


def test_logical_axes_cover_every_param():
    for model_type in ("llama", "qwen2", "qwen3"):
        config = models.tiny_config(model_type)
        params = models.init_params(config)
        axes = models.param_logical_axes(config)
        flat_p = jax.tree_util.tree_leaves_with_path(params)
        flat_a = jax.tree_util.tree_leaves_with_path(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert [p for p, _ in flat_p] == [p for p, _ in flat_a]
        for (path, x), (_, spec) in zip(flat_p, flat_a, strict=True):
            assert len(spec) == x.ndim, path
        names = {n for _, s in flat_a for n in s if n}
        assert {"vocab", "embed", "mlp", "kv_heads", "heads"} <= names


def _windowed_steps(config, params, cache, ids, mask, new, window):
    """Prefill, then one token a step, each attending over the first `window` slots."""
    extend = jax.jit(models.extend, static_argnums=0, static_argnames=("last_only", "kv_length"))
    logits, cache = extend(config, params, ids, mask, cache, last_only=True, kv_length=window)
    out = [np.asarray(logits)]
    for t in range(new.shape[1]):
        logits, cache = extend(config, params, new[:, t:t + 1], np.ones((len(ids), 1), bool),
                               cache, last_only=True, kv_length=window)
        out.append(np.asarray(logits))
    return np.stack(out), cache


def test_windowed_cache_gives_the_plain_caches_logits():
    """bfloat16 kept as uint16 bits plus a spare slot: the same keys and values, so the same
    logits, bit for bit, through windows narrower than the cache and as wide as it."""
    config = models.tiny_config("qwen2")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), models.init_params(config, 4))
    ids, mask = left_padded_batch(config.vocab_size, [5, 8, 3], seed=7)
    new = np.random.default_rng(1).integers(3, config.vocab_size, (3, 5))
    S = ids.shape[1] + new.shape[1]
    for window in (S - 1, S):
        plain = models.init_cache(config, 3, S, jnp.bfloat16)
        windowed = models.init_cache(config, 3, S, jnp.bfloat16, windowed=True)
        assert windowed.max_length == S and windowed.k[0].shape[2] == S + 1
        assert windowed.k[0].dtype == jnp.uint16
        a, _ = _windowed_steps(config, params, plain, ids, mask.astype(bool), new[:, :4], window)
        b, cache = _windowed_steps(config, params, windowed, ids, mask.astype(bool), new[:, :4],
                                   window)
        np.testing.assert_array_equal(a, b)
        assert int(cache.index) == ids.shape[1] + 4
    # float32 caches keep their dtype (only bfloat16 has the in-place problem).
    assert models.init_cache(config, 1, 4, jnp.float32, windowed=True).k[0].dtype == jnp.float32


def test_windowed_decode_loop_writes_the_cache_in_place():
    """The decode loop over a windowed cache, attending through a window narrower than the
    cache, never copies a layer's cache (a plain bfloat16 cache read this way is copied whole at
    every step on XLA:CPU: `init_cache`'s docstring)."""
    config = models.tiny_config("llama")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), models.init_params(config, 0))
    B, S = 4, 64
    cache = models.init_cache(config, B, S, jnp.bfloat16, windowed=True)
    run = jax.jit(functools.partial(
        sampling.decode, config, sampler=sampling.Greedy(), max_new_tokens=8,
        stop=sampling.StopConditions(pad_id=0), kv_length=32), donate_argnums=(1,))
    logits = jnp.zeros((B, config.vocab_size), jnp.float32)
    hlo = run.lower(params, cache, logits, jax.random.key(0)).compile().as_text()
    K, D = config.num_kv_heads, config.head_dim
    whole = re.compile(rf"= \w+\[{B},{K},{S + 1},{D}\]\S* copy\(")
    assert not whole.findall(hlo)
    out, _ = run(params, cache, logits, jax.random.key(0))
    assert (np.asarray(out.lengths) == 8).all()


def test_whole_sequence_attention_in_query_blocks_equals_one_block(monkeypatch):
    """Cache-less passes (training, scoring) attend in blocks of `_QUERY_CHUNK` queries, each
    reading the keys up to its own end: with blocks of 4 (13 tokens: three whole blocks and a
    short one; left padding and a packed row's segments) the logits and the gradients equal
    the single-block pass at every real token. (A pad query sees no key; what it averages
    differs with the block, and nothing reads it.)"""
    from zerosearch_jax import training
    from zerosearch_jax.models import transformer

    config = models.tiny_config("qwen2")
    params = models.init_params(config, 7)
    ids, mask = left_padded_batch(config.vocab_size, [13, 9], seed=3)
    segments = np.array([[1] * 5 + [2] * 6 + [0] * 2, [3] * 13])
    inputs = [(models.causal_attention_mask(jnp.asarray(mask, bool)),
               models.positions_from_mask(jnp.asarray(mask, bool)), mask > 0),
              (training.segment_attention_mask(jnp.asarray(segments)),
               jnp.asarray(np.tile(np.arange(13), (2, 1))), segments > 0)]

    for attn, pos, real in inputs:
        def loss(p, attn=attn, pos=pos, real=real):
            out, _ = models.Transformer(config).apply({"params": p}, jnp.asarray(ids), pos, attn)
            return jnp.sum(jnp.sin(out) * real[..., None]), out

        results = []
        for chunk in (64, 4):  # one block (T <= chunk), then four blocks
            monkeypatch.setattr(transformer, "_QUERY_CHUNK", chunk)
            (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
            results.append((np.asarray(out)[real], grads))
        (out1, g1), (out4, g4) = results
        np.testing.assert_allclose(out4, out1, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                             atol=1e-5, rtol=1e-4), g4, g1)
