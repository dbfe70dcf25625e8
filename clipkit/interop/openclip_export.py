"""Export a clipkit image–text checkpoint as an open_clip model folder.

A fine-tuned open_clip model (``model.open_clip``) goes back as its own architecture with the trained
weights. Otherwise, the folder holds ``open_clip_config.json`` (open_clip's ``model_cfg`` + ``preprocess_cfg``) and
``open_clip_model.safetensors``: ``open_clip.create_model_and_transforms("local-dir:FOLDER")`` builds
the matching architecture (a timm image tower with a linear projection, open_clip's own text
transformer, ``custom_text``) and loads the weights with strict key matching.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from safetensors.torch import save_file

from clipkit.config import ModelConfig
from clipkit.openclip.factory import architecture_config, preprocess_settings
from clipkit.openclip.towers import to_open_clip_state
from clipkit.modalities.openclip import tokenizer_of
from clipkit.train.checkpoint import load_model

# Renames from clipkit's module tree to open_clip's CustomTextCLIP (visual = TimmModel, text = TextTransformer).
KEY_PREFIXES = (
    ("towers.image.trunk.", "visual.trunk."),
    ("towers.image.proj.", "visual.head.proj."),
    ("towers.text.", "text."),
)


class ExportError(ValueError):
    """The checkpoint has a part that open_clip cannot express."""


def open_clip_model_config(config: ModelConfig) -> dict[str, Any]:
    """open_clip's ``model_cfg`` for the architecture of a clipkit image–text model."""
    extra = set(config.modalities) - {"image", "text"}
    if extra or set(config.modalities) != {"image", "text"}:
        raise ExportError(f"open_clip has image and text towers only; this model's {', '.join(sorted(extra)) or 'towers'} "
                          f"({', '.join(config.modalities)}) have no open_clip equivalent")
    image = config.image
    timm_kwargs = dict(image.timm_kwargs)
    drop_path = timm_kwargs.pop("drop_path_rate", None)
    if timm_kwargs:
        # open_clip's TimmModel passes no other keyword arguments to timm.create_model.
        raise ExportError(f"model.image.timm_kwargs {sorted(timm_kwargs)} have no open_clip equivalent "
                          "(its timm tower takes only drop_path_rate)")
    text = config.text
    model_cfg: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "custom_text": True,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": image.image_size,
            "timm_model_name": image.timm_name,
            "timm_model_pretrained": False,
            "timm_pool": "",  # keep the trunk's own pooling, as clipkit's tower does
            "timm_proj": "linear",
            "timm_proj_bias": False,
            "timm_drop_path": drop_path,
        },
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.layers,
            "mlp_ratio": text.mlp_ratio,
            "no_causal_mask": not text.causal,
            "pool_type": "argmax",
        },
    }
    if config.loss == "siglip":
        model_cfg["init_logit_bias"] = config.init_logit_bias
    return model_cfg


def open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clipkit parameter names → open_clip's, tensors made contiguous (safetensors needs it)."""
    renamed = {}
    for key, tensor in state.items():
        for old, new in KEY_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = tensor.detach().cpu().contiguous()
    return renamed


def fine_tuned_open_clip_config(config: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model_cfg`` and ``preprocess_cfg`` of a fine-tuned open_clip model: its architecture's own
    (a CLIP fine-tuned with the sigmoid loss gains SigLIP's bias)."""
    model_cfg = architecture_config(config.open_clip.name, config.open_clip.pretrained)
    if config.loss == "siglip" and model_cfg.get("init_logit_bias") is None:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    return model_cfg, preprocess_settings(config.open_clip.name, config.open_clip.pretrained)


def export_to_open_clip(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``checkpoint`` as an open_clip model folder at ``out`` (replaced atomically)."""
    model, config = load_model(checkpoint)
    tokenizer_files = None
    if config.model.open_clip is not None:
        model_cfg, preprocess_cfg = fine_tuned_open_clip_config(config.model)
        state = to_open_clip_state(model.state_dict(), model_cfg)
        # A local-dir: folder's Hugging Face tokenizer is read from the folder itself.
        tokenizer_files = getattr(tokenizer_of(config.model.open_clip.name), "save_pretrained", None)
    else:
        model_cfg = open_clip_model_config(config.model)
        preprocess_cfg = {"size": config.model.image.image_size, "mean": list(config.model.image.mean),
                          "std": list(config.model.image.std), "interpolation": "bicubic", "resize_mode": "shortest"}
        state = open_clip_state_dict(model.state_dict())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(state, staging / HF_SAFE_WEIGHTS_NAME)
        (staging / HF_CONFIG_NAME).write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
        if tokenizer_files is not None:
            tokenizer_files(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
