"""DAPT started through launch/train.py's real code path on a P100 (faked as the hardware describes itself: device
properties, a CUDA 12.6 build's kernels, NCCL's process group): DeepSpeed's own _do_sanity_check runs and accepts
fp16 (DeepSpeed >= 0.13 refuses fp16 on compute capability 6.x unless DS_ALLOW_DEPRECATED_FP16=1)."""
from __future__ import annotations

import os

import pytest
import torch

from corpora.phantoms import PhantomSpec, write_caption_shards
from tests.conftest import ROOT, fake_gpu, load_launch

DAPT = str(ROOT / "recipes" / "medblip" / "dapt.yaml")
CU126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # torch's cu126 wheels


class _SanityCheckPassed(BaseException):
    """Raised right after DeepSpeed's check returned: past it the engine would allocate on a GPU that is not here."""


def test_dapt_on_a_p100_passes_deepspeeds_fp16_check(tmp_path, monkeypatch, one_rank, capsys):
    import deepspeed.accelerator.real_accelerator as real_accelerator
    from deepspeed.runtime.engine import DeepSpeedEngine

    write_caption_shards(tmp_path / "shards", PhantomSpec(image_size=32, samples_per_shard=8), "train", 16)
    fake_gpu(monkeypatch, "P100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU126_ARCHS)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *a, **k: None)
    # NCCL: the process group exists (one_rank's, as NCCL's would); DeepSpeed adopts it and asks its backend
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # detect again, now on "CUDA"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # what detection finds on a CUDA machine
    for var in ("DS_ALLOW_DEPRECATED_FP16", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)  # the run sets them; restored after the test
    seen: list[bool] = []
    check = DeepSpeedEngine._do_sanity_check

    def spy(self) -> None:
        check(self)  # DeepSpeed's own: raises "Type fp16 is not supported on your device." if it refuses
        seen.append(self.fp16_enabled())
        raise _SanityCheckPassed

    monkeypatch.setattr(DeepSpeedEngine, "_do_sanity_check", spy)
    train = load_launch("train")
    args = ["--recipe", DAPT, f"run.dir={tmp_path / 'run'}", f"data.train={tmp_path / 'shards'}", "data.val=null",
            "run.init_from=null", "model.preset=tiny", "image.size=32", "model.queue_size=16", "model.embed_dim=16",
            "data.batch_size=4", "data.num_workers=0", "train.epochs=null", "train.max_steps=1"]
    with pytest.raises(_SanityCheckPassed):
        train.main(args)
    out = capsys.readouterr()
    assert seen == [True], out.err[-2000:]  # fp16 chosen (precision auto on 6.0) and accepted by DeepSpeed
    assert "precision fp16" in out.out and "DS_ALLOW_DEPRECATED_FP16=1" in out.out
    assert os.environ["DS_ALLOW_DEPRECATED_FP16"] == "1"
