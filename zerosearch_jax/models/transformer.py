"""The decoder-only transformer (Flax linen) and its pure-functional interface.

Parameters are a plain pytree (nested dicts of arrays), separate from the static `ModelConfig`.
Every weight is declared with logical axis names (`vocab`, `embed`, `mlp`, `kv_heads`, `heads`,
`head_dim`) so `flax.linen.logical_to_mesh_sharding` can place it on any mesh;
`param_logical_axes(config)` returns them without allocating anything.

Weight layout. Matrices are stored output-major ([out, in], the PyTorch layout) and contracted on
their last axis, with q|k|v fused into one tensor and gate|up into another: on CPU this layout is
the fastest for skinny decode matmuls (350 vs 267 tok/s at batch 8, docs/benchmarks.md), and
on TPU/GPU XLA picks its own physical layout anyway.

    qkv_weight    [K*(G+2)*D, E]  per KV head k: its G query heads, its key, its value
    o_weight      [E, H*D]        (HF's o_proj as is)
    gate_up       [2F, E]         rows interleaved: gate_0, up_0, gate_1, up_1, ...
    down          [E, F]

All matrices are 2-D: XLA:CPU transposes a weight with several output dims on every call,
which costs a full extra read of the model per decode step.
Query head h = k * G + g belongs to KV head k (HF's `repeat_kv` order), and both the fused qkv
rows and the o_weight columns are KV-head-major, so sharding `kv_heads` and `heads` on the same
mesh axis keeps each GQA group on one device and attention needs no communication.

dtype policy. Matmuls read their inputs in the parameter dtype (or the module's `dtype` when
set) and always accumulate in float32 (`preferred_element_type`): with bfloat16 weights this is
the AMX path on this CPU and the MXU path on TPU. The residual stream, RMSNorm, RoPE, softmax
and logits are float32.

KV cache. `KVCache` holds per-layer keys/values [B, K, S, D] (batch dims leading, so the
attention dots read the cache in place; a multi-turn caller asks for a windowed cache,
`init_cache(windowed=True)`), a key-validity mask [B, S], each
row's next RoPE position [B] and the next slot to write (a scalar shared by all rows, so a write
is one `dynamic_update_slice`). `extend` appends a chunk of T tokens (prefill: T = prompt length;
decode: T = 1; inserted observations: any T) and returns the logits for the chunk. Rows may be
left-padded: pad tokens get `token_mask = False`, occupy a slot, and are never attended to.
Worked example, S = 6, a batch of two prompts, row 1 left-padded by two:

    slot         0  1  2  3  4  5
    row 0 token  a  b  c  d  .  .      positions 0 1 2 3
    row 1 token  _  _  x  y  .  .      positions - - 0 1
    after one decode step both rows write slot 4; row 0 at position 4, row 1 at position 2.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zerosearch_jax.models.config import ModelConfig

Array = jax.Array
# Finite "minus infinity": a fully masked row (a pad query) softmaxes to a uniform, finite row.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_INIT_STD = 0.02  # HF `initializer_range` default for these families.
# Query rows per attention block in cache-less (whole-sequence) passes; see Attention.
_QUERY_CHUNK = 128


def _param(module: nn.Module, name: str, axes: tuple[str | None, ...], shape, dtype, init=None):
    init = init or nn.initializers.normal(_INIT_STD)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(eq: str, dtype, x: Array, y: Array) -> Array:
    """einsum of x and y cast to the low-precision `dtype`, with a float32 result, whose
    backward pass also runs `dtype` dots with float32 accumulation.

    JAX's own VJP of a `preferred_element_type=float32` dot upcasts the operands and runs the
    backward matmuls in float32, ~5x slower than the bf16-in/f32-accumulate path on CPU (AMX)
    and off the MXU's fast path on TPU. Here the cotangent is rounded to `dtype` instead, the
    usual bf16 mixed-precision recipe. The casts happen inside, so each operand's gradient
    leaves the float32 accumulator in the operand's own dtype: a float32 master weight gets
    its gradient without a round trip through bfloat16 (and without a separate convert).
    Every index of each operand must appear in the other operand or the output (true of
    every product in this model).
    """
    return _mixed_einsum_fwd(eq, dtype, x, y)[0]


def _mixed_einsum_fwd(eq, dtype, x, y):
    xl, yl = x.astype(dtype), y.astype(dtype)
    out = jnp.einsum(eq, xl, yl, preferred_element_type=jnp.float32)
    # Residuals in `dtype`: half the activation memory of float32 ones. The zero-size arrays
    # only carry the operands' dtypes to the backward pass.
    return out, (xl, yl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), y.dtype))


def _mixed_einsum_bwd(eq, dtype, residuals, ct):
    x, y, x_like, y_like = residuals
    (a, b), c = eq.split("->")[0].split(","), eq.split("->")[1]
    ct = ct.astype(dtype)
    dx = jnp.einsum(f"{c},{b}->{a}", ct, y, preferred_element_type=jnp.float32)
    dy = jnp.einsum(f"{a},{c}->{b}", x, ct, preferred_element_type=jnp.float32)
    return dx.astype(x_like.dtype), dy.astype(y_like.dtype)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def _einsum(eq: str, x: Array, y: Array, dtype) -> Array:
    """einsum with both inputs in `dtype` and a float32 result (float32 accumulation)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return jnp.einsum(eq, x.astype(dtype), y.astype(dtype),
                          preferred_element_type=jnp.float32)
    return _mixed_einsum(eq, dtype, x, y)


def _dot(eq: str, x: Array, w: Array, dtype) -> Array:
    """x times a weight, inputs in `dtype` (None: the weight's), float32 accumulation."""
    return _einsum(eq, x, w, jnp.dtype(dtype or w.dtype))


def _head(hidden: Array, w: Array, dtype) -> Array:
    eq = "bte,ve->btv" if hidden.ndim == 3 else "be,ve->bv"
    return _dot(eq, hidden, w, dtype)


def head_weight(config: ModelConfig, params) -> Array:
    """The LM head matrix [V, E]: the embedding table when tied, else `lm_head`."""
    if config.tie_word_embeddings:
        return params["embedder"]["embedding"]
    return params["lm_head"]["weight"]


def project_logits(config: ModelConfig, params, hidden: Array, dtype=None) -> Array:
    """LM head: final hidden states [..., E] -> float32 logits [..., V]."""
    return _head(hidden, head_weight(config, params), dtype)


def rope_sin_cos(config: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """positions [B, T] int -> (sin, cos) [B, T, D/2] float32."""
    inv_freq = jnp.asarray(config.rope_inv_freq(), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def _apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """HF `rotate_half` convention. x [B, T, ..., D]; sin/cos broadcastable to [..., D/2]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _write_slots(cache: Array, update: Array, start) -> Array:
    """dynamic_update_slice of `update` into `cache`, in place.

    XLA:CPU upcasts a bfloat16 dynamic-update-slice to float32 (a full read and write of the
    cache per layer per decode step); on the same bits viewed as uint16 it updates in place.
    A windowed cache (`init_cache(windowed=True)`) holds those uint16 bits already.
    """
    as_u16 = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint16)
    if cache.dtype == jnp.uint16:
        return jax.lax.dynamic_update_slice(cache, as_u16(update.astype(jnp.bfloat16)), start)
    if cache.dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(_write_slots(as_u16(cache), update, start),
                                            jnp.bfloat16)
    return jax.lax.dynamic_update_slice(cache, update.astype(cache.dtype), start)


def _read_slots(cache: Array, width: int) -> Array:
    """The first `width` slots of a cache array [B, K, S, D], as bfloat16 when it holds
    bfloat16 bits (a windowed cache)."""
    window = cache[:, :, :width]
    if cache.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(window, jnp.bfloat16)
    return window


class RMSNorm(nn.Module):
    eps: float
    axis_name: str = "embed"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", (self.axis_name,), (x.shape[-1],), self.param_dtype,
                       nn.initializers.ones)
        # Rows flattened to [N, E] (batch and time merge; embed, the one axis a mesh may split
        # beside the batch, stays): XLA:CPU's fused reductions of the backward pass (the
        # scale's gradient) run ~20x slower on a [1, T, E] array than on [T, E]; a packed
        # micro-batch of one row paid ~2.4 s an update for it (docs/benchmarks.md).
        shape = x.shape
        x = x.astype(jnp.float32).reshape(-1, shape[-1])
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale.astype(jnp.float32)).reshape(shape)


class Attention(nn.Module):
    config: ModelConfig
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x, sin, cos, attn_mask, kv=None, write_index=None):
        """x [B, T, E] f32; sin/cos [B, T, D/2]; attn_mask [B, T, S] bool (causal without a
        cache: no query sees a later key).

        kv: optional (k, v) cache [B, K, S, D]; the chunk's keys/values are written at slots
        [write_index, write_index + T) and attention runs over the first W slots, W =
        attn_mask.shape[-1] <= S (a static window: a long preallocated cache whose tail is
        still empty costs nothing to read). Without a cache, W = T.
        Returns (y [B, T, E] f32, new (k, v) or None).
        """
        c = self.config
        K, G, D, E = c.num_kv_heads, c.num_groups, c.head_dim, c.hidden_size
        B, T = x.shape[:2]
        w_qkv = _param(self, "qkv_weight", ("kv_heads", "embed"), (K * (G + 2) * D, E),
                       self.param_dtype)
        qkv = _dot("bte,fe->btf", x, w_qkv, self.dtype)
        if c.qkv_bias:
            b = _param(self, "qkv_bias", ("kv_heads",), (K * (G + 2) * D,), self.param_dtype,
                       nn.initializers.zeros)
            qkv = qkv + b.astype(jnp.float32)
        qkv = qkv.reshape(B, T, K, G + 2, D)
        q, k, v = qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, "head_dim", self.param_dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, "head_dim", self.param_dtype, name="k_norm")(k)
        q = _apply_rope(q, sin[:, :, None, None], cos[:, :, None, None])  # [B, T, K, G, D]
        k = _apply_rope(k, sin[:, :, None], cos[:, :, None]).transpose(0, 2, 1, 3)  # [B,K,T,D]
        v = v.transpose(0, 2, 1, 3)

        new_kv = None
        if kv is not None:
            start = (0, 0, write_index, 0)
            ck, cv = (_write_slots(c_, x, start) for c_, x in zip(kv, (k, v), strict=True))
            new_kv = (ck, cv)
            W = attn_mask.shape[-1]
            k, v = _read_slots(ck, W), _read_slots(cv, W)

        # Batch dims [B, K] lead and the mask broadcasts over the G query heads of a KV head
        # (never tiled): XLA:CPU runs both attention products on its batched-matmul path
        # without transposing the cache, and the softmax and its backward pass touch each
        # [B, K, G, T, W] score once. The 1/sqrt(D) scale is folded into q ([.., D] < [.., W]).
        cd = jnp.dtype(self.dtype or w_qkv.dtype)
        q = (q * D**-0.5).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]

        def attend(q, k, v, mask):
            scores = _einsum("bkgtd,bksd->bkgts", q, k, cd)
            scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
            # A batch of one row is dropped for the softmax: XLA:CPU's fused reductions of its
            # backward pass run ~20x slower over [1, K, G, T, S] than over [K, G, T, S] scores
            # (as RMSNorm's). Only that axis: heads may be sharded, and stay so.
            probs = jax.nn.softmax(scores[0] if scores.shape[0] == 1 else scores, axis=-1)
            return _einsum("bkgts,bksd->bkgtd", probs.reshape(scores.shape), v, cd)

        if kv is None and T > _QUERY_CHUNK:
            # Whole sequences (training, scoring): causal, so queries [q0, q1) read keys [0, q1)
            # only. Chunking the queries skips the upper triangle of the score matrix (3/8 of
            # it at 4 chunks) and keeps each chunk's [.., C, S] scores cache-sized.
            out = jnp.concatenate([
                attend(q[:, :, :, q0:q0 + _QUERY_CHUNK], k[:, :, :q0 + _QUERY_CHUNK],
                       v[:, :, :q0 + _QUERY_CHUNK],
                       attn_mask[:, q0:q0 + _QUERY_CHUNK, :q0 + _QUERY_CHUNK])
                for q0 in range(0, T, _QUERY_CHUNK)], axis=3)
        else:
            out = attend(q, k, v, attn_mask)
        out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G * D)
        w_o = _param(self, "o_weight", ("embed", "heads"), (E, K * G * D), self.param_dtype)
        return _dot("btf,ef->bte", out, w_o, self.dtype), new_kv


class MLP(nn.Module):
    config: ModelConfig
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        F = c.intermediate_size
        # Rows interleave gate and up (row 2f is gate_f, 2f+1 is up_f) so that sharding the
        # `mlp` axis gives every shard matching gate and up rows.
        w_gu = _param(self, "gate_up", ("mlp", "embed"), (2 * F, c.hidden_size),
                      self.param_dtype)
        w_down = _param(self, "down", ("embed", "mlp"), (c.hidden_size, F), self.param_dtype)
        gu = _dot("bte,fe->btf", x, w_gu, self.dtype).reshape(*x.shape[:2], F, 2)
        h = jax.nn.silu(gu[..., 0]) * gu[..., 1]
        return _dot("btf,ef->bte", h, w_down, self.dtype)


class DecoderBlock(nn.Module):
    config: ModelConfig
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x, sin, cos, attn_mask, kv=None, write_index=None):
        c = self.config
        h, new_kv = Attention(c, self.param_dtype, self.dtype, name="attn")(
            RMSNorm(c.rms_norm_eps, param_dtype=self.param_dtype, name="pre_attn_norm")(x),
            sin, cos, attn_mask, kv, write_index)
        x = x + h
        x = x + MLP(c, self.param_dtype, self.dtype, name="mlp")(
            RMSNorm(c.rms_norm_eps, param_dtype=self.param_dtype, name="pre_mlp_norm")(x))
        return x, new_kv


class Transformer(nn.Module):
    """Decoder-only LM. Layers are unrolled (not scanned) so each layer's cache is updated in
    place inside a decode `while_loop`; compile time grows with depth, run time does not."""

    config: ModelConfig
    param_dtype: Any = jnp.float32  # used at init only; at apply the dtype follows the params.
    dtype: Any = None  # matmul input dtype; None = each weight's own dtype.
    remat: bool = False  # rematerialize each block in the backward pass (training memory).

    @nn.compact
    def __call__(self, tokens, positions, attn_mask, kv=None, write_index=None,
                 return_hidden=False, last_only=False):
        """tokens, positions [B, T] int32; attn_mask [B, T, S] bool.

        kv: per-layer tuple of (k, v) [B, K, S, D] or None. Returns (out, new_kv) where out is
        logits [B, T, V] float32 ([B, V] if last_only), or the final-norm hidden states
        [B, T, E] (or [B, E]) if return_hidden.
        """
        c = self.config
        embedder = _Embedder(c, self.param_dtype, name="embedder")
        x = embedder(tokens)
        sin, cos = rope_sin_cos(c, positions)
        block_cls = nn.remat(DecoderBlock) if self.remat else DecoderBlock
        new_kv = []
        for i in range(c.num_layers):
            x, layer_kv = block_cls(c, self.param_dtype, self.dtype, name=f"layer_{i}")(
                x, sin, cos, attn_mask, None if kv is None else kv[i], write_index)
            new_kv.append(layer_kv)
        if last_only:
            x = x[:, -1]
        x = RMSNorm(c.rms_norm_eps, param_dtype=self.param_dtype, name="final_norm")(x)
        new_kv = None if kv is None else tuple(new_kv)
        if return_hidden:
            return x, new_kv
        if c.tie_word_embeddings:
            head = embedder.variables["params"]["embedding"]
        else:
            head = _LMHead(c, self.param_dtype, name="lm_head")()
        return _head(x, nn.meta.unbox(head), self.dtype), new_kv


class _Embedder(nn.Module):
    config: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        table = _param(self, "embedding", ("vocab", "embed"), (c.vocab_size, c.hidden_size),
                       self.param_dtype)
        return jnp.take(table, tokens, axis=0).astype(jnp.float32)


class _LMHead(nn.Module):
    config: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        c = self.config
        return _param(self, "weight", ("vocab", "embed"), (c.vocab_size, c.hidden_size),
                      self.param_dtype)
# ----------------------------------------------------------------------------------------------
# Pure-functional interface: init, logical axes, forward, KV cache.
# ----------------------------------------------------------------------------------------------


def _dummy_inputs():
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens, jnp.ones((1, 1, 1), bool)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(config: ModelConfig, rng: Array, dtype):
    variables = Transformer(config, param_dtype=dtype).init(rng, *_dummy_inputs())
    return nn.meta.unbox(variables["params"])


def init_params(config: ModelConfig, rng: Array | int = 0, dtype=jnp.float32):
    """Random parameters (normal(0.02) weights, unit norms, zero biases) as a plain pytree."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return _init(config, rng, jnp.dtype(dtype))


def param_logical_axes(config: ModelConfig):
    """Pytree (same structure as the params) of `PartitionSpec`s of logical axis names.

    Computed with `jax.eval_shape`: nothing is allocated. Map to a mesh with
    `flax.linen.logical_to_mesh_sharding(axes, mesh, rules)`.
    """
    boxed = jax.eval_shape(
        lambda: Transformer(config).init(jax.random.key(0), *_dummy_inputs()))
    return nn.get_partition_spec(boxed)["params"]


def param_shapes(config: ModelConfig, dtype=jnp.float32):
    """Pytree of `jax.ShapeDtypeStruct` for the params (for checkpoint restore / loading)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))


def positions_from_mask(mask: Array, offset: Array | int = 0) -> Array:
    """mask [B, T] bool -> RoPE positions [B, T] int32 counting only valid tokens.

    Pad slots get the position of the last valid token before them (or `offset`), which keeps
    them in range; they are never attended to.
    """
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos, 0) + jnp.asarray(offset, jnp.int32)[..., None]


def causal_attention_mask(mask: Array) -> Array:
    """mask [B, T] bool -> [B, T, T] bool: query t sees valid keys s <= t."""
    T = mask.shape[-1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    return causal[None] & mask[:, None, :]


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("return_hidden",))
def _forward(config, params, input_ids, attention_mask, return_hidden=False):
    mask = attention_mask.astype(bool)
    out, _ = Transformer(config).apply(
        {"params": params}, input_ids, positions_from_mask(mask), causal_attention_mask(mask),
        return_hidden=return_hidden)
    return out


def forward(config: ModelConfig, params, input_ids: Array, attention_mask: Array | None = None,
            *, return_hidden: bool = False) -> Array:
    """Full causal forward pass (no cache).

    input_ids [B, T] int32; attention_mask [B, T] (1 = token, 0 = padding; left or right
    padding). Returns logits [B, T, V] float32 (hidden states [B, T, E] if return_hidden).
    RoPE positions count valid tokens only, like HF `generate`.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    return _forward(config, params, input_ids, jnp.asarray(attention_mask),
                    return_hidden=return_hidden)


@flax.struct.dataclass
class KVCache:
    """Decoding state of the transformer; a pytree (donate it to jitted steps).

    k, v:           per-layer tuples of [B, K, S', D] (S' = S, or S + 1 spare slot and
                    bfloat16 stored as its uint16 bits in a windowed cache; see `init_cache`)
    key_mask:       [B, S] bool, True where a slot holds a real token
    next_position:  [B] int32, RoPE position of each row's next token
    index:          [] int32, next slot to write (shared by all rows)
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    key_mask: Array
    next_position: Array
    index: Array

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]


def cache_logical_axes(config: ModelConfig) -> KVCache:
    """A `KVCache` of logical-axis `PartitionSpec`s: rows along `batch`, keys/values along
    `kv_heads` like the q|k|v weight rows that produce them (so attention stays local to a
    head shard). Map to a mesh with `sharding.Placement.cache_shardings`."""
    P = jax.sharding.PartitionSpec
    kv = tuple(P("batch", "kv_heads", None, "head_dim") for _ in range(config.num_layers))
    return KVCache(k=kv, v=kv, key_mask=P("batch", None), next_position=P("batch"), index=P())


def init_cache(config: ModelConfig, batch_size: int, max_length: int,
               dtype=jnp.bfloat16, *, windowed: bool = False) -> KVCache:
    """An empty cache of S = max_length slots.

    windowed: the caller reads the cache through `extend(kv_length=...)` windows narrower
    than S (a multi-turn rollout: each turn attends over the slots filled so far). Inside a
    decode loop, XLA:CPU then copies every layer's whole bfloat16 cache at every step (the
    in-place write of its bits and the window's read do not share the buffer), which made
    such a step about 2x slower (SmolLM2-135M, 16 rows, a 384-slot window of a 768-slot
    cache: 167 vs 89 ms a step, `benchmarks/decode.py --windows`, docs/benchmarks.md). A
    windowed cache keeps bfloat16 keys and values as their uint16 bits, written in place and
    read as bfloat16 through the window, and one spare slot that no window reaches (a window
    as wide as the cache brings the copy back). Same values, same logits; other dtypes are
    kept as they are.
    """
    stored = jnp.uint16 if windowed and jnp.dtype(dtype) == jnp.bfloat16 else dtype
    shape = (batch_size, config.num_kv_heads, max_length + int(windowed), config.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, stored) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(shape, stored) for _ in range(config.num_layers)),
        key_mask=jnp.zeros((batch_size, max_length), bool),
        next_position=jnp.zeros((batch_size,), jnp.int32),
        index=jnp.zeros((), jnp.int32))


def extend(config: ModelConfig, params, tokens: Array, token_mask: Array, cache: KVCache, *,
           last_only: bool = False, return_hidden: bool = False, dtype=None,
           kv_length: int | None = None):
    """Appends a chunk of tokens to the cache and runs the model on it. Pure; jit it.

    tokens [B, T] int32; token_mask [B, T] bool (False = padding, not attended to, does not
    advance the row's position). The chunk occupies slots [index, index + T); the caller keeps
    index + T <= S (XLA clamps out-of-range writes). Returns (out, new_cache) where out is
    logits [B, T, V] float32, or [B, V] for the chunk's last slot if last_only (with
    left-padded chunks that is every row's last token), or hidden states if return_hidden.
    kv_length (static): attend over the first kv_length slots only; the caller keeps
    index + T <= kv_length. Default: all S slots.
    """
    T = tokens.shape[1]
    S = kv_length or cache.max_length
    token_mask = token_mask.astype(bool)
    positions = positions_from_mask(token_mask, cache.next_position)
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, token_mask, (0, cache.index))
    query_slot = cache.index + jnp.arange(T)
    attn_mask = key_mask[:, None, :S] & (jnp.arange(S)[None, None, :] <= query_slot[None, :, None])
    out, kv = Transformer(config, dtype=dtype).apply(
        {"params": params}, tokens, positions, attn_mask, tuple(zip(cache.k, cache.v, strict=True)),
        cache.index, return_hidden=return_hidden, last_only=last_only)
    new_cache = KVCache(
        k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv), key_mask=key_mask,
        next_position=cache.next_position + token_mask.sum(axis=1, dtype=jnp.int32),
        index=cache.index + T)
    return out, new_cache
