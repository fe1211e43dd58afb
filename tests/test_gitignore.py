"""What the README's commands write into a checkout (runs, shards, exports, downloaded weights) is git-ignored."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import ROOT

WRITTEN = ["runs/demo/demo.json", "data/medpix/all-00000.tar", "exports/medblip-vqa/model.safetensors",
           "checkpoints/model_base.pth"]


@pytest.mark.parametrize("path", WRITTEN)
def test_outputs_are_ignored(path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
    assert r.returncode == 0, f"{path} is not ignored by .gitignore"
