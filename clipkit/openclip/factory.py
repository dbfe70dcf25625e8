"""open_clip's own factory, without silent downloads: an architecture by name (``ViT-B-32``) or
``local-dir:FOLDER``, with weights from a local file, the folder, or a zoo tag whose file is already in
the local Hugging Face cache.

An uncached tag fails at once naming the file to fetch and where to put it, unless ``allow_download``
is set. Evaluation (:mod:`clipkit.interop.openclip_models`) and fine-tuning
(:mod:`clipkit.openclip.towers`) both build their models here.
"""

from __future__ import annotations

import difflib
import functools
import logging
import pickle
from pathlib import Path
from typing import Any, Callable

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import nn

from clipkit.errors import PretrainedWeightsError

LOCAL_DIR_PREFIX = "local-dir:"
# The preprocessing settings a zoo tag may fix (open_clip's pretrained configs), by PreprocessCfg name.
TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _expand_local_dir(arch: str) -> str:
    """``local-dir:~/FOLDER`` with the folder expanded; a clear error when it holds no open_clip config."""
    if not arch.startswith(LOCAL_DIR_PREFIX):
        return arch
    folder = Path(arch[len(LOCAL_DIR_PREFIX):]).expanduser()
    if not (folder / HF_CONFIG_NAME).is_file():
        raise PretrainedWeightsError(f"{arch}: no {HF_CONFIG_NAME} in {folder} (a folder that open_clip's "
                                     f"save_for_hf or `clipkit export-open-clip` wrote)")
    return f"{LOCAL_DIR_PREFIX}{folder}"


def _unknown_architecture(arch: str) -> ValueError:
    close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
    return ValueError(f"unknown open_clip architecture {arch!r}{hint}")


def _cached_hub_file(hf_hub: str) -> str | None:
    """The path of a zoo file in the local Hugging Face cache, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    repo_id = hf_hub.rstrip("/")
    for filename in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME):
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):
            return path
    return None


def _missing_weights(arch: str, tag: str, pretrained_cfg: dict[str, Any]) -> PretrainedWeightsError:
    if pretrained_cfg.get("hf_hub"):
        repo = pretrained_cfg["hf_hub"].rstrip("/")
        where = (f"https://huggingface.co/{repo}/resolve/main/{HF_SAFE_WEIGHTS_NAME} (or `huggingface-cli "
                 f"download {repo} {HF_SAFE_WEIGHTS_NAME}`, which puts it in the Hugging Face cache where "
                 f"clipkit finds it by tag)")
    else:
        where = pretrained_cfg.get("url", "the URL open_clip lists for it")
    return PretrainedWeightsError(
        f"open_clip weights {arch}/{tag} are not on this machine and clipkit does not download them "
        f"unless asked. Fetch {where} on a machine with a network, then pass --pretrained "
        f"/path/to/{HF_SAFE_WEIGHTS_NAME}; or pass --allow-download to let open_clip fetch them."
    )


def _tag_settings(pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """The factory options a zoo tag was trained with: QuickGELU and its preprocessing."""
    preprocess = {key: pretrained_cfg[key] for key in TAG_PREPROCESS_KEYS if pretrained_cfg.get(key) is not None}
    return {"force_quick_gelu": pretrained_cfg.get("quick_gelu", False), "force_preprocess_cfg": preprocess}


def _tag_config(arch: str, tag: str) -> dict[str, Any]:
    pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise PretrainedWeightsError(
            f"--pretrained {tag!r} is neither a file nor an open_clip tag of {arch}; "
            f"its tags: {', '.join(tags) or 'none'}")
    return pretrained_cfg


def create_open_clip(arch: str, pretrained: str | None, device: str | torch.device, allow_download: bool,
                     load_weights: bool = True) -> nn.Module:
    """open_clip's model for ``arch`` with weights from ``pretrained``; ``model.visual.preprocess_cfg``
    holds its preprocessing settings.

    With ``load_weights`` false the architecture is built exactly as the weights would need it
    (a tag's QuickGELU and preprocessing included) with random weights and no file read: the way to
    rebuild a model whose weights come from elsewhere (a clipkit checkpoint).
    """
    if not load_weights:
        # open_clip warns "initialized randomly" for every build without weights: here that is the point.
        logging.disable(logging.WARNING)
        try:
            return _architecture_only(arch, pretrained, device)
        finally:
            logging.disable(logging.NOTSET)
    if arch.startswith(LOCAL_DIR_PREFIX):
        return open_clip.create_model(_expand_local_dir(arch), device=device)
    if open_clip.get_model_config(arch) is None:
        raise _unknown_architecture(arch)
    if pretrained is None:
        return open_clip.create_model(arch, device=device)
    if Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        try:
            return open_clip.create_model(arch, pretrained=str(path), device=device)
        except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused code in the pickle
            raise PretrainedWeightsError(f"--pretrained {path} is not a plain weights file: unpickling it would "
                                         f"run code, and weights load with weights_only=True ({err})") from err
        except RuntimeError as err:  # keys or shapes that do not fit the architecture
            raise PretrainedWeightsError(f"--pretrained {path} does not fit open_clip model {arch}: {err}") from err
    pretrained_cfg = _tag_config(arch, pretrained)
    cached = _cached_hub_file(pretrained_cfg["hf_hub"]) if pretrained_cfg.get("hf_hub") else None
    if cached is None:
        if not allow_download:
            raise _missing_weights(arch, pretrained, pretrained_cfg)
        return open_clip.create_model(arch, pretrained=pretrained, device=device)
    # Load the cached file directly (no hub round trip), with the settings the tag was trained with.
    return open_clip.create_model(arch, pretrained=cached, device=device, **_tag_settings(pretrained_cfg))


def _architecture_only(arch: str, pretrained: str | None, device: str | torch.device) -> nn.Module:
    """``arch`` with random weights, built as ``pretrained`` would need it: a tag fixes QuickGELU and
    preprocessing; a weights file (gone or not) fixes nothing."""
    if arch.startswith(LOCAL_DIR_PREFIX):
        return open_clip.create_model(_expand_local_dir(arch), device=device, load_weights=False,
                                      pretrained_text=False)
    if open_clip.get_model_config(arch) is None:
        raise _unknown_architecture(arch)
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    return open_clip.create_model(arch, device=device, pretrained_text=False,
                                  **(_tag_settings(tag_cfg) if tag_cfg else {}))


def eval_transform(model: nn.Module) -> Callable:
    """open_clip's evaluation transform for ``model`` (PIL image → normalised (3, S, S) tensor)."""
    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


@functools.lru_cache(maxsize=None)
def _preprocess_settings(arch: str, pretrained: str | None) -> tuple[tuple[str, Any], ...]:
    with torch.device("meta"):  # no memory, no initialisation: only the settings are read
        model = create_open_clip(arch, pretrained, "meta", allow_download=False, load_weights=False)
    return tuple(model.visual.preprocess_cfg.items())


def preprocess_settings(arch: str, pretrained: str | None) -> dict[str, Any]:
    """The final preprocessing settings (``PreprocessCfg`` fields: size, mean/std, interpolation, resize
    mode) that open_clip's factory gives ``arch`` with ``pretrained``, found without reading weights."""
    return dict(_preprocess_settings(arch, pretrained))


def architecture_config(arch: str, pretrained: str | None) -> dict[str, Any]:
    """open_clip's ``model_cfg`` for ``arch`` (a built-in name or ``local-dir:``), with a zoo tag's
    QuickGELU applied: what an exported folder's ``open_clip_config.json`` must hold to rebuild it."""
    arch = _expand_local_dir(arch)
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise _unknown_architecture(arch)
    if pretrained and not arch.startswith(LOCAL_DIR_PREFIX) and open_clip.get_pretrained_cfg(arch, pretrained).get(
            "quick_gelu", False):
        model_cfg["quick_gelu"] = True
    return model_cfg


def open_clip_tokenizer(arch: str) -> Callable:
    """open_clip's tokenizer for ``arch`` (strings → (N, context_length) token ids), or a clear error
    when it needs files (a Hugging Face tokenizer) that are not on this machine."""
    arch = _expand_local_dir(arch)
    try:
        return open_clip.get_tokenizer(arch)
    except OSError as err:  # a Hugging Face tokenizer that is not in the local cache
        text_cfg = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
        source = text_cfg.get("hf_tokenizer_name", "its Hugging Face tokenizer")
        raise PretrainedWeightsError(
            f"the tokenizer of open_clip model {arch} ({source}) is not on this machine: fetch it on a machine "
            f"with a network (`huggingface-cli download {source}` puts it in the Hugging Face cache where "
            f"clipkit finds it) ({' '.join(str(err).split())[:300]})") from err
