import random
import string
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from clipkit.config import ExperimentConfig
from clipkit.model import ContrastiveModel, create_model
from clipkit.errors import PretrainedWeightsError
from clipkit.pretrained import create_timm_trunk
from clipkit.train.checkpoint import load_checkpoint, load_model, save_checkpoint
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def model() -> ContrastiveModel:
    torch.manual_seed(0)
    return create_model(tiny_model_config()).eval()


def test_towers_give_unit_norm_embeddings_of_the_shared_width(model):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    tokens = model.tokenize(["a red circle", "a blue square", "a long caption " * 20])
    assert tokens.shape == (3, 16) and tokens.dtype == torch.int64
    with torch.no_grad():
        image_emb = model.encode_image(images)
        text_emb = model.encode_text(tokens)
        raw = model.encode_text(tokens, normalize=False)
    assert image_emb.shape == (3, 32) and text_emb.shape == (3, 32)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    assert torch.allclose(F.normalize(raw, dim=-1), text_emb, atol=1e-6)


def test_uint8_and_unit_float_images_embed_identically(model):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), model.encode_image(images.float() / 255), atol=1e-5)


def test_forward_returns_features_per_modality(model):
    batch = {"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "text": model.tokenize(["a", "b"])}
    with torch.no_grad():
        out = model(batch)
    assert set(out) == {"image", "text"} and out["image"].shape == (2, 32)


def test_temperature_init_and_clamp():
    model = create_model(tiny_model_config())
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_text_tower_is_causal_or_bidirectional():
    config = tiny_model_config()
    causal = create_model(config)
    config.text.causal = False
    bidirectional = create_model(config)
    assert causal.towers["text"].attn_mask is not None
    assert bidirectional.towers["text"].attn_mask is None


def test_bad_model_configs():
    config = tiny_model_config()
    config.modalities = ("image",)
    with pytest.raises(ValueError, match="at least two"):
        create_model(config)
    config = tiny_model_config()
    config.modalities = ("image", "smell")
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        create_model(config)
    config = tiny_model_config()
    config.image.timm_name = "no_such_net"
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        create_model(config)
    with pytest.raises(KeyError, match="no 'audio' tower"):
        create_model(tiny_model_config()).encode("audio", torch.zeros(1))


def test_checkpoint_round_trip_gives_identical_embeddings(model, tmp_path):
    config = ExperimentConfig(model=tiny_model_config())
    path = save_checkpoint(tmp_path / "ckpt" / "final.pt", model, config, step=3)
    assert not list(path.parent.glob("*.tmp"))
    payload = torch.load(path, weights_only=True)
    assert payload["step"] == 3 and payload["config"]["model"]["embed_dim"] == 32
    loaded, loaded_config = load_model(path)
    assert loaded_config == config
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    tokens = model.tokenize(["a red circle", "x", "y", "z"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable clipkit checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a clipkit checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_pretrained_trunk_loads_from_local_file(tmp_path):
    torch.manual_seed(1)
    source = create_timm_trunk("test_byobnet", pretrained=False, pretrained_file=None)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    loaded = create_timm_trunk("test_byobnet", pretrained=False, pretrained_file=str(tmp_path / "model.safetensors"))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_weights_file_that_does_not_fit_the_trunk_stops_naming_the_keys(tmp_path):
    source = create_timm_trunk("test_byobnet", pretrained=False, pretrained_file=None)
    # An open_clip file: the same trunk under open_clip's key prefix.
    save_file({f"visual.trunk.{k}": v for k, v in source.state_dict().items()}, tmp_path / "open_clip.safetensors")
    with pytest.raises(PretrainedWeightsError, match=r"86 weights of the model are not in the file \(stem.conv.weight"
                                                     r".*keys of the file are not in the model \(visual.trunk."):
        create_timm_trunk("test_byobnet", pretrained=False, pretrained_file=str(tmp_path / "open_clip.safetensors"))
    partial = dict(source.state_dict())
    del partial["stages.3.0.conv3_1x1.bn.running_mean"]
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(PretrainedWeightsError, match=r"1 weights of the model are not in the file \(stages.3.0.conv3_1x1.bn.running_mean\)"):
        create_timm_trunk("test_byobnet", pretrained=False, pretrained_file=str(tmp_path / "partial.safetensors"))
    # Another architecture's weights: shapes do not fit.
    save_file(create_timm_trunk("test_resnet", pretrained=False, pretrained_file=None).state_dict(),
              tmp_path / "resnet.safetensors")
    with pytest.raises(PretrainedWeightsError, match="does not fit timm model 'test_byobnet'"):
        create_timm_trunk("test_byobnet", pretrained=False, pretrained_file=str(tmp_path / "resnet.safetensors"))


def test_a_weights_file_that_is_a_pickle_of_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"stem.conv.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(PretrainedWeightsError, match="not a plain weights file: unpickling it would run code"):
        create_timm_trunk("test_byobnet", pretrained=False, pretrained_file=str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_missing_pretrained_file_and_offline_hub_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(PretrainedWeightsError, match="does not exist.*download"):
        create_timm_trunk("test_byobnet", pretrained=True, pretrained_file=str(tmp_path / "none.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="Offline\\? Download model.safetensors.*pretrained_file"):
        create_timm_trunk("resnet18", pretrained=True, pretrained_file=None)



def test_a_huge_one_word_caption_tokenizes_at_once():
    from clipkit.modalities.text import tokenize

    rng = random.Random(0)
    word = "".join(rng.choice(string.ascii_letters) for _ in range(1_000_000))  # BPE's worst case
    start = time.perf_counter()
    tokens = tokenize([word, "a photo of a cat"], 77)
    assert time.perf_counter() - start < 20  # unbounded, this word takes hours
    assert tokens.shape == (2, 77) and (tokens[0] > 0).all()
    assert torch.equal(tokens[1], open_clip.tokenize(["a photo of a cat"])[0])  # normal text: unchanged
