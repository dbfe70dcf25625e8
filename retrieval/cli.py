"""``clipkit index build`` and ``clipkit search``: build an index from an embeddings directory, query it.

``add_index_commands(subparsers)`` registers both on the ``clipkit`` command's subparsers; each sets
``func`` to its handler, which takes the parsed arguments. Bad input raises ``ValueError`` (a usage
error) or ``FileNotFoundError`` with a message that says what to fix.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index import Hit, RetrievalIndex
from retrieval.kinds import AUTO, KINDS
from retrieval.memory import format_bytes


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
    build.set_defaults(func=cmd_index_build)

    search = subparsers.add_parser("search", help="query a saved index by text, image, audio or vectors")
    search.add_argument("index_dir", help="a folder written by `clipkit index build`")
    search.add_argument("text", nargs="?", help="a text query (needs the model)")
    search.add_argument("--image", help="an image file to query with")
    search.add_argument("--audio", help="an audio file to query with")
    search.add_argument("--vector-file", help="a .npy file with one (D,) query vector or a (Q, D) batch")
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


def cmd_index_build(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    index = RetrievalIndex.build_from_embeddings(
        args.embeddings_dir, kind=args.kind, opq=args.opq, memory_budget=args.memory_budget,
        target_recall=args.target_recall,
    )
    index.save(args.out_dir)
    manifest = index.manifest
    tuned = ""
    if manifest.tuning:
        knob = ", ".join(f"{name}={value}" for name, value in manifest.search.items())
        tuned = (f"; {knob} reaches recall@10 {manifest.tuning['recall_at_10']:.3f} "
                 f"(target {manifest.tuning['target_recall_at_10']})")
    print(f"indexed {len(index):,} × {index.dim} vectors of model {index.model_name!r} as {index.kind} "
          f"({manifest.factory}){tuned}")
    print(f"saved to {args.out_dir}: index {format_bytes(manifest.index_bytes)}, metadata "
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


def _load_model(args: argparse.Namespace, index: RetrievalIndex, directory: Path) -> Any:
    """The model that embeds the query: ``--model``, else the one the index records (loaded from its
    absolute path, so from any folder). Its fingerprint must be the index's: a path only names a
    model, and the file there may have been replaced."""
    from clipkit.eval.encoders import load_encoder  # heavy (torch models): only when a query needs it

    manifest = index.manifest
    if args.model:
        model = load_encoder(args.model, args.pretrained, device=args.device)
    elif manifest.model_spec or manifest.model:
        spec = manifest.model_spec or {"model": manifest.model, "pretrained": None}
        try:
            model = load_encoder(spec["model"], spec.get("pretrained"), device=args.device)
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
    given = [name for name in ("text", "image", "audio", "vector_file") if getattr(args, name) is not None]
    if len(given) != 1:
        raise ValueError("give exactly one query: TEXT, --image, --audio or --vector-file")
    if args.vector_file:
        vectors = np.load(args.vector_file)
        vectors = vectors[None, :] if vectors.ndim == 1 else vectors
        results = index.search_vectors(vectors, args.k, where)
        return [(f"vector {i} of {args.vector_file}", hits) for i, hits in enumerate(results)]
    model = _load_model(args, index, Path(args.index_dir))
    if args.text is not None:
        return [(repr(args.text), index.search_text(args.text, model, args.k, where))]
    if args.image:
        return [(args.image, index.search_image(args.image, model, args.k, where))]
    return [(args.audio, index.search_audio(args.audio, model, args.k, where))]


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
