"""A loopback HTTP stub server for the HTTP client tests (see the `stub_server` fixture)."""

import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer(ThreadingHTTPServer):
    """Answers every GET and POST with `respond(method, path, query, body) -> (status, bytes)`,
    after `delay_s`. `path` excludes the query string and `query` is its dict. Records, for every
    request, its arrival time (`arrivals`), body (`bodies`) and (raw path, headers, body)
    (`requests`)."""

    daemon_threads = True

    def __init__(self, respond, delay_s=0.0):
        self.respond, self.delay_s = respond, delay_s
        self.arrivals: list[float] = []
        self.bodies: list[bytes] = []
        self.requests: list[tuple[str, dict, bytes]] = []
        super().__init__(("127.0.0.1", 0), _StubHandler)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.arrivals.append(time.monotonic())
        self.server.bodies.append(body)
        self.server.requests.append((self.path, dict(self.headers), body))
        time.sleep(self.server.delay_s)
        split = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(split.query))
        status, payload = self.server.respond(self.command, split.path, query, body)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    do_GET = do_POST = _handle

    def log_message(self, *args):
        pass


def stub_server_fixture():
    """Generator behind the `stub_server` fixture: yields `start(respond, delay_s=0.0)`, which
    serves a new `StubServer` in a daemon thread and returns it; shuts them all down after."""
    servers = []

    def start(respond, delay_s=0.0):
        server = StubServer(respond, delay_s)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
