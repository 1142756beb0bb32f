"""A local lexical search engine: BM25 (via the `bm25s` library) over a passage corpus.

This is the real search engine available without a network: the evaluation back-end for the
offline Wikipedia corpus, the engine behind `zerosearch-retrieval-server`, and a stand-in for
Search-R1's retriever on its own jsonl corpora. Results are deterministic: ties are broken by
passage order, and passages that share no term with the query are never returned (a query with
no indexed term answers `NO_INFORMATION` rather than arbitrary passages).

An index directory holds the `bm25s` arrays, the passages as Search-R1 jsonl and a small
`zerosearch_index.json` with the tokenizer settings, so a loaded index tokenizes queries
exactly as the one that was built.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from zerosearch_jax.search.base import (
    QueryContext,
    SearchEngine,
    SearchResult,
    format_titled_doc,
    register_engine,
)
from zerosearch_jax.search.corpus import (
    Passage,
    load_corpus,
    load_searchr1_jsonl,
    write_searchr1_jsonl,
)

logger = logging.getLogger(__name__)


def _import_bm25s():
    """Import `bm25s` without letting it touch JAX.

    When JAX is importable, `bm25s.selection` runs a `jax.lax.top_k` at import time. That
    initializes JAX's default backend: in the retrieval server it would claim the TPU/GPU the
    trainer on the same host needs, and in the trainer it would run before
    `jax.distributed.initialize()`, which must come first. A `None` entry in `sys.modules` makes
    that one `import jax.lax` fail, so bm25s falls back to numpy (its JAX path is for top-k
    selection, which this module does itself).
    """
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    missing = object()
    saved = sys.modules.get("jax.lax", missing)
    sys.modules["jax.lax"] = None
    try:
        import bm25s
    finally:
        if saved is missing:
            del sys.modules["jax.lax"]
        else:
            sys.modules["jax.lax"] = saved
    return bm25s


bm25s = _import_bm25s()

INDEX_META_FILE = "zerosearch_index.json"
PASSAGES_FILE = "passages.jsonl"
INDEX_FORMAT = 1
STOPWORDS = "en"


class Hit(NamedTuple):
    passage: Passage
    score: float


def _make_stemmer(stemmer: str | None):
    """PyStemmer's stemmer for `stemmer` (a language), or None for no stemming."""
    if stemmer is None:
        return None
    try:
        import Stemmer
    except ImportError:
        raise ImportError(
            f"stemmer={stemmer!r} needs PyStemmer (pip install PyStemmer); use stemmer=None "
            "to build without stemming"
        ) from None
    return Stemmer.Stemmer(stemmer)


def _default_stemmer() -> str | None:
    """English stemming when PyStemmer is installed, else none."""
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        return None
    return "english"


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best positive scores, best first, ties broken by the lower index.

    `np.argpartition` alone is not tie-stable, so every candidate tied with the k-th score is
    kept and the final order comes from a full (score, index) sort of that small set.
    """
    candidates = np.flatnonzero(scores > 0)
    if candidates.size > k:
        kth = np.partition(scores[candidates], candidates.size - k)[candidates.size - k]
        candidates = candidates[scores[candidates] >= kth]
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


class BM25SearchEngine(SearchEngine):
    """BM25 over `Passage`s; documents come back as `Doc i(Title: "T") text` (docs/method.md §10).

    Build with `build(passages)`, persist with `save(dir)` / `load(dir)`, or let `open` do
    whichever applies.
    """

    name = "bm25"

    def __init__(
        self,
        retriever: bm25s.BM25,
        passages: Sequence[Passage],
        *,
        stemmer: str | None,
        topk: int = 3,
    ) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        num_docs = retriever.scores["num_docs"]
        if num_docs != len(passages):
            raise ValueError(f"the index has {num_docs} documents but {len(passages)} passages")
        self._retriever = retriever
        self._stemmer_name = stemmer
        self._stemmer = _make_stemmer(stemmer)
        self.passages = list(passages)
        self.topk = topk
        self.build_time_s: float | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        passages: Sequence[Passage],
        *,
        topk: int = 3,
        k1: float = 0.9,
        b: float = 0.4,
        stemmer: str | None = "auto",
    ) -> BM25SearchEngine:
        """Index `passages` (title and text).

        The defaults follow Pyserini, behind Search-R1's BM25 retriever: Lucene scoring with
        k1=0.9, b=0.4 and Lucene's 33 English stop words (the milder length normalization also
        keeps ~100-word passages competitive with one-sentence ones). `stemmer="auto"` stems
        English when PyStemmer is installed (as Lucene's analyzer does), else not at all.
        """
        if not passages:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        stemmer = _default_stemmer() if stemmer == "auto" else stemmer
        start = time.perf_counter()
        tokens = bm25s.tokenize(
            [p.contents for p in passages],
            stopwords=STOPWORDS,
            stemmer=_make_stemmer(stemmer),
            show_progress=False,
        )
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(tokens, show_progress=False)
        engine = cls(retriever, passages, stemmer=stemmer, topk=topk)
        engine.build_time_s = time.perf_counter() - start
        # Worth a line only when it took a while (a Wikipedia-size corpus).
        logger.log(
            logging.INFO if engine.build_time_s > 1.0 else logging.DEBUG,
            "built BM25 index over %d passages in %.2f s (stemmer=%s)",
            len(passages), engine.build_time_s, stemmer,
        )
        return engine

    def save(self, index_dir: str | Path) -> None:
        """Write the index, the passages and the tokenizer settings to `index_dir`."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(index_dir), show_progress=False)
        write_searchr1_jsonl(self.passages, index_dir / PASSAGES_FILE)
        meta = {
            "format": INDEX_FORMAT,
            "num_passages": len(self.passages),
            "stemmer": self._stemmer_name,
            "stopwords": STOPWORDS,
            "bm25s_version": bm25s.__version__,
        }
        # Written last: its presence marks a complete index (see `is_index_dir`).
        (index_dir / INDEX_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @staticmethod
    def is_index_dir(index_dir: str | Path) -> bool:
        return (Path(index_dir) / INDEX_META_FILE).is_file()

    @classmethod
    def load(cls, index_dir: str | Path, *, topk: int = 3) -> BM25SearchEngine:
        """Load an index written by `save`."""
        index_dir = Path(index_dir)
        if not cls.is_index_dir(index_dir):
            raise FileNotFoundError(
                f"{index_dir} is not a BM25 index directory (no {INDEX_META_FILE}); build one "
                "with BM25SearchEngine.build(...).save(dir)"
            )
        meta = json.loads((index_dir / INDEX_META_FILE).read_text())
        if meta.get("format") != INDEX_FORMAT or meta.get("stopwords") != STOPWORDS:
            raise ValueError(
                f"{index_dir / INDEX_META_FILE}: unsupported index (format {meta.get('format')}, "
                f"stopwords {meta.get('stopwords')!r}); expected format {INDEX_FORMAT}, "
                f"stopwords {STOPWORDS!r}: rebuild it"
            )
        start = time.perf_counter()
        retriever = bm25s.BM25.load(str(index_dir), show_progress=False)
        passages = load_searchr1_jsonl(index_dir / PASSAGES_FILE)
        engine = cls(retriever, passages, stemmer=meta["stemmer"], topk=topk)
        logger.info(
            "loaded BM25 index of %d passages from %s in %.2f s",
            len(passages), index_dir, time.perf_counter() - start,
        )
        return engine

    @classmethod
    def open(
        cls,
        corpus: str | Path | None = None,
        *,
        passages: Sequence[Passage] | None = None,
        index_dir: str | Path | None = None,
        topk: int = 3,
        **build_kwargs: Any,
    ) -> BM25SearchEngine:
        """Load `index_dir` if it holds an index; else build from `corpus` or `passages` (and
        save there). The registry's `bm25` factory.

        `corpus` is `"wiki"` (offline Wikipedia summaries) or a Search-R1 jsonl path;
        `passages` the passages themselves (e.g. the synthetic world's).
        """
        if index_dir is not None and cls.is_index_dir(index_dir):
            return cls.load(index_dir, topk=topk)
        if corpus is None and passages is None:
            where = f"{index_dir} holds no index and " if index_dir is not None else ""
            raise ValueError(f"{where}no corpus was given: pass corpus='wiki' or a jsonl path")
        if passages is None:
            passages = load_corpus(corpus)
        engine = cls.build(passages, topk=topk, **build_kwargs)
        if index_dir is not None:
            engine.save(index_dir)
        return engine

    # ------------------------------------------------------------------ retrieval

    @property
    def num_passages(self) -> int:
        return len(self.passages)

    def retrieve(self, queries: Sequence[str], topk: int | None = None) -> list[list[Hit]]:
        """The best passages for each query with their BM25 scores (fewer than `topk` when
        fewer passages share a term with the query)."""
        topk = self.topk if topk is None else topk
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        tokens = bm25s.tokenize(
            list(queries),
            stopwords=STOPWORDS,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )
        hits = []
        for query_tokens in tokens:
            # bm25s keeps an empty token "" in its vocabulary that has no score column.
            token_ids = self._retriever.get_tokens_ids([t for t in query_tokens if t])
            if not token_ids:
                hits.append([])
                continue
            scores = self._retriever.get_scores_from_ids(token_ids)
            hits.append(
                [Hit(self.passages[i], float(scores[i])) for i in _top_k(scores, topk)]
            )
        return hits

    def _search(
        self, queries: list[str], contexts: Sequence[QueryContext] | None
    ) -> list[SearchResult]:
        start = time.perf_counter()
        batch_hits = self.retrieve(queries)
        latency = time.perf_counter() - start
        return [
            SearchResult(
                documents=tuple(
                    format_titled_doc(i, hit.passage.contents) for i, hit in enumerate(hits, 1)
                ),
                latency_s=latency,
                metadata={
                    "ids": tuple(h.passage.id for h in hits),
                    "scores": tuple(h.score for h in hits),
                },
            )
            for hits in batch_hits
        ]


register_engine(BM25SearchEngine.name, BM25SearchEngine.open)
