"""Batched generation: a jitted prefill, then a `lax.while_loop` over a preallocated KV cache.

Device side (pure, jitted once per shape bucket):
- `prefill_and_decode` runs left-padded prompts [B, P] through `models.extend`, then `decode`.
- `decode` samples up to N tokens from a cache it is handed (donated, updated in place), so a
  multi-turn rollout can keep one cache across turns. Every row keeps its own RoPE position and
  length; a row stops on an EOS id or when its last tokens complete a stop pattern (e.g.
  `</search>`; the tag's tokens are kept). Finished rows feed masked pad tokens, costing nothing
  beyond the batch step, and the loop exits as soon as every row is done. A row may carry
  banned token sequences (`banned`) it can never complete (the simulator's noisy pages, which
  must not state the gold answer).

Host side (`generate`, `generate_text`): tokenization, padding to shape buckets (prompt length
to the next bucket, batch to 2/4/8 or a multiple of 8) so a run compiles a handful of programs,
and trimming the outputs back.

Sharding: with a `sharding.Placement` (static), the KV cache and the batch are split along its
batch axes and the cache's KV heads along theirs; the parameters are wherever the caller put
them (`Placement.put`). Without one, everything stays on the default device as before.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from zerosearch_jax.models import KVCache, ModelConfig, extend, init_cache
from zerosearch_jax.sampling.methods import Greedy, per_row_keys
from zerosearch_jax.tokenizer import StopPattern, Tokenizer

Array = jax.Array
PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class StopConditions:
    """When a row stops: on any of `eos_ids`, or when its last tokens match a pattern.

    Static (hashable) so it is part of the compiled program, not an argument.
    """

    eos_ids: tuple[int, ...] = ()
    patterns: tuple[StopPattern, ...] = ()
    pad_id: int = 0

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, stop_strings: Sequence[str] = (),
                      eos: bool = True) -> StopConditions:
        patterns = tuple(p for s in stop_strings for p in tokenizer.stop_patterns(s))
        return cls(tokenizer.eos_ids if eos else (), patterns, tokenizer.pad_id)

    @property
    def window(self) -> int:
        return max((len(p.sets) for p in self.patterns), default=1)

    def hit(self, token: Array, recent: Array) -> Array:
        """token [B]; recent [B, W] the last W tokens (token included) -> [B] bool."""
        hit = jnp.isin(token, jnp.asarray(self.eos_ids or (-1,), jnp.int32))
        for p in self.patterns:
            table = jnp.asarray(p.as_array())  # [P, M], -1 padded
            last = recent[:, recent.shape[1] - len(p.sets):]  # [B, P]
            member = (last[:, :, None] == table[None]) & (table[None] >= 0)
            hit |= jnp.all(jnp.any(member, axis=-1), axis=-1)
        return hit


@flax.struct.dataclass
class GenerationOutput:
    """tokens/logprobs [B, N] (pad / 0 after each row's end), lengths [B] generated tokens
    (stop tokens included), stopped [B] True when the row hit EOS or a stop pattern."""

    tokens: Array
    logprobs: Array
    lengths: Array
    stopped: Array


def ban_table(banned: Array) -> tuple[Array, Array, Array]:
    """banned [B, K, L] int32 token sequences, left-aligned, -1 padded (a row of -1: none) ->
    (prefix [B, K, L-1] each sequence but its last token, right-aligned, -1 = any token;
    last [B, K] its last token; valid [B, K])."""
    L = banned.shape[-1]
    n = jnp.sum(banned >= 0, axis=-1)
    last = jnp.take_along_axis(banned, jnp.maximum(n - 1, 0)[..., None], axis=-1)[..., 0]
    src = jnp.arange(L - 1) - (L - n[..., None])  # slot j holds token j - (L - n) of the prefix
    prefix = jnp.where(src >= 0, jnp.take_along_axis(banned, jnp.clip(src, 0, L - 1), -1), -1)
    return prefix, last, n > 0


def apply_ban(logits: Array, recent: Array, table: tuple[Array, Array, Array]) -> Array:
    """logits [B, V] with -inf on every token that would complete one of the row's banned
    sequences after its `recent` [B, W] tokens (W >= L - 1; -1 before the first)."""
    prefix, last, valid = table
    w = prefix.shape[-1]
    tail = recent[:, recent.shape[1] - w:] if w else recent[:, :0]
    match = valid & jnp.all((prefix == tail[:, None, :]) | (prefix < 0), axis=-1)  # [B, K]
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, jnp.maximum(last, 0)].add(jnp.where(match, -jnp.inf, 0.0))


@flax.struct.dataclass
class _LoopState:
    step: Array  # [] int32
    tokens: Array  # [B, N] int32
    logprobs: Array  # [B, N] float32
    done: Array  # [B] bool
    stopped: Array  # [B] bool
    lengths: Array  # [B] int32
    recent: Array  # [B, W] int32, last W sampled tokens (-1 before the first)
    logits: Array  # [B, V] float32, next-token logits
    cache: KVCache
    rng: Array


def _sample(sampler, logits: Array, rng: Array, step: Array) -> tuple[Array, Array]:
    """One draw per row at decode step `step`. rng: one key for the batch, or [B] keys (one per
    row), so a row's tokens do not depend on which batch or process it is in. The sampler sees
    the whole batch (not a vmap over rows), so its batch-level branches stay branches: the
    top-p sampler's exact search runs only on steps that need it."""
    if not per_row_keys(rng):
        return sampler(logits, jax.random.fold_in(rng, step))
    return sampler(logits, jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, step))


def decode(config: ModelConfig, params, cache: KVCache, logits: Array, rng: Array, *,
           sampler, max_new_tokens: int, stop: StopConditions,
           done: Array | None = None,
           kv_length: int | None = None,
           placement=None, banned: Array | None = None) -> tuple[GenerationOutput, KVCache]:
    """Samples up to `max_new_tokens` per row from `logits` [B, V] and a primed cache.

    done [B] bool marks rows that must not generate (batch padding, finished episodes).
    Every sampled token is appended to the cache (masked for finished rows), so on return the
    cache holds prompt + generation and can be extended by the caller. Jit with `config`,
    `sampler`, `max_new_tokens`, `stop`, `kv_length` static and the cache donated.
    kv_length: attend over the first kv_length cache slots only (>= index + max_new_tokens);
    a multi-turn caller passes its current fill rounded up so empty slots are not read.
    rng: a key, or [B] keys (one per row).
    placement (static): a `sharding.Placement` whose cache layout the loop keeps.
    banned: [B, K, L] token sequences (left-aligned, -1 padded) that a row never completes: the
    last token of one is masked out whenever the row's previous tokens are the rest of it (the
    sampled log-prob is then the constrained distribution's). Sequences start in the generation
    (the prompt's tokens are not looked at).
    """
    B = logits.shape[0]
    N = max_new_tokens
    done = jnp.zeros((B,), bool) if done is None else done
    table = None if banned is None else ban_table(banned)
    window = max(stop.window, 1 if banned is None else banned.shape[-1] - 1)
    state = _LoopState(
        step=jnp.zeros((), jnp.int32), tokens=jnp.full((B, N), stop.pad_id, jnp.int32),
        logprobs=jnp.zeros((B, N), jnp.float32), done=done, stopped=jnp.zeros((B,), bool),
        lengths=jnp.zeros((B,), jnp.int32), recent=jnp.full((B, window), -1, jnp.int32),
        logits=logits, cache=cache, rng=rng)

    def cond(s: _LoopState):
        return (s.step < N) & ~jnp.all(s.done)

    def body(s: _LoopState):
        logits = s.logits if table is None else apply_ban(s.logits, s.recent, table)
        token, logprob = _sample(sampler, logits, s.rng, s.step)
        active = ~s.done
        token = jnp.where(active, token, stop.pad_id)
        logprob = jnp.where(active, logprob, 0.0)
        recent = jnp.concatenate([s.recent[:, 1:], token[:, None]], axis=1)
        hit = active & stop.hit(token, recent)
        next_logits, cache = extend(config, params, token[:, None], active[:, None], s.cache,
                                    last_only=True, kv_length=kv_length)
        if placement is not None:
            cache = placement.constrain_cache(config, cache)
        return _LoopState(
            step=s.step + 1,
            tokens=jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step)),
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, logprob[:, None], (0, s.step)),
            done=s.done | hit, stopped=s.stopped | hit, lengths=s.lengths + active,
            recent=recent, logits=next_logits, cache=cache, rng=s.rng)

    s = jax.lax.while_loop(cond, body, state)
    return GenerationOutput(s.tokens, s.logprobs, s.lengths, s.stopped), s.cache


@functools.partial(jax.jit, static_argnames=("config", "sampler", "max_new_tokens", "stop",
                                             "cache_dtype", "placement"))
def prefill_and_decode(config: ModelConfig, params, prompt_ids: Array, prompt_mask: Array,
                       row_valid: Array, rng: Array, *, sampler, max_new_tokens: int,
                       stop: StopConditions, cache_dtype=None,
                       placement=None, banned: Array | None = None) -> GenerationOutput:
    """prompt_ids/prompt_mask [B, P] left-padded; row_valid [B] False for batch padding.
    placement (static): shard the batch and the cache by it (B a multiple of its
    `batch_shards`). banned [B, K, L]: as `decode`'s."""
    B, P = prompt_ids.shape
    dtype = cache_dtype or jax.tree.leaves(params)[0].dtype
    cache = init_cache(config, B, P + max_new_tokens, dtype)
    if placement is not None:
        cache = placement.constrain_cache(config, cache)
        prompt_ids, prompt_mask, row_valid = (
            jax.lax.with_sharding_constraint(x, placement.batch_sharding(x.ndim))
            for x in (prompt_ids, prompt_mask, row_valid))
    logits, cache = extend(config, params, prompt_ids, prompt_mask, cache, last_only=True)
    out, _ = decode(config, params, cache, logits, rng, sampler=sampler,
                    max_new_tokens=max_new_tokens, stop=stop, done=~row_valid,
                    placement=placement, banned=banned)
    return out


def bucket_length(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """Smallest bucket >= n; past the largest, the next multiple of it."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def bucket_batch(n: int, multiple: int = 1) -> int:
    """2, 4, 8, then multiples of 8 (a single row is padded to 2: on CPU a one-row bf16
    matmul is slower than a two-row one), rounded up to a multiple of `multiple` (the number
    of batch shards, so every device gets the same number of rows)."""
    n = max(2, 1 << (n - 1).bit_length()) if n <= 8 else -(-n // 8) * 8
    return -(-n // multiple) * multiple


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], sampler=Greedy(), *,
             max_new_tokens: int = 128, stop: StopConditions = StopConditions(),
             rng: Array | int = 0, cache_dtype=None,
             prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
             placement=None, min_batch: int = 0,
             banned: Sequence[Sequence[Sequence[int]]] | None = None) -> dict[str, np.ndarray]:
    """Generates from token-id prompts (lists of ids, any lengths).

    placement: a `sharding.Placement` to run on (the params already placed on its mesh): the
    batch and the KV cache are split along its batch axes.
    min_batch: pad the batch to at least this many rows, so a caller whose batches vary in size
    (the simulator, called with each turn's searches) runs one compiled program.
    banned: per prompt, token sequences it must never generate (`decode`); padded to shape
    buckets (at least 4 sequences of 8 tokens) so calls with other answers reuse the program.

    Returns numpy arrays: tokens [B, N] int32, logprobs [B, N] float32, lengths [B] int32,
    stopped [B] bool, for the B prompts given (bucket padding removed).
    """
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    B = len(prompts)
    Bp = bucket_batch(max(B, min_batch), 1 if placement is None else placement.batch_shards)
    P = bucket_length(max(len(p) for p in prompts), prompt_buckets)
    ids = np.full((Bp, P), stop.pad_id, np.int32)
    mask = np.zeros((Bp, P), bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = p
        mask[i, P - len(p):] = True
    mask[B:, -1] = True  # padding rows get one dummy token so their attention is well defined
    row_valid = np.arange(Bp) < B
    out = prefill_and_decode(config, params, ids, mask, row_valid, rng, sampler=sampler,
                             max_new_tokens=max_new_tokens, stop=stop,
                             cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
                             placement=placement,
                             banned=None if banned is None else pad_banned(banned, Bp))
    return {name: np.asarray(getattr(out, name))[:B]
            for name in ("tokens", "logprobs", "lengths", "stopped")}


def pad_banned(banned: Sequence[Sequence[Sequence[int]]], rows: int,
               shape: tuple[int, int] | None = None) -> np.ndarray:
    """Per-row banned sequences -> [rows, K, L] int32, -1 padded. Empty sequences are dropped.
    shape: a fixed (K, L) (longer sequences cut to their first L tokens: a text without those
    lacks the whole sequence too); default: powers of two (at least 4 and 8), so a handful of
    shapes cover every call."""
    seqs = [[list(q) for q in row if len(q)] for row in banned]
    K, L = shape or (
        1 << max(2, (max((len(r) for r in seqs), default=1) - 1).bit_length()),
        1 << max(3, (max((len(q) for r in seqs for q in r), default=1) - 1).bit_length()))
    out = np.full((rows, K, L), -1, np.int32)
    for i, row in enumerate(seqs):
        for k, q in enumerate(row[:K]):
            out[i, k, :min(len(q), L)] = q[:L]
    return out


def generate_text(config: ModelConfig, params, tokenizer: Tokenizer, prompts: Sequence[str],
                  sampler=Greedy(), *, max_new_tokens: int = 128,
                  stop_strings: Sequence[str] = (), chat: bool = True, seed: int = 0,
                  **kwargs) -> list[str]:
    """Strings in, strings out (for notebooks). `chat` applies the chat template."""
    texts = [tokenizer.chat_prompt(p) if chat else p for p in prompts]
    stop = StopConditions.for_tokenizer(tokenizer, stop_strings)
    out = generate(config, params, [tokenizer.encode(t) for t in texts], sampler,
                   max_new_tokens=max_new_tokens, stop=stop, rng=seed, **kwargs)
    return [tokenizer.decode(row[:n]) for row, n in zip(out["tokens"], out["lengths"],
                                                         strict=True)]
