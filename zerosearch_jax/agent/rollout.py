"""The host episode loop: drives the jitted sampler pieces turn by turn against any search
engine (BM25, HTTP, the simulator); the environment it steps (parsing, search calls,
observation text, counters) is `agent.environment`.

One KV cache per batch lives across all turns of an episode:

    prefill(prompts) -> [decode a turn -> parse -> search -> extend(observations)] x max_turns
                     -> decode the final turn

- A turn samples up to `max_new_tokens` and stops right after `</search>` or `</answer>` (or
  EOS); the sampled ids are kept as they are (upstream re-tokenized the cut text), a trailing
  end-of-turn id is taken back out of the cache (`_policy_turn`).
- The turn's text goes to the environment (`environment.take_actions`, then one
  `environment.search` call for the batch's queries); each row's observation (the information
  block or the invalid-action message, capped by `environment.observation_ids`) is appended to
  the cache as one left-padded chunk (`_observe`).
- After `max_turns` searches the final turn's search results are discarded and the episode ends.

Device work is three jitted programs (prefill / append a chunk, decode a turn) on donated
caches; everything else (text, parsing, engines) is host work between them. With a
`sharding.Placement` the cache and the batch are split along its batch axes (the params are
wherever the caller placed them). Every row samples from its own key, derived from the global
index of its example, so an episode does not depend on the batch or process it ran in. With
the simulator in process, `agent.episode` runs a whole rollout as one jitted program built
from the same pieces.

The result is a `RolloutBatch` ready for RL: [B, T] arrays with the prompt left-padded to P and
the response right-padded to R, a loss mask that is 1 exactly on the policy's sampled tokens, the
sampling log-probs, and the F1 reward on the last policy token; plus host-side `EpisodeStats`
(`_finish`; both types are `agent.environment`'s).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zerosearch_jax import models, rewards, sampling
from zerosearch_jax.agent.environment import (
    EpisodeCounters,
    EpisodeStats,
    Piece,
    RolloutBatch,
    RolloutConfig,
    TurnActions,
    assemble_batch,
    checked_prompt_ids,
    coin_keys,
    observation_ids,
    search,
    take_actions,
)
from zerosearch_jax.agent.template import STOP_TAGS
from zerosearch_jax.data.qa import QAExample
from zerosearch_jax.search.base import NoiseControlled, SearchEngine
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
Array = jax.Array


def _extend_chunk(config, params, tokens, token_mask, cache, *, last_only, kv_length,
                  placement):
    logits, cache = models.extend(config, params, tokens, token_mask, cache,
                                  last_only=last_only, kv_length=kv_length)
    if placement is not None:
        cache = placement.constrain_cache(config, cache)
    return logits, cache


def _empty_cache(config, batch_size, length, dtype, placement):
    cache = models.init_cache(config, batch_size, length, dtype, windowed=True)
    return cache if placement is None else placement.constrain_cache(config, cache)


# Jitted once per shape; the caches are donated so every step updates them in place.
_extend = jax.jit(_extend_chunk, static_argnums=0,
                  static_argnames=("last_only", "kv_length", "placement"),
                  donate_argnames=("cache",))
_decode = jax.jit(sampling.decode, static_argnums=0,
                  static_argnames=("sampler", "max_new_tokens", "stop", "kv_length", "placement"),
                  donate_argnums=(2,))
# Sharded caches are created sharded: a whole-batch cache never sits on one device.
_init_cache = jax.jit(_empty_cache, static_argnums=(0, 1, 2, 3, 4))


@functools.partial(jax.jit, donate_argnums=(0,))
def _forget_last_token(cache: models.KVCache, slots: Array) -> models.KVCache:
    """Takes the token at `slots[b]` out of row b's context (slots[b] < 0: row unchanged): its
    key is masked and the row's next position moves back. A turn that ended on an end-of-turn
    token drops it this way, as upstream's decoding with skip_special_tokens does."""
    drop = slots >= 0
    rows, slots = jnp.arange(slots.shape[0]), jnp.maximum(slots, 0)
    key_mask = cache.key_mask.at[rows, slots].set(cache.key_mask[rows, slots] & ~drop)
    return cache.replace(key_mask=key_mask,
                         next_position=cache.next_position - drop.astype(jnp.int32))
_WINDOW = 128  # attention windows are rounded up to this many slots (few compiled shapes)


def _window(used: int, extra: int, total: int) -> int:
    """Static attention window for a chunk of `extra` tokens after `used` filled slots."""
    return min(total, -(-(used + extra) // _WINDOW) * _WINDOW)


@dataclasses.dataclass(frozen=True)
class _Loop:
    """What every step of one host rollout reads (fixed for the call)."""

    config: models.ModelConfig
    params: Any
    tokenizer: Tokenizer
    engine: SearchEngine
    rc: RolloutConfig
    sampler: Any
    stop: sampling.StopConditions
    placement: Any  # sharding.Placement or None
    rows: list[QAExample]  # [B]: every example repeated samples_per_prompt times, grouped
    row_keys: Array  # [Bp] one PRNG key per row, from its global index
    padded_batch: int  # Bp >= B (batch-padding rows hold one dummy token and start done)
    prompt_length: int  # P: the prompts' width, left-padded
    cache_length: int  # S: the prompt, every turn at its cap, every observation at obs_cap
    obs_cap: int  # width of an observation chunk (max_obs_tokens, bucketed)

    @property
    def batch(self) -> int:
        return len(self.rows)

    def on_device(self, x):
        """A host array [Bp, ...] placed for the device programs (split along the batch)."""
        if self.placement is None:
            return x
        return jax.device_put(x, self.placement.batch_sharding(x.ndim))


@dataclasses.dataclass
class _State:
    """The host loop's running state between device calls."""

    cache: models.KVCache  # [Bp, S]
    logits: Array  # [Bp, V] each row's next-token logits
    # An upper bound of the filled slots that depends only on the turn (a decode may stop early;
    # an observation chunk is at most obs_cap wide), so each turn's attention window, and with it
    # the compiled program, is the same at every training step.
    used: int
    done: np.ndarray  # [Bp] bool
    real_len: np.ndarray  # [Bp] real tokens in each row's context
    pieces: list[list[Piece]]  # [B] each row's response so far
    counters: EpisodeCounters
    timings: dict[str, float]
    generated: int = 0


def _setup(config, params, tokenizer: Tokenizer, examples: Sequence[QAExample],
           engine: SearchEngine, rc: RolloutConfig, sampler, rng: Array, placement,
           first_example: int) -> tuple[_Loop, list[np.ndarray], np.ndarray]:
    """The loop's fixed settings from the call's arguments.

    -> (loop, prompts: B arrays [n_i] int32 of each row's prompt ids, group [B] int: the global
    index of each row's question).
    """
    rows = [ex for ex in examples for _ in range(rc.samples_per_prompt)]
    group = first_example + np.repeat(np.arange(len(examples)), rc.samples_per_prompt)
    prompts = [np.asarray(checked_prompt_ids(tokenizer, ex, rc), np.int32) for ex in rows]
    Bp = sampling.bucket_batch(len(rows), 1 if placement is None else placement.batch_shards)
    P = sampling.bucket_length(max(len(p) for p in prompts))
    obs_cap = sampling.bucket_length(rc.max_obs_tokens)
    S = P + (rc.max_turns + 1) * rc.max_new_tokens + rc.max_turns * obs_cap
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        rng, first_example * rc.samples_per_prompt + np.arange(Bp))
    loop = _Loop(config=config, params=params, tokenizer=tokenizer, engine=engine, rc=rc,
                 sampler=sampler, stop=sampling.StopConditions.for_tokenizer(tokenizer, STOP_TAGS),
                 placement=placement, rows=rows, row_keys=row_keys, padded_batch=Bp,
                 prompt_length=P, cache_length=S, obs_cap=obs_cap)
    return loop, prompts, group


def _prefill(loop: _Loop, prompts: list[np.ndarray], cache_dtype,
             timings: dict[str, float]) -> _State:
    """Left-pads the prompts (B arrays [n_i] int32) into [Bp, P], prefills a fresh [Bp, S]
    cache with them, and returns the loop's starting state."""
    B, Bp, P, S = loop.batch, loop.padded_batch, loop.prompt_length, loop.cache_length
    cache_dtype = cache_dtype or jax.tree.leaves(loop.params)[0].dtype
    ids = np.full((Bp, P), loop.tokenizer.pad_id, np.int32)
    mask = np.zeros((Bp, P), bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = p
        mask[i, P - len(p):] = True
    mask[B:, -1] = True  # batch-padding rows hold one dummy token

    t0 = time.perf_counter()
    cache = _init_cache(loop.config, Bp, S, jnp.dtype(cache_dtype), loop.placement)
    logits, cache = _extend(loop.config, loop.params, loop.on_device(ids), loop.on_device(mask),
                            cache, last_only=True, kv_length=_window(0, P, S),
                            placement=loop.placement)
    state = _State(cache=cache, logits=logits, used=P, done=np.arange(Bp) >= B,
                   real_len=np.array([len(p) for p in prompts] + [0] * (Bp - B)),
                   pieces=[[] for _ in range(B)], counters=EpisodeCounters.zeros(B),
                   timings=timings)
    timings["policy_s"] += time.perf_counter() - t0
    return state


def _start_turn(loop: _Loop, state: _State) -> bool:
    """Ends (as truncated) the episodes whose next turn could pass max_context_tokens.
    -> False when every row is done."""
    B, rc = loop.batch, loop.rc
    too_long = ~state.done[:B] & (state.real_len[:B] + rc.max_new_tokens > rc.max_context_tokens)
    state.counters.truncated |= too_long
    state.done[:B] |= too_long
    return not state.done.all()


def _drop_trailing_eos(loop: _Loop, state: _State, toks: np.ndarray, lens: np.ndarray,
                       active: np.ndarray, first_slot: int) -> np.ndarray:
    """A turn that ended on an end-of-turn id loses it (upstream decodes with
    skip_special_tokens: EOS is never kept, trained, or followed by the next observation).

    toks [Bp, N], lens [Bp]: the turn as sampled; active [B] bool: the rows that sampled it;
    first_slot: the cache slot of the turn's first token. -> ends_on_eos [B] bool.
    """
    B = loop.batch
    ends_on_eos = active & (lens[:B] > 0) & np.isin(
        toks[np.arange(B), np.maximum(lens[:B] - 1, 0)], loop.tokenizer.eos_ids)
    if ends_on_eos.any():
        slots = np.full(loop.padded_batch, -1, np.int32)
        slots[:B][ends_on_eos] = first_slot + lens[:B][ends_on_eos] - 1
        state.cache = _forget_last_token(state.cache, loop.on_device(slots))
    return ends_on_eos


def _policy_turn(loop: _Loop, state: _State, turn: int, final: bool) -> TurnActions:
    """Samples one turn of every row not done, records it as a policy `Piece` and hands its
    text to the environment; the rows whose episode ended are marked done."""
    B, N, S = loop.batch, loop.rc.max_new_tokens, loop.cache_length
    t0 = time.perf_counter()
    turn_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(loop.row_keys, turn)
    first_slot = int(state.cache.index)  # this turn's step t writes slot first_slot + t
    out, state.cache = _decode(loop.config, loop.params, state.cache, state.logits,
                               loop.on_device(turn_keys), sampler=loop.sampler,
                               max_new_tokens=N, stop=loop.stop,
                               done=loop.on_device(state.done),
                               kv_length=_window(state.used, N, S), placement=loop.placement)
    toks, lps, lens = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
    state.used += N
    state.timings["policy_s"] += time.perf_counter() - t0

    active = ~state.done[:B]
    ends_on_eos = _drop_trailing_eos(loop, state, toks, lens, active, first_slot)
    texts: dict[int, str] = {}
    for i in np.flatnonzero(active):
        n = int(lens[i]) - int(ends_on_eos[i])
        state.generated += n
        state.real_len[i] += n
        state.pieces[i].append(Piece(toks[i, :n].copy(), True, lps[i, :n].copy()))
        texts[i] = loop.tokenizer.decode(toks[i, :n])
    actions = take_actions(texts, final, state.counters)
    for i in actions.ended:
        state.done[i] = True
    return actions


def _observe(loop: _Loop, state: _State, turn: int, actions: TurnActions) -> None:
    """Runs the turn's searches and appends every row's observation (the information block or
    the invalid-action message) to the cache as one left-padded [Bp, obs_cap] chunk."""
    observations = dict(actions.observations)
    if actions.queries:
        t0 = time.perf_counter()
        coins = None
        if loop.rc.group_coins and isinstance(loop.engine, NoiseControlled):
            # The in-graph rollout's coins (same keys): a group's rows share their turn's.
            keys = coin_keys(loop.row_keys, turn, loop.rc.samples_per_prompt)
            useful = np.asarray(jax.vmap(jax.random.uniform)(keys)) > np.float32(
                loop.engine.noise_probability)
            coins = {i: bool(useful[i]) for i in actions.search_rows}
        observations.update(search(loop.engine, actions, loop.rows, turn, state.counters,
                                   loop.rc.reuse_repeated_queries, coins))
        state.timings["search_s"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    obs_ids = {i: observation_ids(loop.tokenizer, text, loop.rc.max_obs_tokens)
               for i, text in observations.items()}
    # Always obs_cap wide: one compiled insert per turn (a width per observation-length
    # bucket would compile up to three; the extra padding costs far less than a compile).
    width = loop.obs_cap
    chunk = np.full((loop.padded_batch, width), loop.tokenizer.pad_id, np.int32)
    chunk_mask = np.zeros((loop.padded_batch, width), bool)
    for i, o in obs_ids.items():
        chunk[i, width - len(o):] = o
        chunk_mask[i, width - len(o):] = True
        state.pieces[i].append(Piece(o, False))
        state.real_len[i] += len(o)
    # Rows that are done contribute masked padding; their next logits are unused.
    state.logits, state.cache = _extend(
        loop.config, loop.params, loop.on_device(chunk), loop.on_device(chunk_mask), state.cache,
        last_only=True, kv_length=_window(state.used, loop.obs_cap, loop.cache_length),
        placement=loop.placement)
    state.used += loop.obs_cap
    state.timings["insert_s"] += time.perf_counter() - t0


def _finish(loop: _Loop, state: _State, prompts: list[np.ndarray], group: np.ndarray,
            batch_lengths: tuple[int, int] | None, noise_probability: float | None,
            t_start: float) -> tuple[RolloutBatch, EpisodeStats]:
    """Scores the episodes and packs them for the learner.

    prompts: B arrays [n_i] int32; group [B]. -> (RolloutBatch [B, P + R], EpisodeStats).
    """
    tokenizer, rows, pieces, c = loop.tokenizer, loop.rows, state.pieces, state.counters
    # The answer is read from the policy's own turns only: the prompt's example answer and the
    # inserted text (the invalid-action message itself contains "<answer> and </answer>") never
    # count.
    responses = [tokenizer.decode(np.concatenate([p.ids for p in row])) if row else ""
                 for row in pieces]
    policy_texts = [tokenizer.decode(np.concatenate([p.ids for p in row if p.policy]))
                    if row else "" for row in pieces]
    turns = [[tokenizer.decode(p.ids) for p in row if p.policy] for row in pieces]
    scores = [rewards.score_response(t, ex.golden_answers)
              for t, ex in zip(policy_texts, rows, strict=True)]
    f1 = np.array([s["f1"] for s in scores], np.float32)
    batch = assemble_batch(prompts, pieces, f1, group, tokenizer.pad_id,
                           *(batch_lengths or (None, None)))
    state.timings["total_s"] = time.perf_counter() - t_start
    engine = loop.engine
    stats = EpisodeStats(
        answers=[s["answer"] for s in scores], responses=responses, f1=f1,
        em=np.array([s["em"] for s in scores], np.float32),
        cover_em=np.array([s["cover_em"] for s in scores], np.float32),
        searches=c.searches, engine_calls=c.engine_calls, invalid_actions=c.invalid_actions,
        useful_calls=c.useful_calls, noisy_calls=c.noisy_calls, truncated=c.truncated,
        noise_probability=(
            (engine.noise_probability if isinstance(engine, NoiseControlled) else None)
            if noise_probability is None
            else noise_probability),
        timings=state.timings, generated_tokens=state.generated, calls=c.calls, turns=turns)
    return batch, stats


def rollout(config: models.ModelConfig, params, tokenizer: Tokenizer,
            examples: Sequence[QAExample], engine: SearchEngine, *,
            rollout_config: RolloutConfig = RolloutConfig(),
            sampler=sampling.TopP(0.95, temperature=1.0), rng: Array | int = 0,
            noise_probability: float | None = None, cache_dtype=None,
            batch_lengths: tuple[int, int] | None = None, placement=None,
            first_example: int = 0) -> tuple[RolloutBatch, EpisodeStats]:
    """Runs `samples_per_prompt` episodes of every example and returns the RL batch.

    noise_probability: the curriculum's value for this step, given to engines that have one
    (the simulator); None leaves the engine as it is.
    batch_lengths: (P, R) of the returned batch; a trainer fixes them so its update compiles
    once (default: the longest prompt / response, bucketed).
    placement: a `sharding.Placement` (params already on its mesh): cache and batch are split
    along its batch axes.
    first_example: the index of `examples[0]` in the step's full list of questions, when this
    call rolls out a slice of them (one process of several): row keys and group ids are global.
    """
    rc = rollout_config
    if not examples:
        raise ValueError("rollout needs at least one example")
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    if noise_probability is not None and isinstance(engine, NoiseControlled):
        engine.noise_probability = noise_probability
    t_start = time.perf_counter()
    timings = dict.fromkeys(("policy_s", "search_s", "insert_s"), 0.0)
    loop, prompts, group = _setup(config, params, tokenizer, examples, engine, rc, sampler, rng,
                                  placement, first_example)
    state = _prefill(loop, prompts, cache_dtype, timings)
    for turn in range(rc.max_turns + 1):
        final = turn == rc.max_turns
        if not _start_turn(loop, state):
            break
        actions = _policy_turn(loop, state, turn, final)
        if final:
            break
        _observe(loop, state, turn, actions)
    return _finish(loop, state, prompts, group, batch_lengths, noise_probability, t_start)
