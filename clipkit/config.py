"""Typed experiment configuration: dataclasses loaded from YAML, with dotted overrides.

A config file has three sections, ``model``, ``data`` and ``train``. Every key is checked against
the dataclasses below: an unknown or misspelt key, or a value of the wrong type, raises
:class:`ConfigError` naming the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the typed schema."""


# A modality's tower section (model.image, model.audio, ...) is a dataclass declared in the modality's own
# module, which registers it with its name (clipkit.modalities.base.register_modality). The sections are
# only known once the modality plug-ins are imported: reading them imports the plug-in package first
# (built-in modules and installed entry points), by name, so this module imports no modality code.
MODALITY_PLUGINS = "clipkit.modalities"
_MODALITY_SECTIONS: dict[str, type] = {}


def register_modality_section(name: str, section: type) -> None:
    """Make dataclass ``section`` the config section ``model.<name>``."""
    if not dataclasses.is_dataclass(section):
        raise TypeError(f"the config section of modality {name!r} must be a dataclass, got {section!r}")
    if name in {item.name for item in dataclasses.fields(_ModelSettings)}:
        raise ValueError(f"modality {name!r} would shadow the model config key of that name")
    known = _MODALITY_SECTIONS.setdefault(name, section)
    if known is not section:
        raise ValueError(f"modality {name!r} is registered twice ({known.__module__} and {section.__module__})")


def modality_sections() -> dict[str, type]:
    """Every registered modality's name → its config section's dataclass."""
    importlib.import_module(MODALITY_PLUGINS)
    return _MODALITY_SECTIONS


@dataclass
class OpenClipConfig:
    """Image and text towers taken from an open_clip model, with its temperature (and SigLIP bias),
    tokenizer and preprocessing. The model fixes what model.embed_dim and the model.image / model.text
    tower settings would say, so those stay unset (their `lock` still applies)."""

    # An open_clip architecture (open_clip.list_models(): ViT-B-32, RN50, ViT-B-16-SigLIP, ...) or
    # local-dir:FOLDER, a folder open_clip wrote (open_clip_config.json + weights).
    name: str = ""
    # Weights of a named architecture: a local file (.safetensors, .bin, .pt) or a zoo tag whose file is
    # already in the local Hugging Face cache (never downloaded). Unset: random weights, or a
    # local-dir: folder's own.
    pretrained: str | None = None
    # With model.image.lock / model.text.lock: the last this many layer groups of the tower stay
    # trainable (open_clip's --lock-image-unlocked-groups / --lock-text-unlocked-layers).
    lock_image_unlocked_groups: int = 0
    lock_text_unlocked_layers: int = 0


# What training learns from (clipkit.methods): "clip" aligns two modalities; "slip" adds a SimCLR loss on
# views of the image; the others learn an image tower from views of the image alone.
IMAGE_ONLY_METHODS = ("simclr", "moco", "byol", "simsiam")


@dataclass
class SelfSupervisedConfig:
    """The views and heads of the self-supervised methods. The heads sit on the image tower's embedding
    (``embed_dim``); they train with it and are kept in checkpoints, but evaluation embeds with the
    tower alone."""

    # Augmented views of each image (data.views says how they are augmented); the losses average over
    # every pair of them.
    views: int = 2

    # Projector: embed_dim → hidden_dim → … → projection_dim, BatchNorm and ReLU after each hidden
    # layer (the papers use 2 layers for SimCLR and BYOL, 3 for SimSiam and MoCo v3).
    projector_layers: int = 2
    hidden_dim: int = 2048
    projection_dim: int = 256
    # Predictor of BYOL, SimSiam and MoCo v3: projection_dim → predictor_hidden_dim → projection_dim.
    predictor_hidden_dim: int = 512
    # Softmax temperature of SimCLR's NT-Xent (and SLIP's) and of MoCo v3. Unset: the paper's, 0.1 for
    # SimCLR and SLIP, 0.2 for MoCo v3.
    temperature: float | None = None
    # The momentum target's EMA rate at the first step, rising to 1 on a cosine over the run (BYOL, MoCo
    # v3). Unset: the paper's, 0.996 for BYOL, 0.99 for MoCo v3.
    base_momentum: float | None = None
    # SLIP: the loss is the image–text loss + slip_weight × the SimCLR loss on the image's views.
    slip_weight: float = 1.0

    def __post_init__(self) -> None:
        check_ranges(
            ("views", self.views >= 2, "must be at least 2"),
            ("projector_layers", self.projector_layers >= 1, "must be at least 1"),
            ("hidden_dim", self.hidden_dim >= 1, "must be at least 1"),
            ("projection_dim", self.projection_dim >= 1, "must be at least 1"),
            ("predictor_hidden_dim", self.predictor_hidden_dim >= 1, "must be at least 1"),
            ("temperature", self.temperature is None or self.temperature > 0, "must be positive"),
            ("base_momentum", self.base_momentum is None or 0 <= self.base_momentum < 1, "must be in [0, 1)"),
            ("slip_weight", self.slip_weight > 0, "must be positive"),
        )


@dataclass
class _ModelSettings:
    """The fields of :class:`ModelConfig`, which adds the modality sections as keyword arguments."""

    embed_dim: int = 512
    # One tower each. Training aligns the first two (any pair: image-text, audio-text, video-text,
    # image-audio); further towers are carried along for evaluation, e.g. a locked text tower. The
    # image-only methods (simclr, moco, byol, simsiam) have the one tower [image].
    modalities: tuple[str, ...] = ("image", "text")
    # clip, slip, simclr, moco (v3), byol or simsiam: see clipkit.methods.
    method: Literal["clip", "slip", "simclr", "moco", "byol", "simsiam"] = "clip"
    ssl: SelfSupervisedConfig = field(default_factory=SelfSupervisedConfig)
    # model.image, model.text, model.audio, ...: one section per registered modality, its own dataclass.
    # A file and to_dict() write each beside the keys here, and each reads as an attribute
    # (model.image.image_size); a section left out holds its defaults.
    sections: dict[str, Any] = field(default_factory=dict, metadata={"flatten": modality_sections})
    # Initialise towers from clipkit checkpoints, e.g. {image: runs/toy-image-text/checkpoints/final.pt}
    # (a video tower takes a checkpoint's image tower as its frame encoder).
    init_towers: dict[str, str] = field(default_factory=dict)
    # "infonce" (CLIP's softmax over the batch) or "siglip" (a sigmoid per pair, with a learnable bias).
    loss: Literal["infonce", "siglip"] = "infonce"
    # The learnable logit scale is 1 / temperature, clamped at max_logit_scale. Unset, it starts where
    # the loss's paper starts it: 1 / 0.07 for InfoNCE (CLIP), 10 for SigLIP.
    init_logit_scale: float | None = None
    max_logit_scale: float = 100.0
    # SigLIP's learnable logit bias starts at -10: almost every pair in a batch is a non-match.
    init_logit_bias: float = -10.0
    # Fine-tune an open_clip model: its image and text towers, temperature and bias (model.open_clip.*).
    open_clip: OpenClipConfig | None = None

    def __post_init__(self) -> None:
        registered = modality_sections()
        known = f"registered: {', '.join(sorted(registered))}"
        for name in self.sections:
            check_ranges((name, name in registered, f"is not a modality section ({known})"))
        for name in self.modalities:
            check_ranges(("modalities", name in registered, f"names {name!r}, which is no registered modality ({known})"))
        for name, section in registered.items():
            given = self.sections.setdefault(name, section())
            if not isinstance(given, section):
                raise ConfigError(f"{name} must be {section.__name__}, got {_describe(given)}")
        image_only = self.method in IMAGE_ONLY_METHODS
        check_ranges(
            ("embed_dim", self.embed_dim >= 1, "must be at least 1"),
            ("modalities", image_only or len(set(self.modalities)) >= 2, "needs at least two distinct modalities"),
            ("modalities", not image_only or tuple(self.modalities) == ("image",),
             f"must be [image] with method {self.method} (it learns an image tower from views of the image "
             f"alone), got {list(self.modalities)}"),
            ("modalities", self.method != "slip" or self.modalities[0] == "image",
             f"must start with image with method slip (its SimCLR loss is on the image), got {list(self.modalities)}"),
            ("loss", not image_only or self.loss == "infonce",
             f"is the image-text loss; method {self.method} has its own and takes no model.loss"),
            ("open_clip", not image_only or self.open_clip is None,
             f"brings image and text towers; method {self.method} trains an image tower alone"),
            ("init_logit_scale", 0 < self.initial_logit_scale <= self.max_logit_scale,
             "must be positive and at most max_logit_scale"),
        )
        if self.open_clip is not None:
            self._check_open_clip()

    def _check_open_clip(self) -> None:
        """An open_clip model has exactly an image and a text tower, and its own sizes, preprocessing and
        temperature: a setting it would silently override is an error. (Checked here rather than in
        OpenClipConfig, whose own errors an optional section would report only as "must be OpenClipConfig".)"""
        open_clip = self.open_clip
        check_ranges(
            ("open_clip.name", bool(open_clip.name), "must name an open_clip architecture (e.g. ViT-B-32) or "
             "local-dir:FOLDER"),
            ("open_clip.lock_image_unlocked_groups", open_clip.lock_image_unlocked_groups >= 0, "must not be negative"),
            ("open_clip.lock_text_unlocked_layers", open_clip.lock_text_unlocked_layers >= 0, "must not be negative"),
            ("open_clip.pretrained", not (open_clip.name.startswith("local-dir:") and open_clip.pretrained),
             "must be left out with a local-dir: folder, which holds its own weights"),
            ("modalities", sorted(self.modalities) == ["image", "text"],
             f"must be [image, text] with open_clip (its two towers), got {list(self.modalities)}"),
        )
        defaults = ModelConfig()
        overridden = [key for key in ("embed_dim", "init_logit_scale") if getattr(self, key) != getattr(defaults, key)]
        for section in ("image", "text"):
            given, default = getattr(self, section), getattr(defaults, section)
            overridden += [f"{section}.{item.name}" for item in dataclasses.fields(given)
                           if item.name != "lock" and getattr(given, item.name) != getattr(default, item.name)]
        if overridden:
            raise ConfigError(f"{overridden[0]} is set by the open_clip model (model.open_clip.name "
                              f"{open_clip.name!r}) and must be left out")
        locks = (("image", "lock_image_unlocked_groups"), ("text", "lock_text_unlocked_layers"))
        for section, key in locks:
            check_ranges((f"open_clip.{key}", getattr(open_clip, key) == 0 or getattr(self, section).lock,
                    f"needs model.{section}.lock: true (it unlocks the last groups of a locked tower)"))

    @property
    def initial_logit_scale(self) -> float:
        if self.init_logit_scale is not None:
            return self.init_logit_scale
        return 10.0 if self.loss == "siglip" else 1 / 0.07

    def __getattr__(self, name: str) -> Any:
        """A modality's section: ``model.image``. (Only called for names that are no attribute.)"""
        sections = self.__dict__.get("sections")
        if sections is None or name not in sections:
            raise AttributeError(f"{type(self).__name__} has no attribute or modality section {name!r}")
        return sections[name]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MODALITY_SECTIONS and name not in self.__dataclass_fields__:
            self.sections[name] = value
        else:
            super().__setattr__(name, value)


class ModelConfig(_ModelSettings):
    """The model: its towers, the training method and the shared embedding. Besides the fields of
    :class:`_ModelSettings`, each modality's section is a keyword argument of its name, e.g.
    ``ModelConfig(image=ImageTowerConfig(image_size=64))``."""

    def __init__(self, **values: Any) -> None:
        sections = dict(values.pop("sections", None) or {})
        named = set(self.__dataclass_fields__)
        sections.update({key: values.pop(key) for key in [key for key in values if key not in named]})
        super().__init__(**values, sections=sections)


@dataclass
class AugmentConfig:
    """Training-time image augmentation; evaluation always resizes and centre-crops."""

    # Area fraction range of the random resized crop; (1.0, 1.0) disables cropping.
    crop_scale: tuple[float, float] = (0.9, 1.0)
    horizontal_flip: bool = False

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        check_ranges(("crop_scale", 0 < low <= high <= 1, "must be [low, high] with 0 < low <= high <= 1"))


@dataclass
class ViewsConfig:
    """The independently augmented views of each image that the self-supervised methods (and SLIP)
    compare (model.ssl.views of them): SimCLR's and BYOL's augmentations, every draw from the sample's
    seeded generator."""

    # Random resized crop down to 8% of the area, then a horizontal flip half the time.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    horizontal_flip: bool = True
    # Colour jitter (brightness, contrast, saturation, hue; in random order) with probability color_jitter_p.
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    # Gaussian blur with sigma in [0.1, 2.0] pixels.
    blur_p: float = 0.5
    # Pixels above 128 inverted.
    solarize_p: float = 0.1

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        brightness, contrast, saturation, hue = self.color_jitter
        check_ranges(
            ("crop_scale", 0 < low <= high <= 1, "must be [low, high] with 0 < low <= high <= 1"),
            ("color_jitter", min(brightness, contrast, saturation) >= 0 and 0 <= hue <= 0.5,
             "must be four non-negative strengths, the hue's at most 0.5"),
            *((key, 0 <= getattr(self, key) <= 1, "must be a probability in [0, 1]")
              for key in ("color_jitter_p", "grayscale_p", "blur_p", "solarize_p")),
        )


@dataclass
class DataConfig:
    # Brace-expandable shard patterns, e.g. "shards/train-{000000..000099}.tar"; several sources are
    # joined with "::", e.g. "a/train-{000..099}.tar::b/train-{000..009}.tar".
    train_shards: str = ""
    # Zero-shot classification shards (KEY.cls labels; classnames.txt and templates beside them or one
    # folder up, as `clipkit eval zeroshot` reads them), evaluated during training (train.eval_every).
    eval_shards: str = ""
    # Held-out image-text pairs: retrieval recall@1/5/10 both ways and the contrastive loss, evaluated
    # during training.
    val_shards: str = ""
    # train_shards / val_shards may name a .csv, .tsv or .jsonl of image paths (relative to the table)
    # and captions instead, converted into shards cached beside it. Its columns: {image: NAME,
    # caption: NAME}; a role left out is found by its usual names (image, filepath, path, file,
    # filename; caption, captions, title, text).
    table_columns: dict[str, str] = field(default_factory=dict)
    # Samples in one epoch. Without resampling, one pass over train_shards (read from sizes.json
    # beside the shards when unset); with resampling, required: no pass ever ends.
    train_num_samples: int | None = None
    # Draw training shards with replacement (every data worker, forever, seeded per epoch) instead of
    # reading each shard once per epoch: any number of ranks and workers, and weighted sources.
    resampled: bool = False
    # One weight per "::"-separated pattern of train_shards (resampled only): a shard is drawn with
    # probability proportional to its pattern's weight divided by that pattern's shard count.
    train_data_weights: list[float] | None = None
    batch_size: int = 256
    num_workers: int = 4
    # How data workers start. "auto": forkserver when audio or video is decoded (FFmpeg and other
    # threaded decoders must not be forked mid-flight), the platform default otherwise.
    worker_start_method: Literal["auto", "fork", "forkserver", "spawn"] = "auto"
    shuffle_buffer: int = 2000
    # Stop training when more than this fraction of the samples read so far were skipped as
    # undecodable or incomplete: a dataset that bad is broken, not noisy.
    max_skip_fraction: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The views of model.method simclr, moco, byol, simsiam and slip.
    views: ViewsConfig = field(default_factory=ViewsConfig)

    def __post_init__(self) -> None:
        weights = self.train_data_weights
        num_patterns = len([part for part in self.train_shards.split("::") if part])
        check_ranges(
            ("train_num_samples", self.train_num_samples is None or self.train_num_samples >= 1, "must be at least 1"),
            ("train_num_samples", self.train_num_samples is not None or not self.resampled,
             "must be set when resampled is true: it is the length of an epoch, as no pass over the shards ends"),
            ("train_data_weights", weights is None or self.resampled,
             "needs resampled: true (weights set how often shards are drawn with replacement)"),
            ("train_data_weights", weights is None or all(w > 0 for w in weights), "must all be positive"),
            ("train_data_weights", weights is None or not num_patterns or len(weights) == num_patterns,
             f"must give one weight per '::'-separated pattern of train_shards "
             f"({len(weights or [])} weights, {num_patterns} patterns)"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("num_workers", self.num_workers >= 0, "must not be negative"),
            ("shuffle_buffer", self.shuffle_buffer >= 0, "must not be negative"),
            ("max_skip_fraction", 0 < self.max_skip_fraction <= 1, "must be in (0, 1]"),
        )


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    epochs: int = 1
    # When set, training stops after this many optimizer steps, whatever `epochs` says.
    max_steps: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 1000
    # After warmup: "cosine" decays to 0; "constant" holds; "const-cooldown" holds, then decays
    # linearly to 0 over the last `cooldown_steps`.
    schedule: Literal["cosine", "constant", "const-cooldown"] = "cosine"
    cooldown_steps: int = 0
    device: str = "auto"
    # How long a rank waits in a collective (the gradient all-reduce, the loss's gathers) before it fails
    # with an error naming the lost rank, instead of hanging when a process or node of the job dies or
    # stalls. It must outlast rank 0's evaluations and checkpoint saves, which the others wait through.
    collective_timeout_s: float = 1800.0
    # "auto": bf16 autocast on CUDA, fp32 on the CPU. "fp16" adds a gradient scaler.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # How a torchrun job spreads the model over its ranks. "ddp": every rank holds the whole model,
    # its gradients and optimizer state (DistributedDataParallel). "fsdp": each rank holds 1/N of them
    # (FSDP2, one shard group per block of each tower), gathering a block's weights only while it runs;
    # in bf16 its weights are gathered in bf16 and gradients reduced in fp32. Its checkpoints are
    # folders (torch.distributed.checkpoint) that resume on any number of ranks.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    grad_clip_norm: float | None = None
    # Recompute tower activations in the backward pass (where timm / the text tower support it).
    grad_checkpointing: bool = False
    # Convolution weights and image batches in channels-last (NHWC) memory: the layout tensor cores and
    # oneDNN convolve fastest. On a 2-core CPU it cut the CPU time of the quickstart's training step by a
    # quarter and of a ResNet-18 one by a tenth; a ViT (one convolution) is unaffected. DDP only: FSDP
    # shards contiguous weights only.
    channels_last: bool = True
    # torch.compile the model: fused kernels for forward and backward after a compile of minutes on the
    # first step (a C++ compiler on CPUs). Worth it for long GPU runs, not for short CPU ones.
    compile: bool = False
    # Optimizer step every `accum_freq` micro-batches of data.batch_size, with the loss over all of
    # them together (contrastive semantics of one batch of accum_freq × batch_size).
    accum_freq: int = 1
    # InfoNCE across ranks: each rank scores its own rows against all columns (less memory, same result).
    local_loss: bool = False
    # Checkpoint every this many steps (and at the end, and on SIGTERM / SIGINT); keep the newest `keep_last`.
    save_every: int | None = None
    keep_last: int = 2
    # "latest" (the newest checkpoint in output_dir) or a checkpoint path to continue from.
    resume: str | None = None
    seed: int = 0
    log_every: int = 10
    # Layer-wise learning-rate decay (BEiT, open_clip fine-tuning recipes): the last block of each tower
    # learns at train.lr, each block below it at layer_decay times the block above; embeddings and stems
    # lowest. Unset: every parameter at train.lr.
    layer_decay: float | None = None
    # Evaluate on data.eval_shards / data.val_shards every this many steps, or after every "epoch";
    # whenever either is set, also once at the end of training.
    eval_every: int | Literal["epoch"] | None = None
    # The evaluation metric that picks checkpoints/best.pt: acc1, acc5, mean_per_class_recall,
    # image_retrieval_recall@K, text_retrieval_recall@K (K = 1, 5, 10; "audio_…" / "video_…" for those
    # towers; higher is better) or val_loss (lower is better). Unset: acc1 with eval_shards, else
    # image_retrieval_recall@1.
    select_metric: str | None = None

    @property
    def uses_channels_last(self) -> bool:
        """Whether weights and image batches go channels-last: never under FSDP, which shards only
        contiguous (channels-first) weights."""
        return self.channels_last and self.parallel == "ddp"

    def __post_init__(self) -> None:
        check_ranges(
            ("epochs", self.epochs >= 1, "must be at least 1"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be at least 1"),
            ("lr", self.lr > 0, "must be positive"),
            ("weight_decay", self.weight_decay >= 0, "must not be negative"),
            ("betas", all(0 <= b < 1 for b in self.betas), "must both be in [0, 1)"),
            ("eps", self.eps > 0, "must be positive"),
            ("warmup_steps", self.warmup_steps >= 0, "must not be negative"),
            ("cooldown_steps", self.cooldown_steps >= 0, "must not be negative"),
            ("collective_timeout_s", self.collective_timeout_s > 0, "must be positive"),
            ("grad_clip_norm", self.grad_clip_norm is None or self.grad_clip_norm > 0, "must be positive"),
            ("accum_freq", self.accum_freq >= 1, "must be at least 1"),
            ("save_every", self.save_every is None or self.save_every >= 1, "must be at least 1"),
            ("keep_last", self.keep_last >= 1, "must be at least 1"),
            ("log_every", self.log_every >= 1, "must be at least 1"),
            ("layer_decay", self.layer_decay is None or 0 < self.layer_decay <= 1, "must be in (0, 1]"),
            ("eval_every", self.eval_every in (None, "epoch") or self.eval_every >= 1, "must be at least 1"),
            ("device", DEVICE_NAME.fullmatch(self.device) is not None,
             f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}"),
            ("precision", not (self.parallel == "fsdp" and self.precision == "fp16"),
             "fp16 needs a gradient scaler, which does not see FSDP's sharded gradients: with "
             "train.parallel fsdp use bf16 (or auto, bf16 on GPUs)"),
        )


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of builtins (safe for YAML, JSON and ``weights_only`` checkpoints)."""
        return section_dict(self)


def section_dict(section: Any) -> dict[str, Any]:
    """A config dataclass as the plain nested dict a file holds: builtins only, the modality sections
    beside the model's other keys."""
    out: dict[str, Any] = {}
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if "flatten" in item.metadata:
            out.update({name: _to_builtin(child) for name, child in value.items()})
        else:
            out[item.name] = _to_builtin(value)
    return out


def bundled_configs_dir() -> Path:
    """The configs that ship with clipkit: ``clipkit/configs/`` in an installed wheel, the repository's
    top-level ``configs/`` in a source checkout (an editable install)."""
    package = Path(__file__).resolve().parent
    for folder in (package / "configs", package.parent / "configs"):
        if folder.is_dir():
            return folder
    raise ConfigError(f"clipkit's bundled configs are missing (looked in {package / 'configs'}): reinstall clipkit")


def bundled_configs() -> list[Path]:
    """The bundled config files, by name."""
    return sorted(bundled_configs_dir().glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config file as given (relative to the current folder), or else the bundled config of that
    file name: ``configs/toy-image-text.yaml``, ``toy-image-text.yaml`` and ``toy-image-text`` all
    name the bundled quickstart config from any folder."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml"
    bundled = bundled_configs_dir() / name
    if not given.is_absolute() and bundled.is_file():
        return bundled
    names = ", ".join(p.name for p in bundled_configs())
    raise ConfigError(f"config file not found: {given} (nor a bundled config of that name; bundled: {names})")


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config file and apply ``key.path=value`` overrides on top of it.

    Overrides are merged before validation, so an override may complete the file (e.g. a file with
    ``train_data_weights`` plus ``--set data.resampled=true``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as fh:
        raw = _parse_yaml(fh.read(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    source = f"{path} with --set overrides" if overrides else str(path)
    return from_dict(ExperimentConfig, _merge_overrides(raw, overrides or []), source=source)


def apply_overrides(config: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Return a copy of ``config`` with each ``a.b.c=value`` override applied (value parsed as YAML)."""
    return from_dict(ExperimentConfig, _merge_overrides(config.to_dict(), overrides), source="--set overrides")


def _merge_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` override in the nested dict ``raw`` (in place; returns it)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        node, schema = raw, ExperimentConfig
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            # A section the file leaves out (all defaults) is created; a key that is no section is an error.
            hint = _section_schemas(schema).get(part) if schema is not None else None
            schema = hint if dataclasses.is_dataclass(hint) else None
            child = node.setdefault(part, {}) if schema is not None else node.get(part)
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {item!r}: {where!r} is not a config section")
            node = child
        node[parts[-1]] = _parse_yaml(text, f"--set {item!r}: the value") if text else ""
    return raw


def _parse_yaml(text: str, where: str) -> Any:
    """YAML as plain data; a syntax error or a tag that would build an object (``!!python/...``) is a
    ConfigError naming ``where`` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{where} is not valid YAML ({detail})") from None


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def from_dict(cls: type, raw: Any, *, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, checking every key and value type."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    flattened = {item.name: item.metadata["flatten"]() for item in dataclasses.fields(cls) if "flatten" in item.metadata}
    names = [item.name for item in dataclasses.fields(cls) if item.name not in flattened]
    names += [name for sections in flattened.values() for name in sections]
    unknown = [key for key in raw if key not in names]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else f" (known keys: {', '.join(names)})"
        raise ConfigError(f"{source}: unknown key {prefix + key!r}{hint}")
    values = {name: _convert(hints[name], value, source=source, key=f"{prefix}{name}")
              for name, value in raw.items() if name in hints}
    for field_name, sections in flattened.items():
        values[field_name] = {name: from_dict(section, raw[name], source=source, prefix=f"{prefix}{name}.")
                              for name, section in sections.items() if name in raw}
    try:
        return cls(**values)
    except ConfigError as err:  # a range check in __post_init__: add the file and the section
        raise ConfigError(f"{source}: {prefix}{err}") from None


def _section_schemas(cls: type) -> dict[str, Any]:
    """Each key of dataclass ``cls`` → its type, a modality section's name → that section's dataclass."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if "flatten" in item.metadata:
            hints.pop(item.name)
            hints.update(item.metadata["flatten"]())
    return hints


def check_ranges(*rules: tuple[str, bool, str]) -> None:
    """Range checks run when a config section is built: ``(key, ok, message)`` → ConfigError if not ok."""
    for key, ok, message in rules:
        if not ok:
            raise ConfigError(f"{key} {message}")


DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _convert(hint: Any, value: Any, *, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key} must be {expected}, got {_describe(value)}")

    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source=source, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            # An optional section: its own error (an unknown key, with a "did you mean") is the useful one.
            return _convert(options[0], value, source=source, key=key)
        for option in options:
            try:
                return _convert(option, value, source=source, key=key)
            except ConfigError:
                continue
        fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if hint is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept numeric text so configs read naturally.
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail(f"a list ({_type_name(hint)})")
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                fail(f"a list of {len(args)} items")
            item_types = list(args)
        return tuple(
            _convert(t, v, source=source, key=f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))
        )
    if origin is list:
        if not isinstance(value, list):
            fail("a list")
        return [_convert(args[0], v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return {str(k): _convert(args[1], v, source=source, key=f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _to_builtin(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return section_dict(value)
    if isinstance(value, dict):
        return {k: _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    return value
