"""The multi-turn search rollout: policy turns, search calls, inserted documents (host loop).

One KV cache per batch lives across all turns of an episode:

    prefill(prompts) -> [decode a turn -> parse -> search -> extend(observations)] x max_turns
                     -> decode the final turn

- A turn samples up to `max_new_tokens` and stops right after `</search>` or `</answer>` (or
  EOS); the sampled ids are kept as they are (upstream re-tokenized the cut text).
- A turn is parsed as upstream: the first complete `<search>` / `<answer>` span wins; anything
  else is invalid and gets the invalid-action message. An answer ends the episode.
- All the batch's queries go to the engine in one call, each with its own trajectory's question
  and gold answers (the simulator reads them; upstream mixed them up across the batch).
- The information block (or the message) is tokenized, capped at `max_obs_tokens` (documents
  are cut, the wrapper tags kept), and appended to the cache as one left-padded chunk.
- After `max_turns` searches the final turn's search results are discarded and the episode ends.

Device work is three jitted programs (prefill / append a chunk, decode a turn) on donated
caches; everything else (text, parsing, engines) is host work between them. With a
`sharding.Placement` the cache and the batch are split along its batch axes (the params are
wherever the caller placed them). Every row samples from its own key, derived from the global
index of its example, so an episode does not depend on the batch or process it ran in. The
design card's next step, one jitted program for a whole episode when the simulator runs in
process, can reuse these pieces.

The result is a `RolloutBatch` ready for RL: [B, T] arrays with the prompt left-padded to P and
the response right-padded to R, a loss mask that is 1 exactly on the policy's sampled tokens, the
sampling log-probs, and the F1 reward on the last policy token; plus host-side `EpisodeStats`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from zerosearch_jax import models, rewards, sampling
from zerosearch_jax.agent.template import (
    INVALID_ACTION,
    STOP_TAGS,
    information_block,
    parse_action,
    policy_prompt,
)
from zerosearch_jax.data.qa import QAExample
from zerosearch_jax.search.base import NoiseControlled, QueryContext, SearchEngine
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Episode shape (REFERENCE section 2 defaults)."""

    samples_per_prompt: int = 5  # n rollouts of each question (GRPO groups).
    max_turns: int = 2  # searches allowed before the final turn.
    max_new_tokens: int = 500  # per policy turn.
    max_obs_tokens: int = 500  # per inserted observation, wrapper tags included.
    max_prompt_tokens: int = 2048  # longer prompts are rejected with an error.
    max_context_tokens: int = 4096  # an episode whose next turn could pass this ends.
    chat_template: bool = True  # apply the tokenizer's chat template to the prompt.

    def __post_init__(self):
        for name in ("samples_per_prompt", "max_new_tokens", "max_obs_tokens",
                     "max_prompt_tokens", "max_context_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {self.max_turns}")

    @property
    def max_response_tokens(self) -> int:
        """The longest possible response: every turn at its cap, every observation at its."""
        return (self.max_turns + 1) * self.max_new_tokens + self.max_turns * self.max_obs_tokens


@flax.struct.dataclass
class RolloutBatch:
    """Trajectories as [B, T] arrays, T = P + R (prompt left-padded, response right-padded).

    tokens         [B, T] int32
    attention_mask [B, T] bool    real tokens (prompt, policy turns, observations)
    positions      [B, T] int32   RoPE positions counting real tokens only
    loss_mask      [B, T] float32 1 exactly on tokens the policy sampled
    logprobs       [B, T] float32 log-prob of each sampled token under the policy at the sampling
                   temperature (before top-p truncation; the RL old log-prob)
    rewards        [B, T] float32 the episode reward (F1) on its last policy token, 0 elsewhere
    group          [B]    int32   index of the question (samples of one question share it)
    """

    tokens: Array
    attention_mask: Array
    positions: Array
    loss_mask: Array
    logprobs: Array
    rewards: Array
    group: Array
    prompt_length: int = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class SearchCall:
    """One search the engine answered: what the simulator-tuning collector and the evaluation
    traces record."""

    turn: int
    query: str
    documents: tuple[str, ...]
    useful: bool | None  # the simulator's coin flip; None for real engines
    ok: bool

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"documents": list(self.documents)}


@dataclasses.dataclass
class EpisodeStats:
    """Per-episode host metadata ([B] arrays / lists) and the rollout's timings."""

    answers: list[str | None]
    responses: list[str]
    f1: np.ndarray
    em: np.ndarray
    cover_em: np.ndarray
    searches: np.ndarray  # searches the policy issued (final-turn ones included)
    engine_calls: np.ndarray  # searches sent to the engine (final-turn ones are not)
    invalid_actions: np.ndarray
    useful_calls: np.ndarray
    noisy_calls: np.ndarray
    truncated: np.ndarray
    noise_probability: float | None
    timings: dict[str, float]
    generated_tokens: int
    calls: list[list[SearchCall]] = dataclasses.field(default_factory=list)  # per episode
    turns: list[list[str]] = dataclasses.field(default_factory=list)  # policy turn texts

    def summary(self) -> dict[str, float]:
        """Batch means for logging."""
        return {
            "reward/f1": float(self.f1.mean()), "reward/em": float(self.em.mean()),
            "reward/cover_em": float(self.cover_em.mean()),
            "episode/searches": float(self.searches.mean()),
            "episode/engine_calls": float(self.engine_calls.mean()),
            "episode/invalid_actions": float(self.invalid_actions.mean()),
            "episode/useful_calls": float(self.useful_calls.mean()),
            "episode/noisy_calls": float(self.noisy_calls.mean()),
            "episode/truncated": float(self.truncated.mean()),
            "episode/answered": float(np.mean([a is not None for a in self.answers])),
            **{f"time/{k}": v for k, v in self.timings.items()},
        }


@dataclasses.dataclass
class Piece:
    ids: np.ndarray  # [n] int32
    policy: bool
    logprobs: np.ndarray | None = None  # [n] float32 for policy pieces


def _extend_chunk(config, params, tokens, token_mask, cache, *, last_only, kv_length,
                  placement):
    logits, cache = models.extend(config, params, tokens, token_mask, cache,
                                  last_only=last_only, kv_length=kv_length)
    if placement is not None:
        cache = placement.constrain_cache(config, cache)
    return logits, cache


def _empty_cache(config, batch_size, length, dtype, placement):
    cache = models.init_cache(config, batch_size, length, dtype)
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


def prompt_ids(tokenizer: Tokenizer, question: str, chat_template: bool = True) -> list[int]:
    """Token ids of the policy prompt for `question` (the template, in a chat turn)."""
    text = policy_prompt(question)
    return tokenizer.encode(tokenizer.chat_prompt(text) if chat_template else text)


def checked_prompt_ids(tokenizer: Tokenizer, example: QAExample,
                       rollout_config: RolloutConfig) -> list[int]:
    """`prompt_ids` of the example, a ValueError naming it when they pass max_prompt_tokens."""
    rc = rollout_config
    ids = prompt_ids(tokenizer, example.question, rc.chat_template)
    if len(ids) > rc.max_prompt_tokens:
        raise ValueError(f"question {example.id!r}: prompt has {len(ids)} tokens, more than "
                         f"max_prompt_tokens={rc.max_prompt_tokens}")
    return ids


def observation_ids(tokenizer: Tokenizer, text: str, cap: int) -> np.ndarray:
    """Token ids of an observation, at most `cap`: an information block loses documents from
    its end, never its wrapper tags; other text is cut at the end."""
    head, sep, rest = text.partition("<information>")
    if sep and "</information>" in rest:
        body, _, tail = rest.rpartition("</information>")
        head_ids = tokenizer.encode(head + "<information>")
        tail_ids = tokenizer.encode("</information>" + tail)
        room = max(cap - len(head_ids) - len(tail_ids), 0)
        ids = head_ids + tokenizer.encode(body)[:room] + tail_ids
    else:
        ids = tokenizer.encode(text)
    return np.asarray(ids[:cap], np.int32)


def assemble_batch(prompts: Sequence[np.ndarray], pieces: Sequence[Sequence[Piece]],
                   episode_rewards: np.ndarray, group: np.ndarray, pad_id: int,
                   prompt_length: int | None = None,
                   response_length: int | None = None) -> RolloutBatch:
    """Packs prompts and response pieces into a `RolloutBatch` (numpy arrays).

    prompts[i]: the prompt ids of row i; pieces[i]: its response, in order. Lengths default to
    the longest row, bucketed (`sampling.bucket_length`) so training compiles few shapes.
    """
    B = len(prompts)
    responses = [np.concatenate([p.ids for p in row]) if row else np.zeros(0, np.int32)
                 for row in pieces]
    P = prompt_length or sampling.bucket_length(max(len(p) for p in prompts))
    R = response_length or sampling.bucket_length(max(1, max(len(r) for r in responses)))
    T = P + R
    tokens = np.full((B, T), pad_id, np.int32)
    attention = np.zeros((B, T), bool)
    loss_mask = np.zeros((B, T), np.float32)
    logprobs = np.zeros((B, T), np.float32)
    token_rewards = np.zeros((B, T), np.float32)
    for i in range(B):
        p = prompts[i]
        if len(p) > P or len(responses[i]) > R:
            raise ValueError(f"row {i}: prompt {len(p)} / response {len(responses[i])} tokens do "
                             f"not fit P={P} / R={R}")
        tokens[i, P - len(p):P] = p
        attention[i, P - len(p):P] = True
        t = P
        last_policy = -1
        for piece in pieces[i]:
            n = len(piece.ids)
            tokens[i, t:t + n] = piece.ids
            attention[i, t:t + n] = True
            if piece.policy:
                loss_mask[i, t:t + n] = 1.0
                logprobs[i, t:t + n] = piece.logprobs
                last_policy = t + n - 1 if n else last_policy
            t += n
        if last_policy >= 0:
            token_rewards[i, last_policy] = episode_rewards[i]
    positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)
    return RolloutBatch(tokens=tokens, attention_mask=attention, positions=positions,
                        loss_mask=loss_mask, logprobs=logprobs, rewards=token_rewards,
                        group=np.asarray(group, np.int32), prompt_length=P)


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

    # Rows: every example repeated n times, grouped.
    rows = [ex for ex in examples for _ in range(rc.samples_per_prompt)]
    group = first_example + np.repeat(np.arange(len(examples)), rc.samples_per_prompt)
    B = len(rows)
    prompts = [np.asarray(checked_prompt_ids(tokenizer, ex, rc), np.int32) for ex in rows]

    Bp = sampling.bucket_batch(B, 1 if placement is None else placement.batch_shards)
    P = sampling.bucket_length(max(len(p) for p in prompts))
    obs_cap = sampling.bucket_length(rc.max_obs_tokens)
    N = rc.max_new_tokens
    S = P + (rc.max_turns + 1) * N + rc.max_turns * obs_cap
    cache_dtype = cache_dtype or jax.tree.leaves(params)[0].dtype
    stop = sampling.StopConditions.for_tokenizer(tokenizer, STOP_TAGS)

    ids = np.full((Bp, P), tokenizer.pad_id, np.int32)
    mask = np.zeros((Bp, P), bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = p
        mask[i, P - len(p):] = True
    mask[B:, -1] = True  # batch-padding rows hold one dummy token
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        rng, first_example * rc.samples_per_prompt + np.arange(Bp))

    def on_device(x):
        return x if placement is None else jax.device_put(x, placement.batch_sharding(x.ndim))

    t0 = time.perf_counter()
    cache = _init_cache(config, Bp, S, jnp.dtype(cache_dtype), placement)
    logits, cache = _extend(config, params, on_device(ids), on_device(mask), cache,
                            last_only=True, kv_length=_window(0, P, S), placement=placement)
    # An upper bound of the filled slots that depends only on the turn (a decode may stop early;
    # an observation chunk is at most obs_cap wide), so each turn's attention window, and with it
    # the compiled program, is the same at every training step.
    used = P

    done = np.arange(Bp) >= B
    pieces: list[list[Piece]] = [[] for _ in range(B)]
    real_len = np.array([len(p) for p in prompts] + [0] * (Bp - B))
    searches = np.zeros(B, np.int32)
    engine_calls = np.zeros(B, np.int32)
    invalid = np.zeros(B, np.int32)
    useful_calls = np.zeros(B, np.int32)
    noisy_calls = np.zeros(B, np.int32)
    truncated = np.zeros(B, bool)
    generated = 0
    calls: list[list[SearchCall]] = [[] for _ in range(B)]
    timings["policy_s"] += time.perf_counter() - t0

    for turn in range(rc.max_turns + 1):
        final = turn == rc.max_turns
        too_long = ~done[:B] & (real_len[:B] + N > rc.max_context_tokens)
        truncated |= too_long
        done[:B] |= too_long
        if done.all():
            break
        t0 = time.perf_counter()
        turn_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, turn)
        first_slot = int(cache.index)  # this turn's step t writes slot first_slot + t
        out, cache = _decode(config, params, cache, logits, on_device(turn_keys),
                             sampler=sampler, max_new_tokens=N, stop=stop,
                             done=on_device(done), kv_length=_window(used, N, S),
                             placement=placement)
        toks, lps, lens = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
        used += N
        timings["policy_s"] += time.perf_counter() - t0

        # A turn that ended on an end-of-turn id loses it (upstream decodes with
        # skip_special_tokens: EOS is never kept, trained, or followed by the next observation).
        active = ~done[:B]
        ends_on_eos = active & (lens[:B] > 0) & np.isin(
            toks[np.arange(B), np.maximum(lens[:B] - 1, 0)], tokenizer.eos_ids)
        if ends_on_eos.any():
            slots = np.full(Bp, -1, np.int32)
            slots[:B][ends_on_eos] = first_slot + lens[:B][ends_on_eos] - 1
            cache = _forget_last_token(cache, on_device(slots))

        observations: dict[int, str] = {}
        search_rows: list[int] = []
        queries: list[str] = []
        for i in np.flatnonzero(active):
            n = int(lens[i]) - int(ends_on_eos[i])
            generated += n
            real_len[i] += n
            pieces[i].append(Piece(toks[i, :n].copy(), True, lps[i, :n].copy()))
            action = parse_action(tokenizer.decode(toks[i, :n]))
            if action.kind == "search":
                searches[i] += 1
            if action.kind == "answer" or final:
                done[i] = True
            elif action.kind == "search":
                engine_calls[i] += 1
                search_rows.append(i)
                queries.append(action.content)
            else:
                invalid[i] += 1
                observations[i] = INVALID_ACTION
        if final:
            break

        if queries:
            t0 = time.perf_counter()
            contexts = [QueryContext(rows[i].question, rows[i].golden_answers)
                        for i in search_rows]
            results = engine.search(queries, contexts=contexts)
            for i, query, res in zip(search_rows, queries, results, strict=True):
                observations[i] = information_block(res.text)
                useful = res.metadata.get("useful")
                calls[i].append(SearchCall(turn, query, tuple(res.documents), useful, res.ok))
                useful_calls[i] += useful is True
                noisy_calls[i] += useful is False
            timings["search_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        obs_ids = {i: observation_ids(tokenizer, text, rc.max_obs_tokens)
                   for i, text in observations.items()}
        # Always obs_cap wide: one compiled insert per turn (a width per observation-length
        # bucket would compile up to three; the extra padding costs far less than a compile).
        width = obs_cap
        chunk = np.full((Bp, width), tokenizer.pad_id, np.int32)
        chunk_mask = np.zeros((Bp, width), bool)
        for i, o in obs_ids.items():
            chunk[i, width - len(o):] = o
            chunk_mask[i, width - len(o):] = True
            pieces[i].append(Piece(o, False))
            real_len[i] += len(o)
        # Rows that are done contribute masked padding; their next logits are unused.
        logits, cache = _extend(config, params, on_device(chunk), on_device(chunk_mask), cache,
                                last_only=True, kv_length=_window(used, obs_cap, S),
                                placement=placement)
        used += obs_cap
        timings["insert_s"] += time.perf_counter() - t0

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
    timings["total_s"] = time.perf_counter() - t_start
    stats = EpisodeStats(
        answers=[s["answer"] for s in scores], responses=responses, f1=f1,
        em=np.array([s["em"] for s in scores], np.float32),
        cover_em=np.array([s["cover_em"] for s in scores], np.float32),
        searches=searches, engine_calls=engine_calls, invalid_actions=invalid,
        useful_calls=useful_calls, noisy_calls=noisy_calls, truncated=truncated, noise_probability=(
            (engine.noise_probability if isinstance(engine, NoiseControlled) else None)
            if noise_probability is None
            else noise_probability),
        timings=timings, generated_tokens=generated, calls=calls, turns=turns)
    return batch, stats

