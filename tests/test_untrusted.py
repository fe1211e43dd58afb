"""Untrusted files never run code: malicious pickles are refused (BLIP/MedBLIP weights and DeepSpeed resume alike)
before anything executes, a checksum mismatch is refused, YAML python tags are refused. Each payload is shown to be
live (it does run under the unsafe loader), so the refusals are what protects the user."""
from __future__ import annotations

import hashlib
import pathlib
import pickle

import pytest
import torch
import yaml

from framework.checkpoint import CheckpointReadError, load, safe_load
from framework.config import ConfigError, load_config
from recipes.medblip.model.weights import CheckpointError, fetch, load_pretrained
from tests.conftest import serve_directory
from tests.test_medblip_model import tiny_model


class Payload:
    """Unpickling this creates `marker` (what an attacker's file would do with a shell command instead)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_pth_refused_by_the_medblip_loader(tmp_path, fmt):
    marker = tmp_path / "pwned"
    model = tiny_model()
    evil = {"model": state(model), "payload": Payload(marker)}  # BLIP's layout, with a passenger
    path = tmp_path / "model_base.pth"
    if fmt == "zip":
        torch.save(evil, path)
    else:  # a plain pickle (torch's pre-1.6 format)
        path.write_bytes(pickle.dumps(evil, protocol=2))
    before = state(model)
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_pretrained(model, path)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    with pytest.raises(CheckpointReadError, match="refused|not a readable tensors-only"):
        safe_load(path)  # the framework's reader refuses it too
    assert not marker.exists()
    if fmt == "zip":  # the payload is live: the unsafe loaders run it
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


class DeepSpeedReads:
    """The part of a DeepSpeedEngine that framework.checkpoint.load relies on: load_checkpoint reads the tag's model
    states through the engine's own TorchCheckpointEngine (torch.load with weights_only=False, as DeepSpeed does).
    A real engine needs a process group; tests/test_bad_input.py resumes a real poisoned run in its own process."""

    def __init__(self):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine,
        )

        self.checkpoint_engine = TorchCheckpointEngine()

    def load_checkpoint(self, load_dir: str, tag: str, **_: object) -> tuple[str, dict]:
        sd = self.checkpoint_engine.load(f"{load_dir}/{tag}/mp_rank_00_model_states.pt", map_location="cpu")
        return load_dir, {k: v for k, v in sd.items() if k != "module"}


def test_malicious_deepspeed_checkpoint_refused_on_resume(tmp_path):
    """DeepSpeed's own loader unpickles with weights_only=False; the framework's resume path must not."""
    ckpt, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    (ckpt / "step_00000001").mkdir(parents=True)
    states = ckpt / "step_00000001" / "mp_rank_00_model_states.pt"
    genuine = {"module": {"w": torch.ones(2)}, "position": {"step": 1}}
    torch.save(genuine, states)
    torch.save({"rng": torch.get_rng_state()}, ckpt / "step_00000001" / "rank_00000.pt")
    engine = DeepSpeedReads()
    client, rank_state = load(engine, ckpt, "step_00000001", rank=0)  # a genuine checkpoint loads
    assert client["position"] == {"step": 1} and torch.equal(rank_state["rng"], torch.get_rng_state())

    torch.save({**genuine, "payload": Payload(marker)}, states)
    with pytest.raises(CheckpointReadError, match=r"refused: it holds a pickled .*; delete .*step_00000001"):
        load(engine, ckpt, "step_00000001", rank=0)
    assert not marker.exists()
    torch.save(genuine, states)
    torch.save({"rng": Payload(marker)}, ckpt / "step_00000001" / "rank_00000.pt")  # the per-rank file too
    with pytest.raises(CheckpointReadError, match="refused"):
        load(engine, ckpt, "step_00000001", rank=0)
    assert not marker.exists()

    torch.save({**genuine, "payload": Payload(marker)}, states)
    assert "load" not in vars(engine.checkpoint_engine)  # the guard is gone after each load ...
    engine.load_checkpoint(str(ckpt), tag="step_00000001")  # ... and DeepSpeed's own reader runs the payload
    assert marker.exists()


def test_deepspeed_data_classes_load_safely(tmp_path):
    """fp16/ZeRO optimizer files pickle DeepSpeed's loss scaler and stage enum: allowlisted data, not code.
    (fp16 needs a GPU; this is the part of its checkpoint the CPU cannot write.)"""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    dynamic = CreateLossScaler(torch.float16, 0, True, {"init_scale": 2 ** 16, "scale_window": 1000,
                                                        "min_scale": 1, "delayed_shift": 2,
                                                        "consecutive_hysteresis": False})
    torch.save({"loss_scaler": dynamic, "static": LossScaler(128.0), "zero_stage": ZeroStageEnum.gradients},
               tmp_path / "optim.pt")
    back = safe_load(tmp_path / "optim.pt")
    assert type(back["loss_scaler"]) is type(dynamic) and vars(back["loss_scaler"]) == vars(dynamic)
    assert back["static"].cur_scale == 128.0 and back["zero_stage"] is ZeroStageEnum.gradients


def test_checksum_mismatch_refused_for_a_file_and_a_url(tmp_path, monkeypatch):
    genuine, tampered = tiny_model(seed=1), tiny_model(seed=2)
    torch.save({"model": state(genuine)}, tmp_path / "genuine.pth")
    digest = hashlib.sha256((tmp_path / "genuine.pth").read_bytes()).hexdigest()
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"model": state(tampered)}, served / "model_base.pth")  # what a compromised mirror serves

    target = tiny_model(seed=3)
    before = state(target)
    with pytest.raises(CheckpointError, match="does not match the expected"):
        load_pretrained(target, served / "model_base.pth", sha256=digest)
    with pytest.raises(CheckpointError, match="does not match the expected"):
        load_pretrained(target, f"{served / 'model_base.pth'}#sha256={digest}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # the download cache
    with serve_directory(served) as base:
        url = f"{base}/model_base.pth"
        with pytest.raises(CheckpointError, match="does not match the expected"):
            load_pretrained(target, f"{url}#sha256={digest}")
        with pytest.raises(CheckpointError, match="does not match the expected"):
            fetch(url, sha256=digest, cache_dir=tmp_path / "cache")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # never loaded
    assert fetch(str(tmp_path / "genuine.pth"), sha256=digest) == tmp_path / "genuine.pth"  # the right file passes


def _tags(marker: pathlib.Path) -> list[str]:
    return [f'!!python/object/apply:os.system ["touch {marker}"]',
            f'!!python/object/apply:builtins.exec ["open(\'{marker}\', \'w\').close()"]',
            "!!python/object:framework.config.TrainConfig {lr: 1.0}",
            "!!python/name:os.system"]


@pytest.mark.parametrize("which", range(4))
def test_yaml_python_tags_refused(tmp_path, which):
    marker = tmp_path / "pwned"
    tag = _tags(marker)[which]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"recipe: recipes.toy\ntrain:\n  max_steps: 1\n  lr: {tag}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:.* invalid YAML: could not determine a constructor"):
        load_config(recipe)
    # in a base recipe, a deepspeed: file and a command-line override
    (tmp_path / "child.yaml").write_text("base: recipe.yaml\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "ds.yaml").write_text(f"zero_optimization: {tag}\n")
    (tmp_path / "ok.yaml").write_text("recipe: recipes.toy\ntrain: {max_steps: 1}\ndeepspeed: ds.yaml\n")
    with pytest.raises(ConfigError, match="deepspeed: .*ds.yaml is not valid YAML"):
        load_config(tmp_path / "ok.yaml")
    (tmp_path / "clean.yaml").write_text("recipe: recipes.toy\ntrain: {max_steps: 1}\n")
    with pytest.raises(ConfigError, match="train.lr: expected a number"):  # the override stays a plain string
        load_config(tmp_path / "clean.yaml", [f"train.lr={tag}"])
    assert not marker.exists()
    if which < 2:  # the payload is live: an unsafe YAML loader runs it
        yaml.unsafe_load(f"x: {tag}")
        assert marker.exists()
