"""What a resumed run may change: the checkpoint fixes the data position, the optimizer's state and
the model, so a config that differs there would continue silently somewhere else (a position counted
in other batches, a learning rate the restored scheduler overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipkit.config import ConfigError, ExperimentConfig

# How long the run goes on, where and how it computes, logs and checkpoints: none of it touches the
# data position, the optimizer or the model. (The number of data workers does move the position by
# the samples a worker had skipped, so it is allowed with a warning; see ShardStream.set_epoch.)
CHANGEABLE = {
    "train.max_steps", "train.epochs", "train.save_every", "train.keep_last", "train.log_every", "train.resume",
    "train.output_dir", "train.device", "train.collective_timeout_s", "train.compile", "train.grad_checkpointing", "train.channels_last",
    "data.num_workers", "data.worker_start_method", "data.max_skip_fraction", "data.eval_shards",
    "data.train_shards", "data.val_shards", "data.table_columns", "train.eval_every", "train.select_metric",
}

# How the global batch is split into ranks and micro-batches: free to change while its size stays.
SPLIT_OF_THE_BATCH = ("data.batch_size", "train.accum_freq")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "init_towers" and not key.endswith("kwargs"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(checkpoint: Path, saved_config: dict[str, Any], config: ExperimentConfig, saved_world: int | None,
                 world: int) -> dict[str, tuple[Any, Any]]:
    """Raise ConfigError naming every setting that differs from the checkpoint's and that a resumed
    run cannot change; return the changes it may make, ``{key: (old, new)}``, for the log."""
    old, new = _flatten(saved_config), _flatten(config.to_dict())
    changes = {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key)}
    refused = {key: values for key, values in changes.items() if key not in CHANGEABLE}
    saved_world = world if saved_world is None else saved_world
    saved_batch = old.get("data.batch_size", 0) * old.get("train.accum_freq", 1) * saved_world
    batch = config.data.batch_size * config.train.accum_freq * world
    if saved_batch == batch:  # the same global batch, split differently: the same optimization
        for key in SPLIT_OF_THE_BATCH:
            refused.pop(key, None)
    else:
        refused[f"the global batch (data.batch_size × train.accum_freq × {world} ranks, as it was over "
                f"{saved_world})"] = (saved_batch, batch)
    if refused:
        listed = "; ".join(f"{key} {before!r} → {after!r}" for key, (before, after) in refused.items())
        raise ConfigError(
            f"--resume {checkpoint}: a resumed run cannot change what fixes its data position, optimizer state "
            f"or model, and these differ from the checkpoint's: {listed}. Resume with the checkpoint's values "
            f"(its config.yaml), or start a new run in another train.output_dir")
    return changes
