"""HTTP search clients and the retrieval server, over real sockets on 127.0.0.1.

The Search-R1 client talks to the real `zerosearch_jax.search.server`; the ZeroSearch wiki and
SerpAPI clients talk to the stdlib `StubServer` of tests/http_stub.py speaking those protocols.
Failure servers (slow, 5xx, 429, 404, malformed JSON, wrong shape, closed port) check that every
failure is retried as configured, counted, logged and answered with NO_INFORMATION.
"""

import json
import logging
import socket

import pytest
import requests

from zerosearch_jax.search import (
    NO_INFORMATION,
    BM25SearchEngine,
    Passage,
    RetryPolicy,
    SearchR1RetrieverClient,
    SerpAPIClient,
    ZeroSearchWikiClient,
    make_engine,
)
from zerosearch_jax.search.server import serve_in_thread

CORPUS = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Berlin", "Berlin is the capital of Germany."),
    ("Mount Everest", "Mount Everest is the highest mountain above sea level."),
    ("Amazon River", "The Amazon River carries more water than any other river."),
]
FAST = RetryPolicy(timeout_s=0.25, max_retries=2, backoff_s=0.01, max_backoff_s=0.02)
SERPAPI_KEY = "test-key-123"


@pytest.fixture(scope="module")
def engine():
    passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(CORPUS)]
    return BM25SearchEngine.build(passages, topk=2)


@pytest.fixture(scope="module")
def retrieval_url(engine):
    server, url = serve_in_thread(engine)
    yield url
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- stub protocols


def wiki_protocol(method, path, query, body):
    """The ZeroSearch wiki server: POST /retrieve {"query", "top_k"} -> [{"text"}, ...]."""
    request = json.loads(body)
    if method != "POST" or path != "/retrieve" or set(request) != {"query", "top_k"}:
        return 400, b'{"error": "bad request"}'
    # One result more than asked, to check that the client keeps only top_k.
    docs = [{"text": f"passage {i} about {request['query']}"} for i in range(request["top_k"] + 1)]
    return 200, json.dumps(docs).encode()


def serpapi_protocol(method, path, query, body):
    """SerpAPI's Google engine: GET /search?engine=google&q=...&num=...&api_key=..."""
    if method != "GET" or path != "/search" or query.get("engine") != "google":
        return 400, b'{"error": "bad request"}'
    if query.get("api_key") != SERPAPI_KEY:
        return 401, b'{"error": "Invalid API key."}'
    if query["q"] == "no hits":
        return 200, b'{"error": "Google hasn\'t returned any results for this query."}'
    results = [
        {"position": 1, "title": f"{query['q']} - Wikipedia", "snippet": "First snippet."},
        {"position": 2, "title": "No snippet here", "link": "https://example.org"},
        {"position": 3, "title": "Third", "snippet": "Third snippet."},
    ]
    return 200, json.dumps({"organic_results": results[: int(query["num"])]}).encode()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- Search-R1 + server


def test_searchr1_client_matches_the_local_engine(engine, retrieval_url):
    client = SearchR1RetrieverClient(f"{retrieval_url}/retrieve", topk=2)
    queries = ["capital of France", "highest mountain", "zzzqx", "river water"]
    remote = client.search(queries)
    local = engine.search(queries)
    assert [r.documents for r in remote] == [r.documents for r in local]
    assert [r.metadata["ids"] for r in remote] == [r.metadata["ids"] for r in local]
    assert remote[0].documents[0].startswith('Doc 1(Title: "Paris") Paris is the capital')
    assert remote[2].text == NO_INFORMATION and remote[2].ok
    stats = client.stats
    # The whole batch is one request.
    assert (stats.calls, stats.queries, stats.requests, stats.retries, stats.failures) == (
        1, 4, 1, 0, 0)


def test_make_engine_builds_http_clients(retrieval_url):
    client = make_engine("searchr1", url=f"{retrieval_url}/retrieve", topk=1)
    assert client.search(["Berlin"])[0].metadata["ids"] == ("1",)
    with pytest.raises(ValueError, match="url must be an http"):
        SearchR1RetrieverClient("127.0.0.1:8000/retrieve")


def test_server_health_and_plain_documents(retrieval_url):
    health = requests.get(f"{retrieval_url}/health", timeout=5)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "num_passages": len(CORPUS), "topk": 2}
    response = requests.post(
        f"{retrieval_url}/retrieve", json={"queries": ["Everest", "Paris"], "topk": 1}, timeout=5
    )
    # Without return_scores, Search-R1 servers return bare documents.
    assert response.json() == {
        "result": [
            [{"id": "2", "contents": f'"Mount Everest"\n{CORPUS[2][1]}'}],
            [{"id": "0", "contents": f'"Paris"\n{CORPUS[0][1]}'}],
        ]
    }


@pytest.mark.parametrize(
    "body, why",
    [
        (b"{not json", "body is not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b"{}", '"queries" must be a list of strings'),
        (json.dumps({"queries": "Paris"}).encode(), '"queries" must be a list of strings'),
        (json.dumps({"queries": ["ok", 3]}).encode(), '"queries" must be a list of strings'),
        (json.dumps({"queries": ["x"], "topk": 0}).encode(), '"topk" must be a positive'),
        (json.dumps({"queries": ["x"], "topk": "3"}).encode(), '"topk" must be a positive'),
        (json.dumps({"queries": ["x"], "topk": True}).encode(), '"topk" must be a positive'),
        (json.dumps({"queries": ["x"], "return_scores": "y"}).encode(), '"return_scores" must'),
        (b"\xff\xfe", "body is not valid JSON"),
    ],
)
def test_server_answers_400_to_bad_requests(retrieval_url, body, why):
    response = requests.post(
        f"{retrieval_url}/retrieve", data=body, headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert response.status_code == 400
    assert why in response.json()["error"]
    # And it keeps serving.
    assert requests.get(f"{retrieval_url}/health", timeout=5).status_code == 200


def test_server_unknown_path_is_404(retrieval_url):
    assert requests.post(f"{retrieval_url}/search", json={}, timeout=5).status_code == 404
    assert requests.get(f"{retrieval_url}/retrieve", timeout=5).status_code == 404


# --------------------------------------------------------------------------- wiki + SerpAPI


def test_zerosearch_wiki_client(stub_server):
    server = stub_server(wiki_protocol)
    client = ZeroSearchWikiClient(f"{server.url}/retrieve", topk=2, max_workers=4)
    results = client.search(["q one", "q two", "q three"])
    assert [r.documents for r in results] == [
        (f"Doc 1: passage 0 about {q}", f"Doc 2: passage 1 about {q}")
        for q in ["q one", "q two", "q three"]
    ]
    assert all(r.ok for r in results)
    # One request per query, each in the wiki server's own format.
    assert sorted(json.loads(b)["query"] for b in server.bodies) == ["q one", "q three", "q two"]
    assert client.stats.requests == 3 and client.stats.failures == 0


def test_serpapi_client(stub_server, monkeypatch):
    server = stub_server(serpapi_protocol)
    monkeypatch.setenv("SERPAPI_API_KEY", SERPAPI_KEY)  # the key comes from the environment
    client = SerpAPIClient(topk=2, base_url=f"{server.url}/search")
    hit, empty = client.search(["Eiffel Tower", "no hits"])
    assert hit.documents == (
        "Doc 1: Eiffel Tower - Wikipedia First snippet.",
        "Doc 2: No snippet here",
    )
    # SerpAPI's "no results" answer is a successful empty search, not a failure.
    assert empty.ok and empty.documents == () and empty.text == NO_INFORMATION
    assert "returned any results" in empty.metadata["serpapi_error"]


def test_serpapi_needs_a_key(monkeypatch):
    monkeypatch.delenv("SERPAPI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="SERPAPI_API_KEY"):
        SerpAPIClient(topk=5)


def test_serpapi_rejected_key_is_not_retried_and_not_leaked(stub_server, caplog):
    server = stub_server(serpapi_protocol)
    client = SerpAPIClient(topk=2, api_key="wrong-secret", base_url=f"{server.url}/search",
                           retry=FAST)
    with caplog.at_level(logging.WARNING):
        [result] = client.search(["anything"])
    assert not result.ok and result.text == NO_INFORMATION
    assert "HTTP 401 (not retried)" in result.error
    assert len(server.arrivals) == 1 and client.stats.retries == 0
    assert client.stats.failures == 1


def test_serpapi_key_is_scrubbed_from_errors(caplog):
    client = SerpAPIClient(topk=2, api_key="sk-secret-xyz", base_url=f"{closed_port_url()}/search",
                           retry=FAST)
    with caplog.at_level(logging.WARNING):
        [result] = client.search(["anything"])
    assert not result.ok and "ConnectionError" in result.error
    assert "api_key=***" in result.error
    assert "sk-secret-xyz" not in result.error + caplog.text


# --------------------------------------------------------------------------- failure handling


def make_client(kind, base_url):
    if kind == "searchr1":
        return SearchR1RetrieverClient(f"{base_url}/retrieve", topk=2, retry=FAST)
    if kind == "zerosearch_wiki":
        return ZeroSearchWikiClient(f"{base_url}/retrieve", topk=2, retry=FAST)
    return SerpAPIClient(topk=2, api_key=SERPAPI_KEY, base_url=f"{base_url}/search", retry=FAST)


FAILURES = {
    # mode: (status, body, delay_s, what the error says)
    "timeout": (200, b"[]", 0.6, "timed out after 0.25 s"),
    "http500": (500, b"Internal Server Error", 0.0, "HTTP 500"),
    "http429": (429, b"Too Many Requests", 0.0, "HTTP 429"),
    "malformed_json": (200, b'{"result": [[', 0.0, "malformed JSON"),
    "wrong_shape": (200, b"[1, 2, 3]", 0.0, "unexpected response"),
}


@pytest.mark.parametrize("kind", ["searchr1", "zerosearch_wiki", "serpapi"])
@pytest.mark.parametrize("mode", [*FAILURES, "closed_port"])
def test_failures_are_retried_counted_and_answered_no_information(stub_server, caplog, kind, mode):
    if mode == "closed_port":
        server, base_url, why = None, closed_port_url(), "ConnectionError"
    else:
        status, body, delay_s, why = FAILURES[mode]
        server = stub_server(lambda *_: (status, body), delay_s)
        base_url = server.url
    client = make_client(kind, base_url)
    queries = ["first query", "second query"]
    with caplog.at_level(logging.WARNING, logger="zerosearch_jax.search.http"):
        results = client.search(queries)

    assert len(results) == 2
    for r in results:
        assert not r.ok and r.documents == () and r.text == NO_INFORMATION
        assert "3 attempt(s) failed" in r.error and why in r.error
    # Search-R1 sends the batch as one request; the others send one request per query.
    chains = 1 if kind == "searchr1" else 2
    attempts = chains * (1 + FAST.max_retries)
    stats = client.stats
    assert (stats.requests, stats.retries, stats.failures) == (
        attempts, chains * FAST.max_retries, 2)
    if server is not None:
        assert len(server.arrivals) == attempts
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == chains
    assert NO_INFORMATION in caplog.text


def test_not_found_is_not_retried(stub_server):
    server = stub_server(lambda *_: (404, b"no such route"))
    client = make_client("searchr1", server.url)
    [result] = client.search(["q"])
    assert not result.ok and "HTTP 404 (not retried)" in result.error
    assert len(server.arrivals) == 1 and client.stats.retries == 0


def test_recovers_when_a_retry_succeeds(stub_server):
    calls = []

    def flaky(*request):
        calls.append(1)
        return (503, b"busy") if len(calls) <= 2 else wiki_protocol(*request)

    server = stub_server(flaky)
    client = ZeroSearchWikiClient(f"{server.url}/retrieve", topk=1, retry=FAST)
    [result] = client.search(["Paris"])
    assert result.ok and result.documents == ("Doc 1: passage 0 about Paris",)
    assert (client.stats.requests, client.stats.retries, client.stats.failures) == (3, 2, 0)


def test_backoff_is_exponential_and_capped(stub_server):
    policy = RetryPolicy(timeout_s=1.0, max_retries=3, backoff_s=0.05, max_backoff_s=0.08)
    assert [policy.delay(r) for r in (1, 2, 3)] == [0.05, 0.08, 0.08]
    server = stub_server(lambda *_: (500, b"down"))
    client = ZeroSearchWikiClient(f"{server.url}/retrieve", topk=1, retry=policy)
    client.search(["q"])
    gaps = [b - a for a, b in zip(server.arrivals[:-1], server.arrivals[1:], strict=True)]
    assert len(gaps) == 3
    assert all(gap >= wait - 0.005 for gap, wait in zip(gaps, [0.05, 0.08, 0.08], strict=True))


def test_retry_policy_is_validated():
    with pytest.raises(ValueError, match="max_retries must be >= 0, got -1"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        RetryPolicy(timeout_s=0)
