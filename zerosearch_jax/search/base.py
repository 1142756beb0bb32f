"""The one batched interface every search back-end implements.

The rollout loop hands a whole batch of `<search>` queries to `SearchEngine.search` and gets back
one `SearchResult` per query; `format_documents(result.documents)` is the text placed between
`<information>` and `</information>`. Back-ends (local BM25, HTTP retrievers, SerpAPI, the LLM
simulator) differ only in how they produce the documents, so they are interchangeable by name
through `make_engine`. A back-end never raises on a failed lookup: it answers
`NO_INFORMATION` (ok=False, error set) and counts the failure in its `EngineStats`, because one
flaky request must not kill an RL step of hundreds of trajectories.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

NO_INFORMATION = "No information available"


@dataclasses.dataclass(frozen=True)
class QueryContext:
    """What the trajectory that issued a query is about (read by the LLM simulator only).

    Each query carries its own trajectory's question and answers; upstream ZeroSearch paired the
    k-th query with the k-th question of the batch instead (docs/method.md §3), which this fixes.
    """

    question: str
    golden_answers: tuple[str, ...]
    # Force useful (True) or noisy (False) documents; None lets the engine decide.
    useful: bool | None = None
    # A multi-hop question's first-hop answers (`QAExample.bridge_answers`); read by a
    # simulator with `hop_answers`.
    bridge_answers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The answer to one query.

    `documents` are already numbered and formatted by the back-end (`Doc 1(Title: "T") text` for
    Search-R1-style passages, `Doc 1: title snippet` for Google); empty on failure or no hit.
    `latency_s` is the wall time of the request that served this query (a batched request
    gives every query of the batch the same latency).
    """

    documents: tuple[str, ...]
    ok: bool = True
    error: str | None = None
    latency_s: float = 0.0
    metadata: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)

    @property
    def text(self) -> str:
        """The text to place between <information> and </information>."""
        return format_documents(self.documents)

    @classmethod
    def failure(cls, error: str, latency_s: float = 0.0) -> SearchResult:
        return cls(documents=(), ok=False, error=error, latency_s=latency_s)


def format_documents(documents: Sequence[str]) -> str:
    """Join formatted documents one per line, each newline-terminated as upstream Search-R1 does.

    No documents (a failed lookup or no hit) gives `NO_INFORMATION`.
    """
    if not documents:
        return NO_INFORMATION
    return "".join(f"{doc}\n" for doc in documents)


def format_titled_doc(index: int, contents: str) -> str:
    """Search-R1 formatting of one `{"id", "contents"}` passage (docs/method.md §10).

    `contents` is `"Title"\\ntext`; like upstream `_passages2string`, the title is the first line
    kept verbatim (quotes included: released checkpoints saw `Doc 1(Title: "Paris") ...`).
    `index` counts from 1.
    """
    title, _, text = contents.partition("\n")
    return f"Doc {index}(Title: {title}) {text}"


def format_snippet_doc(index: int, title: str, snippet: str) -> str:
    """Google/SerpAPI formatting of one organic result: `Doc {i}: {title} {snippet}`."""
    return f"Doc {index}: {title} {snippet}".rstrip()


@dataclasses.dataclass
class EngineStats:
    """Counters every engine keeps (thread-safe; the retrieval server and clients are threaded)."""

    calls: int = 0  # search() invocations
    queries: int = 0  # queries answered
    requests: int = 0  # back-end attempts (HTTP requests, retries included); 0 for local engines
    retries: int = 0  # attempts beyond the first
    failures: int = 0  # queries answered NO_INFORMATION because every attempt failed
    total_latency_s: float = 0.0  # wall time spent inside search()
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def add(self, **increments: float) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, float]:
        """The counters as a plain dict (for logging / metrics)."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}


@runtime_checkable
class NoiseControlled(Protocol):
    """An engine whose documents are useful or noisy by a probability the trainer sets each
    step (the curriculum's p_noise): the simulators."""

    noise_probability: float


@runtime_checkable
class Reseedable(Protocol):
    """An engine with random choices of its own (the simulators' coins and sampling), restarted
    from a seed so a resumed run replays them."""

    def reseed(self, seed: int) -> None: ...


class SearchEngine(abc.ABC):
    """A batched search back-end.

    Subclasses implement `_search`; `search` validates the batch and keeps the stats, so every
    engine counts the same way.
    """

    name: str = "engine"

    def __init__(self) -> None:
        self.stats = EngineStats()

    def search(
        self, queries: Sequence[str], *, contexts: Sequence[QueryContext] | None = None
    ) -> list[SearchResult]:
        """One `SearchResult` per query, in order. `contexts[i]` belongs to `queries[i]`."""
        if isinstance(queries, str):
            raise TypeError(f"queries must be a sequence of strings, got the string {queries!r}")
        queries = list(queries)
        bad = [q for q in queries if not isinstance(q, str)]
        if bad:
            raise TypeError(f"every query must be a str, got {bad[0]!r} ({type(bad[0]).__name__})")
        if contexts is not None and len(contexts) != len(queries):
            raise ValueError(
                f"contexts must match queries one to one: {len(contexts)} contexts "
                f"for {len(queries)} queries"
            )
        start = time.perf_counter()
        results = self._search(queries, contexts) if queries else []
        if len(results) != len(queries):
            raise RuntimeError(
                f"{type(self).__name__}._search returned {len(results)} results "
                f"for {len(queries)} queries"
            )
        self.stats.add(
            calls=1,
            queries=len(queries),
            failures=sum(not r.ok for r in results),
            total_latency_s=time.perf_counter() - start,
        )
        return results

    @abc.abstractmethod
    def _search(
        self, queries: list[str], contexts: Sequence[QueryContext] | None
    ) -> list[SearchResult]:
        """Answer a non-empty batch; must return exactly one result per query."""

    def close(self) -> None:
        """Release connections or other resources (no-op by default)."""
        return None

    def __enter__(self) -> SearchEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# Engine name -> factory(**kwargs) -> SearchEngine. Modules register their engines on import;
# the package `__init__` imports them all, so the registry is full whenever it is reachable.
ENGINES: dict[str, Callable[..., SearchEngine]] = {}


def register_engine(name: str, factory: Callable[..., SearchEngine]) -> None:
    """Make `factory` reachable as `make_engine(name, **kwargs)`."""
    if name in ENGINES and ENGINES[name] is not factory:
        raise ValueError(f"search engine name {name!r} is already registered to {ENGINES[name]}")
    ENGINES[name] = factory


def make_engine(name: str, **kwargs: Any) -> SearchEngine:
    """Build a registered engine by name, e.g. `make_engine("bm25", corpus="wiki", topk=3)`."""
    if name not in ENGINES:
        raise ValueError(f"unknown search engine {name!r}; valid names: {sorted(ENGINES)}")
    return ENGINES[name](**kwargs)
