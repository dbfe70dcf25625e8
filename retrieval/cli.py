"""``clipkit index build``, ``clipkit search`` and ``clipkit serve``: build an index from an embeddings
directory, query it, serve it.

``add_index_commands(subparsers)`` registers them on the ``clipkit`` command's subparsers; each sets
``func`` to its handler, which takes the parsed arguments. Bad input raises ``ValueError`` (a usage
error) or ``FileNotFoundError`` with a message that says what to fix.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index import Hit, RetrievalIndex
from retrieval.kinds import AUTO, KINDS
from retrieval.memory import format_bytes
from retrieval.served import IndexSource, ServedIndex


def add_index_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``index build`` and ``search`` on an argparse subparsers object."""
    index = subparsers.add_parser("index", help="build FAISS retrieval indexes").add_subparsers(
        dest="index_command", required=True)
    build = index.add_parser("build", help="index an embeddings directory written by `clipkit embed`")
    build.add_argument("embeddings_dir", help="folder of <shard>.npy + <shard>.jsonl files and manifest.json")
    build.add_argument("out_dir", help="where the index is saved (replaced if it is an older index)")
    build.add_argument("--kind", default=AUTO, choices=(AUTO, *KINDS),
                       help="index kind; auto picks by vector count, dimension and memory budget (default)")
    build.add_argument("--opq", action="store_true", help="with --kind ivfpq: learn a rotation before PQ")
    build.add_argument("--memory-budget", default="4GB", help="the most the index may take, e.g. 4GB, 500MB")
    build.add_argument("--target-recall", type=float, default=0.95,
                       help="recall@10 against exact search that the search knob is tuned to reach")
    build.add_argument("--on-disk", action="store_true",
                       help="keep the IVF lists on disk, for embeddings whose index does not fit in memory: "
                            "built in chunks beside OUT_DIR, then searched memory-mapped (read-only; "
                            "--kind ivfrabitq or ivfpq, auto meaning ivfrabitq)")
    build.add_argument("--nlist", type=int, help="IVF list count (--kind ivfrabitq or ivfpq; default 8·√N): "
                       "fewer lists train and fill faster on CPUs, for more work per query")
    build.add_argument("--bits", type=int, help="with --kind ivfrabitq: RaBitQ bits per dimension (1, 2, 3, 4, 6 "
                       "or 8; default the most within 1/8 of the raw size)")
    build.set_defaults(func=cmd_index_build)

    search = subparsers.add_parser("search", help="query a saved index by text, a media file or vectors")
    search.add_argument("index_dir", help="a folder written by `clipkit index build`")
    search.add_argument("text", nargs="?", help="a text query (needs the model)")
    search.add_argument("--file", help="a media file to query with: an image, audio clip, video, ... of "
                        "the model's modalities")
    search.add_argument("--modality", help="the --file's modality (default: the model's tower whose decoder "
                        "takes its extension)")
    search.add_argument("--vector-file", help="a .npy file with one (D,) query vector or a (Q, D) batch")
    search.add_argument("--item", type=int, help="the id of an indexed item: more like it (by its stored vector)")
    search.add_argument("--model", help="the model that embeds the query: a clipkit checkpoint or "
                        "open_clip:ARCH (default: the model the index was built with)")
    search.add_argument("--pretrained", help="open_clip weights: a local file or a zoo tag")
    search.add_argument("--device", default="cpu", help="where the query model runs: cpu, cuda, cuda:N or auto")
    search.add_argument("--k", type=int, default=10, help="hits per query")
    search.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                        help="only hits whose metadata FIELD equals VALUE (a JSON number, true/false, or "
                             "else a string); repeat to require several")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.set_defaults(func=cmd_search)

    serve = subparsers.add_parser("serve", help="a JSON search service over saved indexes (FastAPI on uvicorn)")
    serve.add_argument("index_dirs", nargs="+", metavar="INDEX_DIR",
                       help="folders written by `clipkit index build`; each is served under its folder name")
    serve.add_argument("--model", help="the model that embeds text and image queries for every index "
                       "(default: the model each index was built with; an index that records none takes "
                       "vector queries only)")
    serve.add_argument("--pretrained", help="open_clip weights: a local file or a zoo tag")
    serve.add_argument("--device", default="cpu", help="where the query model runs: cpu, cuda, cuda:N or auto")
    serve.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this "
                       "machine only; 0.0.0.0 serves every network the machine is on)")
    serve.add_argument("--port", type=int, default=8000, help="the TCP port (default 8000)")
    serve.add_argument("--watch", type=float, default=2.0, metavar="SECONDS",
                       help="how often each INDEX_DIR is checked for a rebuilt index, which is then swapped "
                            "in (default 2; 0: only on POST /reload)")
    serve.set_defaults(func=cmd_serve)


def cmd_index_build(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = Path(args.out_dir)
    # Beside the output, so that saving moves the lists file by a rename on the same file system.
    lists_dir = out.with_name(f".{out.name}.lists-{os.getpid()}") if args.on_disk else None
    try:
        index = RetrievalIndex.build_from_embeddings(
            args.embeddings_dir, kind=args.kind, opq=args.opq, memory_budget=args.memory_budget,
            target_recall=args.target_recall, lists_dir=lists_dir, nlist=args.nlist, bits=args.bits,
        )
        index.save(out)
    finally:
        if lists_dir is not None:
            shutil.rmtree(lists_dir, ignore_errors=True)
    manifest = index.manifest
    tuned = ""
    if manifest.tuning:
        knob = ", ".join(f"{name}={value}" for name, value in manifest.search.items())
        tuned = (f"; {knob} reaches recall@10 {manifest.tuning['recall_at_10']:.3f} "
                 f"(target {manifest.tuning['target_recall_at_10']})")
    print(f"indexed {len(index):,} × {index.dim} vectors of model {index.model_name!r} as {index.kind} "
          f"({manifest.factory}){tuned}")
    lists = f", lists on disk {format_bytes(manifest.lists_bytes)}" if manifest.lists_bytes is not None else ""
    print(f"saved to {args.out_dir}: index {format_bytes(manifest.index_bytes)}{lists}, metadata "
          f"{format_bytes(manifest.metadata_bytes)}, {time.perf_counter() - start:.1f} s")


def parse_filters(filters: list[str]) -> dict[str, Any] | None:
    """``["source=a.tar", "label=3"]`` → ``{"source": "a.tar", "label": 3}`` (``None`` for no filters)."""
    where: dict[str, Any] = {}
    for item in filters:
        field, sep, text = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--filter takes FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        where[field] = value if isinstance(value, (int, float, bool, str)) else text
    return where or None


def _load_model(model_arg: str | None, pretrained: str | None, device: str, index: RetrievalIndex,
                directory: Path) -> Any:
    """The model that embeds queries: ``model_arg``, else the one the index records (loaded from its
    absolute path, so from any folder). Its fingerprint must be the index's: a path only names a
    model, and the file there may have been replaced."""
    from clipkit.eval.encoders import load_encoder  # heavy (torch models): only when a query needs it

    manifest = index.manifest
    if model_arg:
        model = load_encoder(model_arg, pretrained, device=device)
    elif manifest.model_spec or manifest.model:
        spec = manifest.model_spec or {"model": manifest.model, "pretrained": None}
        try:
            model = load_encoder(spec["model"], spec.get("pretrained"), device=device)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{directory} was built with model {manifest.model!r}, which is not at "
                                    f"{spec['model']} any more ({err}): pass --model with where it is now") from err
    else:
        raise ValueError("this index records no model; pass --model")
    manifest.check(None, None, directory, expect_fingerprint=model.fingerprint())
    return model


def _queries(
    args: argparse.Namespace, index: RetrievalIndex, where: dict[str, Any] | None
) -> list[tuple[str, list[Hit]]]:
    """(label, hits) for each query the arguments ask for."""
    given = [name for name in ("text", "file", "vector_file", "item") if getattr(args, name) is not None]
    if len(given) != 1:
        raise ValueError("give exactly one query: TEXT, --file, --vector-file or --item")
    if args.item is not None:
        try:
            return [(f"item {args.item}", index.search_item(args.item, args.k, where))]
        except KeyError as err:
            raise ValueError(f"{args.index_dir} has no item {args.item}") from err
    if args.vector_file:
        vectors = np.load(args.vector_file)
        vectors = vectors[None, :] if vectors.ndim == 1 else vectors
        results = index.search_vectors(vectors, args.k, where)
        return [(f"vector {i} of {args.vector_file}", hits) for i, hits in enumerate(results)]
    model = _load_model(args.model, args.pretrained, args.device, index, Path(args.index_dir))
    if args.text is not None:
        return [(repr(args.text), index.search_text(args.text, model, args.k, where))]
    return [(args.file, index.search_file(args.file, model, args.modality, args.k, where))]


def cmd_search(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise ValueError(f"--k must be positive, got {args.k}")
    where = parse_filters(args.filter)
    index = RetrievalIndex.load(Path(args.index_dir), mmap=True)
    results = _queries(args, index, where)
    if args.json:
        print(json.dumps([{"query": label, "hits": [{"id": hit.id, "score": hit.score, "metadata": hit.metadata}
                                                    for hit in hits]} for label, hits in results],
                         ensure_ascii=False))
        return
    for label, hits in results:
        print(f"{label}: {len(hits)} hits")
        for rank, hit in enumerate(hits, start=1):
            print(f"  {rank:>3}. {hit.score:.4f}  id {hit.id}  {json.dumps(hit.metadata, ensure_ascii=False)}")


def _index_opener(name: str, directory: Path, args: argparse.Namespace
                  ) -> Callable[[ServedIndex | None], ServedIndex]:
    """``open(served)`` for ``clipkit serve``: the folder's current index, with its model (the one
    served before when the new version was embedded by the same weights)."""

    def open_version(served: ServedIndex | None) -> ServedIndex:
        index = RetrievalIndex.load(directory, mmap=True)
        manifest = index.manifest
        model = None
        if args.model or manifest.model_spec or manifest.model:
            before = served.index.manifest.model_fingerprint if served is not None and served.model else None
            keep = before is not None and before == manifest.model_fingerprint
            model = served.model if keep else _load_model(args.model, args.pretrained, args.device, index, directory)
        print(f"{name}: {len(index):,} × {index.dim} vectors ({index.kind}, built "
              f"{manifest.created})" + ("" if model is not None else "; no model recorded, so vector and item "
                                        "queries only"), flush=True)
        return ServedIndex(index, model)

    return open_version


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from retrieval.service import create_app

    if args.watch < 0:
        raise ValueError(f"--watch takes seconds ≥ 0, got {args.watch}")
    directories = [Path(directory) for directory in args.index_dirs]
    names = [directory.resolve().name for directory in directories]
    if len(set(names)) != len(names):
        raise ValueError(f"indexes are served under their folder names, and these repeat: {names}")
    app = create_app({name: IndexSource(_index_opener(name, directory, args), directory)
                      for name, directory in zip(names, directories)}, watch_seconds=args.watch)
    print(f"serving on http://{args.host}:{args.port} (API docs at /docs; Ctrl-C or SIGTERM stops it)", flush=True)
    # uvicorn drains the requests in flight on SIGTERM, then raises the signal again once its own
    # handler is gone: this handler turns that into a clean exit (0) instead of death by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
