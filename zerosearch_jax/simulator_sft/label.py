"""Labelling collected (query, documents) pairs useful / noisy, and writing SFT examples.

A pair is one search call: the question and gold answers of the trajectory that issued it, the
query, and the real engine's documents (docs/method.md §8). Three judges:

- `trajectory` (the paper's rule): useful iff the trajectory that issued the query reached a
  correct answer (cover EM); all of the call's top-k documents form the target.
- `containment`: judged per document: a document is useful iff it contains a gold answer (the
  normalized answer as a word sequence). The call's top-k becomes a useful example when one of
  them contains an answer; its highest-ranked documents that contain none become a noisy
  example. Retrieving deeper than top-k at collection time gives noisy examples enough
  documents. With `answer_focus` the snippets are cut around the answer instead. A useful
  target's document whose query-focused snippet misses its page's answer starts at the
  answer's sentence, and the documents holding an answer come first. A noisy target keeps the
  ranked pages with their answer-bearing sentences removed, so the query's own pages become
  hard negatives (the entity, its other facts, no answer).
- `llm`: an LLM behind an OpenAI-compatible endpoint answers "do these documents contain enough
  information to answer the question?" (what the authors' released data used).

Classes are balanced by down-sampling the larger one with a fixed seed. Each example is the
docs/method.md §3 prompt (question, first gold answer, query, useful / noisy) and a target of
`Doc i: ...` lines, each document cut to a query-focused snippet of about `doc_words` words
(search engines return snippets, and the prompt asks for "about 30 words").
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from zerosearch_jax.data.jsonl import OnError, handle_bad_row, iter_jsonl
from zerosearch_jax.rewards import normalize_answer
from zerosearch_jax.search.base import QueryContext
from zerosearch_jax.search.http import HTTPClient, SearchBackendError, check_url
from zerosearch_jax.search.simulator import parse_chat, simulator_prompt

logger = logging.getLogger(__name__)

JUDGES = ("trajectory", "containment", "llm")
_DOC_PREFIX = re.compile(r"^\s*Doc\s*\d+\s*(?:\(Title:\s*(?P<title>.*?)\))?\s*:?\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One (query, documents) pair from a real engine, with what is known of its trajectory."""

    question: str
    golden_answers: tuple[str, ...]
    query: str
    documents: tuple[str, ...]  # raw engine documents, best first
    correct: bool | None = None  # did the trajectory reach a correct answer (None: unknown)
    label: str | None = None  # "useful" / "noisy" when the source already says
    id: str = ""

    @classmethod
    def from_record(cls, record: Mapping[str, Any], default_id: str = "") -> Pair:
        """From a JSONL object; raises ValueError naming the bad field."""
        def text(key):
            v = record.get(key)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{key!r} must be a non-empty string, got {v!r}")
            return v.strip()

        answers = record.get("golden_answers", record.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise ValueError(f"'golden_answers' must be a non-empty list of strings, got "
                             f"{answers!r}")
        docs = record.get("documents")
        if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
            raise ValueError(f"'documents' must be a list of strings, got {docs!r}")
        label = record.get("label")
        if label not in (None, "useful", "noisy"):
            raise ValueError(f"'label' must be 'useful', 'noisy' or absent, got {label!r}")
        correct = record.get("correct")
        if correct is not None and not isinstance(correct, bool):
            raise ValueError(f"'correct' must be true, false or absent, got {correct!r}")
        return cls(text("question"), tuple(a.strip() for a in answers), text("query"),
                   tuple(d for d in docs if d.strip()), correct, label,
                   str(record.get("id", default_id)))


def load_pairs(path: str, on_error: OnError = "raise") -> list[Pair]:
    """User-supplied pairs, one JSON object a line: `question`, `golden_answers` (or `answer`),
    `query`, `documents` (list of strings), optional `label` ("useful" / "noisy") and `correct`.
    Malformed lines raise `JSONLError` naming `file:line`, or are skipped with a warning."""
    pairs = []
    for where, record in iter_jsonl(path):
        try:
            if isinstance(record, str):
                raise ValueError(record)
            pairs.append(Pair.from_record(record, default_id=where))
        except ValueError as err:
            handle_bad_row(where, str(err), on_error)
    return pairs


def pairs_from_collection(records: Sequence[Mapping[str, Any]]) -> list[Pair]:
    """The successful search calls of `collect`'s per-question records."""
    pairs = []
    for r in records:
        for k, call in enumerate(r["calls"]):
            if call["ok"] and call["documents"]:
                pairs.append(Pair(r["question"], tuple(r["golden_answers"]), call["query"],
                                  tuple(call["documents"]), bool(r["correct"]), None,
                                  f"{r['id']}/{k}"))
    return pairs


# ----------------------------------------------------------------------------------------------
# Documents -> snippets.
# ----------------------------------------------------------------------------------------------


def document_text(doc: str) -> str:
    """Strips an engine's numbering (`Doc 3(Title: "X") ...`, `Doc 3: ...`) from a document."""
    m = _DOC_PREFIX.match(doc)
    return doc[m.end():].strip() if m else doc.strip()


def snippet(text: str, query: str, max_words: int) -> str:
    """About `max_words` words of `text`: from the sentence sharing most words with the query
    (ties: the earliest), continuing into the following sentences, cut at `max_words`."""
    sents = sentences(text)
    if not sents:
        return ""
    q = set(normalize_answer(query).split())
    overlap = [len(q & set(normalize_answer(s).split())) for s in sents]
    words = " ".join(sents[int(np.argmax(overlap)):]).split()
    return " ".join(words[:max_words])


def sentences(text: str) -> list[str]:
    """The sentences of `text` (split after `.`, `!`, `?`)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def answer_snippet(text: str, golden_answers: Sequence[str], max_words: int) -> str:
    """About `max_words` words of `text` from its first sentence holding a gold answer, on into
    the following ones; "" when no sentence holds one."""
    sents = sentences(text)
    for i, s in enumerate(sents):
        if contains_answer(s, golden_answers):
            return " ".join(" ".join(sents[i:]).split()[:max_words])
    return ""


def answerless_snippet(text: str, query: str, golden_answers: Sequence[str],
                       max_words: int) -> str:
    """`snippet` of `text` with every sentence holding a gold answer removed: a page about the
    query's entity that does not answer it; "" when nothing answer-free is left."""
    kept = " ".join(s for s in sentences(text) if not contains_answer(s, golden_answers))
    out = snippet(kept, query, max_words)
    return "" if contains_answer(out, golden_answers) else out


def contains_answer(text: str, golden_answers: Sequence[str]) -> bool:
    """True if a normalized gold answer occurs in the normalized text as whole words."""
    t = f" {normalize_answer(text)} "
    return any(f" {a} " in t for a in (normalize_answer(g) for g in golden_answers) if a)


def format_target(snippets: Sequence[str]) -> str:
    """The simulator's output format: `Doc 1: ...` lines (docs/method.md §3)."""
    return "\n".join(f"Doc {i + 1}: {s}" for i, s in enumerate(snippets))


# ----------------------------------------------------------------------------------------------
# Judges and examples.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    judge: str = "containment"  # one of JUDGES.
    topk: int = 5  # documents per target (the simulator writes five).
    doc_words: int = 30  # words per document snippet.
    balance: bool = True  # down-sample the larger class to the smaller one's size.
    # containment: cut useful snippets at the answer, noisy ones around it (module docstring).
    answer_focus: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        if self.topk < 1 or self.doc_words < 1:
            raise ValueError(f"topk and doc_words must be >= 1, got {self.topk}, "
                             f"{self.doc_words}")


def make_example(pair: Pair, useful: bool, snippets: Sequence[str], source: str) -> dict:
    """One SFT record: the finetuned-simulator prompt and its `Doc i:` target."""
    context = QueryContext(pair.question, pair.golden_answers)
    return {"id": f"{pair.id}/{'useful' if useful else 'noisy'}", "question": pair.question,
            "golden_answers": list(pair.golden_answers), "query": pair.query,
            "label": "useful" if useful else "noisy", "judge": source,
            "prompt": simulator_prompt(pair.query, context, useful, "finetuned"),
            "target": format_target(snippets)}


def label_pairs(pairs: Sequence[Pair], config: LabelConfig,
                llm_judge: Callable[[Pair, Sequence[str]], bool | None] | None = None
                ) -> list[dict]:
    """SFT examples from pairs (balanced if configured), in a seeded random order.

    Pairs with fewer than `topk` non-empty documents are dropped: every target has the five
    documents the prompt asks for. A pair's own `label` wins over the judge (user data may
    come labelled). `llm_judge(pair, snippets)` returns True/False, or None when it could not
    decide (the pair is dropped).
    """
    if config.judge == "llm" and llm_judge is None:
        raise ValueError("the llm judge needs an endpoint (label.judge_url)")
    useful, noisy = [], []
    for pair in pairs:
        texts = [document_text(d) for d in pair.documents]
        raw = [snippet(t, pair.query, config.doc_words) for t in texts]  # aligned with texts
        snips = [s for s in raw if s]
        if len(snips) < config.topk:  # targets teach the format: always `topk` documents
            continue
        top = snips[:config.topk]
        if pair.label is not None:
            (useful if pair.label == "useful" else noisy).append(
                make_example(pair, pair.label == "useful", top, "given"))
        elif config.judge == "trajectory":
            if pair.correct is None:
                raise ValueError(f"pair {pair.id!r} has no trajectory outcome ('correct'); use "
                                 "the containment or llm judge")
            (useful if pair.correct else noisy).append(
                make_example(pair, pair.correct, top, "trajectory"))
        elif config.judge == "containment" and config.answer_focus:
            w, answers = config.doc_words, pair.golden_answers
            focused = [s if contains_answer(s, answers) else answer_snippet(t, answers, w) or s
                       for s, t in zip(raw, texts, strict=True)]
            focused = [s for s in focused if s][:config.topk]
            if any(contains_answer(s, answers) for s in focused):
                # The answer's documents first (stable): Doc 1 always answers, the one place a
                # briefly tuned model reliably writes, and the first the policy reads.
                focused.sort(key=lambda s: not contains_answer(s, answers))
                useful.append(make_example(pair, True, focused, "containment"))
            misses = [answerless_snippet(t, pair.query, answers, w) for t in texts]
            misses = [s for s in misses if s][:config.topk]
            if len(misses) == config.topk:
                noisy.append(make_example(pair, False, misses, "containment"))
        elif config.judge == "containment":
            hits = [contains_answer(s, pair.golden_answers) for s in snips]
            if any(hits[:config.topk]):
                useful.append(make_example(pair, True, top, "containment"))
            misses = [s for s, h in zip(snips, hits, strict=True) if not h][:config.topk]
            if len(misses) == config.topk:
                noisy.append(make_example(pair, False, misses, "containment"))
        else:
            verdict = llm_judge(pair, top)
            if verdict is not None:
                (useful if verdict else noisy).append(make_example(pair, verdict, top, "llm"))
    rng = np.random.default_rng(config.seed)
    if config.balance:
        n = min(len(useful), len(noisy))
        if n == 0:
            raise ValueError(
                f"cannot balance: {len(useful)} useful and {len(noisy)} noisy examples (judge "
                f"{config.judge!r}); collect more pairs, or set label.balance=False")
        useful = [useful[i] for i in sorted(rng.choice(len(useful), n, replace=False))]
        noisy = [noisy[i] for i in sorted(rng.choice(len(noisy), n, replace=False))]
    examples = useful + noisy
    return [examples[i] for i in rng.permutation(len(examples))]


def split_heldout(examples: Sequence[dict], fraction: float, seed: int
                  ) -> tuple[list[dict], list[dict]]:
    """(train, held-out), split by question so no held-out question was trained on."""
    questions = sorted({e["question"] for e in examples})
    rng = np.random.default_rng(seed)
    n = int(round(fraction * len(questions)))
    held = {questions[i] for i in rng.choice(len(questions), n, replace=False)} if n else set()
    return ([e for e in examples if e["question"] not in held],
            [e for e in examples if e["question"] in held])


# ----------------------------------------------------------------------------------------------
# The LLM judge.
# ----------------------------------------------------------------------------------------------

JUDGE_PROMPT = (
    "You will be given a question, its correct answer and a list of search results.\n"
    "Decide whether the search results contain enough information to answer the question "
    "with the given answer. Reply with one word: yes or no.\n\n"
    "Question: {question}\nCorrect answer: {answer}\n\nSearch results:\n{documents}\n\n"
    "Enough information?"
)


class OpenAIJudge:
    """The llm judge over an OpenAI-compatible `/v1/chat/completions` endpoint, with the HTTP
    clients' timeouts and retries; a failed or unparseable reply returns None (logged)."""

    def __init__(self, url: str, model: str = "default", api_key: str | None = None,
                 retry=None):
        self.url = check_url(url).rstrip("/") + "/v1/chat/completions"
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = HTTPClient(retry=retry)
        self.failures = 0

    def __call__(self, pair: Pair, snippets: Sequence[str]) -> bool | None:
        prompt = JUDGE_PROMPT.format(question=pair.question, answer=pair.golden_answers[0],
                                     documents=format_target(snippets))
        body = {"model": self.model, "temperature": 0.0, "max_tokens": 4,
                "messages": [{"role": "user", "content": prompt}]}
        try:
            reply = self._http.request("POST", self.url, parse_chat, json=body,
                                       headers=self._headers)
        except SearchBackendError as e:
            self.failures += 1
            logger.warning("llm judge failed for pair %s: %s", pair.id, e)
            return None
        word = reply.strip().lower().split()[:1]
        if word and word[0].strip(".!") in ("yes", "no"):
            return word[0].startswith("yes")
        self.failures += 1
        logger.warning("llm judge gave an unparseable reply for pair %s: %r", pair.id, reply)
        return None
