"""The in-graph rollout: a batch of multi-turn episodes against the in-process simulator, as
one jitted program.

When the search engine is the simulator LLM running in this process with the policy's
tokenizer (the default; the paper's Qwen2.5 policy and simulators too), nothing in an episode
needs the host. The program, per turn (the turn loop is unrolled; `max_turns` is static):

    policy turn     `sampling.decode` until `</search>`, `</answer>`, EOS or the cap (a trailing
                    EOS is taken back out of the cache, as the host loop does)
    parse           token level: a turn whose closing tag completes an opening tag of the same
                    kind is a search or an answer; anything else is invalid. The query is the
                    token span between `<search>` and `</search>` (`parse_turn`).
    simulate        rows that searched flip their useful/noisy coin (uniform > p_noise), their
                    simulator prompt is assembled from token pieces (`SimulatorPrompt`: the
                    template, the row's question and gold answer, the query span), prefilled and
                    decoded; the output stops at `Doc {topk+1}` or the cap (`simulate`)
    observe         `<information>` + documents (cut to fit `max_obs_tokens`, tags kept) +
                    `</information>`, or the invalid-action message, inserted into the policy's
                    cache in one chunk
    ... then the final turn, and the [B, T] batch the learner reads (`EpisodeTokens`).

The host sees only the finished batch: it decodes the turns for the F1 reward and the logs.
A GRPO group's prompt is prefilled once and its cache copied to the group's samples. A row
that has answered leaves the batch's work: the simulator, a later policy turn and an
observation insert run on the rows still in the episode, gathered into half the batch when
they fit (`lax.switch` over the two sizes).

Every piece is a pure function of static settings (`EpisodeSpec`) and arrays. `run` jits their
composition as one program; `run_stepped` calls the same pieces one jitted call at a time from
a Python loop (the host-loop form, for tests and as a baseline): both give the same episodes.
External engines (BM25, HTTP) keep the text-level host loop (`agent.rollout`), whose engines
read and write text.

Differences from the text-level host loop (`agent.rollout` with `search.LLMSimulator`): the
query is the sampled token span (leading space included, as generated), not the re-encoded
stripped text; the simulator's documents are its sampled tokens up to `Doc {topk+1}`, not
re-encoded after the line clean-up; the coins are `jax.random` draws per row and turn. The
simulator's SFT examples are built with the same token assembly (`SimulatorPrompt.ids`), so the
tuned simulator sees at RL time exactly the prompts it was tuned on.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from zerosearch_jax import models, rewards, sampling
from zerosearch_jax.agent.environment import (
    EpisodeStats,
    RolloutBatch,
    SearchCall,
    checked_prompt_ids,
    coin_keys,
)
from zerosearch_jax.agent.template import INVALID_ACTION, STOP_TAGS
from zerosearch_jax.search.base import NO_INFORMATION
from zerosearch_jax.search.simulator import (
    LLMSimulator,
    SimulatorPrompt,
    clean_simulator_output,
)
from zerosearch_jax.tokenizer import StopPattern, Tokenizer

Array = jax.Array

# Simulator prompts are prefilled this many columns at a time, from the first column that
# holds a real token of any row (left padding beyond the batch's longest prompt costs nothing).
_PREFILL_CHUNK = 32
# Kinds of a policy turn (`parse_turn`).
NONE, SEARCH, ANSWER, INVALID = 0, 1, 2, 3


@functools.lru_cache(maxsize=64)
def _membership(patterns: tuple[StopPattern, ...], vocab_size: int) -> tuple[np.ndarray, ...]:
    """Per pattern, a [len(sets), V] bool table: is token v allowed at position j."""
    tables = []
    for p in patterns:
        t = np.zeros((len(p.sets), vocab_size), bool)
        for j, s in enumerate(p.sets):
            t[j, [i for i in s if i < vocab_size]] = True
        tables.append(t)
    return tuple(tables)


def match_ends(tokens: Array, patterns: tuple[StopPattern, ...], vocab_size: int
               ) -> tuple[Array, Array]:
    """Where a pattern ends: tokens [B, N] -> (hit [B, N] bool, length [B, N] int32, the
    longest matching pattern's token count at each hit)."""
    B, N = tokens.shape
    hit = jnp.zeros((B, N), bool)
    length = jnp.zeros((B, N), jnp.int32)
    safe = jnp.clip(tokens, 0, vocab_size - 1)
    for p, table in zip(patterns, _membership(patterns, vocab_size), strict=True):
        n = len(p.sets)
        ok = jnp.ones((B, N), bool)
        for j in range(n):
            shift = n - 1 - j  # the pattern's j-th token sits `shift` before its end
            member = jnp.asarray(table[j])[safe]
            member = jnp.pad(member, ((0, 0), (shift, 0)))[:, :N]
            ok &= member
        ok &= jnp.arange(N)[None] >= n - 1
        length = jnp.where(ok, jnp.maximum(length, n), length)
        hit |= ok
    return hit, length


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """Everything static about a rollout program (hashable: it is the jit's static argument).

    Build with `EpisodeSpec.make`; `prompt_length` etc. are the padded shapes of this call.
    """

    policy: models.ModelConfig
    simulator: models.ModelConfig
    max_turns: int
    max_new_tokens: int  # per policy turn (N)
    obs_cap: int  # observation chunk width (max_obs_tokens)
    max_context_tokens: int
    samples: int  # n episodes per question
    sampler: Any  # the policy's
    sim_sampler: Any
    sim_new_tokens: int  # M
    policy_stop: sampling.StopConditions
    sim_stop: sampling.StopConditions
    search_open: tuple[StopPattern, ...]
    search_close: tuple[StopPattern, ...]
    answer_open: tuple[StopPattern, ...]
    answer_close: tuple[StopPattern, ...]
    doc_stop: tuple[StopPattern, ...]  # `Doc {topk+1}`
    eos_ids: tuple[int, ...]
    pad_id: int
    info_head: tuple[int, ...]
    info_tail: tuple[int, ...]
    no_information: tuple[int, ...]
    invalid: tuple[int, ...]
    sim_prompt: SimulatorPrompt
    prompt_length: int  # P of the prompts fed (left-padded)
    question_length: int  # Lq of the question ids fed (right-padded)
    answer_length: int  # La
    batch_prompt_length: int  # P of the returned batch (>= prompt_length)
    response_length: int  # R of the returned batch
    placement: Any = None  # sharding.Placement of the rollout (policy and simulator) or None
    reuse_repeated_queries: bool = False  # RolloutConfig's: a repeated query's old documents
    group_coins: bool = False  # RolloutConfig's: a group's rows share each turn's coin

    @classmethod
    def make(cls, tokenizer: Tokenizer, policy: models.ModelConfig,
             simulator: models.ModelConfig, rollout_config, sampler, *, sim_temperature: float,
             sim_new_tokens: int, topk: int, variant: str, prompt_length: int,
             question_length: int, answer_length: int, batch_lengths=None,
             placement=None) -> EpisodeSpec:
        rc = rollout_config
        head, tail = "\n\n<information>", "</information>\n\n"
        info_head, info_tail = tuple(tokenizer.encode(head)), tuple(tokenizer.encode(tail))
        if len(info_head) + len(info_tail) >= rc.max_obs_tokens:
            raise ValueError(f"max_obs_tokens={rc.max_obs_tokens} leaves no room for documents")
        P, R = batch_lengths or (prompt_length, None)
        if R is None:
            R = sampling.bucket_length(rc.max_response_tokens)
        return cls(
            policy=policy, simulator=simulator, max_turns=rc.max_turns,
            max_new_tokens=rc.max_new_tokens, obs_cap=rc.max_obs_tokens,
            max_context_tokens=rc.max_context_tokens, samples=rc.samples_per_prompt,
            sampler=sampler, sim_sampler=sampling.Temperature(sim_temperature),
            # The policy reads at most `room` document tokens of a page: no more are sampled.
            sim_new_tokens=min(sim_new_tokens,
                               rc.max_obs_tokens - len(info_head) - len(info_tail)),
            policy_stop=sampling.StopConditions.for_tokenizer(tokenizer, STOP_TAGS),
            sim_stop=sampling.StopConditions.for_tokenizer(tokenizer, [f"Doc {topk + 1}"]),
            search_open=tokenizer.stop_patterns("<search>"),
            search_close=tokenizer.stop_patterns("</search>"),
            answer_open=tokenizer.stop_patterns("<answer>"),
            answer_close=tokenizer.stop_patterns("</answer>"),
            doc_stop=tokenizer.stop_patterns(f"Doc {topk + 1}"),
            eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
            info_head=info_head, info_tail=info_tail,
            no_information=tuple(tokenizer.encode(NO_INFORMATION)),
            invalid=tuple(tokenizer.encode(INVALID_ACTION)[:rc.max_obs_tokens]),
            sim_prompt=SimulatorPrompt.make(tokenizer, variant),
            prompt_length=prompt_length, question_length=question_length,
            answer_length=answer_length, batch_prompt_length=max(P, prompt_length),
            response_length=R, placement=placement,
            reuse_repeated_queries=rc.reuse_repeated_queries, group_coins=rc.group_coins)

    @property
    def cache_length(self) -> int:
        """Policy cache slots: the prompt, every turn at its cap, every observation at its."""
        T = self.max_turns
        return self.prompt_length + (T + 1) * self.max_new_tokens + T * self.obs_cap

    @property
    def sim_prompt_length(self) -> int:
        """Static width of the simulator's prompts: the longer variant's constant pieces plus
        the widest question, answer and query."""
        n = self.sim_prompt.max_constant_length + self.question_length + self.answer_length
        return -(-(n + self.max_new_tokens) // _PREFILL_CHUNK) * _PREFILL_CHUNK

    def window(self, used: int, extra: int) -> int:
        """The static attention window of a chunk of `extra` tokens after `used` filled slots
        (rounded up to 128 so a few programs cover every turn)."""
        return min(self.cache_length, -(-(used + extra) // 128) * 128)


@flax.struct.dataclass
class EpisodeInputs:
    """The device inputs of one rollout (Q questions, B = Q * n rows).

    prompt_ids / prompt_mask [Q, P]   each question's policy prompt, left-padded
    question_ids [Q, Lq], question_len [Q]   the question's ids (simulator prompt), right-padded
    answer_ids [Q, La], answer_len [Q]       the first gold answer's ids (with a leading space)
    row_keys [B]   one PRNG key per row (derived from the row's global index)
    noise []       the curriculum's p_noise for this step
    ban_ids [Q, K, La]   what the row's noisy pages may not contain (the simulator's
                   `block_answer`; `SimulatorPrompt.answer_bans`, cut to La tokens: a page
                   without the answer's first La tokens lacks the answer), or None
    """

    prompt_ids: Array
    prompt_mask: Array
    question_ids: Array
    question_len: Array
    answer_ids: Array
    answer_len: Array
    row_keys: Array
    noise: Array
    ban_ids: Array | None = None


@flax.struct.dataclass
class EpisodeTokens:
    """A finished rollout. Learner arrays are [B, T] as `agent.RolloutBatch` (prompt
    left-padded to P, response right-padded to R); per-turn arrays have a leading turn axis
    (Tn = max_turns + 1 policy turns, Tn - 1 observations).

    tokens, attention_mask, positions, loss_mask, logprobs   [B, T]
    last_policy [B]         index of each row's last policy token (-1: none), for the reward
    turn_tokens [Tn, B, N]  each policy turn as sampled (EOS dropped); turn_len [Tn, B]
    kind [Tn, B]            NONE (row done) | SEARCH | ANSWER | INVALID
    query_start, query_len [Tn, B]   the query span inside the turn (searches)
    docs [Tn-1, B, M], doc_len [Tn-1, B]   the simulator's documents (engine calls)
    useful [Tn-1, B]        the coin of each engine call
    called [Tn-1, B]        an engine call was made (a search before the final turn)
    truncated [B]           the episode ran out of context
    """

    tokens: Array
    attention_mask: Array
    positions: Array
    loss_mask: Array
    logprobs: Array
    last_policy: Array
    turn_tokens: Array
    turn_len: Array
    kind: Array
    query_start: Array
    query_len: Array
    docs: Array
    doc_len: Array
    useful: Array
    called: Array
    truncated: Array


def concat_rows(parts, width: int, pad_id: int, left: bool):
    """Concatenates per-row pieces of varying length into [B, width].

    parts: (ids [B, L] or [L], length [B], extra channels) tuples, in order; a row takes the
    first length[b] ids of each part. extra: a tuple of [B, L] arrays placed alongside the ids
    (e.g. log-probs), zero elsewhere. left: right-align (left padding) or left-align.
    Returns (ids [B, width], mask [B, width], extras [B, width] each, ends [B] list: the
    position just after each part).
    """
    B = parts[0][1].shape[0]
    total = sum(length for _, length, _ in parts)
    offset = (width - total) if left else jnp.zeros((B,), jnp.int32)
    rows = jnp.arange(B)[:, None]
    ids_out = jnp.full((B, width), pad_id, jnp.int32)
    n_extra = max(len(e) for _, _, e in parts)
    extra_out = [jnp.zeros((B, width), jnp.float32) for _ in range(n_extra)]
    ends = []
    for ids, length, extra in parts:
        ids = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (B, jnp.shape(ids)[-1]))
        j = jnp.arange(ids.shape[1])[None]
        pos = jnp.where(j < length[:, None], offset[:, None] + j, width)  # width: dropped
        ids_out = ids_out.at[rows, pos].set(ids, mode="drop")
        for k, x in enumerate(extra):
            extra_out[k] = extra_out[k].at[rows, pos].set(x.astype(jnp.float32), mode="drop")
        offset = offset + length
        ends.append(offset)
    start = (width - total) if left else jnp.zeros((B,), jnp.int32)
    col = jnp.arange(width)[None]
    mask = (col >= start[:, None]) & (col < (start + total)[:, None])
    return ids_out, mask, extra_out, ends


def _constrain(spec: EpisodeSpec, config, cache):
    return cache if spec.placement is None else spec.placement.constrain_cache(config, cache)


def prefill(spec: EpisodeSpec, params, prompt_ids: Array, prompt_mask: Array):
    """Each question's prompt once, its cache and last logits copied to its n samples.
    -> (logits [B, V], cache [B, S])."""
    Q = prompt_ids.shape[0]
    dtype = jax.tree.leaves(params)[0].dtype
    cache = _constrain(spec, spec.policy, models.init_cache(spec.policy, Q, spec.cache_length,
                                                           dtype, windowed=True))
    logits, cache = models.extend(spec.policy, params, prompt_ids, prompt_mask, cache,
                                  last_only=True, kv_length=spec.window(0, spec.prompt_length))
    n = spec.samples
    copy = functools.partial(jnp.repeat, repeats=n, axis=0, total_repeat_length=Q * n)
    cache = cache.replace(k=tuple(map(copy, cache.k)), v=tuple(map(copy, cache.v)),
                          key_mask=copy(cache.key_mask), next_position=copy(cache.next_position))
    return copy(logits), _constrain(spec, spec.policy, cache)


def policy_turn(spec: EpisodeSpec, turn: int, params, cache, logits, keys, done):
    """One policy turn of every row not `done`: -> (GenerationOutput, turn_len [B] with a
    trailing EOS dropped (and taken out of the cache), cache)."""
    used = spec.prompt_length + turn * (spec.max_new_tokens + spec.obs_cap)
    first = cache.index
    turn_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, turn)
    B, N = logits.shape[0], spec.max_new_tokens

    def turn_of(size):
        """Decode the first `size` rows of the active-first order (each row's draws depend on
        its own logits and key only, so a row samples alike in any subset)."""
        def run(cache):
            decode = functools.partial(
                sampling.decode, spec.policy, params, sampler=spec.sampler, max_new_tokens=N,
                stop=spec.policy_stop, kv_length=spec.window(used, N), placement=spec.placement)
            if size == B:
                return decode(cache, logits, turn_keys, done=done)
            rows = jnp.argsort(done, stable=True)[:size]
            out, sub = decode(_take_rows(spec, cache, rows), logits[rows], turn_keys[rows],
                              done=done[rows])
            full = jax.tree.map(lambda x: _scatter_rows(B, rows, x), out)
            full = full.replace(tokens=_scatter_rows(B, rows, out.tokens,
                                                     spec.policy_stop.pad_id))
            return full, _put_rows(spec, cache, rows, sub)
        return run

    # Later turns run with the rows still in the episode only (after the first search most
    # rows answer), gathered into half the batch when they fit. The first turn has every row
    # (a second program there would only cost compile time).
    sizes = _subset_sizes(spec, B) if turn else [B]
    out, cache = jax.lax.switch(jnp.maximum(_subset_branch(sizes, ~done) - 1, 0),
                                [turn_of(s) for s in sizes], cache)
    rows = jnp.arange(B)
    last = jnp.maximum(out.lengths - 1, 0)
    eos = (~done & (out.lengths > 0)
           & jnp.isin(out.tokens[rows, last], jnp.asarray(spec.eos_ids, jnp.int32)))
    # As the host loop: an end-of-turn id is never kept, trained, or followed by the next
    # observation (upstream decodes with skip_special_tokens).
    slot = first + last
    key_mask = cache.key_mask.at[rows, slot].set(cache.key_mask[rows, slot] & ~eos)
    cache = cache.replace(key_mask=key_mask,
                          next_position=cache.next_position - eos.astype(jnp.int32))
    return out, out.lengths - eos.astype(jnp.int32), cache


def parse_turn(spec: EpisodeSpec, tokens: Array, length: Array, active: Array):
    """The action of each turn, at token level: tokens [B, N], length [B] (EOS excluded).

    A turn ends at the first closing tag (the stop condition); it is a search (answer) when that
    tag is `</search>` (`</answer>`) and an opening tag of the same kind ends before the
    closing tag begins; the first such opening tag starts the content, as upstream's regex.
    -> (kind [B], content start [B], content length [B]).
    """
    B, N = tokens.shape
    V = spec.policy.vocab_size
    rows = jnp.arange(B)
    end = jnp.maximum(length - 1, 0)
    kind = jnp.where(active, INVALID, NONE)
    start = jnp.zeros((B,), jnp.int32)
    size = jnp.zeros((B,), jnp.int32)
    for k, (opening, closing) in ((SEARCH, (spec.search_open, spec.search_close)),
                                  (ANSWER, (spec.answer_open, spec.answer_close))):
        close_hit, close_len = match_ends(tokens, closing, V)
        closed = active & (length > 0) & close_hit[rows, end]
        close_start = length - close_len[rows, end]
        open_hit, _ = match_ends(tokens, opening, V)
        before = open_hit & (jnp.arange(N)[None] < close_start[:, None])
        opened = before.any(axis=1)
        first_open = jnp.argmax(before, axis=1)
        is_k = closed & opened
        kind = jnp.where(is_k, k, kind)
        start = jnp.where(is_k, first_open + 1, start)
        size = jnp.where(is_k, jnp.maximum(close_start - first_open - 1, 0), size)
    return kind, start, size


def simulator_prompts(spec: EpisodeSpec, turn_tokens: Array, query_start: Array,
                      query_len: Array, useful: Array, inputs: EpisodeInputs):
    """Each row's simulator prompt, assembled from token pieces: the template's constant ids,
    the row's question and gold answer (`inputs`), and its query span of `turn_tokens`.
    -> (ids [B, L], mask [B, L]) left-padded, L = `spec.sim_prompt_length`."""
    B = turn_tokens.shape[0]
    n = spec.samples
    query = query_window(spec, turn_tokens, query_start, query_len)
    fields = {
        "question": (jnp.repeat(inputs.question_ids, n, 0), jnp.repeat(inputs.question_len, n)),
        "answer": (jnp.repeat(inputs.answer_ids, n, 0), jnp.repeat(inputs.answer_len, n)),
        "query": (query, query_len),
    }
    variants = []
    for is_useful in (True, False):
        parts = []
        for piece in spec.sim_prompt.pieces(is_useful):
            if isinstance(piece, str):
                ids, length = fields[piece]
            else:
                ids, length = jnp.asarray(piece, jnp.int32), jnp.full((B,), len(piece))
            parts.append((ids, length, ()))
        ids, mask, _, _ = concat_rows(parts, spec.sim_prompt_length, spec.pad_id, left=True)
        variants.append((ids, mask))
    (u_ids, u_mask), (n_ids, n_mask) = variants
    return (jnp.where(useful[:, None], u_ids, n_ids), jnp.where(useful[:, None], u_mask, n_mask))


def simulate(spec: EpisodeSpec, turn: int, params, turn_tokens: Array, query_start: Array,
             query_len: Array, searching: Array, inputs: EpisodeInputs):
    """The simulator's documents for the rows `searching`: -> (docs [B, M], doc_len [B],
    useful [B]). Each row flips its coin (useful iff uniform > p_noise) and samples from keys
    of its own (row, turn); with `spec.group_coins` the coin is its group's first row's, so
    a group's rows share it."""
    B = turn_tokens.shape[0]
    rows = jnp.arange(B)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(inputs.row_keys, turn)
    coins = coin_keys(inputs.row_keys, turn, spec.samples if spec.group_coins else None)
    sim_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 2)
    useful = jax.vmap(jax.random.uniform)(coins) > inputs.noise
    ids, mask = simulator_prompts(spec, turn_tokens, query_start, query_len, useful, inputs)
    L = spec.sim_prompt_length
    mask = mask.at[:, -1].set(mask[:, -1] | ~searching)  # idle rows: one dummy token
    M = spec.sim_new_tokens

    def generate(size):
        """Prefill and decode the first `size` rows of the searching-first order."""
        def run():
            rows_ = jnp.argsort(~searching, stable=True)[:size]
            sub_ids, sub_mask, on = ids[rows_], mask[rows_], searching[rows_]
            dtype = jax.tree.leaves(params)[0].dtype
            cache = _constrain(spec, spec.simulator,
                               models.init_cache(spec.simulator, size, L + M, dtype))
            C = _PREFILL_CHUNK
            # Chunks left of the longest prompt hold only padding: skipped.
            longest = jnp.max(jnp.where(on, sub_mask.sum(1), 1))
            first = (L - longest) // C

            def chunk(c, carry):
                _, cache = carry
                part = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=c * C,
                                         slice_size=C, axis=1)
                cache = cache.replace(index=c * C)
                return models.extend(spec.simulator, params, part(sub_ids), part(sub_mask),
                                     cache, last_only=True, kv_length=L)

            V = spec.simulator.vocab_size
            logits, cache = jax.lax.fori_loop(first, L // C, chunk,
                                              (jnp.zeros((size, V), jnp.float32), cache))
            banned = None
            if inputs.ban_ids is not None:  # noisy rows may not write the answer
                banned = jnp.where(useful[:, None, None], -1,
                                   jnp.repeat(inputs.ban_ids, spec.samples, 0))[rows_]
            out, _ = sampling.decode(spec.simulator, params, cache, logits, sim_keys[rows_],
                                     sampler=spec.sim_sampler, max_new_tokens=M,
                                     stop=spec.sim_stop, done=~on, placement=spec.placement,
                                     banned=banned)
            return (_scatter_rows(B, rows_, out.tokens, spec.pad_id),
                    _scatter_rows(B, rows_, out.lengths))
        return run

    def nothing():
        return jnp.full((B, M), spec.pad_id, jnp.int32), jnp.zeros((B,), jnp.int32)

    # The simulator runs on the searching rows only, gathered into the smallest batch that holds
    # them (half the rollout's, or all of it); a turn with no search costs nothing.
    sizes = _subset_sizes(spec, B)
    tokens, lengths = jax.lax.switch(_subset_branch(sizes, searching),
                                     [nothing] + [generate(s) for s in sizes])
    # Clean-up: a trailing EOS, or the `Doc {topk+1}` that stopped it, is not a document.
    last = jnp.maximum(lengths - 1, 0)
    eos = (lengths > 0) & jnp.isin(tokens[rows, last], jnp.asarray(spec.eos_ids, jnp.int32))
    hit, cut = match_ends(tokens, spec.doc_stop, spec.simulator.vocab_size)
    doc_cut = jnp.where(eos, 1, jnp.where(hit[rows, last], cut[rows, last], 0))
    doc_len = jnp.where(searching, jnp.maximum(lengths - doc_cut, 0), 0)
    return tokens, doc_len, useful & searching


def _subset_sizes(spec: EpisodeSpec, B: int) -> list[int]:
    """The batch sizes a row subset runs at: half the rollout's rows, or all of them (each a
    multiple of the batch shards, so every device gets the same number of rows)."""
    shards = 1 if spec.placement is None else spec.placement.batch_shards
    return [s for s in (B // 2, B) if s >= 1 and s % shards == 0 and (s == B or B % 2 == 0)]


def _scatter_rows(B: int, rows: Array, x: Array, fill=0) -> Array:
    """A subset's per-row result x [size, ...] back in a batch of B rows, `fill` elsewhere."""
    return jnp.full((B, *x.shape[1:]), fill, x.dtype).at[rows].set(x)


def _take_rows(spec: EpisodeSpec, cache, rows: Array):
    """The policy cache of `rows` (the shared write index kept)."""
    return _constrain(spec, spec.policy, jax.tree.map(
        lambda x: x if x.ndim == 0 else x[rows], cache))


def _put_rows(spec: EpisodeSpec, cache, rows: Array, sub):
    """`cache` with `rows` replaced by `sub` (`_take_rows`'s, advanced): the other rows' slots
    of the advance stay masked, as a masked chunk would leave them."""
    return _constrain(spec, spec.policy, jax.tree.map(
        lambda x, y: y if x.ndim == 0 else x.at[rows].set(y), cache, sub))


def _subset_branch(sizes: list[int], on: Array) -> Array:
    """`lax.switch` index: 0 when no row is `on`, else 1 + the smallest size that holds them."""
    count = on.sum()
    return jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), count))


def query_window(spec: EpisodeSpec, turn_tokens: Array, query_start: Array,
                 query_len: Array) -> Array:
    """[B, N] each row's query span of `turn_tokens`, shifted to the front, -1 past its end."""
    j = jnp.arange(spec.max_new_tokens)
    query = jnp.take_along_axis(
        turn_tokens, jnp.clip(query_start[:, None] + j, 0, spec.max_new_tokens - 1), axis=1)
    return jnp.where(j[None] < query_len[:, None], query, -1)


def repeated_calls(spec: EpisodeSpec, turn_tokens: Array, query_start: Array, query_len: Array,
                   searching: Array, earlier):
    """The rows `searching` a query (the same tokens) that they searched at an earlier turn,
    with that call's documents and coin (`RolloutConfig.reuse_repeated_queries`).

    earlier: one (turn_tokens, query_start, query_len, called, docs, doc_len, useful) tuple per
    earlier turn. -> (hit [B], docs [B, M], doc_len [B], useful [B]), the last three set where
    `hit`."""
    B, M = turn_tokens.shape[0], spec.sim_new_tokens
    query = query_window(spec, turn_tokens, query_start, query_len)
    hit, useful = jnp.zeros((B,), bool), jnp.zeros((B,), bool)
    docs, doc_len = jnp.full((B, M), spec.pad_id, jnp.int32), jnp.zeros((B,), jnp.int32)
    for e_tokens, e_start, e_len, e_called, e_docs, e_doc_len, e_useful in earlier:
        same = (searching & e_called & (e_len == query_len)
                & (query_window(spec, e_tokens, e_start, e_len) == query).all(axis=1))
        hit = hit | same
        docs = jnp.where(same[:, None], e_docs, docs)
        doc_len = jnp.where(same, e_doc_len, doc_len)
        useful = jnp.where(same, e_useful, useful)
    return hit, docs, doc_len, useful


def observe(spec: EpisodeSpec, kind: Array, docs: Array, doc_len: Array):
    """The chunk each row appends after its turn: the information block (searches), the
    invalid-action message, or nothing. -> (ids [B, C], mask [B, C], length [B])."""
    search, invalid = kind == SEARCH, kind == INVALID
    room = spec.obs_cap - len(spec.info_head) - len(spec.info_tail)
    empty = search & (doc_len == 0)

    def const(ids, on):
        return jnp.asarray(ids, jnp.int32), jnp.where(on, len(ids), 0), ()

    body_len = jnp.where(search & ~empty, jnp.minimum(doc_len, room), 0)
    no_info = spec.no_information[:room]
    parts = [const(spec.info_head, search), (docs, body_len, ()), const(no_info, empty),
             const(spec.info_tail, search), const(spec.invalid, invalid)]
    ids, mask, _, _ = concat_rows(parts, spec.obs_cap, spec.pad_id, left=True)
    return ids, mask, mask.sum(axis=1, dtype=jnp.int32)


def insert(spec: EpisodeSpec, turn: int, params, cache, chunk: Array, chunk_mask: Array):
    """Appends each row's observation chunk to the policy cache -> (next logits [B, V], cache).

    A row without a chunk has answered (or stopped): its next logits are never read, and its
    slots of this chunk stay masked as an empty chunk would leave them. So, as for the
    simulator, after the first turn only the rows with a chunk run, gathered into half the
    batch when they fit (a second search is made by about a third of the rows in the
    default's rollouts).
    """
    used = spec.prompt_length + (turn + 1) * spec.max_new_tokens + turn * spec.obs_cap
    B, V = chunk.shape[0], spec.policy.vocab_size
    on = chunk_mask.any(axis=1)
    window = spec.window(used, spec.obs_cap)

    def extend(size):
        def run(cache):
            if size == B:
                logits, cache = models.extend(spec.policy, params, chunk, chunk_mask, cache,
                                              last_only=True, kv_length=window)
                return logits, _constrain(spec, spec.policy, cache)
            rows = jnp.argsort(~on, stable=True)[:size]
            logits, sub = models.extend(spec.policy, params, chunk[rows], chunk_mask[rows],
                                        _take_rows(spec, cache, rows), last_only=True,
                                        kv_length=window)
            return _scatter_rows(B, rows, logits), _put_rows(spec, cache, rows, sub)
        return run

    def nothing(cache):  # every row has answered: their next logits are never read
        return jnp.zeros((B, V), jnp.float32), cache

    sizes = _subset_sizes(spec, B) if turn else [B]  # after the first turn, as policy_turn
    return jax.lax.switch(_subset_branch(sizes, on), [nothing] + [extend(s) for s in sizes],
                          cache)


def assemble(spec: EpisodeSpec, inputs: EpisodeInputs, turns, observations):
    """The learner's [B, T] arrays from the prompt, the policy turns and the observations.

    turns: per policy turn (tokens [B, N], logprobs [B, N], length [B]); observations: per
    observation (ids [B, C], mask [B, C], length [B]) (left-padded chunks).
    """
    n = spec.samples
    P, R = spec.batch_prompt_length, spec.response_length
    prompt = jnp.repeat(inputs.prompt_ids, n, 0)
    prompt_len = jnp.repeat(inputs.prompt_mask.sum(axis=1, dtype=jnp.int32), n)
    B = prompt.shape[0]
    C = spec.obs_cap
    # The prompt right-aligned in P columns.
    j = jnp.arange(spec.prompt_length)[None]
    pos = jnp.where(inputs.prompt_mask.repeat(n, 0), P - spec.prompt_length + j, P)
    p_ids = jnp.full((B, P), spec.pad_id, jnp.int32).at[
        jnp.arange(B)[:, None], pos].set(prompt, mode="drop")
    parts = []
    for t, (tokens, logprobs, length) in enumerate(turns):
        parts.append((tokens, length, (jnp.ones_like(logprobs), logprobs)))
        if t < len(observations):
            ids, mask, length = observations[t]
            # Left-padded chunk -> its tokens first: shift each row by its padding.
            shift = C - length
            src = jnp.clip(jnp.arange(C)[None] + shift[:, None], 0, C - 1)
            ids = jnp.take_along_axis(ids, src, axis=1)
            zero = jnp.zeros((B, C), jnp.float32)
            parts.append((ids, length, (zero, zero)))
    r_ids, r_mask, (loss, lps), ends = concat_rows(parts, R, spec.pad_id, left=False)
    tokens = jnp.concatenate([p_ids, r_ids], axis=1)
    p_mask = jnp.arange(P)[None] >= (P - prompt_len)[:, None]
    attention = jnp.concatenate([p_mask, r_mask], axis=1)
    positions = jnp.maximum(jnp.cumsum(attention, axis=1, dtype=jnp.int32) - 1, 0)
    zeros = jnp.zeros((B, P), jnp.float32)
    loss_mask = jnp.concatenate([zeros, loss * r_mask], axis=1)
    logprobs = jnp.concatenate([zeros, lps * r_mask], axis=1)
    # Each row's last policy token: the end of its last non-empty turn.
    last = jnp.full((B,), -1, jnp.int32)
    for t, (_, _, length) in enumerate(turns):
        last = jnp.where(length > 0, P + ends[2 * t] - 1, last)
    return tokens, attention, positions, loss_mask, logprobs, last


def _episodes(spec: EpisodeSpec, policy_params, sim_params, inputs: EpisodeInputs,
              piece: Callable) -> EpisodeTokens:
    """The rollout, each piece called through `piece` (identity inside one jit, or a jit per
    call for the stepped form)."""
    B = inputs.row_keys.shape[0]
    logits, cache = piece(prefill)(spec, policy_params, inputs.prompt_ids, inputs.prompt_mask)
    done = jnp.zeros((B,), bool)
    truncated = jnp.zeros((B,), bool)
    real_len = jnp.repeat(inputs.prompt_mask.sum(axis=1, dtype=jnp.int32), spec.samples)
    turns, observations = [], []
    record = {k: [] for k in ("tokens", "len", "kind", "qs", "ql", "docs", "dl", "useful",
                              "called")}
    M = spec.sim_new_tokens
    for turn in range(spec.max_turns + 1):
        final = turn == spec.max_turns
        too_long = ~done & (real_len + spec.max_new_tokens > spec.max_context_tokens)
        truncated |= too_long
        done |= too_long
        out, length, cache = piece(policy_turn, 1)(spec, turn, policy_params, cache, logits,
                                                    inputs.row_keys, done)
        active = ~done
        length = jnp.where(active, length, 0)
        real_len = real_len + length
        kind, q_start, q_len = piece(parse_turn)(spec, out.tokens, length, active)
        turns.append((out.tokens, out.logprobs, length))
        for k, v in (("tokens", out.tokens), ("len", length), ("kind", kind), ("qs", q_start),
                     ("ql", q_len)):
            record[k].append(v)
        done = done | (kind == ANSWER) | (final & active)
        if final:
            break
        searching = kind == SEARCH
        hit = None
        if spec.reuse_repeated_queries and turn:
            earlier = tuple(zip(*(record[k][:turn] for k in ("tokens", "qs", "ql", "called",
                                                             "docs", "dl", "useful")),
                                strict=True))
            hit, r_docs, r_len, r_useful = piece(repeated_calls)(spec, out.tokens, q_start,
                                                                 q_len, searching, earlier)
        # A repeated query is answered from its earlier call: the simulator writes only new ones.
        docs, doc_len, useful = piece(simulate, 1)(
            spec, turn, sim_params, out.tokens, q_start, q_len,
            searching if hit is None else searching & ~hit, inputs)
        if hit is not None:
            docs = jnp.where(hit[:, None], r_docs, docs)
            doc_len = jnp.where(hit, r_len, doc_len)
            useful = jnp.where(hit, r_useful, useful)
        chunk, chunk_mask, obs_len = piece(observe)(spec, kind, docs, doc_len)
        observations.append((chunk, chunk_mask, obs_len))
        real_len = real_len + obs_len
        for k, v in (("docs", docs), ("dl", doc_len), ("useful", useful),
                     ("called", searching)):
            record[k].append(v)
        logits, cache = piece(insert, 1)(spec, turn, policy_params, cache, chunk, chunk_mask)
    tokens, attention, positions, loss_mask, logprobs, last = piece(assemble)(
        spec, inputs, tuple(turns), tuple(observations))

    def stack(k, shape, dtype):
        return jnp.stack(record[k]) if record[k] else jnp.zeros(shape, dtype)

    return EpisodeTokens(
        tokens=tokens, attention_mask=attention, positions=positions, loss_mask=loss_mask,
        logprobs=logprobs, last_policy=last, turn_tokens=jnp.stack(record["tokens"]),
        turn_len=jnp.stack(record["len"]), kind=jnp.stack(record["kind"]),
        query_start=jnp.stack(record["qs"]), query_len=jnp.stack(record["ql"]),
        docs=stack("docs", (0, B, M), jnp.int32), doc_len=stack("dl", (0, B), jnp.int32),
        useful=stack("useful", (0, B), bool), called=stack("called", (0, B), bool),
        truncated=truncated)


def _inline(fn, static_turn=None):
    del static_turn
    return fn


@functools.cache
def _jitted(fn, static_turn):
    static = (0, 1) if static_turn else (0,)
    return jax.jit(fn, static_argnums=static)


def _stepped(fn, static_turn=None):
    return _jitted(fn, bool(static_turn))


@functools.partial(jax.jit, static_argnums=0)
def run(spec: EpisodeSpec, policy_params, sim_params, inputs: EpisodeInputs) -> EpisodeTokens:
    """The whole rollout as one program."""
    return _episodes(spec, policy_params, sim_params, inputs, _inline)


def run_stepped(spec: EpisodeSpec, policy_params, sim_params,
                inputs: EpisodeInputs) -> EpisodeTokens:
    """The same rollout, each piece its own jitted call from a Python loop (the host-loop form
    of the same device pieces)."""
    return _episodes(spec, policy_params, sim_params, inputs, _stepped)


# -- host side: inputs in, (RolloutBatch, EpisodeStats) out ---------------------------------------


def supports(engine, tokenizer: Tokenizer, placement=None) -> str | None:
    """None when `engine` can run inside the rollout program, else why not."""
    if not isinstance(engine, LLMSimulator):
        return f"the engine is {type(engine).__name__}, not the in-process simulator"
    if engine.tokenizer.hf.get_vocab() != tokenizer.hf.get_vocab():
        return "the simulator's tokenizer is not the policy's"
    if engine.prime_reply:
        return "simulator.prime_reply is set"
    if engine.hop_answers:
        return "simulator.hop_answers is set (the host loop matches each query to its hop)"
    if engine.placement is not None and placement is not None and (
            engine.placement.mesh != placement.mesh):
        return "the simulator runs on its own sub-mesh"
    return None


def _bucket(n: int, smallest: int) -> int:
    return sampling.bucket_length(max(n, 1), tuple(smallest << i for i in range(12)))


def field_lengths(tokenizer: Tokenizer, examples, prompt: SimulatorPrompt) -> tuple[int, int]:
    """(Lq, La): bucketed widths of the questions' and first answers' ids. A trainer computes
    them once over its whole training set, so every step runs the same program."""
    q = max(len(prompt.field_ids(tokenizer, "question", ex.question)) for ex in examples)
    a = max(len(prompt.field_ids(tokenizer, "answer", (ex.golden_answers or ("",))[0]))
            for ex in examples)
    return _bucket(q, 32), _bucket(a, 8)


def _prepare(config: models.ModelConfig, tokenizer: Tokenizer, examples, simulator, rc, sampler,
             rng: Array, noise_probability: float | None, batch_lengths, placement,
             first_example: int, field_widths: tuple[int, int] | None
             ) -> tuple[EpisodeSpec, EpisodeInputs, float]:
    """The program's static settings and device inputs from `rollout`'s arguments.

    -> (spec, inputs (prompts [Q, P], questions [Q, Lq], answers [Q, La], row keys [B], placed
    along the batch axes when `placement` is given), the noise probability used).
    """
    n = rc.samples_per_prompt
    B = len(examples) * n
    if placement is not None and B % placement.batch_shards:
        raise ValueError(f"{B} rows do not split over {placement.batch_shards} batch shards")
    prompts = [checked_prompt_ids(tokenizer, ex, rc) for ex in examples]
    P = sampling.bucket_length(max(map(len, prompts)))
    if batch_lengths is not None:
        P = max(P, batch_lengths[0])
    prompt = simulator.prompt
    Lq, La = field_widths or field_lengths(tokenizer, examples, prompt)
    q_ids = [prompt.field_ids(tokenizer, "question", ex.question) for ex in examples]
    a_ids = [prompt.field_ids(tokenizer, "answer", (ex.golden_answers or ("",))[0])
             for ex in examples]
    if max(map(len, q_ids)) > Lq or max(map(len, a_ids)) > La:
        raise ValueError(f"a question or answer is longer than field_widths={(Lq, La)}")
    spec = EpisodeSpec.make(
        tokenizer, config, simulator.config, rc, sampler,
        sim_temperature=simulator.temperature, sim_new_tokens=simulator.max_new_tokens,
        topk=simulator.topk, variant=simulator.variant, prompt_length=P, question_length=Lq,
        answer_length=La, batch_lengths=batch_lengths, placement=placement)
    p_ids, p_mask = tokenizer.pad_batch(prompts, P)
    qa = [tokenizer.pad_batch(x or [[]], w, left=False) for x, w in ((q_ids, Lq), (a_ids, La))]
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        rng, first_example * n + np.arange(B))
    noise = simulator.noise_probability if noise_probability is None else noise_probability
    ban_ids = None
    if simulator.block_answer:
        ban_ids = sampling.pad_banned(
            [prompt.answer_bans(tokenizer, ex.golden_answers) for ex in examples],
            len(examples), shape=(2, La))
    inputs = EpisodeInputs(
        prompt_ids=p_ids, prompt_mask=p_mask, question_ids=qa[0][0],
        question_len=qa[0][1].sum(1).astype(np.int32), answer_ids=qa[1][0],
        answer_len=qa[1][1].sum(1).astype(np.int32), row_keys=row_keys,
        noise=np.float32(noise), ban_ids=ban_ids)
    if placement is not None:
        inputs = jax.tree.map(lambda x: jax.device_put(
            x, placement.batch_sharding(x.ndim) if x.shape[:1] == (B,) else
            placement.replicated()), inputs)
    return spec, inputs, noise


def _search_calls(tokenizer: Tokenizer, out: EpisodeTokens, topk: int) -> list[list[SearchCall]]:
    """Each row's engine calls, decoded from a finished rollout (host arrays: turn_tokens
    [Tn, B, N], query_start / query_len [Tn, B], docs [Tn-1, B, M], doc_len / useful / called
    [Tn-1, B])."""
    Tn, B = out.turn_tokens.shape[:2]
    calls = [[] for _ in range(B)]
    for t in range(Tn - 1):
        for b in np.flatnonzero(out.called[t]):
            qs, ql = out.query_start[t, b], out.query_len[t, b]
            docs = clean_simulator_output(
                tokenizer.decode(out.docs[t, b, :out.doc_len[t, b]]), topk)
            calls[b].append(SearchCall(t, tokenizer.decode(out.turn_tokens[t, b, qs:qs + ql])
                                       .strip(), docs, bool(out.useful[t, b]), bool(docs)))
    return calls


def _results(tokenizer: Tokenizer, spec: EpisodeSpec, examples, simulator, out: EpisodeTokens,
             noise: float, first_example: int, t_start: float, t_device: float
             ) -> tuple[RolloutBatch, EpisodeStats]:
    """The host side of a finished rollout (`out`: host arrays, [B, T] learner arrays and
    [Tn, B, ...] per-turn ones): the turns decoded for the F1 reward and the logs.
    -> (RolloutBatch [B, T], EpisodeStats)."""
    n = spec.samples
    Q, B = len(examples), len(examples) * n
    rows = [ex for ex in examples for _ in range(n)]
    Tn = out.turn_tokens.shape[0]
    turns = [[tokenizer.decode(out.turn_tokens[t, b, :out.turn_len[t, b]])
              for t in range(Tn) if out.kind[t, b] != NONE] for b in range(B)]
    policy_texts = ["".join(t) for t in turns]
    P_out = spec.batch_prompt_length
    responses = [tokenizer.decode(out.tokens[b, P_out:][out.attention_mask[b, P_out:]])
                 for b in range(B)]
    scores = [rewards.score_response(t, ex.golden_answers)
              for t, ex in zip(policy_texts, rows, strict=True)]
    f1 = np.array([s["f1"] for s in scores], np.float32)
    token_rewards = np.zeros(out.tokens.shape, np.float32)
    has = out.last_policy >= 0
    token_rewards[np.flatnonzero(has), out.last_policy[has]] = f1[has]
    calls = _search_calls(tokenizer, out, simulator.topk)
    called = out.called.astype(np.int32)
    batch = RolloutBatch(
        tokens=out.tokens, attention_mask=out.attention_mask, positions=out.positions,
        loss_mask=out.loss_mask, logprobs=out.logprobs, rewards=token_rewards,
        group=(first_example + np.repeat(np.arange(Q), n)).astype(np.int32), prompt_length=P_out)
    simulator.generated_tokens += int(out.doc_len.sum())
    stats = EpisodeStats(
        answers=[s["answer"] for s in scores], responses=responses, f1=f1,
        em=np.array([s["em"] for s in scores], np.float32),
        cover_em=np.array([s["cover_em"] for s in scores], np.float32),
        searches=(out.kind == SEARCH).sum(0).astype(np.int32), engine_calls=called.sum(0),
        invalid_actions=(out.kind[:-1] == INVALID).sum(0).astype(np.int32),
        useful_calls=(called * out.useful).sum(0), noisy_calls=(called * ~out.useful).sum(0),
        truncated=out.truncated, noise_probability=float(noise),
        timings={"program_s": t_device, "total_s": time.perf_counter() - t_start},
        generated_tokens=int(out.loss_mask.sum()), calls=calls, turns=turns)
    return batch, stats


def rollout(config: models.ModelConfig, params, tokenizer: Tokenizer, examples, simulator, *,
            rollout_config, sampler, rng: Array | int = 0,
            noise_probability: float | None = None, batch_lengths=None, placement=None,
            first_example: int = 0, field_widths: tuple[int, int] | None = None,
            stepped: bool = False):
    """`agent.rollout`'s contract, run as one program (`run`; `stepped`: `run_stepped`).

    simulator: an `LLMSimulator` that `supports` accepts (its weights, temperature, token cap,
    topk and variant are used; its host-side coins are not: the program draws its own from
    `rng`). field_widths: (Lq, La) from `field_lengths` (default: this batch's, bucketed).
    Returns (RolloutBatch, EpisodeStats) as `agent.rollout`.
    """
    if not examples:
        raise ValueError("rollout needs at least one example")
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    t_start = time.perf_counter()
    spec, inputs, noise = _prepare(config, tokenizer, examples, simulator, rollout_config,
                                   sampler, rng, noise_probability, batch_lengths, placement,
                                   first_example, field_widths)
    out = (run_stepped if stepped else run)(spec, params, simulator.params, inputs)
    out = jax.device_get(out)
    t_device = time.perf_counter() - t_start
    return _results(tokenizer, spec, examples, simulator, out, noise, first_example, t_start,
                    t_device)
