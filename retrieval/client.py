"""A small client for ``clipkit serve``: ``Client("http://127.0.0.1:8000").search(text="a red circle")``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from retrieval.index import Hit


class ServiceError(RuntimeError):
    """The service refused a request: ``status`` is the HTTP status, the message its ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    """Calls a running ``clipkit serve``; every method raises :class:`ServiceError` on a 4xx or 5xx."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def health(self) -> dict[str, Any]:
        return self._json(self._http.get("/health"))

    def indexes(self) -> list[dict[str, Any]]:
        """Each served index: name, vectors, dim, kind, model, text_and_image_queries, built."""
        return self._json(self._http.get("/indexes"))

    def item(self, index: str, item_id: int) -> dict[str, Any]:
        """One item's metadata."""
        return self._json(self._http.get(f"/indexes/{index}/items/{int(item_id)}"))["metadata"]

    def search(
        self,
        *,
        text: str | None = None,
        vector: Sequence[float] | None = None,
        image: bytes | str | Path | None = None,
        item: int | None = None,
        index: str | None = None,
        k: int = 10,
        where: Mapping[str, str | int | float | bool] | None = None,
    ) -> list[Hit]:
        """Up to ``k`` hits for one query: ``text``, a ``vector``, an ``image`` (its bytes, or a file on
        this machine, which is read here and uploaded) or the id of an indexed ``item`` ("more like
        this": the item's own vector)."""
        if sum(query is not None for query in (text, vector, image, item)) != 1:
            raise ValueError("give exactly one of text, vector, image and item")
        if image is not None:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            form = {"k": str(k), **({"index": index} if index else {}), **({"where": json.dumps(where)} if where else {})}
            response = self._http.post("/search/image", data=form, files={"file": ("query", data)})
        else:
            body: dict[str, Any] = {"k": k, "index": index, "where": dict(where) if where else None}
            if text is not None:
                body["text"] = text
            elif item is not None:
                body["item"] = int(item)
            else:
                body["vector"] = [float(v) for v in vector]
            response = self._http.post("/search", json=body)
        return [Hit(hit["id"], hit["score"], hit["metadata"]) for hit in self._json(response)["hits"]]

    def reload(self, index: str | None = None) -> list[str]:
        """Swap in the current version of ``index`` (default: every index served from a folder) now,
        without waiting for the server to notice; returns the names reloaded."""
        return self._json(self._http.post("/reload", params={"index": index} if index else None))["reloaded"]

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServiceError(response.status_code, detail if isinstance(detail, str) else json.dumps(detail))
        return response.json()
