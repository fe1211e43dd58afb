"""Host synchronisations per optimizer step, counted through launch/train.py (launch/bench/benchmark_syncs.py).

A sync stalls a GPU's pipeline. Pinned here on the CPU (a TorchDispatchMode counting `.item()`-like reads, copies to
the host, tolist/numpy and data-dependent shapes): none inside forward + loss + backward for MedBLIP DAPT, PSD, VQA
and BLIP-2 stage 1; outside, only the engine's non-finite check, once per optimizer step whatever the accumulation
(the step's summed losses, read before the step to skip it); the logged values are read once per log interval. Before
this (da0a33f^), DAPT made 10 per step inside and 10 outside at batch 4, 2 micro-batches; the non-finite check was
then one per micro-batch.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import load_launch

syncs = load_launch("bench/benchmark_syncs")
STEPS = 4  # steps 2..3 are counted: the first has one-off work, the last logs and saves


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return syncs.write_data(tmp_path_factory.mktemp("syncs"))


def test_the_counter_sees_item_tolist_host_copies_and_data_dependent_shapes():
    """The counter is not blind: each kind of host read counts once, in the phase it happens in."""
    count = syncs.SyncCount()
    x = torch.arange(6.0)
    with syncs.counting(count, torch.device("cpu")):
        syncs._phased(count, "inside", lambda: (x.sum().item(), float(x[0]), bool(x.any())))()
        syncs._phased(count, "inside", lambda: (x.tolist(), x[x > 2], x.nonzero()))()
        x.repeat_interleave(torch.tensor([1, 0, 2, 1, 1, 1]))  # output size read from the repeats: outside
        x.repeat_interleave(torch.tensor([1, 0, 2, 1, 1, 1]), output_size=6)  # told the size: no read
        with syncs._data_phase(count):
            x.max().item()  # data loading is host work: not counted
    assert (count.inside, count.outside) == (6, 1), count.where


@pytest.mark.parametrize("model", syncs.MODELS)
def test_no_host_sync_inside_forward_and_backward(model, data, tmp_path):
    r = syncs.count_syncs(model, data, tmp_path / model, STEPS)
    assert r["steps"] == STEPS - 2
    assert r["inside_per_step"] == 0, r["where"]
    # outside: the engine's non-finite check, once per step (2 micro-batches here); logging reads nothing per step
    assert r["outside_per_step"] <= 1, r["where"]


def test_at_most_one_sync_per_step_outside_a_logging_step(data, tmp_path):
    """fp32 with 4 micro-batches a step: the non-finite check is one read per step, not one per micro-batch."""
    r = syncs.count_syncs("dapt", data, tmp_path / "dapt", STEPS, ["train.grad_accum=4"])
    assert r["inside_per_step"] == 0 and r["outside_per_step"] == 1, r["where"]
    assert r["deepspeed_per_step"] == 0, r["where"]


def test_under_bf16_the_framework_still_makes_one_and_deepspeed_its_own(data, tmp_path):
    """bf16 at ZeRO 0: DeepSpeed's optimizer checks each gradient for overflow with one host read per parameter
    (CheckOverflow.has_overflow_serial, inside ds.step()); the framework's own count stays 1 per step."""
    r = syncs.count_syncs("dapt", data, tmp_path / "dapt", STEPS, ["train.grad_accum=4", "train.precision=bf16"])
    assert r["inside_per_step"] == 0 and r["outside_per_step"] - r["deepspeed_per_step"] == 1, r["where"]
    assert r["deepspeed_per_step"] > 0  # the counter sees DeepSpeed's reads: were they gone, the docs must say so


def test_device_draw_is_torch_multinomial_draw_for_draw():
    """The negatives drawn without a host read are torch.multinomial's, index for index, generator state included
    (what keeps the step-for-step comparison with BLIP's row-by-row multinomial exact)."""
    from recipes.medblip.model.losses import draw_one_per_row

    for b in (2, 5, 16):
        w = torch.rand(b, b, generator=torch.Generator().manual_seed(b)) + 1e-4
        w.fill_diagonal_(0)
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        rows = torch.stack([torch.multinomial(w[i], 1, generator=g1) for i in range(b)]).squeeze(1)
        assert torch.equal(draw_one_per_row(w, g2), rows)
        assert torch.equal(g1.get_state(), g2.get_state())
        assert not bool((draw_one_per_row(w, g2) == torch.arange(b)).any())  # never the zero-weight positive


def test_queue_pointer_is_kept_on_the_host_and_restored_from_a_state_dict():
    from tests.test_medblip_model import tiny_batch, tiny_model

    model = tiny_model().train()
    model(tiny_batch(model, n=4))
    assert model._queue_ptr == 4 and int(model.queue_ptr) == 4  # the buffer (BLIP's key) follows the host int
    other = tiny_model(seed=1)
    other.load_state_dict(model.state_dict())
    assert other._queue_ptr == 4  # read once, at load
