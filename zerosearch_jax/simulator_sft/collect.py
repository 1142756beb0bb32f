"""Collecting real (query, documents) pairs for simulator tuning (docs/method.md §8).

A policy (any loadable model, with the agent template) answers training questions against a real
engine (BM25, the HTTP retriever, SerpAPI); every search call is recorded with the trajectory's
question, gold answers, final answer and whether it was right. Small policies rarely search, so
`query_sources` may add the question itself as one more query per question ("question"), which
is what a RAG baseline would retrieve.

The output is an append-only JSONL log with one record per question (its calls inside), written
after every rollout batch with fsync: a killed collection resumes by skipping the questions
already in the log, with nothing duplicated or lost. `max_calls` caps the engine calls of the
whole collection (resumed runs included) for users paying per search: calls past the cap are
answered "No information available" without reaching the engine, and the collection stops after
that batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import numpy as np

from zerosearch_jax import agent, sampling
from zerosearch_jax.data.jsonl import AppendOnlyJSONL
from zerosearch_jax.data.qa import QAExample
from zerosearch_jax.search.base import QueryContext, SearchEngine, SearchResult

logger = logging.getLogger(__name__)

QUERY_SOURCES = ("policy", "question")


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    batch_size: int = 16  # questions per rollout batch (one durable write each).
    query_sources: tuple[str, ...] = ("policy", "question")  # see QUERY_SOURCES.
    max_calls: int = 0  # engine calls for the whole collection; 0 = no cap.
    seed: int = 0

    def __post_init__(self):
        bad = [s for s in self.query_sources if s not in QUERY_SOURCES]
        if bad or not self.query_sources:
            raise ValueError(f"query_sources must be a non-empty subset of {QUERY_SOURCES}, "
                             f"got {self.query_sources!r}")
        if self.batch_size < 1 or self.max_calls < 0:
            raise ValueError(f"batch_size must be >= 1 and max_calls >= 0, got "
                             f"{self.batch_size}, {self.max_calls}")


class BudgetedEngine(SearchEngine):
    """Passes at most `budget` queries to `engine`; later ones fail without reaching it."""

    name = "budgeted"

    def __init__(self, engine: SearchEngine, budget: int | None):
        super().__init__()
        self.engine, self.budget, self.used = engine, budget, 0

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.used >= self.budget

    def _search(self, queries, contexts):
        n = len(queries) if self.budget is None else max(0, min(len(queries),
                                                                self.budget - self.used))
        self.used += n
        results = (self.engine.search(queries[:n], contexts=None if contexts is None
                                      else contexts[:n]) if n else [])
        return results + [SearchResult.failure("call budget (collect.max_calls) exhausted")
                          for _ in queries[n:]]


def _call(source: str, turn: int, query: str, result_documents, ok: bool) -> dict:
    return {"source": source, "turn": turn, "query": query, "documents": list(result_documents),
            "ok": ok}


def run_collection(config, params, tokenizer, examples: Sequence[QAExample], engine: SearchEngine,
            out_path: str, cc: CollectConfig = CollectConfig(), *,
            rollout_config: agent.RolloutConfig = agent.RolloutConfig(samples_per_prompt=1),
            sampler=sampling.TopP(0.95, temperature=1.0), progress: bool = True) -> dict:
    """Runs the policy on the examples not yet in `out_path` and appends their records.

    `config`, `params`, `tokenizer` are the policy's; None when `cc.query_sources` lacks
    "policy" (then each question is searched as itself, and no trajectory is run).

    Returns counts: questions (in the log), new_questions, engine_calls (in the log), pairs (ok
    calls with documents in the log), stopped_by_budget.
    """
    from tqdm import tqdm

    if rollout_config.samples_per_prompt != 1:
        raise ValueError("collection runs one trajectory per question (samples_per_prompt=1)")
    log = AppendOnlyJSONL(out_path)
    done = {r["id"] for r in log.records}
    used = sum(int(r["engine_calls"]) for r in log.records)
    budget = BudgetedEngine(engine, cc.max_calls - used if cc.max_calls else None)
    todo = [e for e in examples if e.id not in done]
    if done:
        logger.info("collection: %d questions already in %s, %d to go", len(done), out_path,
                    len(todo))
    key = jax.random.key(cc.seed)
    bar = tqdm(total=len(todo), desc="collect", disable=not progress, dynamic_ncols=True)
    stopped = budget.exhausted
    for start in range(0, len(todo), cc.batch_size):
        if stopped:
            break
        batch = todo[start:start + cc.batch_size]
        calls: list[list[dict]] = [[] for _ in batch]
        engine_calls = np.zeros(len(batch), int)
        if "policy" in cc.query_sources:
            _, stats = agent.rollout(config, params, tokenizer, batch, budget,
                                     rollout_config=rollout_config, sampler=sampler,
                                     rng=jax.random.fold_in(key, len(done) + start))
            for i, episode in enumerate(stats.calls):
                calls[i] += [_call("policy", c.turn, c.query, c.documents, c.ok)
                             for c in episode]
            # Counted as sent (calls the cap refused included), so a resumed run's remaining
            # budget is never over-estimated.
            engine_calls += stats.engine_calls
            answers, correct = stats.answers, stats.cover_em > 0
            f1 = stats.f1
        else:
            answers, correct, f1 = [None] * len(batch), np.zeros(len(batch), bool), np.zeros(
                len(batch))
        if "question" in cc.query_sources:
            results = budget.search([e.question for e in batch], contexts=[
                QueryContext(e.question, e.golden_answers) for e in batch])
            for i, (e, r) in enumerate(zip(batch, results, strict=True)):
                calls[i].append(_call("question", -1, e.question, r.documents, r.ok))
            engine_calls += 1
        log.append({"id": e.id, "question": e.question, "golden_answers": list(e.golden_answers),
                    "data_source": e.data_source, "final_answer": answers[i],
                    "correct": bool(correct[i]), "f1": float(f1[i]),
                    "engine_calls": int(engine_calls[i]), "calls": calls[i]}
                   for i, e in enumerate(batch))
        bar.update(len(batch))
        stopped = budget.exhausted
        if stopped:
            logger.warning("collection stopped: the engine-call cap collect.max_calls=%d is "
                           "reached", cc.max_calls)
    bar.close()
    return {"questions": len(log.records), "new_questions": len(log.records) - len(done),
            "engine_calls": sum(int(r["engine_calls"]) for r in log.records),
            "pairs": sum(c["ok"] and bool(c["documents"]) for r in log.records
                         for c in r["calls"]),
            "stopped_by_budget": bool(stopped)}
