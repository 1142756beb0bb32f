"""Tests for zerosearch_jax.models.head: token log-probs and entropies from logits, and the
chunked custom-VJP LM-head kernel against the materialized logits (values and gradients)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zerosearch_jax import models


def test_token_and_shifted_logprobs():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 7)).astype(jnp.bfloat16)
    tokens = jnp.array([[3, 1, 6, 0], [2, 2, 5, 4]])
    full = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = models.token_logprobs(logits, tokens)
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, jnp.take_along_axis(full, tokens[..., None], -1)[..., 0],
                               atol=1e-6)
    shifted = models.shifted_logprobs(logits, tokens)
    assert shifted.shape == (2, 4) and shifted.dtype == jnp.float32
    np.testing.assert_array_equal(shifted[:, 0], 0.0)
    # Entry t scores token t with the logits of position t - 1.
    for b in range(2):
        for t in range(1, 4):
            assert float(shifted[b, t]) == pytest.approx(float(full[b, t - 1, tokens[b, t]]),
                                                         abs=1e-6)


def test_entropy_from_logits():
    # Uniform over 8 -> log 8; one-hot-ish (others -inf) -> 0 and no nan; two equal of three
    # with the third -inf -> log 2; large logits stay finite.
    logits = jnp.array([[[0.0] * 8,
                         [5.0] + [-jnp.inf] * 7,
                         [1.0, 1.0] + [-jnp.inf] * 6,
                         [1e4, 1e4 - 1.0] + [-1e4] * 6]])
    ent = models.entropy_from_logits(logits)
    # Two logits a nat apart: p = [s, 1 - s] with s = sigmoid(1), H = -sum p log p = 0.5822031.
    np.testing.assert_allclose(ent, [[math.log(8), 0.0, math.log(2), 0.5822031]], atol=1e-6)
    assert np.isfinite(jax.grad(lambda z: models.entropy_from_logits(z).sum())(logits)).all()


@pytest.mark.parametrize("temperature,chunk", [(1.0, 4), (0.7, 16), (1.3, 128)])
def test_head_logprobs_entropy_match_the_full_logits(temperature, chunk):
    """The chunked, custom-VJP head equals log-softmax / entropy of the materialized logits,
    values and both gradients, also when the chunk does not divide T (T = 13)."""
    k = jax.random.split(jax.random.key(3), 5)
    B, T, E, V = 2, 13, 8, 37
    hidden = jax.random.normal(k[0], (B, T, E))
    head = jax.random.normal(k[1], (V, E))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    g_logp, g_ent = jax.random.normal(k[3], (B, T)), jax.random.normal(k[4], (B, T))

    def reference(h, w):
        z = jnp.einsum("bte,ve->btv", h, w) / temperature
        lp = jnp.take_along_axis(jax.nn.log_softmax(z), targets[..., None], -1)[..., 0]
        return lp, models.entropy_from_logits(z)

    def fused(h, w):
        return models.head_logprobs_entropy(h, w, targets, jnp.float32, temperature, chunk)

    def objective(fn):
        return lambda h, w: (fn(h, w)[0] * g_logp + fn(h, w)[1] * g_ent).sum()

    for got, want in zip(fused(hidden, head), reference(hidden, head), strict=True):
        assert got.shape == (B, T) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, atol=2e-5)
    grads = jax.grad(objective(fused), argnums=(0, 1))(hidden, head)
    want = jax.grad(objective(reference), argnums=(0, 1))(hidden, head)
    for got, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, w, atol=1e-4)


def test_head_logprobs_entropy_bfloat16_inputs_keep_float32_gradients():
    k = jax.random.split(jax.random.key(4), 3)
    hidden = jax.random.normal(k[0], (2, 9, 16))
    head = jax.random.normal(k[1], (50, 16)) * 0.1
    targets = jax.random.randint(k[2], (2, 9), 0, 50)
    fn = jax.jit(lambda h, w: models.head_logprobs_entropy(h, w, targets, jnp.bfloat16)[0].sum())
    gh, gw = jax.grad(fn, argnums=(0, 1))(hidden, head)
    assert gh.dtype == gw.dtype == jnp.float32
    exact = jax.grad(lambda h, w: models.head_logprobs_entropy(h, w, targets, jnp.float32)[0].sum(),
                     argnums=(0, 1))(hidden, head)
    # bf16 products with f32 accumulation: within bf16's ~3 significant digits of the f32 path.
    for got, want in zip((gh, gw), exact, strict=True):
        np.testing.assert_allclose(got, want, atol=3e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("n_valid", [0, 3, 4, 9, 13])
def test_head_skips_the_chunks_after_n_valid(n_valid):
    """With n_valid, the chunks holding positions < n_valid are computed as without it (values
    and gradients), the chunks after them are 0 and add nothing to either gradient."""
    k = jax.random.split(jax.random.key(5), 5)
    B, T, E, V, chunk = 2, 13, 8, 37, 4
    hidden, head = jax.random.normal(k[0], (B, T, E)), jax.random.normal(k[1], (V, E))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    g_logp, g_ent = jax.random.normal(k[3], (B, T)), jax.random.normal(k[4], (B, T))
    computed = -(-n_valid // chunk) * chunk  # whole chunks
    keep = (jnp.arange(T) < computed)[None]

    def objective(**kw):
        def f(h, w):
            lp, ent = models.head_logprobs_entropy(h, w, targets, jnp.float32, 1.0, chunk, **kw)
            return (lp * g_logp * keep + ent * g_ent * keep).sum(), (lp, ent)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, (lp, ent)), grads = objective(n_valid=jnp.int32(n_valid))(hidden, head)
    (_, (lp_all, ent_all)), want = objective()(hidden, head)
    for got, full in ((lp, lp_all), (ent, ent_all)):
        np.testing.assert_allclose(got[:, :computed], full[:, :computed], atol=1e-5)
        np.testing.assert_array_equal(got[:, computed:], 0.0)
    for got, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, w, atol=1e-4)


def test_policy_logprobs_on_the_needed_positions_only():
    """`needed` (a loss mask) gives the same entries there, values and gradients of a masked
    loss, and 0 elsewhere; a row without needed positions is all 0."""
    from zerosearch_jax import training

    config = models.tiny_config("llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    params = models.init_params(config, 0)
    B, T = 3, 300  # several 128-position chunks
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 50)
    mask = jnp.ones((B, T), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    needed = (jax.random.uniform(jax.random.key(2), (B, T)) < 0.2).astype(jnp.float32)
    needed = needed.at[2].set(0.0).at[:, 0].set(0.0)
    adv = jax.random.normal(jax.random.key(3), (B, T))

    def loss(p, **kw):
        lp, ent = training.policy_logprobs(config, p, tokens, mask, positions, dtype=jnp.float32,
                                           **kw)
        return ((lp * adv + 0.1 * ent) * needed).sum(), (lp, ent)

    (_, (lp, ent)), g = jax.jit(jax.value_and_grad(
        lambda p: loss(p, needed=needed), has_aux=True))(params)
    (_, (lp_all, ent_all)), g_all = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    on = needed > 0
    for got, full in ((lp, lp_all), (ent, ent_all)):
        np.testing.assert_allclose(got[on], full[on], atol=1e-5)
        np.testing.assert_array_equal(got[~on], 0.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, g_all)
