"""open_clip interop: its models through clipkit's encoder API, clipkit checkpoints exported to it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.push_to_hf_hub import save_for_hf
from PIL import Image

from clipkit.config import ExperimentConfig
from clipkit.eval.benchmark import evaluate_zeroshot
from clipkit.eval.encoders import load_encoder
from clipkit.interop.openclip_export import ExportError, export_to_open_clip
from clipkit.model import create_model
from clipkit.errors import PretrainedWeightsError
from clipkit.train.checkpoint import save_checkpoint
from tests.conftest import tiny_model_config

# A ViT-B/32-shaped open_clip model, shrunk: open_clip's own vision transformer and text transformer.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class _BundledVocabulary:
    """open_clip's SimpleTokenizer ships its vocabulary in the wheel; there are no files to save."""

    def save_pretrained(self, folder: Path) -> None:
        pass


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random-weight open_clip model written by open_clip's own save_for_hf (config + weights)."""
    config_dir = tmp_path_factory.mktemp("oc-config")
    (config_dir / "clipkit-tiny-vit.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    model = open_clip.create_model("clipkit-tiny-vit").eval()
    folder = tmp_path_factory.mktemp("oc-model")
    save_for_hf(model, _BundledVocabulary(), TINY_OPEN_CLIP, folder, safe_serialization="both")
    return folder, model


def jpeg_bytes(seed: int, size: int = 48) -> bytes:
    pixels = torch.randint(0, 256, (size, size + 8, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("source", ["local-dir", "safetensors", "bin"])
def test_open_clip_model_gives_open_clips_embeddings(open_clip_folder, source):
    folder, reference = open_clip_folder
    if source == "local-dir":
        encoder = load_encoder(f"open_clip:local-dir:{folder}")
    else:
        weights = folder / ("open_clip_model.safetensors" if source == "safetensors" else "open_clip_pytorch_model.bin")
        encoder = load_encoder("open_clip:clipkit-tiny-vit", str(weights))
    _, _, preprocess = open_clip.create_model_and_transforms("clipkit-tiny-vit")
    images = [jpeg_bytes(seed) for seed in range(3)]
    decoder = encoder.eval_decoder("image")
    ours = torch.stack([decoder.decode(data, None) for data in images])
    theirs = torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in images])
    texts = ["a red circle", "a photo of a dog", ""]
    tokens = open_clip.get_tokenizer("clipkit-tiny-vit")(texts)
    with torch.no_grad():
        assert torch.equal(ours, theirs)
        assert torch.equal(encoder.encode("image", ours), reference.encode_image(theirs, normalize=True))
        assert torch.equal(encoder.tokenize(texts), tokens)
        assert torch.equal(encoder.encode("text", encoder.tokenize(texts)), reference.encode_text(tokens, normalize=True))


def test_uncached_zoo_tag_fails_fast_and_names_the_file():
    with pytest.raises(PretrainedWeightsError) as err:
        load_encoder("open_clip:ViT-B-32", "laion2b_s34b_b79k")
    message = str(err.value)
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and "open_clip_model.safetensors" in message
    assert "--pretrained" in message
    with pytest.raises(PretrainedWeightsError, match="neither a file nor an open_clip tag.*laion2b_s34b_b79k"):
        load_encoder("open_clip:ViT-B-32", "no-such-tag")
    with pytest.raises(ValueError, match="did you mean ViT-B-32"):
        load_encoder("open_clip:ViT-B-3")
    with pytest.raises(ValueError, match="--pretrained applies to open_clip models"):
        load_encoder("some/checkpoint.pt", "laion2b_s34b_b79k")


def test_exported_checkpoint_loads_in_open_clip_with_identical_embeddings(tmp_path):
    config = ExperimentConfig(model=tiny_model_config())
    torch.manual_seed(1)
    model = create_model(config.model).eval()
    checkpoint = save_checkpoint(tmp_path / "model.pt", model, config)
    folder = export_to_open_clip(checkpoint, tmp_path / "exported")
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    images = torch.rand(4, 3, 32, 32)
    mean = torch.tensor(config.model.image.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.model.image.std).view(1, 3, 1, 1)
    texts = ["a red circle", "two blue squares at the top"]
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), theirs.eval().encode_image((images - mean) / std, normalize=True))
        assert torch.equal(tokenizer(texts), model.tokenize(texts))
        assert torch.equal(model.encode_text(model.tokenize(texts)), theirs.encode_text(tokenizer(texts), normalize=True))
    assert theirs.logit_scale.item() == model.logit_scale.item()


def test_exported_model_evaluates_like_the_checkpoint(toy_shards, tmp_path):
    """32-px toy images need no resize, so both decoders see the same pixels: identical metrics."""
    config = ExperimentConfig(model=tiny_model_config())
    checkpoint = save_checkpoint(tmp_path / "model.pt", create_model(config.model).eval(), config)
    folder = export_to_open_clip(checkpoint, tmp_path / "exported")
    ours = evaluate_zeroshot(load_encoder(str(checkpoint)), toy_shards.shard_pattern("eval"))
    theirs = evaluate_zeroshot(load_encoder(f"open_clip:local-dir:{folder}"), toy_shards.shard_pattern("eval"))
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert theirs.metrics[name] == pytest.approx(ours.metrics[name])
    assert theirs.metrics["per_class_recall"] == pytest.approx(ours.metrics["per_class_recall"])


def test_export_refuses_what_open_clip_cannot_express(tmp_path):
    config = ExperimentConfig(model=tiny_model_config())
    config.model.image.timm_kwargs = {"drop_rate": 0.1}
    checkpoint = save_checkpoint(tmp_path / "model.pt", create_model(config.model), config)
    with pytest.raises(ExportError, match="timm_kwargs.*no open_clip equivalent"):
        export_to_open_clip(checkpoint, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
