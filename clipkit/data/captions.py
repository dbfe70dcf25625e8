"""How captions are stored: a caption field holds one caption per line, or a JSON list of captions.

CLIP_benchmark's retrieval shards keep all captions of an image in one ``txt`` member, one per line
(its webdataset builder joins them with newlines and reads them back with ``splitlines``); other
tools write a JSON list. Both read as several captions everywhere clipkit reads captions: training
(one caption drawn per sample and epoch), evaluation, embedding and ``make-shards``.
"""

from __future__ import annotations

import json
from typing import Any, Sequence


def parse_captions(text: str) -> list[str]:
    """A caption field → its non-empty captions, stripped: a JSON list (``["a dog", "a puppy"]``),
    else one caption per line. A text that starts with ``[`` but is no JSON list is one caption."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value: Any = json.loads(stripped)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list):
            return clean_captions(value)
    return [line.strip() for line in stripped.splitlines() if line.strip()]


def clean_captions(values: Sequence[Any]) -> list[str]:
    """Caption values from a list → stripped non-empty strings, each line break inside one (whatever
    ``str.splitlines`` breaks at) made a space: in a ``txt`` member a line break separates captions."""
    joined = (" ".join(str(value).splitlines()).strip() for value in values)
    return [caption for caption in joined if caption]


def join_captions(captions: Sequence[str]) -> str:
    """Captions → the text of one ``txt`` member, one caption per line (what :func:`parse_captions` reads)."""
    return "\n".join(clean_captions(captions))
