"""``clipkit serve``: a JSON search service over saved indexes, on FastAPI and uvicorn.

    GET  /health                      {"status": "ok", "indexes": [names]}
    GET  /indexes                     each index's name, vectors, dimension, kind, model and whether
                                      it answers text and image queries
    GET  /indexes/{name}/items/{id}   one item's metadata
    GET  /indexes/{name}/items/{id}/media   the item's image, audio or video file (?frame=0.5: the
                                      middle frame of a video, as a JPEG)
    GET  /                            the search page (retrieval/page.html; no assets from elsewhere)
    POST /search                      JSON {"index", "text" | "vector" | "item", "k", "where"} → hits
                                      ("item": an indexed item's id, "more like this")
    POST /search/image                multipart: the image file, with "index", "k" and "where" (JSON)
    POST /reload[?index=NAME]         swap in the current version of the index(es) in their folders
    GET  /metrics                     Prometheus: requests by route and status, seconds per stage
                                      (encode, search, metadata, media), reloads

A bad request gets a 4xx whose ``detail`` says what to fix: 400 for a query the index cannot answer
(wrong vector dimension, an undecodable image, text on an index served without a model), 404 for an
unknown index or item, 409 for a reload whose new version does not open (the old one is still
served), 413 for an upload over the limit, 422 for a body that is not the schema.
Nothing a client sends becomes a file-system path: uploads are decoded from their bytes and index
names are looked up among the indexes the server was started with, whose folders alone are reloaded.
A rebuilt folder is swapped in whole, while the old version answers (:mod:`retrieval.served`).

One worker thread answers every query and reads every item: indexes are opened on another thread
(at start-up and on reload) but used by one thread at a time, and on a CPU one query's torch and
FAISS kernels already use every core, so a second query in parallel would only slow the first down.
Queries that arrive while it works are answered together as the next batch
(:mod:`retrieval.query_batch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi import Query as QueryParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from retrieval.media import MediaNotFound, MediaReader, NotAVideo
from retrieval.query_batch import Answer, Query, QueryBatcher, QueryRefused
from retrieval.served import IndexSource, ReloadFailed, ServedIndex, ServedIndexes

MAX_K = 1000
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_TEXT_CHARS = 2000
PAGE = files("retrieval").joinpath("page.html").read_text(encoding="utf-8")
FilterValue = StrictStr | StrictInt | StrictFloat | StrictBool
T = TypeVar("T")


class SearchRequest(BaseModel):
    """A text, vector or item ("more like this") query."""

    model_config = ConfigDict(extra="forbid")

    index: str | None = Field(None, description="the index to search (may be left out when one is served)")
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(None, min_length=1)
    item: int | None = Field(None, ge=0, description="the id of an indexed item: search by its stored vector")
    k: int = Field(10, ge=1, le=MAX_K)
    where: dict[str, FilterValue] | None = Field(None, description="metadata field → value every hit must have")

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        if sum(given is not None for given in (self.text, self.vector, self.item)) != 1:
            raise ValueError("give exactly one of text, vector and item")
        return self


def _answer_json(answer: Answer) -> dict[str, Any]:
    return {"hits": [{"id": hit.id, "score": hit.score, "metadata": hit.metadata} for hit in answer.hits],
            "seconds": answer.seconds, "batch": answer.batch}


class _Metrics:
    """The service's Prometheus metrics, in a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("clipkit_serve_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.stage = Histogram("clipkit_serve_stage_seconds", "Seconds per stage of one batch of queries",
                               ["stage"], registry=self.registry,
                               buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.batch = Histogram("clipkit_serve_batch_queries", "Queries answered together", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.reloads = Counter("clipkit_serve_reloads", "New index versions swapped in, or refused",
                               ["index", "outcome"], registry=self.registry)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(stage).observe(seconds)


def create_app(sources: Mapping[str, IndexSource], watch_seconds: float = 0.0) -> FastAPI:
    """The service for the indexes ``sources`` open (name → :class:`IndexSource`), opened here; every
    ``watch_seconds`` (0: never) each directory is checked for a new version, swapped in whole."""
    metrics = _Metrics()
    served = ServedIndexes(sources, lambda name, outcome: metrics.reloads.labels(name, outcome).inc())
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipkit-serve")
    media_reader = MediaReader()
    batcher = QueryBatcher(worker, metrics.observe_stage, metrics.batch.observe)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(batcher.run())]
        if watch_seconds > 0:
            tasks.append(asyncio.create_task(served.watch(watch_seconds)))
        yield
        for task in tasks:  # uvicorn has drained the requests in flight
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        worker.shutdown(wait=True)
        served.close()

    app = FastAPI(title="clipkit search", description="kNN search over clipkit indexes", lifespan=lifespan)

    async def on_worker(stage: str, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the worker thread, its seconds observed as ``stage``."""
        def timed() -> T:
            start = time.perf_counter()
            try:
                return function(*args)
            finally:
                metrics.observe_stage(stage, time.perf_counter() - start)

        return await asyncio.get_running_loop().run_in_executor(worker, timed)

    def chosen(name: str | None) -> tuple[str, ServedIndex]:
        if name is None:
            if len(served) > 1:
                raise HTTPException(400, f"several indexes are served; name one with index: {sorted(served)}")
            name = next(iter(served))
        if name not in served:
            raise HTTPException(404, f"no index named {name!r}; served: {sorted(served)}")
        return name, served[name]

    def with_model(name: str, entry: ServedIndex, what: str) -> Any:
        if entry.model is None:
            raise HTTPException(400, f"index {name!r} is served without a model, so it takes vector and item "
                                     f"queries only, not {what}")
        return entry.model

    async def answer(query: Query) -> JSONResponse:
        try:
            # A JSONResponse is written as it is; a returned dict would first go through FastAPI's
            # jsonable_encoder, item by item, on every query.
            return JSONResponse(_answer_json(await batcher.ask(query)))
        except QueryRefused as err:
            raise HTTPException(err.status, str(err)) from None

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input back, and a NaN in it cannot be written as JSON (a
        # 500); the field and the reason are what the client needs.
        return JSONResponse({"detail": _validation_message(error)}, status_code=422)

    app.add_middleware(_CountAndLimit, count=lambda route, status: metrics.requests.labels(route, status).inc())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "indexes": sorted(served)}

    @app.get("/indexes")
    async def indexes() -> list[dict[str, Any]]:
        return [{"name": name, "vectors": len(entry.index), "dim": entry.index.dim, "kind": entry.index.kind,
                 "model": entry.index.model_name, "text_and_image_queries": entry.model is not None,
                 "built": entry.index.manifest.created}
                for name, entry in sorted(served.items())]

    @app.get("/indexes/{name}/items/{item_id}")
    async def item(name: str, item_id: int) -> dict[str, Any]:
        _, entry = chosen(name)
        found = await on_worker("metadata", entry.index.store.get, [item_id])
        if item_id not in found:
            raise HTTPException(404, f"index {name!r} has no item {item_id}")
        return {"id": item_id, "metadata": found[item_id]}

    @app.get("/indexes/{name}/items/{item_id}/media")
    async def media(name: str, item_id: int,
                    frame: Annotated[float | None, QueryParameter(ge=0, le=1, description="for a video: a "
                                     "JPEG of the frame this far into it (0 the first, 1 the last)")] = None
                    ) -> Response:
        found = await item(name, item_id)

        def read() -> tuple[bytes, str]:
            if frame is not None:
                return media_reader.frame(found["metadata"], frame), "image/jpeg"
            return media_reader.read(found["metadata"])

        try:
            data, media_type = await on_worker("media", read)
        except MediaNotFound as err:
            raise HTTPException(404, f"item {item_id} of {name!r}: {err}") from None
        except NotAVideo as err:
            raise HTTPException(400, f"item {item_id} of {name!r}: {err}; leave out frame") from None
        return Response(data, media_type=media_type, headers={"cache-control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.post("/search")
    async def search_json(query: SearchRequest) -> JSONResponse:
        name, entry = chosen(query.index)
        if query.text is not None:
            return await answer(Query(entry.index, with_model(name, entry, "text"), query.k, query.where,
                                      text=query.text))
        if query.item is not None:
            return await answer(Query(entry.index, entry.model, query.k, query.where, item=query.item))
        return await answer(Query(entry.index, entry.model, query.k, query.where,
                                  vector=np.asarray(query.vector, dtype=np.float32)))

    @app.post("/search/image")
    async def search_image(file: Annotated[UploadFile, File()], index: Annotated[str | None, Form()] = None,
                           k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
                           where: Annotated[str | None, Form()] = None) -> JSONResponse:
        name, entry = chosen(index)
        model = with_model(name, entry, "images")
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"the upload is over the limit of {MAX_UPLOAD_BYTES} bytes")
        return await answer(Query(entry.index, model, k, _parse_where(where), image=data))

    @app.post("/reload")
    async def reload(index: str | None = None) -> dict[str, Any]:
        """Swap in the current version of ``index`` (default: of every index served from a directory)."""
        names = [chosen(index)[0]] if index is not None else [name for name in served if served.reloadable(name)]
        if index is not None and not served.reloadable(index):
            raise HTTPException(400, f"index {index!r} is served from memory, not from a directory to reload")
        for name in names:
            try:
                await served.reload(name)
            except ReloadFailed as err:
                raise HTTPException(409, str(err)) from None
        return {"reloaded": names, "indexes": await indexes()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _CountAndLimit:
    """ASGI middleware: answers 413 to a body over the upload limit from its Content-Length, before
    it is read, and counts every response by route and status. (A plain ASGI class, not
    ``@app.middleware``: Starlette's BaseHTTPMiddleware runs each request through extra streams
    and tasks, a cost every query would pay.)"""

    def __init__(self, app: Callable, count: Callable[[str, str], None]) -> None:
        self._app = app
        self._count = count

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_UPLOAD_BYTES + 64 * 1024:
            refusal = JSONResponse({"detail": f"request body of {int(length)} bytes is over the limit of "
                                              f"{MAX_UPLOAD_BYTES} bytes"}, status_code=413)
            await refusal(scope, receive, send)
            self._count("unmatched", "413")
            return
        status = 500  # unless a response starts: an exception escapes to Starlette's 500 handler

        async def noting_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, noting_status)
        finally:
            route = scope.get("route")  # FastAPI's router records the route it matched in the scope
            self._count(route.path if route is not None else "unmatched", str(status))


def _validation_message(error: RequestValidationError) -> str:
    """'k: Input should be less than or equal to 1000; vector.0: ...' for each problem of a request."""
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"] if part != "body")
        problems.append(f"{where}: {problem['msg']}" if where else problem["msg"])
    return "; ".join(problems)


def _parse_where(text: str | None) -> dict[str, Any] | None:
    """The multipart form's ``where``: a JSON object of field → string, number or boolean."""
    if text is None or not text.strip():
        return None
    try:
        where = json.loads(text)
    except json.JSONDecodeError as err:
        raise HTTPException(422, f"where must be a JSON object: {err}") from None
    if not isinstance(where, dict) or not all(isinstance(v, (str, int, float, bool)) for v in where.values()):
        raise HTTPException(422, "where must be a JSON object of field → string, number or boolean")
    return where
