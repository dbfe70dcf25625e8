"""The command line itself: start-up without heavy imports, help for every option, the version, the
bundled configs."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from clipkit import __version__
from clipkit.cli import build_parser
from retrieval import RetrievalIndex

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "open_clip", "torchaudio", "torchvision", "webdataset", "matplotlib")


def run_python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_help_imports_no_model_library():
    done = run_python("import sys\nfrom clipkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                      f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_vector_search_runs_without_torch(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    RetrievalIndex.build(vectors, [{"n": i} for i in range(50)], kind="exact").save(tmp_path / "idx")
    np.save(tmp_path / "q.npy", vectors[7])
    done = run_python("import sys\nfrom clipkit.cli import main\n"
                      f"code = main(['search', {str(tmp_path / 'idx')!r}, '--vector-file', {str(tmp_path / 'q.npy')!r},"
                      " '--k', '2'])\n"
                      "print('torch loaded' if 'torch' in sys.modules else 'no torch', code)")
    assert done.returncode == 0, done.stderr
    assert "id 7" in done.stdout and done.stdout.strip().endswith("no torch 0")


def _actions(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_every_option_has_a_help_line():
    missing = [f"{path} {action.option_strings or action.dest}" for path, action in _actions(build_parser(), "clipkit")
               if not action.help]
    assert not missing


def test_version_and_configs_from_any_folder(tmp_path):
    version = subprocess.run([sys.executable, "-m", "clipkit", "--version"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert version.stdout.strip() == f"clipkit {__version__}"
    listed = subprocess.run([sys.executable, "-m", "clipkit", "configs"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert listed.returncode == 0
    for path in (REPO / "configs").glob("*.yaml"):
        assert f"configs/{path.name}" in listed.stdout
    unknown = subprocess.run([sys.executable, "-m", "clipkit", "make-toy", "--config", "configs/nope.yaml"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert unknown.returncode == 2 and "nor a bundled config of that name" in unknown.stderr
