"""Build time, size, memory, queries/s and recall@10 of each retrieval index kind on synthetic vectors.

    python benchmarks/retrieval_index.py                 # 1,000,000 × 512 (tens of minutes on 2 cores)
    python benchmarks/retrieval_index.py --quick         # 100,000 × 512
    python benchmarks/retrieval_index.py --data clip-like --memory-budget 1GB --kinds auto

``--data clustered`` (the default) draws ``retrieval.synthetic.ClusteredVectors`` (N/500 Gaussian
clusters on the sphere with a decaying within-cluster spectrum), ``--data clip-like``
``retrieval.synthetic.ClipLikeVectors`` (a shared direction, a power-law spectrum and N/500 clusters of
Zipf-like sizes, as real CLIP embeddings have); the queries are 1000 more draws, not in the index, and
recall@10 is measured against exact search. ``--memory-budget`` is ``auto``'s; the other kinds are
built whatever their size (within RetrievalIndex's default 4 GB). Each kind is built, saved and
searched in fresh processes so that their memory figures do not mix: "build mem" is the growth of the
build process's peak RSS over its RSS before building (it includes the memory-mapped input vectors it
touched), "loaded" the RSS growth from loading the saved index. ``auto`` is not built again when its
first pick is a kind benchmarked already whose tuning reached the target (it would build the same).
Queries go through ``RetrievalIndex.search_vectors`` (metadata included), at batch 1 and batch 64.
Figures are printed, never asserted; on a shared machine compare the ratios within one run.
"""

from __future__ import annotations

import os

# FAISS's OpenMP threads busy-wait between parallel sections; on a machine shared with other jobs
# that turns short sections (PQ training, small searches) into long stalls.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from retrieval import RetrievalIndex  # noqa: E402
from retrieval.kinds import IndexPlan, plan_index  # noqa: E402
from retrieval.memory import format_bytes, parse_memory  # noqa: E402
from retrieval.synthetic import ClipLikeVectors, ClusteredVectors  # noqa: E402
from retrieval.tuning import exact_neighbours, recall_at_k  # noqa: E402
from retrieval.vectors import ArrayVectors  # noqa: E402

KINDS = {  # benchmark name → build options
    "exact": {"kind": "exact"},
    "hnsw": {"kind": "hnsw"},
    "ivfpq": {"kind": "ivfpq"},
    "ivfpq+opq": {"kind": "ivfpq", "opq": True},
    "ivfrabitq": {"kind": "ivfrabitq"},
    "auto": {"kind": "auto"},
}
NUM_QUERIES = 1_000
BATCH = 64
TIMED_SECONDS = 20.0  # each throughput figure runs at most about this long (exact search is slow)
TARGETS = {"recall": 0.95, "qps_ratio": 20.0, "size_ratio": 1 / 8}
DATA = {"clustered": ClusteredVectors, "clip-like": ClipLikeVectors}  # --data → generator


def rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_data(workdir: Path, data: str, num_vectors: int, dim: int, clusters: int) -> None:
    """Write base.npy, queries.npy and the queries' exact top-10 (truth.npy) of ``data`` vectors (a key
    of ``DATA``) to ``workdir``, unless a ``--workdir`` from an earlier run already holds the same data."""
    description = {"data": data, "num_vectors": num_vectors, "dim": dim, "clusters": clusters, "queries": NUM_QUERIES}
    described = workdir / "data.json"
    if described.is_file() and json.loads(described.read_text()) == description:
        return
    generator = DATA[data](dim=dim, num_clusters=clusters)
    base, base_clusters = generator.sample(num_vectors, seed=0)
    queries, _ = generator.sample(NUM_QUERIES, seed=1)
    np.save(workdir / "base.npy", base)
    np.save(workdir / "clusters.npy", base_clusters)
    np.save(workdir / "queries.npy", queries)
    np.save(workdir / "truth.npy", exact_neighbours(queries, ArrayVectors(base), 10))
    described.write_text(json.dumps(description))


def build_phase(workdir: Path, name: str, memory_budget: str, target_recall: float) -> dict:
    base = np.load(workdir / "base.npy", mmap_mode="r")
    clusters = np.load(workdir / "clusters.npy")
    metadata = ({"cluster": int(c), "source": f"shard-{i // 10_000:05d}"} for i, c in enumerate(clusters))
    budget = {"memory_budget": memory_budget} if name == "auto" else {}
    rss_before = rss_bytes()
    start = time.perf_counter()
    index = RetrievalIndex.build(base, metadata, target_recall=target_recall, model_name="synthetic",
                                 **budget, **KINDS[name])
    seconds = time.perf_counter() - start
    index.save(workdir / name)
    return {
        "build_s": seconds, "build_memory": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
        "factory": index.manifest.factory, "search": index.manifest.search, "tuning": index.manifest.tuning,
        "index_bytes": index.manifest.index_bytes,
    }


def queries_per_s(index: RetrievalIndex, queries: np.ndarray, batch: int) -> tuple[float, list]:
    """Search ``queries`` in batches until done or ``TIMED_SECONDS`` pass; (queries/s, hits so far)."""
    hits: list = []
    start = time.perf_counter()
    for first in range(0, len(queries), batch):
        hits += index.search_vectors(queries[first:first + batch], k=10)
        if time.perf_counter() - start > TIMED_SECONDS:
            break
    return len(hits) / (time.perf_counter() - start), hits


def search_phase(workdir: Path, name: str) -> dict:
    queries, truth = np.load(workdir / "queries.npy"), np.load(workdir / "truth.npy")
    before = rss_bytes()
    index = RetrievalIndex.load(workdir / name)
    loaded = rss_bytes() - before
    index.search_vectors(queries[:BATCH], k=10)  # first-touch costs are not throughput
    qps_1, _ = queries_per_s(index, queries, 1)
    qps_64, hits = queries_per_s(index, queries, BATCH)
    found = np.array([[hit.id for hit in row] + [-1] * (10 - len(row)) for row in hits])
    return {"loaded_rss": loaded, "qps_1": qps_1, "qps_64": qps_64,
            "recall_at_10": recall_at_k(found, truth[:len(found)]), "recall_queries": len(found)}


def run_child(args: argparse.Namespace, phase: str, name: str) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--kind", name, "--workdir", str(args.workdir),
               "--threads", str(args.threads), "--memory-budget", args.memory_budget,
               "--target-recall", str(args.target_recall)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def reusable_row(rows: dict[str, dict], plan: IndexPlan, target_recall: float) -> dict | None:
    """The row of a kind benchmarked already that ``auto`` would build again: the plan it starts from,
    tuned to the target (``auto`` goes on to other indexes only when the target is missed)."""
    row = rows.get(plan.kind)
    if row is None or row["factory"] != plan.factory:
        return None
    return row if row["tuning"] is None or row["tuning"]["recall_at_10"] >= target_recall else None


def knob_text(search: dict[str, int]) -> str:
    return ",".join(f"{name}={value}" for name, value in search.items()) or "-"


def report_auto(auto: dict) -> None:
    """How ``auto`` chose its index: the tuning of the one it kept, and the others it tried."""
    tuning = auto["tuning"] or {}
    print(f"\nauto kept {auto['factory']} ({knob_text(auto['search'])}): recall@10 "
          f"{tuning.get('recall_at_10', '-')} on {tuning.get('queries', '-')} held-out vectors while tuning, "
          f"target {tuning.get('target_recall_at_10', '-')}")
    for attempt in tuning.get("tried", []):
        print(f"  also tried {attempt['factory']:<37} {knob_text(attempt['search']):<22} "
              f"recall@10 {attempt['recall_at_10']:.3f}")


def report(rows: dict[str, dict], num_vectors: int, dim: int, data: str, memory_budget: str) -> None:
    raw = num_vectors * dim * 4
    print(f"\n{num_vectors:,} × {dim} float32 {data} vectors = {format_bytes(raw)} raw; recall@10 on {NUM_QUERIES} "
          f"held-out queries vs exact search; {faiss.omp_get_max_threads()} threads; auto's memory budget "
          f"{memory_budget}\n")
    header = (f"{'kind':<10} {'index':<37} {'knob':<22} {'build s':>8} {'build mem':>10} {'index size':>10} "
              f"{'/raw':>6} {'loaded':>9} {'q/s @1':>8} {'q/s @64':>8} {'recall@10':>9}")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(f"{name:<10} {row['factory']:<37} {knob_text(row['search']):<22} {row['build_s']:>8.1f} "
              f"{format_bytes(row['build_memory']):>10} {format_bytes(row['index_bytes']):>10} "
              f"{row['index_bytes'] / raw:>6.3f} {format_bytes(row['loaded_rss']):>9} {row['qps_1']:>8.1f} "
              f"{row['qps_64']:>8.1f} {row['recall_at_10']:>9.3f}")
    if "auto" in rows:
        report_auto(rows["auto"])
    if "auto" in rows and "exact" in rows:
        auto, exact = rows["auto"], rows["exact"]
        checks = [
            ("recall@10", auto["recall_at_10"], f"≥ {TARGETS['recall']}", auto["recall_at_10"] >= TARGETS["recall"]),
            ("q/s vs exact, batch 1", auto["qps_1"] / exact["qps_1"], f"≥ {TARGETS['qps_ratio']:.0f}×",
             auto["qps_1"] / exact["qps_1"] >= TARGETS["qps_ratio"]),
            ("q/s vs exact, batch 64", auto["qps_64"] / exact["qps_64"], f"≥ {TARGETS['qps_ratio']:.0f}×",
             auto["qps_64"] / exact["qps_64"] >= TARGETS["qps_ratio"]),
            ("index size / raw", auto["index_bytes"] / raw, "≤ 0.125",
             auto["index_bytes"] / raw <= TARGETS["size_ratio"]),
        ]
        print(f"\nauto ({auto['factory']}) against the targets (set for 1,000,000 vectors):")
        for label, value, target, met in checks:
            print(f"  {label:<24} {value:>8.3f}   target {target:<7} {'met' if met else 'NOT met'}")


SCALE_PART_VECTORS = 1_000_000  # vectors per part of the --scale embeddings folder
SCALE_DIM = 128
SCALE_LISTS = 4096
SCALE_BITS = 6


def parse_count(text: str) -> int:
    """``10M`` → 10,000,000; ``200k`` → 200,000; plain digits as they are."""
    factor = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if factor > 1 else text) * factor)


class PeakAnonymousMemory:
    """The peak of this process's anonymous resident memory (RssAnon), sampled every 0.2 s: what a build
    needs of RAM, without the pages of memory-mapped input files, which the kernel drops under pressure."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def __enter__(self) -> "PeakAnonymousMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_scale_data(workdir: Path, num_vectors: int, dim: int) -> None:
    """An embeddings folder (``workdir/emb``, as ``clipkit embed`` writes it, float16 parts of 1M vectors
    with one metadata line each) of clustered vectors, 1000 queries and their exact top-10 over the
    float16 vectors as indexed; kept for a rerun with the same ``--workdir``."""
    from retrieval import read_embeddings_dir, write_manifest
    from retrieval.files import atomic_write

    description = {"scale": num_vectors, "dim": dim, "dtype": "float16", "queries": NUM_QUERIES}
    described = workdir / "scale.json"
    if described.is_file() and json.loads(described.read_text()) == description:
        return
    generator = ClusteredVectors(dim=dim, num_clusters=max(num_vectors // 500, 1))
    emb = workdir / "emb"
    emb.mkdir(parents=True, exist_ok=True)
    stems, counts = [], []
    for number, start in enumerate(range(0, num_vectors, SCALE_PART_VECTORS)):
        count = min(SCALE_PART_VECTORS, num_vectors - start)
        vectors, clusters = generator.sample(count, seed=number)
        stem = f"part-{number:05d}"
        atomic_write(emb / f"{stem}.npy", lambda file, v=vectors: np.save(file, v.astype(np.float16)))
        lines = "".join(f'{{"n": {start + i}, "cluster": {c}}}\n' for i, c in enumerate(clusters.tolist()))
        (emb / f"{stem}.jsonl").write_text(lines)
        stems.append(stem)
        counts.append(count)
        print(f"  wrote {stem} ({start + count:,} of {num_vectors:,})", flush=True)
    write_manifest(emb, "synthetic", "image", dim, stems, counts=counts)
    queries, _ = generator.sample(NUM_QUERIES, seed=10**6)
    np.save(workdir / "queries.npy", queries)
    np.save(workdir / "truth.npy", exact_neighbours(queries, read_embeddings_dir(emb).vectors, 10))
    described.write_text(json.dumps(description))


def scale_build_phase(workdir: Path, lists: int, bits: int) -> dict:
    import shutil

    start = time.perf_counter()
    with PeakAnonymousMemory() as memory:
        index = RetrievalIndex.build_from_embeddings(workdir / "emb", kind="ivfrabitq", nlist=lists,
                                                     bits=bits, lists_dir=workdir / "lists")
        index.save(workdir / "index")
    shutil.rmtree(workdir / "lists", ignore_errors=True)
    manifest = index.manifest
    return {"build_s": time.perf_counter() - start, "peak_anon": memory.peak,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "factory": manifest.factory,
            "search": manifest.search, "tuning": manifest.tuning, "index_bytes": manifest.index_bytes,
            "lists_bytes": manifest.lists_bytes, "metadata_bytes": manifest.metadata_bytes}


def run_scale(args: argparse.Namespace, num_vectors: int) -> None:
    """``--scale N``: an on-disk IVF-RaBitQ index of N float16 vectors built from an embeddings folder
    (lists merged on disk, in chunks), then searched memory-mapped, each in a fresh process."""
    dim = args.dim or SCALE_DIM
    start = time.perf_counter()
    make_scale_data(args.workdir, num_vectors, dim)
    print(f"data and exact ground truth: {time.perf_counter() - start:.0f} s", flush=True)
    common = ["--workdir", str(args.workdir), "--threads", str(args.threads), "--scale", str(num_vectors),
              "--nlist", str(args.nlist), "--bits", str(args.bits)]
    rows = {}
    for phase in ("build", "search"):
        done = subprocess.run([sys.executable, __file__, "--phase", phase, *common], stdout=subprocess.PIPE,
                              text=True, check=True)
        rows |= json.loads(done.stdout.strip().splitlines()[-1])
    raw = num_vectors * dim * 2
    on_disk = rows["index_bytes"] + rows["lists_bytes"]
    tuning = rows["tuning"] or {}
    print(f"\n{num_vectors:,} × {dim} float16 clustered vectors ({format_bytes(raw)} of input, in parts of "
          f"{SCALE_PART_VECTORS:,}); {faiss.omp_get_max_threads()} threads")
    print(f"index            {rows['factory']}, lists on disk; {knob_text(rows['search'])} tuned to recall@10 "
          f"{tuning.get('recall_at_10', '-')} (target {tuning.get('target_recall_at_10', '-')})")
    print(f"build            {rows['build_s']:.0f} s (metadata, training, chunks, merge, tuning, save)")
    print(f"peak memory      {format_bytes(rows['peak_anon'])} anonymous (peak RSS {format_bytes(rows['peak_rss'])}, "
          "which counts the mapped input pages read)")
    print(f"index size       {format_bytes(on_disk)} (lists {format_bytes(rows['lists_bytes'])}, "
          f"{on_disk / (num_vectors * dim * 4):.3f} of float32), metadata {format_bytes(rows['metadata_bytes'])}")
    print(f"loaded (mmap)    {format_bytes(rows['loaded_rss'])} resident after load")
    print(f"queries/s        {rows['qps_1']:.1f} at batch 1, {rows['qps_64']:.1f} at batch {BATCH}")
    print(f"recall@10        {rows['recall_at_10']:.3f} on {rows['recall_queries']} held-out queries vs exact search")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-vectors", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 vectors")
    parser.add_argument("--dim", type=int, help="vector dimension (default: 512; with --scale, 128)")
    parser.add_argument("--scale", type=parse_count, metavar="N",
                        help="instead: an on-disk index of N float16 vectors (e.g. 10M) built from an embeddings "
                             "folder and searched memory-mapped")
    parser.add_argument("--nlist", type=int, default=SCALE_LISTS,
                        help=f"with --scale: IVF lists (default {SCALE_LISTS}: 8·√N lists would cost hours of "
                             "k-means and assignment at 10M on 2 cores)")
    parser.add_argument("--bits", type=int, default=SCALE_BITS,
                        help=f"with --scale: RaBitQ bits per dimension (default {SCALE_BITS})")
    parser.add_argument("--data", choices=tuple(DATA), default="clustered",
                        help="isotropic Gaussian clusters, or vectors shaped like CLIP embeddings")
    parser.add_argument("--clusters", type=int, help="clusters (default: one per 500 vectors)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads (this machine has 2 cores)")
    parser.add_argument("--memory-budget", default="4GB", help="auto's memory budget, e.g. 1GB")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--workdir", type=Path,
                        help="where data and indexes go, kept for a rerun (default: a temporary folder)")
    parser.add_argument("--phase", choices=("build", "search"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    if args.phase and args.scale:
        # The search is the kinds' own: loading an index whose lists are on disk maps them.
        result = (scale_build_phase(args.workdir, args.nlist, args.bits) if args.phase == "build"
                  else search_phase(args.workdir, "index"))
        print(json.dumps(result))
        return
    if args.phase:  # a child process: one phase of one kind, one JSON line out
        phase = build_phase if args.phase == "build" else search_phase
        options = (args.memory_budget, args.target_recall) if args.phase == "build" else ()
        print(json.dumps(phase(args.workdir, args.kind, *options)))
        return

    if args.scale:
        with tempfile.TemporaryDirectory(prefix="retrieval-scale-") as scratch:
            args.workdir = args.workdir or Path(scratch)
            args.workdir.mkdir(parents=True, exist_ok=True)
            run_scale(args, args.scale)
        return
    args.dim = args.dim or 512
    num_vectors = 100_000 if args.quick else args.num_vectors
    names = args.kinds.split(",")
    unknown = set(names) - KINDS.keys()
    if unknown:
        parser.error(f"unknown kinds {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="retrieval-bench-") as scratch:
        args.workdir = args.workdir or Path(scratch)
        args.workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        make_data(args.workdir, args.data, num_vectors, args.dim, args.clusters or max(num_vectors // 500, 1))
        print(f"data and exact ground truth: {time.perf_counter() - start:.0f} s", flush=True)
        auto_plan = plan_index("auto", num_vectors, args.dim, parse_memory(args.memory_budget))
        rows = {}
        for name in names:
            reused = reusable_row(rows, auto_plan, args.target_recall) if name == "auto" else None
            if reused is not None:
                rows[name] = reused
            else:
                rows[name] = run_child(args, "build", name)
                rows[name] |= run_child(args, "search", name)
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
        report(rows, num_vectors, args.dim, args.data, args.memory_budget)


if __name__ == "__main__":
    main()
