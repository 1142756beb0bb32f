"""The KV cache: prefill + one-token steps give the full forward pass's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_utils import left_padded_batch
from zerosearch_jax import models


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
