"""Opening shards that are not local files: ``http(s)://`` URLs, ``pipe:`` commands and the object
stores fsspec knows (``s3://``, ``gs://``, ...), and the small files published beside them
(``sizes.json``, ``classnames.txt``). Plain Python, no torch.

HTTP is read with the standard library rather than webdataset's ``curl`` pipe, so that a server that
stalls raises a timeout here instead of leaving a child process waiting, and a connection dropped
mid-shard raises ``http.client.IncompleteRead`` from the read that lost it.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from clipkit.errors import DataError

# Seconds a read from an HTTP server may wait for bytes before the shard counts as broken (and is retried).
HTTP_TIMEOUT_S = 60.0
# A remote shard whose read fails is read again this many times; each attempt skips the samples
# already delivered.
REMOTE_SHARD_RETRIES = 3
# Seconds before the first retry, doubled for each next one (0.5 + 1 + 2 s in all).
REMOTE_RETRY_PAUSE_S = 0.5
CACHE = Path.home() / ".cache" / "clipkit" / "remote"


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def open_shard(url: str) -> BinaryIO:
    """A readable binary stream of the remote shard ``url`` (``pipe:`` included)."""
    if is_http(url):
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)  # noqa: S310 (http(s) only)
    if url.startswith("pipe:"):
        from webdataset import gopen

        return gopen(url)
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError as err:  # fsspec names the package the scheme needs, e.g. s3fs for s3://
        raise DataError(f"cannot open {url}: {err}") from err


def parent_url(url: str) -> str:
    """The "folder" of a URL: everything up to its last slash."""
    return url.rsplit("/", 1)[0]


def fetch_text(url: str) -> str | None:
    """The text of a small remote file, or None when the server says it is not there (404); any other
    failure is a :class:`DataError` naming the URL."""
    try:
        with open_shard(url) as stream:
            return stream.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise DataError(f"could not fetch {url}: HTTP {err.code} {err.reason}") from err
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DataError(f"could not fetch {url}: {err}") from err


def cached_side_file(url: str) -> Path | None:
    """A remote side file (``classnames.txt`` beside remote shards) copied into the local cache, for
    readers that take paths; None if the server has none."""
    text = fetch_text(url)
    if text is None:
        return None
    folder = CACHE / hashlib.sha1(parent_url(url).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / url.rsplit("/", 1)[1]
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text, encoding="utf-8")
    shutil.move(partial, path)
    return path
