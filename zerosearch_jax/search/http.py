"""HTTP clients for the search back-ends that users already run (docs/method.md §10).

- `SearchR1RetrieverClient`: the Search-R1 retrieval server (`POST /retrieve`, the whole batch in
  one request); also what `zerosearch-retrieval-server` speaks.
- `ZeroSearchWikiClient`: the ZeroSearch wiki server (`POST /retrieve`, one query a request).
- `SerpAPIClient`: Google through SerpAPI (`GET https://serpapi.com/search`, one query a request).

Every request has a timeout; connection errors, timeouts, HTTP 429/5xx, malformed JSON and
responses of the wrong shape are retried with exponential back-off (`RetryPolicy`). Other 4xx
answers are not retried (a bad key or request will not get better). When a query has no answer
after all attempts, it gets `NO_INFORMATION` with ok=False and the error, a `logging.warning`,
and a count in `stats.failures`: a flaky back-end degrades a rollout, it never crashes it.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import requests
import requests.adapters

from zerosearch_jax.search.base import (
    NO_INFORMATION,
    EngineStats,
    QueryContext,
    SearchEngine,
    SearchResult,
    format_snippet_doc,
    format_titled_doc,
    register_engine,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

SERPAPI_URL = "https://serpapi.com/search"
SERPAPI_KEY_ENV = "SERPAPI_API_KEY"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Timeout and bounded exponential back-off for one logical request.

    Retry r (1-based) waits `min(backoff_s * 2**(r-1), max_backoff_s)` before it is sent, so
    the defaults wait 1, 2, 4 s: up to 1 + max_retries attempts in all.
    """

    timeout_s: float = 30.0  # per attempt (connect and read)
    max_retries: int = 3  # attempts after the first
    backoff_s: float = 1.0  # wait before the first retry
    max_backoff_s: float = 16.0  # cap on any single wait

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(
                f"backoff_s and max_backoff_s must be >= 0, got {self.backoff_s}, "
                f"{self.max_backoff_s}"
            )

    def delay(self, retry: int) -> float:
        return min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s)


class SearchBackendError(RuntimeError):
    """A request that failed for good (after its retries, or at once for a non-retryable 4xx)."""


class ProtocolError(ValueError):
    """A response that is valid JSON but not what the protocol promises (retried)."""


def check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"url must be an http(s) URL such as http://127.0.0.1:8000/retrieve, got {url!r}"
        )
    return url


def _expect(condition: bool, what: str, got: Any) -> None:
    if not condition:
        raise ProtocolError(f"expected {what}, got {got!r:.200}")


class HTTPClient:
    """Requests with timeouts and retries (back-off on timeouts, 429, 5xx and malformed
    JSON); shared by the search clients and other JSON endpoints (the LLM judge)."""

    def __init__(self, *, retry: RetryPolicy | None = None, max_workers: int = 1) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.retry = retry if retry is not None else RetryPolicy()
        self.max_workers = max_workers
        if not hasattr(self, "stats"):  # search engines already have theirs
            self.stats = EngineStats()
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max_workers)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()

    def _redact(self, message: str) -> str:
        """Remove secrets from a message before it is logged or returned."""
        return message

    def request(self, method: str, url: str, parse: Callable[[Any], T], **kwargs: Any) -> T:
        """Send with retries; return `parse(json)` or raise `SearchBackendError`."""
        attempts = 1 + self.retry.max_retries
        last_error = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.retry.delay(attempt))
                self.stats.add(retries=1)
            self.stats.add(requests=1)
            try:
                response = self._session.request(
                    method, url, timeout=self.retry.timeout_s, **kwargs
                )
            except requests.Timeout:
                last_error = f"timed out after {self.retry.timeout_s} s"
                continue
            except requests.RequestException as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                last_error = f"HTTP {status}: {response.text[:200]!r}"
                continue
            if not 200 <= status < 300:
                raise SearchBackendError(
                    self._redact(f"HTTP {status} (not retried): {response.text[:200]!r}")
                )
            try:
                payload = response.json()
            except ValueError:
                last_error = f"malformed JSON: {response.text[:200]!r}"
                continue
            try:
                return parse(payload)
            except ProtocolError as e:
                last_error = f"unexpected response: {e}"
        raise SearchBackendError(
            self._redact(f"{attempts} attempt(s) failed; last error: {last_error}")
        )


class HTTPSearchEngine(HTTPClient, SearchEngine):
    """Shared request/retry/failure handling of the HTTP search clients."""

    def __init__(
        self, *, topk: int, retry: RetryPolicy | None = None, max_workers: int = 1
    ) -> None:
        SearchEngine.__init__(self)
        HTTPClient.__init__(self, retry=retry, max_workers=max_workers)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = topk

    def _failed(self, queries: Sequence[str], error: str, latency_s: float) -> list[SearchResult]:
        logger.warning(
            "%s: %d query(ies) answered %r, e.g. %r: %s",
            self.name, len(queries), NO_INFORMATION, queries[0], error,
        )
        return [SearchResult.failure(error, latency_s) for _ in queries]


class PerQueryHTTPEngine(HTTPSearchEngine):
    """A client whose protocol takes one query a request; `max_workers` requests in flight."""

    def _search(
        self, queries: list[str], contexts: Sequence[QueryContext] | None
    ) -> list[SearchResult]:
        if self.max_workers == 1 or len(queries) == 1:
            return [self._search_one(q) for q in queries]
        with ThreadPoolExecutor(min(self.max_workers, len(queries))) as pool:
            return list(pool.map(self._search_one, queries))

    def _search_one(self, query: str) -> SearchResult:
        start = time.perf_counter()
        try:
            documents, metadata = self._request_one(query)
        except SearchBackendError as e:
            return self._failed([query], str(e), time.perf_counter() - start)[0]
        return SearchResult(
            documents=documents, latency_s=time.perf_counter() - start, metadata=metadata
        )

    @abc.abstractmethod
    def _request_one(self, query: str) -> tuple[tuple[str, ...], dict]:
        """(formatted documents, metadata) for one query, or raise `SearchBackendError`."""


class SearchR1RetrieverClient(HTTPSearchEngine):
    """Client of a Search-R1 retrieval server, e.g. `http://127.0.0.1:8000/retrieve`.

    `POST {"queries": [...], "topk": k, "return_scores": true}` ->
    `{"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}`; the whole batch is one
    request, so one failure fails the batch.
    """

    name = "searchr1"

    def __init__(self, url: str, topk: int = 3, *, retry: RetryPolicy | None = None) -> None:
        super().__init__(topk=topk, retry=retry)
        self.url = check_url(url)

    def _search(
        self, queries: list[str], contexts: Sequence[QueryContext] | None
    ) -> list[SearchResult]:
        start = time.perf_counter()
        payload = {"queries": queries, "topk": self.topk, "return_scores": True}
        try:
            batch = self.request(
                "POST", self.url, lambda r: _parse_searchr1(r, len(queries)), json=payload
            )
        except SearchBackendError as e:
            return self._failed(queries, str(e), time.perf_counter() - start)
        latency = time.perf_counter() - start
        results = []
        for hits in batch:
            hits = hits[: self.topk]
            results.append(
                SearchResult(
                    documents=tuple(
                        format_titled_doc(i, doc["contents"]) for i, (doc, _) in enumerate(hits, 1)
                    ),
                    latency_s=latency,
                    metadata={
                        "ids": tuple(str(doc.get("id", "")) for doc, _ in hits),
                        "scores": tuple(score for _, score in hits),
                    },
                )
            )
        return results


def _parse_searchr1(response: Any, num_queries: int) -> list[list[tuple[dict, float | None]]]:
    """`{"result": [[hit, ...] per query]}` -> per query [(document, score)]; a hit is
    `{"document": {...}, "score": s}` or, from servers asked without scores, the document."""
    _expect(
        isinstance(response, dict) and "result" in response, 'an object with "result"', response
    )
    result = response["result"]
    _expect(
        isinstance(result, list) and len(result) == num_queries,
        f"a list of {num_queries} per-query lists under 'result'",
        result,
    )
    batch = []
    for hits in result:
        _expect(isinstance(hits, list), "a list of hits per query", hits)
        parsed = []
        for hit in hits:
            _expect(isinstance(hit, dict), "a hit object", hit)
            doc, score = (hit["document"], hit.get("score")) if "document" in hit else (hit, None)
            _expect(
                isinstance(doc, dict) and isinstance(doc.get("contents"), str),
                'a document {"id", "contents": str}',
                doc,
            )
            parsed.append((doc, score))
        batch.append(parsed)
    return batch


class ZeroSearchWikiClient(PerQueryHTTPEngine):
    """Client of the ZeroSearch wiki server, e.g. `http://127.0.0.1:8000/retrieve`.

    `POST {"query": q, "top_k": k}` -> `[{"text": ...}, ...]`, one request per query
    (`max_workers` in flight). Passages carry no separate title, so they read `Doc {i}: {text}`.
    """

    name = "zerosearch_wiki"

    def __init__(
        self,
        url: str,
        topk: int = 3,
        *,
        retry: RetryPolicy | None = None,
        max_workers: int = 8,
    ) -> None:
        super().__init__(topk=topk, retry=retry, max_workers=max_workers)
        self.url = check_url(url)

    def _request_one(self, query: str) -> tuple[tuple[str, ...], dict]:
        texts = self.request(
            "POST", self.url, _parse_wiki, json={"query": query, "top_k": self.topk}
        )
        texts = texts[: self.topk]
        return tuple(f"Doc {i}: {text}" for i, text in enumerate(texts, 1)), {}


def _parse_wiki(response: Any) -> list[str]:
    _expect(isinstance(response, list), 'a list of {"text": str}', response)
    for item in response:
        _expect(isinstance(item, dict) and isinstance(item.get("text"), str), '{"text": str}', item)
    return [item["text"] for item in response]


class SerpAPIClient(PerQueryHTTPEngine):
    """Google results through SerpAPI (the paper's evaluation engine; it costs money per call).

    `GET {base_url}?engine=google&q=...&num=topk&api_key=...`; documents are
    `Doc {i}: {title} {snippet}` from `organic_results`. The key comes from `api_key` or the
    `SERPAPI_API_KEY` environment variable and is scrubbed from every logged or returned error.
    """

    name = "serpapi"

    def __init__(
        self,
        topk: int = 5,
        api_key: str | None = None,
        *,
        base_url: str = SERPAPI_URL,
        retry: RetryPolicy | None = None,
        max_workers: int = 8,
    ) -> None:
        api_key = api_key if api_key is not None else os.environ.get(SERPAPI_KEY_ENV)
        if not api_key:
            raise ValueError(
                f"SerpAPI needs an API key: pass api_key=... or set {SERPAPI_KEY_ENV} "
                "(https://serpapi.com/manage-api-key)"
            )
        super().__init__(topk=topk, retry=retry, max_workers=max_workers)
        self._api_key = api_key
        self.base_url = check_url(base_url)
        # urllib3 logs every request URL (with the key) at DEBUG, e.g. under --verbosity=1.
        _SECRETS.add(api_key, urllib.parse.quote_plus(api_key))

    def _redact(self, message: str) -> str:
        # Request errors quote the URL, where the key may appear percent-encoded.
        for form in (self._api_key, urllib.parse.quote_plus(self._api_key)):
            message = message.replace(form, "***")
        return message

    def _request_one(self, query: str) -> tuple[tuple[str, ...], dict]:
        params = {"engine": "google", "q": query, "num": self.topk, "api_key": self._api_key}
        response = self.request("GET", self.base_url, _parse_serpapi, params=params)
        organic = response.get("organic_results", [])[: self.topk]
        documents = tuple(
            format_snippet_doc(i, r.get("title", ""), r.get("snippet", ""))
            for i, r in enumerate(organic, 1)
        )
        # A 200 with "error" and no results is SerpAPI's "no results" answer, not a failure.
        metadata = ({"serpapi_error": self._redact(str(response["error"]))}
                    if "error" in response else {})
        return documents, metadata


class _SecretFilter(logging.Filter):
    """Replaces registered secrets (API keys) with *** in every record of the loggers it is
    attached to (the HTTP libraries', which log request URLs)."""

    def __init__(self):
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, *secrets: str) -> None:
        self._secrets.update(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            redacted = message
            for secret in self._secrets:
                redacted = redacted.replace(secret, "***")
            if redacted != message:
                record.msg, record.args = redacted, ()
        return True


_SECRETS = _SecretFilter()
for _name in ("urllib3", "urllib3.connectionpool", "requests"):
    logging.getLogger(_name).addFilter(_SECRETS)


def _parse_serpapi(response: Any) -> dict:
    _expect(isinstance(response, dict), "a JSON object", response)
    organic = response.get("organic_results", [])
    _expect(isinstance(organic, list), "organic_results to be a list", organic)
    for r in organic:
        _expect(
            isinstance(r, dict)
            and isinstance(r.get("title", ""), str)
            and isinstance(r.get("snippet", ""), str),
            'an organic result {"title": str, "snippet": str}',
            r,
        )
    return response


register_engine(SearchR1RetrieverClient.name, SearchR1RetrieverClient)
register_engine(ZeroSearchWikiClient.name, ZeroSearchWikiClient)
register_engine(SerpAPIClient.name, SerpAPIClient)
