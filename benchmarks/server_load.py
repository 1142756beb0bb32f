"""The retrieval server under load: many concurrent clients on loopback, health polled
throughout.

    python benchmarks/server_load.py [--clients 200] [--rounds 5]

Serves a BM25 index over the synthetic world's passages (`search.server.serve_in_thread`), then
runs `--rounds` rounds of `--clients` clients at once, each posting one `/retrieve` request of
its own query; a separate thread asks `/health` every 50 ms. Prints how many requests were
answered with 200, the latency percentiles, and how many health checks were answered.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import requests

from zerosearch_jax import search
from zerosearch_jax.data import synthetic
from zerosearch_jax.search.server import serve_in_thread


def run_load(url: str, clients: int, rounds: int, queries: list[str]) -> dict:
    """Answers, latencies and health checks of `rounds` x `clients` concurrent requests."""
    statuses, latencies = [], []
    lock = threading.Lock()
    health = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def poll_health():
        while not stop.is_set():
            try:
                ok = requests.get(f"{url}/health", timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            health["ok" if ok else "failed"] += 1
            stop.wait(0.05)

    def client(i):
        t = time.perf_counter()
        try:
            status = requests.post(f"{url}/retrieve", json={"queries": [queries[i % len(queries)]]},
                                   timeout=60).status_code
        except requests.RequestException as e:
            status = type(e).__name__
        with lock:
            statuses.append(status)
            latencies.append(time.perf_counter() - t)

    poller = threading.Thread(target=poll_health)
    poller.start()
    t0 = time.perf_counter()
    for _ in range(rounds):
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(statuses), "answered": statuses.count(200),
            "errors": sorted({str(s) for s in statuses if s != 200}),
            "p50_s": q[49], "p95_s": q[94], "max_s": max(latencies), "wall_s": wall,
            "health_ok": health["ok"], "health_failed": health["failed"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    world = synthetic.build_world()
    passages = [search.Passage.from_contents(p["id"], p["contents"]) for p in world.passages]
    server, url = serve_in_thread(search.BM25SearchEngine.build(passages, topk=3))
    try:
        queries = [q.question for q in world.questions("train")]
        r = run_load(url, args.clients, args.rounds, queries)
    finally:
        server.shutdown()
        server.server_close()
    print(f"{r['answered']}/{r['requests']} answered ({args.clients} clients x {args.rounds} "
          f"rounds, {r['wall_s']:.1f} s); latency p50 {r['p50_s'] * 1000:.0f} ms, p95 "
          f"{r['p95_s'] * 1000:.0f} ms, max {r['max_s'] * 1000:.0f} ms; health "
          f"{r['health_ok']} answered, {r['health_failed']} failed; errors {r['errors']}")


if __name__ == "__main__":
    main()
