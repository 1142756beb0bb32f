"""A retrieval server: one local BM25 index shared over HTTP with the Search-R1 `/retrieve` API.

Run one per pod so every host's rollout workers query the same index instead of each loading
its own:

    python -m zerosearch_jax.search.server --corpus wiki --port 8000 [--index-dir DIR]
    zerosearch-retrieval-server --corpus wiki_18.jsonl --index-dir /data/bm25 --host 0.0.0.0

Endpoints (what Search-R1's retriever serves, so its clients work unchanged):

- `POST /retrieve` `{"queries": [str, ...], "topk": int (optional), "return_scores": bool}` ->
  `{"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}`, or lists of bare
  documents when `return_scores` is false. A malformed request gets 400 `{"error": why}`, as
  does one over the size limits (`MAX_QUERIES` queries, `MAX_TOPK` per query, `MAX_RESULTS`
  passages in all) or nested too deeply; a body over `MAX_BODY_BYTES` gets 413.
- `GET /health` -> `{"status": "ok", "num_passages": N, "topk": k}`.

Only the standard library's `ThreadingHTTPServer` is used: BM25 scoring is read-only numpy, so
requests are served concurrently without locks. The listen backlog holds 1024 pending
connections (a burst of clients is queued, not reset), and a connection idle or stalled for
`IDLE_TIMEOUT_S` is closed, so idle clients cannot hold threads forever.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import urllib.parse
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from zerosearch_jax.cli import setup_logging
from zerosearch_jax.search.bm25 import BM25SearchEngine

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
# A request asks for at most this many passages in all (queries x topk) and this many per
# query: a response, and the server's memory for it, stays bounded whatever the corpus size.
MAX_QUERIES = 4096
MAX_TOPK = 100
MAX_RESULTS = 100_000
# Seconds a connection may sit idle (or half-sent) before the server closes it and frees its
# thread.
IDLE_TIMEOUT_S = 30.0
REQUEST_SHAPE = '{"queries": [str, ...], "topk": int, "return_scores": bool}'


class BadRequest(ValueError):
    """A request body the server refuses (answered with HTTP 400)."""


def parse_retrieve_request(body: bytes) -> tuple[list[str], int | None, bool]:
    """Validate a `/retrieve` body -> (queries, topk or None for the default, return_scores)."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"body is not valid JSON ({e}); expected {REQUEST_SHAPE}") from None
    except RecursionError:
        raise BadRequest(f"body nests too deeply; expected {REQUEST_SHAPE}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"expected a JSON object {REQUEST_SHAPE}, got {request!r:.100}")
    queries = request.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest(f'"queries" must be a list of strings, got {queries!r:.100}')
    topk = request.get("topk")
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or topk < 1):
        raise BadRequest(f'"topk" must be a positive integer, got {topk!r:.100}')
    if len(queries) > MAX_QUERIES:
        raise BadRequest(f"{len(queries)} queries in one request; at most {MAX_QUERIES}")
    if topk is not None and topk > MAX_TOPK:
        raise BadRequest(f'"topk" = {topk}; at most {MAX_TOPK}')
    if len(queries) * (topk or 1) > MAX_RESULTS:
        raise BadRequest(f"{len(queries)} queries x topk {topk} passages; at most "
                         f"{MAX_RESULTS} in one request")
    return_scores = request.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(f'"return_scores" must be true or false, got {return_scores!r:.100}')
    return queries, topk, return_scores


class RetrievalServer(ThreadingHTTPServer):
    """A threaded HTTP server that owns the engine its handlers query."""

    daemon_threads = True
    # socketserver's default listen backlog of 5 resets connections under a burst of clients.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], engine: BM25SearchEngine) -> None:
        self.engine = engine
        super().__init__(address, _RetrievalHandler)


class _RetrievalHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, so a client's session reuses one socket per worker.
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S  # socket timeout: an idle or stalled client loses its connection
    server: RetrievalServer

    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/health":
            self._send_json(404, {"error": f"no such path {self.path!r}; try GET /health"})
            return
        engine = self.server.engine
        self._send_json(200, {"status": "ok", "num_passages": engine.num_passages,
                              "topk": engine.topk})

    def do_POST(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/retrieve":
            self.close_connection = True  # the body is left unread
            self._send_json(404, {"error": f"no such path {self.path!r}; try POST /retrieve"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._send_json(411, {"error": "a Content-Length header (an integer) is required"})
            return
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(413, {"error": f"body of {length} bytes; at most {MAX_BODY_BYTES}"})
            return
        try:
            queries, topk, return_scores = parse_retrieve_request(self.rfile.read(length))
        except BadRequest as e:
            self._send_json(400, {"error": str(e)})
            return
        try:
            batch = self.server.engine.retrieve(queries, topk)
        except Exception as e:  # a server must answer, not die, whatever the engine raised
            logger.exception("retrieval failed for %d queries", len(queries))
            self._send_json(500, {"error": f"retrieval failed: {type(e).__name__}: {e}"})
            return
        result = [
            [
                {"document": h.passage.to_json(), "score": h.score}
                if return_scores
                else h.passage.to_json()
                for h in hits
            ]
            for hits in batch
        ]
        self._send_json(200, {"result": result})

    def _send_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


def serve_in_thread(
    engine: BM25SearchEngine, host: str = "127.0.0.1", port: int = 0
) -> tuple[RetrievalServer, str]:
    """Serve `engine` from a daemon thread -> (server, base URL). `port=0` picks a free port.

    Stop it with `server.shutdown(); server.server_close()`.
    """
    server = RetrievalServer((host, port), engine)
    # A short poll interval makes `shutdown()` return quickly (tests start and stop many).
    threading.Thread(
        target=server.serve_forever, args=(0.05,), name="retrieval-server", daemon=True
    ).start()
    return server, f"http://{host}:{server.server_address[1]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zerosearch-retrieval-server",
        description="Serve a BM25 index with the Search-R1 /retrieve API.",
    )
    parser.add_argument(
        "--corpus",
        help="'wiki' (offline Wikipedia summaries) or a Search-R1 jsonl(.gz) path; "
        "optional when --index-dir already holds an index",
    )
    parser.add_argument(
        "--index-dir", help="load the index from here, or build it and save it here"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument(
        "--topk", type=int, default=3, help="passages per query when a request gives no topk"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    args = parser.parse_args(argv)
    if args.corpus is None and args.index_dir is None:
        parser.error("give --corpus (wiki or a jsonl path), --index-dir, or both")
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")

    setup_logging(args.log_level.upper())
    engine = BM25SearchEngine.open(args.corpus, index_dir=args.index_dir, topk=args.topk)
    server = RetrievalServer((args.host, args.port), engine)
    logger.info(
        "serving %d passages at http://%s:%d/retrieve",
        engine.num_passages, args.host, server.server_address[1],
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
