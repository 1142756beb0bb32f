"""Search back-ends behind one batched interface (`SearchEngine.search(queries) -> results`).

- `base`: `SearchResult`, `QueryContext`, `SearchEngine`, `format_documents`, the registry.
- `corpus`: Search-R1 jsonl passages and the offline Wikipedia summaries.
- `bm25`: the local lexical engine (`bm25s`), with index save/load.
- `http`: clients for the Search-R1 retriever, the ZeroSearch wiki server and SerpAPI.
- `simulator`: the LLM simulator (in process, or an OpenAI-compatible server) of ZeroSearch.
- `server`: `zerosearch-retrieval-server`, a BM25 index behind the Search-R1 `/retrieve` API
  (not imported here, so `python -m zerosearch_jax.search.server` runs it cleanly).

`make_engine(name, **kwargs)` builds any registered engine by name.
"""

from zerosearch_jax.search.base import (
    ENGINES,
    NO_INFORMATION,
    EngineStats,
    NoiseControlled,
    QueryContext,
    Reseedable,
    SearchEngine,
    SearchResult,
    format_documents,
    format_snippet_doc,
    format_titled_doc,
    make_engine,
    register_engine,
)
from zerosearch_jax.search.bm25 import BM25SearchEngine, Hit
from zerosearch_jax.search.corpus import (
    CorpusFormatError,
    Passage,
    iter_searchr1_jsonl,
    load_corpus,
    load_searchr1_jsonl,
    load_wiki_summaries,
    split_passages,
    wiki_summaries_path,
    write_searchr1_jsonl,
)
from zerosearch_jax.search.http import (
    HTTPSearchEngine,
    RetryPolicy,
    SearchBackendError,
    SearchR1RetrieverClient,
    SerpAPIClient,
    ZeroSearchWikiClient,
)
from zerosearch_jax.search.simulator import (
    LLMSimulator,
    SimulatorPrompt,
    SimulatorServerClient,
    clean_simulator_output,
    hop_context,
    simulator_prompt,
)

__all__ = [
    "LLMSimulator",
    "SimulatorPrompt",
    "SimulatorServerClient",
    "clean_simulator_output",
    "hop_context",
    "simulator_prompt",
    "ENGINES",
    "NO_INFORMATION",
    "BM25SearchEngine",
    "CorpusFormatError",
    "EngineStats",
    "HTTPSearchEngine",
    "NoiseControlled",
    "Reseedable",
    "Hit",
    "Passage",
    "QueryContext",
    "RetryPolicy",
    "SearchBackendError",
    "SearchEngine",
    "SearchR1RetrieverClient",
    "SearchResult",
    "SerpAPIClient",
    "ZeroSearchWikiClient",
    "format_documents",
    "format_snippet_doc",
    "format_titled_doc",
    "iter_searchr1_jsonl",
    "load_corpus",
    "load_searchr1_jsonl",
    "load_wiki_summaries",
    "make_engine",
    "register_engine",
    "split_passages",
    "wiki_summaries_path",
    "write_searchr1_jsonl",
]
