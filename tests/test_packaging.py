"""The package as users install it: a wheel (not an editable install) in a fresh virtual environment,
run from a folder that is not the checkout."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_every_package_of_the_source_tree_is_in_the_wheel_list():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for top in ("clipkit", "retrieval")
             for p in (REPO / top).rglob("__init__.py")}
    assert listed == found | {"clipkit.configs"}


@pytest.mark.slow
def test_wheel_installs_and_runs_from_an_unrelated_folder(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("clipkit-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # clipkit comes from the wheel; its dependencies (torch & co.) from this environment, appended
    # after the fresh venv's own site-packages, which a .pth line does without running this
    # environment's editable-install hook.
    fresh_site = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    clipkit = str(venv / "bin" / "clipkit")

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([clipkit, *args], capture_output=True, text=True, timeout=900, cwd=work, env=env)
        assert done.returncode == 0, f"clipkit {' '.join(args)}: {done.stderr[-3000:]}"
        return done

    where = subprocess.run([str(python), "-c", "import clipkit; print(clipkit.__file__)"], capture_output=True,
                           text=True, cwd=work, env=env, check=True).stdout.strip()
    assert where.startswith(str(venv)), where
    assert "configs/toy-image-text.yaml" in run("configs").stdout
    run("make-toy", "--num-train", "256", "--num-eval", "32", "--samples-per-shard", "128")
    assert json.loads((work / "toy-data" / "image-text" / "sizes.json").read_text())["train-000000.tar"] == 128
    trained = run("train", "--config", "configs/toy-image-text.yaml", "--no-progress", "--set", "train.max_steps=2",
                  "--set", "data.batch_size=32", "--set", "data.num_workers=0", "--set", "train.output_dir=run")
    assert "trained 2 steps" in trained.stdout and (work / "run" / "checkpoints" / "final.pt").is_file()
    assert "eval after step 2" in trained.stdout and (work / "run" / "checkpoints" / "best.pt").is_file()
    quick = run("quickstart", "--cache-dir", "cache", "--num-train", "256", "--num-eval", "64", "--no-progress",
                "--set", "train.max_steps=2", "--set", "data.num_workers=0", "--set", "train.output_dir=quick")
    assert "zero-shot classification of 64 held-out image samples" in quick.stdout
