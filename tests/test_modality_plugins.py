"""Modalities are plug-ins: one file declares the config section and the tower, registered by name.

The end-to-end test installs a new modality the way a third-party package would (a module plus an
entry point in a ``.dist-info`` folder) and trains, saves and reloads a model with it through the
CLI in a fresh process, with no change to clipkit.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from clipkit.config import ConfigError, ExperimentConfig, ModelConfig, apply_overrides, from_dict
from clipkit.eval.templates import builtin_templates, resolve_templates
from clipkit.model import create_model
from clipkit.modalities import available_modalities, register_modality
from clipkit.modalities.image import ImageModality, ImageTowerConfig
from retrieval.encode import file_modality
from tests.conftest import tiny_model_config

PLUGIN = textwrap.dedent('''
    """A modality of feature vectors stored as .npy members: one file, nothing else to register."""
    import io
    from dataclasses import dataclass

    import numpy as np
    import torch
    from torch import nn

    from clipkit.config import check_ranges
    from clipkit.modalities import FieldDecoder, Modality, register_modality


    @dataclass
    class VectorTowerConfig:
        dim: int = 8
        hidden: int = 16
        lock: bool = False

        def __post_init__(self):
            check_ranges(("dim", self.dim >= 1, "must be at least 1"))


    class VectorDecoder:
        def __init__(self, dim):
            self.dim = dim

        def __call__(self, data, rng):
            vector = np.load(io.BytesIO(data), allow_pickle=False)
            if vector.shape != (self.dim,):
                raise ValueError(f"expected a ({self.dim},) vector, got shape {vector.shape}")
            return torch.from_numpy(vector.astype(np.float32))


    @register_modality
    class VectorModality(Modality):
        name = "vector"
        config_section = VectorTowerConfig
        template_sets = {"measurement": ("a measurement of {}.",)}

        def __init__(self, config):
            self.config = config

        @classmethod
        def from_config(cls, model_config, augment):
            return cls(model_config.vector)

        def field(self, train):
            return FieldDecoder(self.name, ("npy",), VectorDecoder(self.config.dim))

        def build_tower(self, embed_dim):
            return nn.Sequential(nn.Linear(self.config.dim, self.config.hidden), nn.ReLU(),
                                 nn.Linear(self.config.hidden, embed_dim))
''')

CONFIG = textwrap.dedent('''
    model:
      embed_dim: 16
      modalities: [vector, text]
      vector: {{dim: 6, hidden: 24}}
      text: {{context_length: 16, width: 32, heads: 2, layers: 1}}
    data:
      train_shards: "{shards}/train-{{000000..000001}}.tar"
      batch_size: 8
      num_workers: 1
      shuffle_buffer: 10
    train:
      output_dir: "{run}"
      max_steps: 4
      warmup_steps: 1
      log_every: 2
      device: cpu
''')


def write_vector_shards(folder: Path, dim: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for shard in range(2):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as tar:
            for i in range(24):
                buffer = io.BytesIO()
                np.save(buffer, rng.normal(size=dim).astype(np.float32))
                for extension, data in (("npy", buffer.getvalue()), ("txt", f"reading {i % 3}".encode())):
                    member = tarfile.TarInfo(f"{shard:02d}{i:04d}.{extension}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))


@pytest.mark.slow
def test_an_installed_modality_trains_saves_and_reloads_without_changes_to_clipkit(tmp_path):
    site = tmp_path / "site"
    (site / "clipkit_vectors-0.1.dist-info").mkdir(parents=True)
    (site / "clipkit_vectors.py").write_text(PLUGIN)
    (site / "clipkit_vectors-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: clipkit-vectors\n"
                                                                     "Version: 0.1\n")
    (site / "clipkit_vectors-0.1.dist-info" / "entry_points.txt").write_text(
        "[clipkit.modalities]\nvector = clipkit_vectors\n")
    write_vector_shards(tmp_path / "shards", dim=6)
    config = tmp_path / "vector.yaml"
    config.write_text(CONFIG.format(shards=tmp_path / "shards", run=tmp_path / "run"))
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    train = subprocess.run([sys.executable, "-m", "clipkit", "train", "--config", str(config)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    check = textwrap.dedent(f'''
        import io, json
        import numpy as np, torch
        from clipkit.eval.encoders import load_encoder
        from clipkit.eval.templates import resolve_templates
        model = load_encoder("{tmp_path / "run" / "checkpoints" / "final.pt"}")
        buffer = io.BytesIO(); np.save(buffer, np.ones(6, np.float32))
        sample = model.eval_decoder("vector").decode(buffer.getvalue(), None)
        vector = model.encode("vector", sample[None])
        print(json.dumps({{"modalities": list(model.modalities), "dim": model.config.vector.dim,
                           "hidden": model.config.vector.hidden, "shape": list(vector.shape),
                           "norm": float(vector.norm()), "templates": resolve_templates(None, "vector")}}))
    ''')
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["modalities"] == ["vector", "text"]
    assert (result["dim"], result["hidden"], result["shape"]) == (6, 24, [1, 16])
    assert result["norm"] == pytest.approx(1.0, abs=1e-5)
    assert result["templates"] == ["a measurement of {}."]
    # Without the plug-in installed the same config names an unknown section, not a crash deep inside.
    bare = subprocess.run([sys.executable, "-m", "clipkit", "train", "--config", str(config)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=300)
    assert bare.returncode != 0 and "unknown key 'model.vector'" in bare.stderr
    # A plug-in that fails to import is named, not skipped: a skipped one would make its configs unreadable.
    (site / "clipkit_broken-0.1.dist-info").mkdir()
    (site / "clipkit_broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: clipkit-broken\n"
                                                                    "Version: 0.1\n")
    (site / "clipkit_broken-0.1.dist-info" / "entry_points.txt").write_text("[clipkit.modalities]\nbroken = clipkit_broken\n")
    (site / "clipkit_broken.py").write_text("raise RuntimeError('needs libfoo')\n")
    broken = subprocess.run([sys.executable, "-c", "import clipkit.modalities"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert broken.returncode != 0
    assert "the modality plug-in 'broken' (clipkit_broken, entry point group clipkit.modalities) failed to load: " \
           "needs libfoo" in broken.stderr


def test_sections_are_registered_by_the_modality_files():
    assert {"image", "text", "audio", "video"} <= set(available_modalities())
    config = ModelConfig(image=ImageTowerConfig(image_size=48))
    assert config.image.image_size == 48 and config.text.context_length == 77  # a left-out section: defaults
    config.image = ImageTowerConfig(image_size=40)  # replacing a section replaces it where to_dict reads it
    assert ExperimentConfig(model=config).to_dict()["model"]["image"]["image_size"] == 40
    assert {"sections"}.isdisjoint(ExperimentConfig().to_dict()["model"])
    assert {"photo", "audio", "video", "simple"} <= set(builtin_templates())
    assert resolve_templates(None, "image")[0] == "a photo of a {}." and len(resolve_templates(None, "image")) == 16
    assert resolve_templates(None, "text") == ["a photo of a {}."]  # a modality without sets: "simple"


def test_section_keys_are_checked_like_any_other():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.imag' \(did you mean 'model\.image'\?\)"):
        from_dict(ExperimentConfig, {"model": {"imag": {}}}, source="test")
    with pytest.raises(ConfigError, match=r"model\.image\.image_size must be an integer"):
        from_dict(ExperimentConfig, {"model": {"image": {"image_size": "big"}}}, source="test")
    with pytest.raises(ConfigError, match="modalities names 'smell', which is no registered modality"):
        ModelConfig(modalities=("image", "smell"))
    with pytest.raises(ConfigError, match="smell is not a modality section"):
        ModelConfig(smell=ImageTowerConfig())
    with pytest.raises(ConfigError, match="text must be TextTowerConfig"):
        ModelConfig(text=ImageTowerConfig())
    overridden = apply_overrides(ExperimentConfig(), ["model.audio.n_mels=32", "model.video.num_frames=3"])
    assert (overridden.model.audio.n_mels, overridden.model.video.num_frames) == (32, 3)


def test_a_name_is_registered_once_and_never_shadows_a_model_key():
    @dataclass
    class Section:
        size: int = 1

    def plugin(name: str) -> type:
        return type("Plugin", (ImageModality,), {"name": name, "config_section": Section})

    with pytest.raises(ValueError, match="'image' is registered twice"):
        register_modality(plugin("image"))
    with pytest.raises(ValueError, match="'embed_dim' would shadow the model config key"):
        register_modality(plugin("embed_dim"))


def test_a_query_file_finds_its_modality_by_extension():
    model = create_model(tiny_model_config())
    assert file_modality(model, "query.JPG") == "image" and file_modality(model, Path("caption.txt")) == "text"
    with pytest.raises(ValueError, match=r"no tower of the model \(image, text\) decodes \.flac files"):
        file_modality(model, "clip.flac")
    with pytest.raises(ValueError, match="has no file extension"):
        file_modality(model, b"\xff\xd8")


def test_a_video_tower_shares_the_image_tower_through_its_plugin():
    config = tiny_model_config()
    video = ModelConfig(embed_dim=config.embed_dim, modalities=("video", "image"), image=config.image,
                        text=config.text)
    model = create_model(video)
    assert model.towers["video"].frames is model.towers["image"]
