r"""Load test of the explorer's API on a Market-sized gallery (localhost only, bounded).

  python tools/bench_serve.py [--num_gallery=19732] [--num_queries=3368] [--dim=2048] \
      [--requests=100] [--clients=1,8] [--max_seconds=120]

Starts the explorer in a child process (this file with --serve_port) on random unit
embeddings and a random attribute head W — the numbers an API request computes do not depend on
what the embeddings mean — with Market-1501's shape: 751 identities over six cameras, 3,368
queries, 19,732 gallery images of which 2,798 are distractors. Then, for every scenario and
client count, ``--requests`` requests go to 127.0.0.1 from that many threads (each with its
own keep-alive connection) and the latency of each is measured at the client:

* ``rank``: ``GET /api/rank?query=Q&k=10`` with explanations, a new query each request (the
  kernels run; nothing is cached);
* ``threshold``: the same query with a new threshold each request (what the slider sends:
  only the confident attributes are re-selected);
* ``steered``: a new query with 1-8 ignored attributes and, every other request, one required
  attribute (projection, filter, candidates, explanations, the query's AP);
* ``metrics``: ``GET /api/metrics`` with a new steering (the whole split re-ranked), a few
  requests only.

Prints a table (p50 / p95 / max in ms, requests per second) with the machine's load before and
after. Every loop is bounded by ``--requests`` and ``--max_seconds``; nothing leaves localhost.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

from reid_jax import cli
from reid_jax.data.attributes import ATTRIBUTE_NAMES

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_gallery", 19732, "Gallery images (Market-1501: 19,732).")
flags.DEFINE_integer("num_queries", 3368, "Query images (Market-1501: 3,368).")
flags.DEFINE_integer("num_distractors", 2798, "Gallery distractors (pid 0).")
flags.DEFINE_integer("num_ids", 751, "Identities of queries and gallery.")
flags.DEFINE_integer("dim", 2048, "Embedding size N (AGW: 2,048).")
flags.DEFINE_integer("k", 10, "Ranks per request.")
flags.DEFINE_integer("requests", 100, "Requests per scenario and client count.")
flags.DEFINE_integer("metrics_requests", 3, "Requests of the metrics scenario.")
flags.DEFINE_list("clients", ["1", "8"], "Concurrent clients.")
flags.DEFINE_list("scenarios", ["rank", "threshold", "steered", "metrics"], "Scenarios.")
flags.DEFINE_float("max_seconds", 180.0, "Time limit of one scenario and client count.")
flags.DEFINE_integer("seed", 0, "Seed of the embeddings and the requests.")
flags.DEFINE_integer("serve_port", 0, "Internal: run as the server on this port.")

COLOURS = [n for n in ATTRIBUTE_NAMES if n[:2] == "up" and n != "up" or
           n[:4] == "down" and n != "down"]


def synthetic_explorer():
    """An explorer of random unit embeddings with Market-1501's identities and cameras."""
    from reid_jax.explorer.rankings import Explorer

    rng = np.random.default_rng(FLAGS.seed)
    n, q, g = FLAGS.dim, FLAGS.num_queries, FLAGS.num_gallery
    query_pids = rng.integers(1, FLAGS.num_ids, q)
    gallery_pids = np.concatenate([rng.integers(1, FLAGS.num_ids, g - FLAGS.num_distractors),
                                   np.zeros(FLAGS.num_distractors, np.int64)])
    fq = rng.standard_normal((q, n), dtype=np.float32)
    fg = rng.standard_normal((g, n), dtype=np.float32)
    fq /= np.linalg.norm(fq, axis=1, keepdims=True)
    fg /= np.linalg.norm(fg, axis=1, keepdims=True)
    w = rng.standard_normal((n, len(ATTRIBUTE_NAMES)), dtype=np.float32) * np.float32(
        4.0 / np.sqrt(n))
    return Explorer.from_arrays(fq, fg, w, query_pids=query_pids,
                                query_cameras=rng.integers(1, 7, q), gallery_pids=gallery_pids,
                                gallery_cameras=rng.integers(1, 7, g),
                                description={"source": "tools/bench_serve.py, random"})


def serve(port: int) -> None:
    import uvicorn

    from reid_jax.explorer.app import create_app

    started = time.monotonic()
    explorer = synthetic_explorer()
    loaded = time.monotonic() - started
    warm = explorer.warm()
    print(json.dumps({"loaded_s": round(loaded, 1), "warm_s": round(warm, 1)}), flush=True)
    uvicorn.run(create_app(explorer), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def run_load(port: int, paths: list[str], clients: int) -> tuple[np.ndarray, float, int]:
    """Latencies (s) of ``paths`` sent by ``clients`` threads; wall time; failures."""
    todo: queue.Queue[str] = queue.Queue()
    for p in paths:
        todo.put(p)
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + FLAGS.max_seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=FLAGS.max_seconds)
        try:
            while time.monotonic() < deadline:
                try:
                    path = todo.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                status, _ = get(conn, path)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    failures[0] += status != 200
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.asarray(latencies), time.perf_counter() - started, failures[0]


def scenario_paths(name: str, count: int, rng: np.random.Generator) -> list[str]:
    k = FLAGS.k
    queries = rng.permutation(FLAGS.num_queries)
    if name == "rank":
        return [f"/api/rank?query={q}&k={k}" for q in queries[:count]]
    if name == "threshold":
        q = int(queries[0])
        return [f"/api/rank?query={q}&k={k}&threshold={t:.3f}"
                for t in rng.uniform(0.0, 0.49, count)]
    paths = []
    for i in range(count):
        ignore = rng.choice(COLOURS, size=int(rng.integers(1, 9)), replace=False)
        p = f"ignore={','.join(sorted(ignore))}"
        if i % 2:
            p += f"&require={rng.choice(['backpack', 'bag', 'hat', 'hair', 'gender'])}"
        paths.append(f"/api/rank?query={queries[i]}&k={k}&{p}" if name == "steered"
                     else f"/api/metrics?{p}")
    return paths


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.serve_port:
        serve(FLAGS.serve_port)
        return
    port = free_port()
    load_before = os.getloadavg()
    args = [sys.executable, os.path.abspath(__file__), f"--serve_port={port}",
            *[a for a in sys.argv[1:] if not a.startswith("--serve_port")]]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        startup = json.loads(server.stdout.readline() or "{}")
        if not startup:
            raise SystemExit(f"the server did not start (exit {server.poll()})")
        info = None
        for _ in range(600):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                status, body = get(conn, "/api/info")
                conn.close()
                if status == 200:
                    info = json.loads(body)
                    break
            except OSError:
                time.sleep(0.5)
        if info is None:
            raise SystemExit("the server does not answer /api/info")
        print(f"explorer of random embeddings: {info['num_queries']} queries, "
              f"{info['num_gallery']} gallery images, N = {info['embedding_dim']}; loaded "
              f"(incl. the AP of every query) in {startup['loaded_s']} s, kernels compiled in "
              f"{startup['warm_s']} s")
        print(f"machine: {os.cpu_count()} CPUs; load average before: "
              f"{' '.join(f'{x:.1f}' for x in load_before)}")
        rng = np.random.default_rng(FLAGS.seed + 1)
        rows = []
        for name in FLAGS.scenarios:
            for clients in (int(c) for c in FLAGS.clients):
                count = FLAGS.metrics_requests if name == "metrics" else FLAGS.requests
                paths = scenario_paths(name, count, rng)
                lat, wall, failed = run_load(port, paths, clients)
                if lat.size == 0:
                    continue
                ms = 1e3 * lat
                rows.append((name, clients, lat.size, np.percentile(ms, 50),
                             np.percentile(ms, 95), ms.max(), lat.size / wall, failed))
                print(f"  {name:<9} clients={clients}: {lat.size} requests, p50 "
                      f"{rows[-1][3]:.0f} ms, p95 {rows[-1][4]:.0f} ms", flush=True)
        load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(timeout=60)
    print()
    print("| scenario | clients | requests | p50 ms | p95 ms | max ms | requests/s | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, clients, n, p50, p95, mx, rate, failed in rows:
        print(f"| {name} | {clients} | {n} | {p50:.0f} | {p95:.0f} | {mx:.0f} | {rate:.1f} | "
              f"{failed} |")
    print(f"\nload average (1, 5, 15 min) before: {' '.join(f'{x:.1f}' for x in load_before)}"
          f", after: {' '.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    cli.run(main)
