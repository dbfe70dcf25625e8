"""WiSE-FT (Wortsman et al., 2022): weight-space ensembles of a fine-tuned model and the model it
started from, θ(α) = (1 − α)·θ_original + α·θ_fine-tuned, one checkpoint per α.

α = 0 is the original model, α = 1 the fine-tuned one; in between, models that often keep the
original's robustness with most of the fine-tuned accuracy. The original is a clipkit checkpoint of
the same architecture or, for a fine-tuned open_clip model, open_clip weights (a file, a cached zoo
tag or a ``local-dir:`` folder) of the fine-tuned model's architecture.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from clipkit.config import ExperimentConfig
from clipkit.openclip.factory import LOCAL_DIR_PREFIX
from clipkit.model import create_model
from clipkit.train.checkpoint import load_checkpoint, load_model, save_checkpoint


def interpolate(original: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·original + α·finetuned for every floating-point tensor; integer buffers (BatchNorm's
    step counts) are the fine-tuned model's. Both state dicts must have the same keys and shapes."""
    if original.keys() != finetuned.keys():
        differ = sorted(original.keys() ^ finetuned.keys())
        raise ValueError(f"the two models have different weights ({', '.join(differ[:5])}, ...): WiSE-FT needs "
                         "the fine-tuned model and the one it started from, of the same architecture")
    mixed = {}
    for key, tuned in finetuned.items():
        start = original[key].to(tuned.device)
        if start.shape != tuned.shape:
            raise ValueError(f"{key} has shape {tuple(start.shape)} in the original and {tuple(tuned.shape)} "
                             "in the fine-tuned model: not the same architecture")
        mixed[key] = torch.lerp(start, tuned, alpha) if tuned.is_floating_point() else tuned.clone()
    return mixed


def original_weights(config: ExperimentConfig, original: str) -> dict[str, torch.Tensor]:
    """The state dict of ``original`` in the fine-tuned model's layout: a clipkit checkpoint's, or open_clip
    weights (file, cached tag, ``local-dir:``) loaded into the fine-tuned model's open_clip architecture."""
    path = Path(original).expanduser()
    if path.is_file():
        try:
            return load_checkpoint(path)["model"]
        except ValueError:  # not a clipkit checkpoint: open_clip weights, if the model is an open_clip one
            if config.model.open_clip is None:
                raise
    if config.model.open_clip is None:
        raise ValueError(f"{original} is not a clipkit checkpoint; the fine-tuned model is no open_clip model, so "
                         "its original must be one")
    open_clip = config.model.open_clip
    source = (dataclasses.replace(open_clip, name=original, pretrained=None) if original.startswith(LOCAL_DIR_PREFIX)
              else dataclasses.replace(open_clip, pretrained=original))
    # Without init_towers: the original is the open_clip weights alone, not what a run put over them.
    return create_model(dataclasses.replace(config.model, open_clip=source, init_towers={})).state_dict()


def alpha_name(alpha: float) -> str:
    """The checkpoint file of ``alpha``: every alpha its own name (``repr`` keeps all its digits)."""
    return f"wise-ft-alpha-{float(alpha)!r}.pt"


def write_wise_ft(finetuned: str | Path, original: str, alphas: Sequence[float], out: str | Path) -> list[Path]:
    """One weights-only checkpoint per α in ``out`` (``wise-ft-alpha-0.5.pt``), with the fine-tuned model's
    config, so that ``clipkit eval`` / ``embed`` / ``export-open-clip`` take them like any checkpoint."""
    bad = [alpha for alpha in alphas if not 0 <= alpha <= 1]
    if bad or not alphas:
        raise ValueError(f"--alphas must be numbers in [0, 1], got {list(alphas)}")
    model, config = load_model(finetuned)
    # Copies: a state dict shares the parameters' storage, which each load_state_dict below overwrites.
    tuned = {key: value.clone() for key, value in model.state_dict().items()}
    start = original_weights(config, original)
    out = Path(out)
    paths = []
    for alpha in alphas:
        model.load_state_dict(interpolate(start, tuned, alpha))
        paths.append(save_checkpoint(out / alpha_name(alpha), model, config, wise_ft_alpha=alpha))
    return paths
