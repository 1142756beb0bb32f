"""The search environment the policy acts in (text level): prompts, actions, search calls,
observations, and the record of an episode.

- `RolloutConfig` is the episode's contract: turns allowed, token caps of a policy turn, an
  observation, a prompt and the whole context.
- The first observation is the policy prompt (`prompt_ids`, `checked_prompt_ids`).
- A turn is parsed as upstream (`take_actions`): the first complete `<search>` / `<answer>` span
  wins; anything else is invalid and gets the invalid-action message. An answer ends the episode,
  and so does any action on the final turn (its search is counted, never sent).
- All the batch's queries go to the engine in one call (`search`), each with its own trajectory's
  question and gold answers (the simulator reads them; upstream mixed them up across the batch).
- The information block (or the message) is tokenized and capped at `max_obs_tokens`
  (`observation_ids`: documents are cut, the wrapper tags kept).
- An episode is recorded as response `Piece`s, packed for the learner by `assemble_batch` into a
  `RolloutBatch`; its counters (`EpisodeCounters`, `SearchCall`s) end up in `EpisodeStats`.

The rollouts drive it: `agent.rollout` (the host loop, any engine) calls these functions turn by
turn; `agent.episode` (one jitted program, the in-process simulator) does the same steps on
tokens and returns the same `RolloutBatch` / `EpisodeStats`; `agent.warmup` lays out its
demonstrations with the same pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from zerosearch_jax import sampling
from zerosearch_jax.agent.template import (
    INVALID_ACTION,
    information_block,
    parse_action,
    policy_prompt,
)
from zerosearch_jax.data.qa import QAExample
from zerosearch_jax.search.base import QueryContext, SearchEngine, format_documents
from zerosearch_jax.tokenizer import Tokenizer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Episode shape (docs/method.md §2 defaults)."""

    samples_per_prompt: int = 5  # n rollouts of each question (GRPO groups).
    max_turns: int = 2  # searches allowed before the final turn.
    max_new_tokens: int = 500  # per policy turn.
    max_obs_tokens: int = 500  # per inserted observation, wrapper tags included.
    max_prompt_tokens: int = 2048  # longer prompts are rejected with an error.
    max_context_tokens: int = 4096  # an episode whose next turn could pass this ends.
    chat_template: bool = True  # apply the tokenizer's chat template to the prompt.
    # A query the episode already searched gets that call's documents again instead of a new
    # call: a real engine answers a repeated query alike, while upstream's simulator flips a
    # new coin and writes a new page, which rewards searching the same query twice.
    reuse_repeated_queries: bool = False
    # The episodes of one GRPO group share each turn's useful/noisy coin (common random
    # numbers): the group's k-th searches all get useful pages or all noisy ones, so what
    # separates the group's rewards is what each episode did, not which coin it drew. False
    # (upstream): every call flips its own coin. Engines without a coin ignore it.
    group_coins: bool = False

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
    """One stretch of a response: a policy turn (sampled) or an inserted observation."""

    ids: np.ndarray  # [n] int32
    policy: bool
    logprobs: np.ndarray | None = None  # [n] float32 for policy pieces

@dataclasses.dataclass
class EpisodeCounters:
    """Per-episode counters of a host rollout ([B] arrays) and each episode's search calls."""

    searches: np.ndarray  # [B] int32, searches the policy issued (final-turn ones included)
    engine_calls: np.ndarray  # [B] int32, searches sent to the engine
    invalid_actions: np.ndarray  # [B] int32
    useful_calls: np.ndarray  # [B] int32, engine calls whose simulator coin said useful
    noisy_calls: np.ndarray  # [B] int32, ... and noisy
    truncated: np.ndarray  # [B] bool, the episode ran out of context
    calls: list[list[SearchCall]]  # per episode

    @classmethod
    def zeros(cls, batch_size: int) -> EpisodeCounters:
        B = batch_size
        return cls(searches=np.zeros(B, np.int32), engine_calls=np.zeros(B, np.int32),
                   invalid_actions=np.zeros(B, np.int32), useful_calls=np.zeros(B, np.int32),
                   noisy_calls=np.zeros(B, np.int32), truncated=np.zeros(B, bool),
                   calls=[[] for _ in range(B)])


@dataclasses.dataclass
class TurnActions:
    """What the environment makes of one policy turn of the batch (`take_actions`)."""

    ended: list[int]  # rows whose episode ends: an answer, or any action on the final turn
    search_rows: list[int]  # rows whose query goes to the engine, in row order
    queries: list[str]  # their queries
    observations: dict[int, str]  # row -> observation text (here: the invalid-action message)


def take_actions(texts: dict[int, str], final: bool, counters: EpisodeCounters) -> TurnActions:
    """Parses each active row's policy turn (`texts[row]`, in row order) and counts it."""
    actions = TurnActions([], [], [], {})
    for i, text in texts.items():
        action = parse_action(text)
        if action.kind == "search":
            counters.searches[i] += 1
        if action.kind == "answer" or final:
            actions.ended.append(i)
        elif action.kind == "search":
            counters.engine_calls[i] += 1
            actions.search_rows.append(i)
            actions.queries.append(action.content)
        else:
            counters.invalid_actions[i] += 1
            actions.observations[i] = INVALID_ACTION
    return actions


def search(engine: SearchEngine, actions: TurnActions, rows: Sequence[QAExample], turn: int,
           counters: EpisodeCounters, reuse_repeated: bool = False,
           coins: Mapping[int, bool] | None = None) -> dict[int, str]:
    """Sends the turn's queries to `engine` in one call, each with its row's question and gold
    answers (`rows[i]`); records every call. With `reuse_repeated`, a query its row already
    searched (same text) is answered with that call's documents and coin, not sent.
    coins: row -> its forced useful/noisy coin (`RolloutConfig.group_coins`); rows not in it
    leave the coin to the engine. -> row -> information block."""
    earlier = {}
    if reuse_repeated:
        earlier = {k: c for k, i in enumerate(actions.search_rows)
                   for c in counters.calls[i] if c.ok and c.query == actions.queries[k]}
    sent = [k for k in range(len(actions.search_rows)) if k not in earlier]
    coins = coins or {}
    results = engine.search([actions.queries[k] for k in sent], contexts=[
        QueryContext(rows[i].question, rows[i].golden_answers, useful=coins.get(i),
                     bridge_answers=rows[i].bridge_answers)
        for i in (actions.search_rows[k] for k in sent)]) if sent else []
    answers = dict(zip(sent, results, strict=True))
    observations = {}
    for k, (i, query) in enumerate(zip(actions.search_rows, actions.queries, strict=True)):
        if k in earlier:
            documents, useful, ok = earlier[k].documents, earlier[k].useful, True
            text = format_documents(documents)
        else:
            res = answers[k]
            documents, useful, ok = tuple(res.documents), res.metadata.get("useful"), res.ok
            text = res.text
        observations[i] = information_block(text)
        counters.calls[i].append(SearchCall(turn, query, documents, useful, ok))
        counters.useful_calls[i] += useful is True
        counters.noisy_calls[i] += useful is False
    return observations


def coin_keys(row_keys: Array, turn, samples: int | None = None) -> Array:
    """[B] PRNG keys of each row's useful/noisy coin at `turn` (uniform > p_noise: useful);
    with `samples`, every row of a group (rows grouped: row r in group r // samples) gets its
    group's first row's (`RolloutConfig.group_coins`). The in-graph rollout flips every coin
    with these; the host loop only the shared ones (its engine flips the others)."""
    if samples is not None:
        row_keys = row_keys[(jnp.arange(row_keys.shape[0]) // samples) * samples]
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    return fold(fold(row_keys, turn), 1)


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
