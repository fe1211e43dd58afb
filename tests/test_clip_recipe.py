"""The second recipe (recipes/clip): YAML, loss, gradient across ranks, and training through launch/train.py."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from corpora.phantoms import PhantomSpec, write_caption_shards
from framework.config import ConfigError, load_config
from framework.distributed import DistInfo
from framework.run_env import run_env
from framework.shards import expand_shards
from framework.streams import ShardStream
from recipes.clip import build
from recipes.clip.loss import contrastive_loss
from tests.conftest import DIST_ENV, ROOT, run_entry

YAML = ROOT / "recipes" / "clip" / "clip.yaml"
SPEC = PhantomSpec(seed=1, image_size=32, samples_per_shard=32)
TINY = ["image.size=32", "model.vision_width=32", "model.text_width=32", "model.embed_dim=32", "data.batch_size=16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip_shards")
    write_caption_shards(root / "train", SPEC, "train", 128)
    write_caption_shards(root / "val", SPEC, "val", 32)
    return root


def test_yaml_validates_and_names_unknown_objectives() -> None:
    cfg = load_config(YAML)
    assert cfg.recipe == "recipes.clip" and list(cfg.objectives) == ["contrastive"]
    assert cfg.image.size == 64 and not cfg.image.hflip and cfg.model.vision_depth == 2
    with pytest.raises(ConfigError, match="objectives.itm: unknown objective .*contrastive"):
        load_config(YAML, ["objectives.itm.weight=1"])
    with pytest.raises(ConfigError, match="model.vision_widht"):
        load_config(YAML, ["model.vision_widht=8"])
    with pytest.raises(ValueError, match="model.vision_pool must be token or avg"):
        load_config(YAML, ["model.vision_pool=max"])


def test_contrastive_loss_matches_hand_computation() -> None:
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    s = 10.0
    sim = [[1.0, 0.0], [0.6, 0.8]]  # img_i . txt_j
    i2t = [-math.log(math.exp(s * sim[i][i]) / sum(math.exp(s * v) for v in sim[i])) for i in range(2)]
    t2i = [-math.log(math.exp(s * sim[j][j]) / sum(math.exp(s * sim[i][j]) for i in range(2))) for j in range(2)]
    expected = 0.5 * (sum(i2t) / 2 + sum(t2i) / 2)
    assert contrastive_loss(img, txt, torch.tensor(s)).item() == pytest.approx(expected, rel=1e-6)
    # Perfectly aligned, well-separated pairs at a high scale: the loss goes to zero.
    eye = torch.eye(4)
    assert contrastive_loss(eye, eye, torch.tensor(100.0)).item() < 1e-6


# Two light processes (torch only; loss.py loaded by path, so no model libraries are imported): ~3 s.
_WORKER = r"""
import importlib.util, os, sys, torch, torch.distributed as dist
spec = importlib.util.spec_from_file_location("clip_loss", sys.argv[1]); m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
rank = int(os.environ["RANK"])  # a file rendezvous: no TCP port another process could take first
dist.init_process_group("gloo", init_method="file://" + sys.argv[4], rank=rank, world_size=2)
img, txt = (t[rank * 3:(rank + 1) * 3].clone().requires_grad_(True) for t in torch.load(sys.argv[2]))
loss = m.contrastive_loss(m.gather_with_grad(img), m.gather_with_grad(txt), torch.tensor(5.0))
loss.backward()
torch.save((loss.item(), img.grad, txt.grad), f"{sys.argv[3]}.{rank}")
dist.barrier()  # gloo's backward scatter may still be sending
# Leave without tearing gloo down: a peer that closes its sockets while this rank still finishes the barrier can make
# gloo abort the process (-6) after the results are written (seen once in a serial run); the test checks the math.
sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
"""


@pytest.mark.slow
def test_gathered_loss_and_gradients_equal_one_big_batch(tmp_path: Path) -> None:
    """Two ranks with 3 pairs each = one process with all 6 (each rank's rows get the full-batch gradient)."""
    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(6, 4, generator=g), dim=-1) for _ in range(2))
    full_img, full_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    full = contrastive_loss(full_img, full_txt, torch.tensor(5.0))
    full.backward()
    torch.save((img, txt), tmp_path / "feats.pt")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(ROOT / "recipes" / "clip" / "loss.py"),
                               str(tmp_path / "feats.pt"), str(tmp_path / "out"), str(tmp_path / "rendezvous")],
                              env={**env, "RANK": str(r)}) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for rank in range(2):
        loss, gi, gt = torch.load(tmp_path / f"out.{rank}")
        assert loss == pytest.approx(full.item(), rel=1e-6)
        # Each rank averages the same global loss; DeepSpeed then averages gradients over ranks (x 1/2),
        # and all_gather's backward sums both ranks' contributions: the result is the full-batch gradient.
        assert torch.allclose(gi, full_img.grad[rank * 3:(rank + 1) * 3] * 2, atol=1e-6)
        assert torch.allclose(gt, full_txt.grad[rank * 3:(rank + 1) * 3] * 2, atol=1e-6)


DIST = DistInfo(0, 1, 0, torch.device("cpu"))


def _built(cfg):
    """(cfg, its RunEnv on the CPU): the arguments of a recipe's build."""
    return cfg, run_env(cfg, DIST)


def test_build_forward_and_disabled_objective(shards: Path) -> None:
    cfg = load_config(YAML, TINY + [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}"])
    task = build(cfg, run_env(cfg, DIST))
    stream = ShardStream(expand_shards(cfg.data.train), task.decode, task.collate, 16, shuffle_buffer=0)
    batch = next(iter(stream))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["input_ids"].shape[0] == 16
    out = task.model(batch)
    assert set(out["losses"]) == {"contrastive"}
    assert out["losses"]["contrastive"].item() == pytest.approx(math.log(16), abs=0.5)  # untrained: ~ln(B)
    assert out["metrics"]["temp"].item() == pytest.approx(0.07, rel=1e-5)
    metrics = task.evaluate(task.model.eval(), 0)
    assert set(metrics) == {"i2t_r1", "t2i_r1", "temp"} and 0 <= metrics["i2t_r1"] <= 1
    assert build(*_built(load_config(YAML, TINY + [f"data.train={shards / 'train'}", "data.val=null"]))).evaluate is None
    with pytest.raises(ConfigError, match="no objective is enabled"):
        build(*_built(load_config(YAML, TINY + ["objectives.contrastive.enabled=false"])))
    task.model.objectives = []  # a disabled objective is not computed
    assert task.model(batch)["losses"] == {}


@pytest.mark.slow
def test_trains_through_launch_train_and_loss_decreases(shards: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    res = run_entry("train.py", "--recipe", str(YAML), *TINY, f"data.train={shards / 'train'}",
                    f"data.val={shards / 'val'}", f"run.dir={run_dir}", "train.epochs=null", "train.max_steps=100",
                    "train.warmup_steps=5", "run.save_every=0", "run.log_every=20", "data.shuffle_buffer=64",
                    timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: finished at step 100" in res.stdout
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss/contrastive")]
    assert len(losses) == 100
    # Contrastive training sits near ln(batch) for some dozens of steps before features separate.
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3, losses  # it learns
    temps = [e.value for e in acc.Scalars("metrics/temp")]
    assert temps[0] != temps[-1]  # the temperature is learned
    assert "eval/i2t_r1" in acc.Tags()["scalars"]
    assert (run_dir / "checkpoints").is_dir()
