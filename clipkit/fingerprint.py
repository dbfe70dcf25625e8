"""A model's identity: a content hash of its weights and of what else decides its embeddings.

Embedding folders, indexes and cached zero-shot classifiers record it, so that vectors of two models
are never mixed and a model is recognised whatever path it is loaded from (a path is only a hint).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def weights_fingerprint(model: nn.Module, description: Any) -> str:
    """32 hex digits hashing every tensor of ``model.state_dict()`` (name, dtype, shape and bytes, in
    the logical layout, so channels-last weights hash as their contiguous copy) and ``description``
    (JSON: the architecture and preprocessing settings). Any change of a weight changes it; hashing
    runs at about 1 GB/s, a second for a ViT-B/32."""
    digest = hashlib.blake2b(json.dumps(description, sort_keys=True, default=str).encode(), digest_size=16)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(json.dumps([name, str(flat.dtype), list(tensor.shape)]).encode())
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()
