"""Training-step throughput, clipkit's trainer against open_clip's, on the same model and batches.

    python benchmarks/train_step.py                      # CPU: ViT-Ti/16 + 4-layer text, batch 32
    python benchmarks/train_step.py --preset small-resnet  # the same with a ResNet-18 tower
    python benchmarks/train_step.py --preset vit-b-16    # GPU: open_clip's ViT-B-16, batch 256, bf16
    python benchmarks/train_step.py --preset open-clip-vit  # CPU: an open_clip ViT-Ti/16 in model.open_clip
    python benchmarks/train_step.py --device cuda --preset open-clip-vit-b-32  # GPU: ViT-B-32, batch 256, bf16

A step is forward, loss, backward and optimizer update, as each trainer runs it: clipkit's
``Trainer.train_step`` and open_clip's ``open_clip_train.train.train_one_epoch`` (its model from
``create_model_and_transforms``, AdamW with its parameter groups, cosine schedule, ``ClipLoss``). Both
models are one timm tower plus open_clip's text transformer with the same widths (the parameter
counts are printed). The ``open-clip-*`` presets train one open_clip architecture on both sides:
clipkit through ``model.open_clip``, open_clip as it trains its own models, both from the same random
weights (written once by open_clip's ``save_for_hf`` and loaded as ``pretrained``). Batches are made
once from the same 512-px toy shards, by each trainer's own
decoding: clipkit's loader (uint8 crops), open_clip's train transform and tokenizer (float crops);
the loaders themselves are measured by ``data_pipeline.py``.

Every variant runs in this one process, in alternating blocks of steps, so drift on a shared
machine hits all alike. Printed: samples/s and CPU time per sample (all threads; what other load on
the machine does not inflate) per variant, median and range of the blocks, their ratios to open_clip,
the memory a step adds on top of the resident model (peak CUDA allocation on a GPU,
peak resident set on a CPU), the optimizer step alone with each AdamW implementation, and on a GPU
the model FLOPs utilisation (model FLOPs counted by ``torch.utils.flop_counter``). Figures are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import io
import itertools
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

import _common

if TYPE_CHECKING:
    from clipkit.config import ModelConfig

NUM_BATCHES = 2  # distinct batches each variant cycles through (the step's cost does not depend on them)


@dataclass(frozen=True)
class Preset:
    """One model (timm image tower + text transformer) and batch size, as both trainers build it."""

    timm_name: str
    image_size: int
    embed_dim: int
    text_width: int
    text_heads: int
    text_layers: int
    batch_size: int
    context_length: int = 77
    vocab_size: int = 49408

    def open_clip_config(self) -> dict:
        """open_clip's model config (JSON) for the same model: timm trunk with its own pooling, linear
        projection without bias, open_clip's text transformer."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"timm_model_name": self.timm_name, "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": self.image_size},
            "text_cfg": {"context_length": self.context_length, "vocab_size": self.vocab_size,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers},
        }

    @property
    def open_clip_name(self) -> str:
        return "bench-" + self.timm_name

    def describe(self) -> str:
        return (f"{self.timm_name} at {self.image_size} px + {self.text_layers}-layer {self.text_width}-wide text "
                f"transformer, embed {self.embed_dim}")

    def prepare(self, out_dir: Path) -> str | None:
        """Register the open_clip config of the same model; no shared weights (each side draws its own)."""
        import open_clip

        path = out_dir / f"{self.open_clip_name}.json"
        path.write_text(json.dumps(self.open_clip_config()))
        open_clip.add_model_config(path)
        return None

    def clipkit_model(self, pretrained: str | None) -> "ModelConfig":
        """clipkit's config of the model; ``pretrained`` is :meth:`prepare`'s None (random weights)."""
        from clipkit.config import ModelConfig
        from clipkit.modalities.image import ImageTowerConfig
        from clipkit.modalities.text import TextTowerConfig

        return ModelConfig(
            embed_dim=self.embed_dim,
            image=ImageTowerConfig(timm_name=self.timm_name, image_size=self.image_size),
            text=TextTowerConfig(context_length=self.context_length, vocab_size=self.vocab_size,
                                 width=self.text_width, heads=self.text_heads, layers=self.text_layers),
        )


class _BundledVocabulary:
    """open_clip's CLIP tokenizer ships its vocabulary in the wheel: ``save_for_hf`` has nothing to save."""

    def save_pretrained(self, folder: Path) -> None:
        pass


@dataclass(frozen=True)
class OpenClipPreset:
    """An open_clip architecture (open_clip's own, or ``config`` registered under ``name``) that both
    trainers train from the same random weights: clipkit through ``model.open_clip``."""

    name: str
    batch_size: int
    config: dict | None = None
    # "cuda": the preset is sized for a GPU and refuses to run on a CPU.
    device: str | None = None

    @property
    def open_clip_name(self) -> str:
        return self.name

    def model_cfg(self) -> dict:
        import open_clip

        return self.config or open_clip.get_model_config(self.name)

    def describe(self) -> str:
        vision, text = self.model_cfg()["vision_cfg"], self.model_cfg()["text_cfg"]
        return (f"open_clip {self.name}: {vision['layers']}-layer {vision['width']}-wide ViT/{vision['patch_size']} "
                f"at {vision['image_size']} px + {text['layers']}-layer {text['width']}-wide text transformer, "
                f"embed {self.model_cfg()['embed_dim']}, the same weights on both sides")

    def prepare(self, out_dir: Path) -> str:
        """Register the architecture and write random weights of it with open_clip's ``save_for_hf``;
        returns the weights file both trainers load."""
        import open_clip
        from open_clip.push_to_hf_hub import save_for_hf

        if self.config is not None:
            path = out_dir / f"{self.name}.json"
            path.write_text(json.dumps(self.config))
            open_clip.add_model_config(path)
        torch.manual_seed(0)
        folder = out_dir / "weights"
        save_for_hf(open_clip.create_model(self.name), _BundledVocabulary(), self.model_cfg(), str(folder),
                    safe_serialization=True)
        return str(folder / "open_clip_model.safetensors")

    def clipkit_model(self, pretrained: str | None) -> "ModelConfig":
        from clipkit.config import ModelConfig, OpenClipConfig

        return ModelConfig(open_clip=OpenClipConfig(name=self.name, pretrained=pretrained))


PRESETS: dict[str, Preset | OpenClipPreset] = {
    "small": Preset("vit_tiny_patch16_224", 224, 256, 256, 4, 4, batch_size=32),
    # A convolutional tower, where channels-last memory can matter.
    "small-resnet": Preset("resnet18", 224, 256, 256, 4, 4, batch_size=32),
    # open_clip's ViT-B-16 (timm's ViT-B/16 trunk, 512-wide 12-layer text transformer).
    "vit-b-16": Preset("vit_base_patch16_224", 224, 512, 512, 8, 12, batch_size=256),
    # The small preset's widths as open_clip's own VisionTransformer (ViT-Ti/16) and text transformer.
    "open-clip-vit": OpenClipPreset("bench-open-clip-vit-ti-16", batch_size=32, config={
        "embed_dim": 256,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 192, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4}}),
    "open-clip-vit-b-32": OpenClipPreset("ViT-B-32", batch_size=256, device="cuda"),
}
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor's data sheets, for model FLOPs utilisation.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))


# --- the two trainers ------------------------------------------------------------------------------

class ClipkitStep:
    """clipkit's Trainer (its defaults, or ``options`` such as ``compile=True``) stepping over batches
    from its own loader."""

    def __init__(self, model: "ModelConfig", batch_size: int, pattern: str, device: torch.device, out_dir: Path,
                 **options: bool) -> None:
        from clipkit.config import AugmentConfig, DataConfig, ExperimentConfig, TrainConfig
        from clipkit.train.trainer import Trainer

        data = DataConfig(train_shards=pattern, batch_size=batch_size, num_workers=0, shuffle_buffer=0,
                          augment=AugmentConfig(crop_scale=_common.OPEN_CLIP_CROP_SCALE))
        train = TrainConfig(output_dir=str(out_dir), max_steps=10**6, warmup_steps=10, device=str(device), **options)
        self.trainer = Trainer(ExperimentConfig(model=model, data=data, train=train), progress=False)
        self.model = self.trainer.model
        self.batches = list(itertools.islice(iter(self.trainer.loader), NUM_BATCHES))
        self.next_batch = itertools.cycle(self.batches).__next__

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.trainer.train_step([self.next_batch()])

    def count_flops(self) -> int:
        """Model FLOPs of one step's forward, loss and backward."""
        from torch.utils.flop_counter import FlopCounterMode

        trainer = self.trainer
        with FlopCounterMode(display=False) as counter:
            trainer._loss(trainer._forward(self.batches[0])).backward()
        trainer.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


class OpenClipStep:
    """open_clip's trainer (``train_one_epoch``) over batches made by its own transform and tokenizer."""

    def __init__(self, preset: Preset | OpenClipPreset, pretrained: str | None, shards: list[str],
                 device: torch.device, *, compile: bool) -> None:
        import open_clip
        from open_clip_train.params import parse_args
        from open_clip_train.scheduler import cosine_lr
        from PIL import Image

        from clipkit.data.pipeline import read_shards

        name = preset.open_clip_name
        precision = "amp_bf16" if device.type == "cuda" else "fp32"  # clipkit's "auto" picks the same
        args = parse_args(["--model", name, "--batch-size", str(preset.batch_size), "--precision", precision,
                           "--warmup", "10", "--lr", "5e-4", "--wd", "0.2", "--log-every-n-steps", "10000"])
        # What open_clip's main sets up for one process.
        args.device, args.rank, args.local_rank, args.world_size = str(device), 0, 0, 1
        args.distributed, args.distill, args.wandb = False, False, False
        model, preprocess_train, _ = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=precision, device=device, output_dict=True)
        self.model = model
        self.train_model = torch.compile(model) if compile else model  # as its --torchcompile does
        # open_clip's AdamW groups: no decay on gains, biases and the temperature.
        no_decay = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
             {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": args.wd}],
            lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
        self.scheduler = cosine_lr(self.optimizer, args.lr, args.warmup, 10**6)
        self.loss = open_clip.create_loss(args)
        self.args = args
        tokenizer = open_clip.get_tokenizer(name)
        samples = itertools.islice(read_shards(shards), NUM_BATCHES * preset.batch_size)
        pairs = [(preprocess_train(Image.open(io.BytesIO(s["jpg"])).convert("RGB")), s["txt"].decode()) for s in samples]
        chunks = [pairs[i : i + preset.batch_size] for i in range(0, len(pairs), preset.batch_size)]
        self.batches = [(torch.stack([image for image, _ in chunk]), tokenizer([text for _, text in chunk]))
                        for chunk in chunks]
        self.epoch = 0

    def run(self, steps: int) -> None:
        from open_clip_train.train import train_one_epoch

        batches = list(itertools.islice(itertools.cycle(self.batches), steps))
        train_one_epoch(self.train_model, {"train": _EpochData(batches, self.args.batch_size)}, self.loss,
                        self.epoch, self.optimizer, None, self.scheduler, None, self.args)
        self.epoch += 1


class _Batches(list):
    """A list of batches with the attributes open_clip's trainer reads from its data loader."""

    def __init__(self, batches: list, batch_size: int) -> None:
        super().__init__(batches)
        self.num_batches = len(self)
        self.num_samples = len(self) * batch_size


class _EpochData:
    """What open_clip's trainer reads from its ``DataInfo`` (whose module needs webdataset 0.2)."""

    def __init__(self, batches: list, batch_size: int) -> None:
        self.dataloader = _Batches(batches, batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The batches are fixed: nothing to reseed."""


# --- measuring -------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def step_memory_mib(run: Callable[[int], None], device: torch.device) -> float | None:
    """Memory one step adds on top of what is resident before it: peak CUDA allocation, or (Linux)
    peak resident set after freed heap memory is handed back and the peak counter is reset."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(1)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set
    except OSError:
        return None
    run(1)
    return (_status_kib("VmHWM") - base) / 1024


def optimizer_step_ms(model: torch.nn.Module, implementation: str, repeats: int = 5) -> float:
    """Milliseconds of one AdamW update of ``model``'s parameters (random gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[implementation]
    optimizer = torch.optim.AdamW(params, lr=1e-9, **options)
    optimizer.step()
    synchronize(params[0].device)
    start = time.perf_counter()
    for _ in range(repeats):
        optimizer.step()
    synchronize(params[0].device)
    for p in params:
        p.grad = None
    return (time.perf_counter() - start) / repeats * 1000


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, help="default: small on a CPU, vit-b-16 on a GPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU when torch sees one")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size")
    parser.add_argument("--variants", nargs="+",
                        help="open_clip, open_clip+compile, clipkit (its defaults: channels_last on, compile off) "
                             "and clipkit with options turned on (+) or off (-), e.g. clipkit-channels_last+compile "
                             "(default: open_clip clipkit clipkit-channels_last clipkit+compile; for the "
                             "open-clip-* presets, whose ViTs have one convolution, open_clip clipkit)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=8, help="timed blocks per variant")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak bf16 TFLOP/s for MFU (default: the data sheet's for known GPUs: "
                             + ", ".join(f"{name} {tflops:g}" for name, tflops in PEAK_BF16_TFLOPS) + ")")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_step.py: --device cuda, but torch sees no CUDA GPU on this machine")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    preset_name = args.preset or ("vit-b-16" if device.type == "cuda" else "small")
    preset = PRESETS[preset_name]
    if isinstance(preset, OpenClipPreset) and preset.device == "cuda" and device.type != "cuda":
        sys.exit(f"train_step.py: preset {preset_name} is sized for a GPU: run it with --device cuda")
    if args.batch_size:
        preset = dataclasses.replace(preset, batch_size=args.batch_size)
    variants = args.variants or (["open_clip", "clipkit"] if isinstance(preset, OpenClipPreset)
                                 else ["open_clip", "clipkit", "clipkit-channels_last", "clipkit+compile"])
    toy = _common.bench_shards(1024)
    shards = [str(p) for p in toy.train_shards]
    print(f"{_common.machine()}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}\n"
          f"{preset.describe()}, batch {preset.batch_size}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'} "
          f"on {device.type}")

    with tempfile.TemporaryDirectory() as tmp:
        pretrained = preset.prepare(Path(tmp))
        runners = {}
        for variant in variants:
            framework, *switches = re.split(r"(?=[+-])", variant)
            options = {switch[1:]: switch[0] == "+" for switch in switches}
            allowed = {"clipkit": {"channels_last", "compile"}, "open_clip": {"compile"}}.get(framework)
            if allowed is None or not set(options) <= allowed or (framework == "open_clip" and not all(options.values())):
                parser.error(f"unknown variant {variant!r}")
            if framework == "clipkit":
                out_dir = Path(tmp) / variant
                out_dir.mkdir()
                runners[variant] = ClipkitStep(preset.clipkit_model(pretrained), preset.batch_size,
                                               toy.shard_pattern("train"), device, out_dir, **options)
            else:
                runners[variant] = OpenClipStep(preset, pretrained, shards, device,
                                                compile=options.get("compile", False))
        params = {v: sum(p.numel() for p in r.model.parameters()) for v, r in runners.items()}
        print("parameters: " + ", ".join(f"{v} {n / 1e6:.2f} M" for v, n in params.items()))

        warmup_s, memory = {}, {}
        for variant, runner in runners.items():  # the first steps compile, allocate and tune
            start = time.perf_counter()
            runner.run(2)
            synchronize(device)
            warmup_s[variant] = time.perf_counter() - start
            memory[variant] = step_memory_mib(runner.run, device)
            print(f"  warm-up {variant}: {warmup_s[variant]:.1f} s for 2 steps", flush=True)

        rates: dict[str, list[float]] = {v: [] for v in runners}
        cpu_ms: dict[str, list[float]] = {v: [] for v in runners}  # CPU time per sample, all threads
        for repeat in range(args.repeats):
            order = list(runners) if repeat % 2 == 0 else list(runners)[::-1]
            for variant in order:
                synchronize(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                runners[variant].run(args.steps)
                synchronize(device)
                samples = args.steps * preset.batch_size
                rates[variant].append(samples / (time.perf_counter() - start))
                cpu_ms[variant].append((time.process_time() - cpu_start) * 1000 / samples)
                print(f"  block {repeat + 1}, {variant:24s}: {rates[variant][-1]:8.1f} samples/s, "
                      f"{cpu_ms[variant][-1]:7.1f} CPU-ms/sample", flush=True)

        clipkit_runner = next((r for v, r in runners.items() if v == "clipkit"), None)
        flops = clipkit_runner.count_flops() if clipkit_runner else None
        peak = peak_flops(device, args.peak_tflops)
        reference = rates.get("open_clip")
        print("\ntraining step samples/s and CPU time per sample, median (range) of the blocks; ratios to open_clip "
              "are medians of the paired blocks (CPU ratio: open_clip's CPU time over the variant's)")
        print(f"{'variant':24s} {'samples/s':>18} {'ratio':>6} {'CPU-ms/sample':>20} {'CPU ratio':>9} "
              f"{'step memory':>12} {'model TFLOP/s':>14}{'   MFU' if peak else ''}")
        for variant, values in rates.items():
            ratio = cpu_ratio = "-"
            if reference:
                ratio = f"{statistics.median(a / b for a, b in zip(values, reference)):.2f}x"
                cpu_ratio = f"{statistics.median(b / a for a, b in zip(cpu_ms[variant], cpu_ms['open_clip'])):.2f}x"
            mib = f"{memory[variant]:.0f} MiB" if memory[variant] is not None else "-"
            achieved = flops * statistics.median(values) / preset.batch_size if flops else math.nan
            mfu = f" {achieved / peak:5.1%}" if peak else ""
            print(f"{variant:24s} {_common.median_and_range(values):>18} {ratio:>6} "
                  f"{_common.median_and_range(cpu_ms[variant]):>20} {cpu_ratio:>9} {mib:>12} {achieved / 1e12:>14.3f}{mfu}")
        print("warm-up (2 steps, including any compiling): " + ", ".join(f"{v} {s:.0f} s" for v, s in warmup_s.items()))
        if flops:
            print(f"model FLOPs per step (forward + backward, counted): {flops / 1e12:.3f} T "
                  f"({flops / preset.batch_size / 1e9:.1f} GFLOP per sample)")

        model = next(iter(runners.values())).model
        times = {impl: optimizer_step_ms(model, impl) for impl in ("fused", "foreach", "for-loop")}
        print("AdamW step alone (ms): " + ", ".join(f"{impl} {ms:.1f}" for impl, ms in times.items())
              + " (clipkit uses fused; open_clip the default: for-loop on CPUs, foreach on GPUs)")


if __name__ == "__main__":
    main()
