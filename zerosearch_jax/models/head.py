"""Token log-probs and entropies of the LM head's distribution.

`head_logprobs_entropy` is what training differentiates: from the final-norm hidden states
[B, T, E] and the head weight [V, E] (`models.head_weight`: the LM head or the tied embedding)
it returns, per position, log p(target) and the entropy of p = softmax(hidden @ head.T /
temperature), both float32, without ever materializing the [B, T, V] logits. It is a custom
VJP because the plain logits -> log-softmax -> entropy graph keeps several float32 [B, T, V]
arrays for the backward pass (a 4 x 256 batch of a 49k vocabulary is 200 MB per copy) and
makes several passes over them. Here positions go `chunk` at a time: the forward keeps only
logsumexp and E_p[z] per position, and the backward recomputes each chunk's logits and uses

    d logp / dz = onehot(target) - p          d H / dz = -p * (z - E_p[z])

so neither pass holds more than one [B, chunk, V] float32 block, at the price of one extra
head matmul. The forward's two sums are one variadic `lax.reduce`, tuned for XLA:CPU (its
YNNPACK reduce fusions, which take plain sums, ran them ~2.5x slower); matmul inputs are cast
to `dtype` inside the VJP with float32 accumulation, so float32 master weights get float32
gradients.

A loss reads a fraction of the positions (an RL batch's policy tokens: ~18% of a packed row
in the default job). `compact_positions` orders each row's needed positions first and
`permute` gathers them (its gradient the inverse gather); with `n_valid` the kernel then skips
every chunk past them, in both passes.

`token_logprobs`, `shifted_logprobs` and `entropy_from_logits` are the same quantities from
materialized logits [B, T, V] (the reference the kernel is tested against, and for callers
that already hold logits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# From materialized logits
# ---------------------------------------------------------------------------------------------


def token_logprobs(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[targets] in float32: logits [B, T, V], targets [B, T] int -> [B, T].

    Computed as logit - logsumexp so no [B, T, V] log-softmax is kept beside the logits.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def shifted_logprobs(logits: Array, tokens: Array) -> Array:
    """Log-probs aligned with the tokens: logits [B, T, V] (position t predicts t + 1),
    tokens [B, T] -> [B, T] float32 with entry t = log p(tokens[t] | tokens[<t]), entry 0 = 0.

    This is the layout of `RolloutBatch.logprobs` / `loss_mask` (indexed by the token's own
    position), so the result is masked with `loss_mask` directly.
    """
    logp = token_logprobs(logits[:, :-1], tokens[:, 1:])
    return jnp.pad(logp, ((0, 0), (1, 0)))


def entropy_from_logits(logits: Array) -> Array:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v, as -sum p log p; logits [B, T, V] -> [B, T]
    float32. Stable for large logits and for -inf logits (p = 0 contributes 0, not nan)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    # Select before multiplying: 0 * -inf would be nan in the value and in the gradient.
    return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------
# The chunked kernel: logits recomputed per chunk, never held whole
# ---------------------------------------------------------------------------------------------


def _head_chunk(hidden: Array, head: Array, dtype, temperature: float) -> Array:
    """hidden [B, C, E] -> float32 logits [B, C, V] / temperature (dtype inputs, f32 sums)."""
    z = jnp.einsum("bce,ve->bcv", hidden.astype(dtype), head.astype(dtype),
                   preferred_element_type=jnp.float32)
    return z / temperature


def _head_chunks(x: Array, chunk: int) -> tuple[Array, int]:
    """[B, T, ...] -> [n, B, chunk, ...] (T padded to n * chunk with zeros) and the pad."""
    B, T = x.shape[:2]
    pad = -T % chunk
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(B, -1, chunk, *x.shape[2:]).swapaxes(0, 1), pad


def _head_unchunk(y: Array, T: int) -> Array:
    """[n, B, chunk] -> [B, T]."""
    return y.swapaxes(0, 1).reshape(y.shape[1], -1)[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def head_logprobs_entropy(hidden: Array, head: Array, targets: Array, dtype=jnp.bfloat16,
                          temperature: float = 1.0, chunk: int = 128,
                          n_valid: Array | None = None) -> tuple[Array, Array]:
    """Token log-probs and entropies of the LM head's distribution, without materializing the
    [B, T, V] logits.

    hidden [B, T, E] (final-norm states), head [V, E] (LM head or tied embedding), targets
    [B, T] int -> (log p(targets[t] | position t) [B, T], entropy at position t [B, T]), both
    float32, for z = hidden @ head.T / temperature with `dtype` matmul inputs and float32
    accumulation.

    The positions are processed `chunk` at a time (a `lax.map`): the forward pass keeps only
    logsumexp and E_p[z] per position, and the backward pass recomputes each chunk's logits,
    using

        d logp / dz = onehot(target) - p          d H / dz = -p * (z - E_p[z])

    so neither pass holds more than one [B, chunk, V] float32 block. Against the plain
    logits -> log-softmax -> entropy graph this trades one extra head matmul for several
    fewer passes over [B, T, V] arrays and a much smaller peak (the full float32 logits of a
    4 x 256 batch of a 49k vocabulary are 200 MB, kept for the backward pass, several times).

    n_valid (a traced int scalar): only the first n_valid positions are wanted; the chunks
    after the one holding position n_valid - 1 are skipped in both passes (their outputs are
    0 and they add nothing to the gradients). `compact_positions` moves the positions a loss
    reads to the front, so the head runs on those and not on prompts and inserted documents.
    """
    out, _ = _head_fwd(hidden, head, targets, dtype, temperature, chunk, n_valid)
    return out


def _chunks_used(n: int, chunk: int, n_valid) -> Array:
    return jnp.clip((jnp.asarray(n_valid, jnp.int32) + chunk - 1) // chunk, 0, n)


def _map_chunks(fn, xs, n_used):
    """lax.map(fn, xs) over the first n_used chunks (all with n_used None); the outputs of the
    chunks after them are zeros."""
    if n_used is None:
        return jax.lax.map(fn, xs)
    shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], xs))
    zeros = jax.tree.map(lambda a: jnp.zeros((xs[0].shape[0], *a.shape), a.dtype), shapes)

    def body(i, acc):
        out = fn(jax.tree.map(lambda x: x[i], xs))
        return jax.tree.map(lambda a, o: a.at[i].set(o), acc, out)

    return jax.lax.fori_loop(0, n_used, body, zeros)


def _head_fwd(hidden, head, targets, dtype, temperature, chunk, n_valid):
    T = hidden.shape[1]
    hs, _ = _head_chunks(hidden, chunk)
    ts, _ = _head_chunks(targets.astype(jnp.int32), chunk)
    n_used = None if n_valid is None else _chunks_used(hs.shape[0], chunk, n_valid)

    def one(args):
        h, t = args
        z = _head_chunk(h, head, dtype, temperature)
        m = jnp.max(z, axis=-1, keepdims=True)
        e = jnp.exp(z - m)
        # sum(e) and sum(e * z) in one variadic reduce: a single pass over the block, and on
        # XLA:CPU a native loop (its YNNPACK reduce fusions, which take plain sums, ran the
        # two sums ~2.5x slower here).
        s, sz = jax.lax.reduce((e, e * z), (jnp.float32(0), jnp.float32(0)),
                               lambda a, b: (a[0] + b[0], a[1] + b[1]), (z.ndim - 1,))
        lse = m[..., 0] + jnp.log(s)
        picked = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]
        return picked - lse, lse, sz / s

    logp, lse, ez = (_head_unchunk(y, T) for y in _map_chunks(one, (hs, ts), n_used))
    return (logp, lse - ez), (hidden, head, targets, lse, ez, n_used)


def _head_bwd(dtype, temperature, chunk, residuals, cotangents):
    hidden, head, targets, lse, ez, n_used = residuals
    g_logp, g_ent = cotangents
    T = hidden.shape[1]
    hs, _ = _head_chunks(hidden, chunk)
    ts, _ = _head_chunks(targets.astype(jnp.int32), chunk)
    # Padded positions get zero cotangents, so they add nothing to either gradient.
    gs = [_head_chunks(x.astype(jnp.float32), chunk)[0] for x in (g_logp, g_ent, lse, ez)]
    cd = jnp.dtype(dtype)

    def one(d_head, args):
        h, t, gl, ge, l_, e_ = args
        z = _head_chunk(h, head, dtype, temperature)
        p = jnp.exp(z - l_[..., None])
        onehot = jax.nn.one_hot(t, z.shape[-1], dtype=jnp.float32)
        dz = gl[..., None] * (onehot - p) - ge[..., None] * p * (z - e_[..., None])
        dz = (dz / temperature).astype(cd)
        dh = jnp.einsum("bcv,ve->bce", dz, head.astype(cd), preferred_element_type=jnp.float32)
        d_head = d_head + jnp.einsum("bcv,bce->ve", dz, h.astype(cd),
                                     preferred_element_type=jnp.float32)
        return d_head, dh

    d_head0 = jnp.zeros(head.shape, jnp.float32)
    if n_used is None:
        d_head, dh = jax.lax.scan(one, d_head0, (hs, ts, *gs))
    else:  # the skipped chunks have zero gradients
        def body(i, carry):
            d_head, dh = carry
            d_head, dh_i = one(d_head, tuple(x[i] for x in (hs, ts, *gs)))
            return d_head, dh.at[i].set(dh_i)

        d_head, dh = jax.lax.fori_loop(0, n_used, body,
                                       (d_head0, jnp.zeros(hs.shape, jnp.float32)))
    dh = dh.swapaxes(0, 1).reshape(hidden.shape[0], -1, hidden.shape[-1])[:, :T]
    return dh.astype(hidden.dtype), d_head.astype(head.dtype), None, None


@jax.custom_vjp
def permute(x: Array, order: Array, inverse: Array) -> Array:
    """x [B, T, ...] with row b's position t taken from order[b, t], a permutation of each row
    (`compact_positions`) whose inverse is `inverse`. A custom VJP so the gradient is the
    inverse gather, not a scatter-add."""
    return _take(x, order)


def _take(x, index):
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


def _permute_fwd(x, order, inverse):
    return _take(x, order), inverse


def _permute_bwd(inverse, g):
    return _take(g, inverse), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


def compact_positions(needed: Array) -> tuple[Array, Array, Array]:
    """needed [B, T] bool -> (order, inverse [B, T] int32, n_valid scalar): `order` puts each
    row's needed positions first, in their order (the rest after them), `inverse` undoes it,
    and n_valid is the largest count of needed positions in a row. The head kernel on
    `permute(x, order, inverse)` with `n_valid` computes only what is needed;
    `permute(out, inverse, order)` puts the results back."""
    order = jnp.argsort(jnp.logical_not(needed).astype(jnp.int32), axis=1,
                        stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order, axis=1).astype(jnp.int32)
    return order, inverse, needed.sum(axis=1).max().astype(jnp.int32)


head_logprobs_entropy.defvjp(_head_fwd, _head_bwd)
