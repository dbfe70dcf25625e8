"""open_clip models as clipkit's towers: fine-tuning pretrained CLIPs and SigLIPs.

Every model here is a small architecture registered in this file, given random weights by open_clip's
own code and saved by open_clip's ``save_for_hf``: no network, no downloaded weights.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip.push_to_hf_hub import save_for_hf
from PIL import Image

from clipkit.config import ConfigError, ExperimentConfig, ModelConfig, OpenClipConfig, from_dict
from clipkit.modalities.image import ImageTowerConfig
from clipkit.modalities.text import TextTowerConfig
from clipkit.errors import PretrainedWeightsError
from clipkit.eval.benchmark import evaluate_zeroshot
from clipkit.eval.encoders import load_encoder
from clipkit.interop.openclip_export import export_to_open_clip
from clipkit.losses import build_loss
from clipkit.modalities import get_modality
from clipkit.model import create_model
from clipkit.cli import main
from clipkit.train.checkpoint import load_model, save_checkpoint
from clipkit.train.trainer import Trainer
from clipkit.wise_ft import alpha_name
from tests.conftest import train_until_sigterm
from tests.distributed_step import run_step
from tests.test_distributed import assert_same_step, two_rank_step

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
ARCHITECTURES = {
    # open_clip's VisionTransformer + CLIP's text modules on the model itself.
    "ck-ft-vit": {"embed_dim": 32, "text_cfg": TEXT,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}},
    # open_clip's ModifiedResNet (vision_cfg.layers a list).
    "ck-ft-rn": {"embed_dim": 32, "text_cfg": TEXT,
                 "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}},
    # SigLIP-shaped: a timm ViT with attention pooling, a bias, CustomTextCLIP, its own HF tokenizer
    # (a tiny one written by the fixture; "hf_tokenizer_name" is filled in there). timm_proj none: the
    # trunk's 64 features are the embedding.
    "ck-ft-sig": {"embed_dim": 64, "init_logit_bias": -10, "custom_text": True,
                  "vision_cfg": {"image_size": 32, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                                 "timm_pool": "map", "timm_proj": "none"},
                  "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1,
                               "tokenizer_kwargs": {"clean": "canonicalize"}, "no_causal_mask": True,
                               "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}},
    # The same with SigLIP's real tokenizer, which is not on this machine.
    "ck-ft-sig-hub": {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
                      "vision_cfg": {"image_size": 32, "timm_model_name": "test_vit", "timm_pool": "map",
                                     "timm_proj": "none"},
                      "text_cfg": {"context_length": 16, "vocab_size": 32000, "width": 32, "heads": 2, "layers": 1,
                                   "hf_tokenizer_name": "timm/ViT-B-16-SigLIP", "pool_type": "last"}},
    # CoCa: a captioning decoder clipkit's towers have no place for.
    "ck-ft-coca": {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT,
                   "multimodal_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}},
}
WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "dog", "two", "at", "the", "top"]
TEXTS = ["a red circle", "a photo of a dog", "two blue squares at the top", ""]
# What the tests give the checkpoints, so that a value clipkit took from them is told from a default.
CHECKPOINT_SCALE, CHECKPOINT_BIAS = math.log(42.0), -3.25


class _BundledVocabulary:
    """open_clip's SimpleTokenizer ships its vocabulary in the wheel; there are no files to save."""

    def save_pretrained(self, folder: Path) -> None:
        pass


def write_tokenizer(folder: Path) -> Path:
    """A tiny Hugging Face word-level tokenizer (pad 0, end-of-text 1) saved as a local folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: 3 + i for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory) -> dict[str, Path]:
    """Each architecture registered with open_clip, a random-weight model of it saved by ``save_for_hf``
    (with the temperature and bias set to CHECKPOINT_SCALE / CHECKPOINT_BIAS); name → weights file."""
    root = tmp_path_factory.mktemp("open-clip")
    configs = json.loads(json.dumps(ARCHITECTURES))
    configs["ck-ft-sig"]["text_cfg"]["hf_tokenizer_name"] = str(write_tokenizer(root / "tokenizer"))
    for name, cfg in configs.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    files = {}
    for index, name in enumerate(("ck-ft-vit", "ck-ft-rn", "ck-ft-sig")):
        torch.manual_seed(index)
        model = open_clip.create_model(name)
        with torch.no_grad():
            model.logit_scale.fill_(CHECKPOINT_SCALE)
            if model.logit_bias is not None:
                model.logit_bias.fill_(CHECKPOINT_BIAS)
        folder = root / name
        # The SigLIP folder carries its tokenizer's files, as a hub folder does (local-dir: reads them).
        tokenizer = open_clip.get_tokenizer(name) if name == "ck-ft-sig" else _BundledVocabulary()
        save_for_hf(model, tokenizer, configs[name], folder)
        files[name] = folder / "open_clip_model.safetensors"
    return files


def open_clip_reference(name: str, weights: Path) -> tuple[torch.nn.Module, object, object]:
    """open_clip's own model, evaluation transform and tokenizer for the saved weights."""
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def fine_tune_config(name: str, weights: Path, **model: object) -> ModelConfig:
    return ModelConfig(open_clip=OpenClipConfig(name=name, pretrained=str(weights)), **model)


def jpeg_bytes(seed: int, width: int = 56, height: int = 48) -> bytes:
    """A random JPEG that is not square, so the evaluation transform resizes and crops it."""
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="JPEG")
    return buffer.getvalue()


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["ck-ft-vit", "ck-ft-rn", "ck-ft-sig"])
def test_towers_embed_like_open_clip(open_clip_files, name):
    """Step 0: clipkit's preprocessing, tokenizer and towers give open_clip's own embeddings."""
    weights = open_clip_files[name]
    loss = "siglip" if name == "ck-ft-sig" else "infonce"
    model = create_model(fine_tune_config(name, weights, loss=loss)).eval()
    reference, preprocess, tokenizer = open_clip_reference(name, weights)
    images = [jpeg_bytes(seed) for seed in range(3)]
    decoded = torch.stack([model.eval_decoder("image").decode(data, None) for data in images])
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 3, 32, 32)
    theirs_in = torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in images])
    tokens = model.tokenize(TEXTS)
    assert torch.equal(tokens, tokenizer(TEXTS))
    with torch.no_grad():
        ours_image, theirs_image = model.encode_image(decoded), reference.encode_image(theirs_in, normalize=True)
        ours_text, theirs_text = model.encode_text(tokens), reference.encode_text(tokens, normalize=True)
    assert largest_difference(ours_image, theirs_image) <= 1e-6
    assert largest_difference(ours_text, theirs_text) <= 1e-6
    # The caption decoder the data pipeline runs tokenizes with the model's own tokenizer too.
    caption = get_modality("text", model.config).field(train=True).decode(TEXTS[2].encode(), None)
    assert torch.equal(caption, tokenizer(TEXTS[2:3])[0])


def test_temperature_and_bias_come_from_the_checkpoint(open_clip_files):
    clip = create_model(fine_tune_config("ck-ft-vit", open_clip_files["ck-ft-vit"]))
    assert clip.logit_scale.item() == pytest.approx(CHECKPOINT_SCALE) and clip.logit_bias is None
    siglip = create_model(fine_tune_config("ck-ft-sig", open_clip_files["ck-ft-sig"], loss="siglip"))
    assert siglip.logit_scale.item() == pytest.approx(CHECKPOINT_SCALE)
    assert siglip.logit_bias.item() == pytest.approx(CHECKPOINT_BIAS)
    # A CLIP fine-tuned with the sigmoid loss starts its (new) bias at model.init_logit_bias.
    clip_siglip = create_model(fine_tune_config("ck-ft-vit", open_clip_files["ck-ft-vit"], loss="siglip",
                                                init_logit_bias=-5.0))
    assert clip_siglip.logit_bias.item() == -5.0 and clip_siglip.logit_scale.item() == pytest.approx(CHECKPOINT_SCALE)


@pytest.mark.parametrize("name, loss", [("ck-ft-vit", "infonce"), ("ck-ft-sig", "siglip")])
def test_loss_on_a_fixed_batch_equals_open_clips(open_clip_files, name, loss):
    weights = open_clip_files[name]
    model = create_model(fine_tune_config(name, weights, loss=loss)).eval()
    reference, _, tokenizer = open_clip_reference(name, weights)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    mean = torch.tensor(reference.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(reference.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        features = model({"image": images, "text": model.tokenize(TEXTS)})
        ours = build_loss(loss)(features["image"], features["text"], model.logit_scale.exp(), model.logit_bias)
        image = reference.encode_image((images.float() / 255 - mean) / std, normalize=True)
        text = reference.encode_text(tokenizer(TEXTS), normalize=True)
        if loss == "infonce":
            theirs = ClipLoss()(image, text, reference.logit_scale.exp())
        else:
            theirs = SigLipLoss()(image, text, reference.logit_scale.exp(), reference.logit_bias)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def test_unusable_open_clip_models_fail_with_one_clear_line(open_clip_files):
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ck-ft-vt'.*did you mean ck-ft-vit"):
        create_model(ModelConfig(open_clip=OpenClipConfig(name="ck-ft-vt")))
    with pytest.raises(ValueError, match="CoCa model.*captioning text decoder"):
        create_model(ModelConfig(open_clip=OpenClipConfig(name="ck-ft-coca")))
    with pytest.raises(PretrainedWeightsError, match=r"tokenizer of open_clip model ck-ft-sig-hub \(timm/ViT-B-16-SigLIP\)"
                                                     r" is not on this machine"):
        get_modality("text", ModelConfig(open_clip=OpenClipConfig(name="ck-ft-sig-hub"), loss="siglip"))
    with pytest.raises(PretrainedWeightsError, match="ViT-B-32/laion2b_s34b_b79k are not on this machine.*"
                                                     "open_clip_model.safetensors"):
        create_model(ModelConfig(open_clip=OpenClipConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k")))
    with pytest.raises(ConfigError, match="SigLIP model.*set model.loss: siglip"):
        create_model(fine_tune_config("ck-ft-sig", open_clip_files["ck-ft-sig"]))
    with pytest.raises(ConfigError, match="logit scale of 42.*above model.max_logit_scale"):
        create_model(fine_tune_config("ck-ft-vit", open_clip_files["ck-ft-vit"], max_logit_scale=30.0))


@pytest.mark.parametrize("section, message", [
    ({"embed_dim": 64}, "model.embed_dim is set by the open_clip model"),
    ({"image": {"image_size": 64}}, "model.image.image_size is set by the open_clip model"),
    ({"text": {"context_length": 32}}, "model.text.context_length is set by the open_clip model"),
    ({"init_logit_scale": 20.0}, "model.init_logit_scale is set by the open_clip model"),
    ({"modalities": ["image", "text", "audio"]}, "model.modalities must be \\[image, text\\] with open_clip"),
    ({"open_clip": {"name": "ViT-B-32", "lock_image_unlocked_groups": 2}},
     "model.open_clip.lock_image_unlocked_groups needs model.image.lock: true"),
    ({"open_clip": {}}, "model.open_clip.name must name an open_clip architecture"),
    ({"open_clip": {"name": "local-dir:exported", "pretrained": "other.safetensors"}},
     "model.open_clip.pretrained must be left out with a local-dir: folder"),
])
def test_config_refuses_settings_open_clip_overrides(section, message):
    raw = {"model": {"open_clip": {"name": "ViT-B-32"}, **section}}
    with pytest.raises(ConfigError, match=f"config.yaml: {message}"):
        from_dict(ExperimentConfig, raw, source="config.yaml")


def training_config(toy_shards, output: Path, weights: Path, name: str = "ck-ft-vit", **model: object) -> ExperimentConfig:
    """A few steps of fine-tuning on the 32-px toy shards, checkpointing as it goes."""
    config = ExperimentConfig(model=fine_tune_config(name, weights, **model))
    config.data.train_shards = toy_shards.shard_pattern("train")
    config.data.batch_size, config.data.num_workers, config.data.shuffle_buffer = 8, 0, 50
    train = config.train
    train.output_dir, train.max_steps, train.save_every, train.warmup_steps = str(output), 4, 2, 1
    train.lr, train.log_every, train.grad_checkpointing = 1e-3, 1, True
    return config


def copy_weights(weights: Path, folder: Path) -> Path:
    """A copy of a weights file that a test may delete: checkpoints must not need it again."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / weights.name
    copy.write_bytes(weights.read_bytes())
    return copy


def open_clip_tower_state(model: torch.nn.Module, tower: str) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.towers[tower].state_dict().items()}


def test_fine_tune_lit_export_and_reload_without_the_weights(open_clip_files, toy_shards, tmp_path):
    """LiT on an open_clip ViT: the locked image tower stays put, the text tower and temperature learn;
    the checkpoint reloads without the original weights file, and its export is the same model in open_clip."""
    weights = copy_weights(open_clip_files["ck-ft-vit"], tmp_path / "weights")
    config = training_config(toy_shards, tmp_path / "run", weights)
    config.model.image.lock = True
    trainer = Trainer(config, progress=False)
    before = {tower: open_clip_tower_state(trainer.model, tower) for tower in ("image", "text")}
    assert trainer.model.towers["text"].transformer.grad_checkpointing  # train.grad_checkpointing reached it
    result = trainer.fit()
    assert result.steps == 4 and math.isfinite(result.final_loss)
    after = {tower: open_clip_tower_state(trainer.model, tower) for tower in ("image", "text")}
    assert all(torch.equal(before["image"][key], after["image"][key]) for key in before["image"])
    assert any(not torch.equal(before["text"][key], after["text"][key]) for key in before["text"])
    assert trainer.model.logit_scale.item() != pytest.approx(CHECKPOINT_SCALE, abs=1e-9)

    weights.unlink()  # the checkpoint alone must rebuild the model
    model, _ = load_model(result.checkpoint)
    assert all(torch.equal(value, trainer.model.state_dict()[key]) for key, value in model.state_dict().items())
    folder = export_to_open_clip(result.checkpoint, tmp_path / "exported")
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    theirs.eval()
    images = [jpeg_bytes(seed) for seed in range(3)]
    decoded = torch.stack([model.eval_decoder("image").decode(data, None) for data in images])
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(TEXTS)
    with torch.no_grad():
        image_difference = largest_difference(
            model.encode_image(decoded),
            theirs.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in images]),
                                normalize=True))
        text_difference = largest_difference(model.encode_text(model.tokenize(TEXTS)),
                                             theirs.encode_text(tokens, normalize=True))
    assert image_difference == 0 and text_difference == 0
    assert theirs.logit_scale.item() == model.logit_scale.item()
    # `clipkit eval` of the checkpoint and of its export agree (open_clip's own transform on the toy images).
    ours = evaluate_zeroshot(load_encoder(str(result.checkpoint)), toy_shards.shard_pattern("eval"))
    exported = evaluate_zeroshot(load_encoder(f"open_clip:local-dir:{folder}"), toy_shards.shard_pattern("eval"))
    assert ours.metrics["acc1"] == pytest.approx(exported.metrics["acc1"])
    assert ours.metrics["per_class_recall"] == pytest.approx(exported.metrics["per_class_recall"])


def test_siglip_fine_tune_resumes_exactly_and_exports_its_bias_and_tokenizer(open_clip_files, toy_shards, tmp_path):
    """SigLIP loss on the SigLIP-shaped timm model: 2 + 2 resumed steps equal 4 straight ones, and the
    export carries the trained bias and the model's own Hugging Face tokenizer."""
    weights = open_clip_files["ck-ft-sig"]
    straight_config = training_config(toy_shards, tmp_path / "straight", weights, name="ck-ft-sig", loss="siglip")
    straight = Trainer(straight_config, progress=False)
    straight.fit()
    resumed_config = training_config(toy_shards, tmp_path / "resumed", weights, name="ck-ft-sig", loss="siglip")
    resumed_config.train.resume = str(tmp_path / "straight" / "checkpoints" / "step-00000002.pt")
    resumed = Trainer(resumed_config, progress=False)
    assert resumed.step == 2
    result = resumed.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.model.logit_bias.item() != CHECKPOINT_BIAS

    folder = export_to_open_clip(result.checkpoint, tmp_path / "exported")
    theirs = open_clip.create_model(f"local-dir:{folder}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert theirs.logit_bias.item() == resumed.model.logit_bias.item()
    model = resumed.model.eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    mean = torch.tensor(theirs.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(theirs.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(tokenizer(TEXTS), model.tokenize(TEXTS))
        assert largest_difference(model.encode_text(model.tokenize(TEXTS)), theirs.encode_text(tokenizer(TEXTS), True)) == 0
        assert largest_difference(model.encode_image(images),
                                  theirs.encode_image((images.float() / 255 - mean) / std, True)) <= 1e-6


def trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, param in module.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("tower, groups", [("image", 2), ("text", 1)])
def test_locking_all_but_the_last_groups_is_open_clips(open_clip_files, tower, groups):
    """model.<tower>.lock + model.open_clip.lock_*_unlocked_* leave exactly the parameters trainable that
    open_clip's lock_image_tower(unlocked_groups) / lock_text_tower(unlocked_layers) leave."""
    weights = open_clip_files["ck-ft-vit"]
    key = "lock_image_unlocked_groups" if tower == "image" else "lock_text_unlocked_layers"
    sections = {tower: (ImageTowerConfig if tower == "image" else TextTowerConfig)(lock=True)}
    model = create_model(ModelConfig(open_clip=OpenClipConfig(name="ck-ft-vit", pretrained=str(weights),
                                                              **{key: groups}), **sections))
    reference = open_clip.create_model("ck-ft-vit", pretrained=str(weights))
    if tower == "image":
        reference.lock_image_tower(unlocked_groups=groups)
        theirs = {name for name in trainable(reference) if name.startswith("visual.")}
    else:
        reference.lock_text_tower(unlocked_layers=groups)
        theirs = {name for name in trainable(reference) if not name.startswith("visual.") and "logit" not in name}
    ours = trainable(model.towers[tower])  # the towers' parameter names are open_clip's (module docstring)
    assert ours == theirs
    assert 0 < len(ours) < len(list(model.towers[tower].parameters()))
    assert tower not in model.locked  # partly trainable: it trains in train mode
    other = "text" if tower == "image" else "image"
    assert trainable(model.towers[other]) == {name for name, _ in model.towers[other].named_parameters()}


def test_modified_resnet_locks_only_whole(open_clip_files):
    config = ModelConfig(open_clip=OpenClipConfig(name="ck-ft-rn", pretrained=str(open_clip_files["ck-ft-rn"]),
                                                  lock_image_unlocked_groups=1), image=ImageTowerConfig(lock=True))
    with pytest.raises(ValueError, match="ModifiedResNet image tower locks only as a whole"):
        create_model(config)


def test_wise_ft_interpolates_and_evaluates_each_alpha(open_clip_files, toy_shards, tmp_path, capsys):
    """`clipkit wise-ft FINETUNED ORIGINAL`: α = 0 embeds as the original open_clip model, α = 1 as the
    fine-tuned one, α = 0.5 is the midpoint of the weights; each is evaluated zero-shot."""
    weights = open_clip_files["ck-ft-vit"]
    config = ExperimentConfig(model=fine_tune_config("ck-ft-vit", weights))
    tuned = create_model(config.model)
    with torch.no_grad():  # a stand-in for fine-tuning: every weight moved
        for param in tuned.parameters():
            param.add_(0.01 * torch.randn_like(param))
    finetuned = save_checkpoint(tmp_path / "final.pt", tuned, config)
    argv = ["wise-ft", str(finetuned), str(weights), "--alphas", "0,0.5,1", "--dataset",
            toy_shards.shard_pattern("eval"), "--out", str(tmp_path / "wise"), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["alpha 0.00", "alpha 0.50", "alpha 1.00"]
    assert all("acc1" in line and "acc5" in line for line in lines)

    reference, _, tokenizer = open_clip_reference("ck-ft-vit", weights)
    tokens = tokenizer(TEXTS)
    mixed = {alpha: load_model(tmp_path / "wise" / alpha_name(alpha))[0] for alpha in (0, 0.5, 1)}
    assert alpha_name(0.501) != alpha_name(0.502)  # every alpha its own file
    with torch.no_grad():
        assert largest_difference(mixed[0].encode_text(tokens), reference.encode_text(tokens, normalize=True)) <= 1e-6
        assert largest_difference(mixed[1].encode_text(tokens), tuned.eval().encode_text(tokens)) == 0
    start, end, middle = reference.state_dict(), tuned.state_dict(), mixed[0.5].state_dict()
    key = "towers.text.token_embedding.weight"
    assert torch.allclose(middle[key], (start["token_embedding.weight"] + end[key]) / 2, atol=1e-7)

    other = open_clip_files["ck-ft-rn"]
    assert main([*argv[:2], str(other), *argv[3:]]) == 1  # an original of another architecture
    assert "does not fit open_clip model ck-ft-vit" in capsys.readouterr().err


def local_dir_config(open_clip_files, name: str, toy_shards, output: Path, **train: object) -> ExperimentConfig:
    """Fine-tuning from the saved open_clip folder (``local-dir:``), which a torchrun worker can read
    without this file's architecture registration."""
    loss = train.pop("loss", "infonce")
    config = ExperimentConfig(model=ModelConfig(open_clip=OpenClipConfig(name=f"local-dir:{open_clip_files[name].parent}"),
                                                loss=loss))
    config.data.train_shards = toy_shards.shard_pattern("train")
    config.data.batch_size, config.data.num_workers = 4, 0
    config.train.device, config.train.output_dir = "cpu", str(output)
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def open_clip_batch(trainer: Trainer) -> dict[str, torch.Tensor]:
    """8 random 32-px images and 8 captions tokenized by the model's own tokenizer."""
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    captions = [f"a {colour} {shape}" for colour in ("red", "blue", "green", "two") for shape in ("circle", "square")]
    return {"image": images, "text": trainer.model.tokenize(captions)}


@pytest.mark.parametrize("name, train", [
    ("ck-ft-vit", {"loss": "infonce", "accum_freq": 2}),
    ("ck-ft-sig", {"loss": "siglip"}),
], ids=["vit-infonce-accum2", "siglip"])
def test_open_clip_towers_on_two_ranks_equal_one_process(open_clip_files, toy_shards, tmp_path, name, train):
    """Real torchrun, gloo: two ranks with half the batch each give one process's loss and gradients."""
    reference = Trainer(local_dir_config(open_clip_files, name, toy_shards, tmp_path / "one",
                                         loss=train["loss"]), progress=False)
    batch = open_clip_batch(reference)
    loss, grads = run_step(reference, batch)
    reference.close()
    config = local_dir_config(open_clip_files, name, toy_shards, tmp_path / "two", **train)
    config.data.batch_size = 2
    assert_same_step(two_rank_step(config, batch, tmp_path), loss, grads)


def test_open_clip_towers_train_in_bf16(open_clip_files, toy_shards, tmp_path):
    """bf16 autocast reaches open_clip's modules: the loss moves off fp32's by bf16's rounding, no more."""
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(local_dir_config(open_clip_files, "ck-ft-vit", toy_shards, tmp_path / precision,
                                           precision=precision), progress=False)
        losses[precision], grads = run_step(trainer, open_clip_batch(trainer))
        assert all(torch.isfinite(grad).all() for grad in grads.values())
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
        trainer.close()
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_open_clip_fine_tune_stops_on_sigterm_and_resumes(open_clip_files, toy_shards, tmp_path):
    config = local_dir_config(open_clip_files, "ck-ft-vit", toy_shards, tmp_path / "run",
                              max_steps=100_000, log_every=1)
    path = tmp_path / "long.yaml"
    returncode, stdout, stderr, step = train_until_sigterm(config, path)
    assert returncode == 0, stderr
    assert "stopped by signal after" in stdout and step >= 2
    resumed_config = local_dir_config(open_clip_files, "ck-ft-vit", toy_shards, tmp_path / "run",
                                      max_steps=step + 1, resume="latest")
    resumed = Trainer(resumed_config, progress=False)
    assert resumed.step == step
    assert resumed.fit().steps == 1
