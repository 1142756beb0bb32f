"""Format warm-up: demonstration episodes in the policy template, for small policies.

ZeroSearch starts RL from a base or instruct model that can already follow the template (3B and
7B in the paper). The embedded 135M default cannot: prompted, SmolLM2-135M-Instruct almost never
closes a `<search>` or `<answer>` span (no engine call in 160 training episodes,
docs/training.md), so every reward is 0, GRPO's advantages vanish and RL has nothing to learn
from. A short behaviour-cloning stage on demonstrations of the format fixes that, and is off
(`warmup.steps = 0`) in the paper configs.

A demonstration is one episode of the template as a rollout would lay it out:

    <think> ... </think>\\n<search> {query} </search>            policy tokens (loss mask 1)
    \\n\\n<information>{documents}</information>\\n\\n             inserted tokens (loss mask 0)
    ... one more search for a two-hop question ...
    <think> ... </think>\\n<answer> {gold answer} </answer>      policy tokens (loss mask 1)

The documents are what a real engine returned for the query (the question itself, then, for a
two-hop question of the synthetic world, the name of its bridge entity); the observation is
tokenized and capped exactly as `agent.rollout` does, and the rows are packed by
`agent.assemble_batch`, so the loss sees the same token layout RL will. A demonstration is kept
only when its documents contain a gold answer (cover-EM), so every demonstrated answer can be
read off the documents shown: the policy is taught to search and to copy from the results, not
to recite answers.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from zerosearch_jax import rewards
from zerosearch_jax.agent.environment import (
    Piece,
    RolloutConfig,
    assemble_batch,
    observation_ids,
    prompt_ids,
)
from zerosearch_jax.agent.template import information_block
from zerosearch_jax.data.qa import QAExample
from zerosearch_jax.search.base import QueryContext, SearchEngine
from zerosearch_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FIRST_THOUGHT = "<think> I need to search for information to answer this question. </think>"
NEXT_THOUGHT = "<think> I need more information about {query}. </think>"
ANSWER_THOUGHT = "<think> The documents contain the answer. </think>"


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """One demonstrated episode: its question, the queries searched and the documents text
    each returned (what goes between <information> tags), and the answer given."""

    example: QAExample
    queries: tuple[str, ...]
    documents: tuple[str, ...]
    answer: str

    def turns(self) -> list[tuple[str, bool]]:
        """The episode's response as (text, is_policy) pieces, in order."""
        out = []
        for i, (query, docs) in enumerate(zip(self.queries, self.documents, strict=True)):
            thought = FIRST_THOUGHT if i == 0 else NEXT_THOUGHT.format(query=query)
            out.append((f"{thought}\n<search> {query} </search>", True))
            out.append((information_block(docs), False))
        out.append((f"{ANSWER_THOUGHT}\n<answer> {self.answer} </answer>", True))
        return out


def question_queries(example: QAExample) -> list[str]:
    """The default plan: search the question itself, once."""
    return [example.question.strip()]


def synthetic_world_queries(world, reread_single_hop: float = 0.0,
                            ) -> Callable[[QAExample], list[str]]:
    """For the synthetic world: the question, then for a two-hop question the title of each
    further supporting passage (the bridge entity the second hop is about).

    reread_single_hop: the fraction of single-hop questions (a fixed choice per question id)
    whose plan also searches a second time, for the title of the passage holding the answer
    (the question's own subject). Why: a policy that learns to search twice (RL does, from a
    warm-up that shows two-hop plans) otherwise has only seen second queries that name a
    bridge entity, so on a single-hop question it searches an entity of the first page and
    answers from that page; this shows the second search that returns the answer's page.
    """
    if not 0.0 <= reread_single_hop <= 1.0:
        raise ValueError(f"reread_single_hop must be in [0, 1], got {reread_single_hop!r}")

    def plan(example: QAExample) -> list[str]:
        titles = [p["contents"].split("\n", 1)[0].strip().strip('"')
                  for p in world.supporting_passages(example.id)]
        if len(titles) == 1 and zlib.crc32(example.id.encode()) % 1000 < reread_single_hop * 1000:
            return [example.question.strip(), titles[0]]
        return [example.question.strip(), *titles[1:]]
    return plan


def visible_documents(tokenizer: Tokenizer, max_obs_tokens: int) -> Callable[[str], str]:
    """documents text -> the part of it a rollout shows the policy (the information block
    capped at `max_obs_tokens`, which drops documents from the end)."""
    def visible(text: str) -> str:
        return tokenizer.decode(observation_ids(tokenizer, information_block(text),
                                                max_obs_tokens))
    return visible


def build_demonstrations(examples: Sequence[QAExample], engine: SearchEngine, *,
                         max_turns: int, plan: Callable[[QAExample], list[str]] = question_queries,
                         visible: Callable[[str], str] = lambda text: text,
                         ) -> tuple[list[Demonstration], dict[str, int]]:
    """Searches each example's plan (at most `max_turns` queries, one batched call per hop)
    and keeps the episodes whose documents, as far as `visible` shows them (see
    `visible_documents`), contain a gold answer.

    Returns (demonstrations, counts) with counts of `examples`, `kept`, `kept_multi_search`
    (kept episodes that search more than once: the synthetic world's two-hop plan),
    `no_answer_in_docs` and `failed_searches` (an engine that answered `NO_INFORMATION`).
    """
    if max_turns < 1:
        raise ValueError(f"a demonstration needs max_turns >= 1 searches, got {max_turns}")
    plans = [plan(e)[:max_turns] for e in examples]
    docs: list[list[str]] = [[] for _ in examples]
    failed = [False] * len(examples)
    for hop in range(max(map(len, plans), default=0)):
        rows = [i for i, p in enumerate(plans) if len(p) > hop]
        results = engine.search(
            [plans[i][hop] for i in rows],
            contexts=[QueryContext(examples[i].question, examples[i].golden_answers)
                      for i in rows])
        for i, r in zip(rows, results, strict=True):
            docs[i].append(r.text)
            failed[i] |= not r.ok
    demos, no_answer = [], 0
    for e, p, d, bad in zip(examples, plans, docs, failed, strict=True):
        if bad:
            continue
        if not rewards.cover_exact_match(" ".join(map(visible, d)), e.golden_answers):
            no_answer += 1
            continue
        demos.append(Demonstration(e, tuple(p), tuple(d), e.golden_answers[0]))
    counts = {"examples": len(examples), "kept": len(demos),
              "kept_multi_search": sum(len(d.queries) > 1 for d in demos),
              "no_answer_in_docs": no_answer,
              "failed_searches": sum(failed)}
    return demos, counts


def encode_demonstrations(tokenizer: Tokenizer, demos: Sequence[Demonstration],
                          rollout_config: RolloutConfig) -> dict[str, np.ndarray]:
    """[N, T] tokens / attention_mask / positions / loss_mask, laid out like a rollout batch
    (prompt left-padded, response right-padded; loss mask 1 on the policy's turns only)."""
    if not demos:
        raise ValueError("no demonstrations to encode")
    rc = rollout_config
    prompts, pieces = [], []
    for d in demos:
        prompts.append(np.asarray(prompt_ids(tokenizer, d.example.question, rc.chat_template),
                                  np.int32))
        row = []
        for text, policy in d.turns():
            if policy:
                ids = np.asarray(tokenizer.encode(text)[:rc.max_new_tokens], np.int32)
                row.append(Piece(ids, True, np.zeros(len(ids), np.float32)))
            else:
                row.append(Piece(observation_ids(tokenizer, text, rc.max_obs_tokens), False))
        pieces.append(row)
    batch = assemble_batch(prompts, pieces, np.zeros(len(demos), np.float32),
                           np.arange(len(demos)), tokenizer.pad_id)
    return {"tokens": batch.tokens, "attention_mask": batch.attention_mask,
            "positions": batch.positions, "loss_mask": batch.loss_mask}
