"""Load on `clipkit serve`: concurrent clients with a mix of good and bad queries, per query kind.

    python benchmarks/serve.py --toy indexes/toy [--large DIR [--make-large 1000000]] [--seconds 8]

Starts the real ``clipkit serve`` on 127.0.0.1 over the given indexes and, for each concurrency (1, 8,
32 clients, each sending its next request when the last is answered), runs a mix for ``--seconds``:
on the toy index (which has a model) 35% text, 20% vector, 20% image and 15% item ("more like this")
queries (held-out images read from the shard the index's first item came from); on the large index
(vectors only) 75% vector and 15% item queries; and on both 10% bad requests (an undecodable image, a
vector of another dimension, k of 10⁶, an unknown index, an unknown item, malformed JSON) that must
each get a 4xx. A 50 MB upload is sent once per run. It prints queries/s and p50/p95/p99 latency per
kind; per level, the CPU time per request of the server and of the clients (they share the
machine's cores); the status codes of the bad requests; the server's resident memory after a
warm-up, after each level and at the end (its heap, and the pages of the memory-mapped index files
it has read); and that SIGTERM stopped it with exit code 0.

``--make-large N`` first builds a memory-mapped index of N clustered 128-d vectors into ``--large``
(kind ``auto``, tuned to recall@10 0.95; reused when it is there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

BAD_KINDS = ("bad image", "bad dimension", "bad k", "bad index", "bad item", "bad json")


def resident_mb(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MB of process ``pid``: the heap, and the index files' pages
    that searches have touched (the page cache's, which the kernel drops under memory pressure)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[name].split()[0]) / 1024 for name in ("RssAnon", "RssFile"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_large(folder: Path, count: int) -> None:
    from retrieval import RetrievalIndex
    from retrieval.synthetic import ClusteredVectors

    if (folder / "manifest.json").is_file():
        return
    start = time.perf_counter()
    vectors, _ = ClusteredVectors(dim=128, num_clusters=1000).sample(count, seed=0)
    RetrievalIndex.build(vectors, ({"n": i} for i in range(count)), kind="auto", memory_budget="2GB").save(folder)
    print(f"built {folder}: {count:,} × 128 vectors in {time.perf_counter() - start:.0f} s", flush=True)


def held_out_images(url: str, index: str, count: int = 32) -> list[bytes]:
    source = httpx.get(f"{url}/indexes/{index}/items/0").json()["metadata"]["source"]
    with tarfile.open(source) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))][:count]
        return [tar.extractfile(m).read() for m in members]


def request_for(kind: str, index: str, dim: int, count: int, images: list[bytes], rng: random.Random) -> dict:
    """httpx.post keyword arguments (with "path") for one request of ``kind``."""
    vector = np.random.default_rng(rng.randrange(1 << 30)).normal(size=dim)
    vector = (vector / np.linalg.norm(vector)).tolist()
    if kind == "text":
        return {"path": "/search", "json": {"index": index, "text": f"a photo of a {rng.choice(['red', 'blue'])} "
                                                                      f"{rng.choice(['circle', 'star'])}", "k": 10}}
    if kind == "vector":
        return {"path": "/search", "json": {"index": index, "vector": vector, "k": 10}}
    if kind == "item":
        return {"path": "/search", "json": {"index": index, "item": rng.randrange(count), "k": 10}}
    if kind == "bad item":
        return {"path": "/search", "json": {"index": index, "item": count + rng.randrange(1000), "k": 10}}
    if kind == "image":
        return {"path": "/search/image", "files": {"file": ("q.jpg", rng.choice(images))}, "data": {"index": index}}
    if kind == "bad image":
        return {"path": "/search/image", "files": {"file": ("q.jpg", b"not an image")}, "data": {"index": index}}
    if kind == "bad dimension":
        return {"path": "/search", "json": {"index": index, "vector": vector[: dim // 2]}}
    if kind == "bad k":
        return {"path": "/search", "json": {"index": index, "vector": vector, "k": 10**6}}
    if kind == "bad index":
        return {"path": "/search", "json": {"index": "no-such-index", "vector": vector}}
    return {"path": "/search", "content": b'{"index": ', "headers": {"content-type": "application/json"}}


async def load(url: str, index: str, dim: int, count: int, mix: dict[str, float], images: list[bytes], clients: int,
               seconds: float) -> tuple[dict[str, list[float]], dict[str, dict[int, int]], float]:
    """(latencies per kind, status counts per kind, wall seconds) of ``clients`` closed-loop clients."""
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    kinds, weights = list(mix), list(mix.values())
    deadline = time.perf_counter() + seconds

    async def client(number: int) -> None:
        rng = random.Random(number)
        # One connection pool per client: httpx's pool costs CPU per request that grows with its
        # connections (32 clients on one pool took 2-3x the client CPU per request of 8).
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            await send_until_deadline(rng, http)

    async def send_until_deadline(rng: random.Random, http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind == "bad":
                kind = rng.choice(BAD_KINDS)
            arguments = request_for(kind, index, dim, count, images, rng)
            path = arguments.pop("path")
            start = time.perf_counter()
            response = await http.post(path, **arguments)
            latencies[kind].append(time.perf_counter() - start)
            statuses[kind][response.status_code] += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies, statuses, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", required=True, help="an index with a model, e.g. the quickstart's indexes/toy")
    parser.add_argument("--large", help="a large vector index folder (built first with --make-large)")
    parser.add_argument("--make-large", type=int, metavar="N", help="build --large from N synthetic vectors")
    parser.add_argument("--seconds", type=float, default=8.0, help="load per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    if args.make_large:
        make_large(Path(args.large), args.make_large)
    folders = [Path(args.toy)] + ([Path(args.large)] if args.large else [])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "clipkit", "serve", *map(str, folders), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        indexes = {entry["name"]: entry for entry in httpx.get(f"{url}/indexes").json()}
        toy = folders[0].resolve().name
        images = held_out_images(url, toy)
        mixes = {name: {"text": 0.35, "vector": 0.2, "image": 0.2, "item": 0.15, "bad": 0.1}
                 if entry["text_and_image_queries"] else {"vector": 0.75, "item": 0.15, "bad": 0.1}
                 for name, entry in indexes.items()}
        for name, entry in indexes.items():  # warm up: the model's first call, the item tables, allocator pools
            asyncio.run(load(url, name, entry["dim"], entry["vectors"], mixes[name], images, 8, 2.0))
        rss_start = resident_mb(server.pid)
        heap_after_levels = []
        served = ", ".join(f"{name} ({entry['vectors']:,} × {entry['dim']})" for name, entry in indexes.items())
        print(f"clipkit serve on {url}: {served}")
        print(f"{'index':<14}{'clients':>8}  {'kind':<14}{'requests':>9}{'q/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
              f"{'p99 ms':>9}  statuses")
        bad_5xx = 0
        for name in indexes:
            for clients in args.concurrency:
                server_cpu, clients_cpu = cpu_seconds(server.pid), time.process_time()
                latencies, statuses, wall = asyncio.run(load(url, name, indexes[name]["dim"], indexes[name]["vectors"],
                                                             mixes[name], images, clients, args.seconds))
                for kind in sorted(latencies, key=lambda k: (k.startswith("bad"), k)):
                    ms = np.percentile(np.array(latencies[kind]) * 1000, [50, 95, 99])
                    codes = ",".join(f"{code}×{n}" for code, n in sorted(statuses[kind].items()))
                    bad_5xx += sum(n for code, n in statuses[kind].items() if code >= 500)
                    print(f"{name:<14}{clients:>8}  {kind:<14}{len(latencies[kind]):>9}{len(latencies[kind]) / wall:>9.1f}"
                          f"{ms[0]:>9.1f}{ms[1]:>9.1f}{ms[2]:>9.1f}  {codes}")
                heap_after_levels.append(resident_mb(server.pid)[0])
                requests = sum(len(times) for times in latencies.values())
                print(f"{name:<14}{clients:>8}  {'(all)':<14}{requests:>9}{requests / wall:>9.1f}  CPU per request: "
                      f"server {1000 * (cpu_seconds(server.pid) - server_cpu) / requests:.2f} ms, clients "
                      f"{1000 * (time.process_time() - clients_cpu) / requests:.2f} ms")
        big = httpx.post(f"{url}/search/image", files={"file": ("big.jpg", os.urandom(50 * 1024 * 1024))},
                         data={"index": toy}, timeout=120)
        rss_end = resident_mb(server.pid)
        print(f"50 MB upload: {big.status_code} {json.loads(big.text)['detail']}")
        print(f"5xx answers: {bad_5xx}; server memory after the warm-up and at the end: heap {rss_start[0]:.0f} → "
              f"{rss_end[0]:.0f} MB (after each level: {', '.join(f'{mb:.0f}' for mb in heap_after_levels)}), "
              f"index file pages read {rss_start[1]:.0f} → {rss_end[1]:.0f} MB")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "killed after 60 s"
    print(f"SIGTERM: exit code {code}")


if __name__ == "__main__":
    main()
