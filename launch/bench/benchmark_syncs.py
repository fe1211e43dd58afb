#!/usr/bin/env python
"""Host synchronisations per optimizer step through launch/train.py, inside forward+backward vs outside.

    python launch/bench/benchmark_syncs.py [--models dapt psd vqa blip2] [--steps 4] [--json FILE]
        [--set train.grad_accum=4 train.precision=bf16 ...]

A sync is a point where the host waits for the device: `.item()` / `int()` / `float()` / `bool()` of a tensor
(aten._local_scalar_dense), a copy to the host, `.tolist()` / `.numpy()`, or an op whose output shape depends
on the data (nonzero, masked_select, unique: the host must read the size). On the CPU nothing waits, so they are
counted under a TorchDispatchMode (and a Python wrapper for tolist/numpy, which skip the dispatcher); on a GPU
`torch.cuda.set_sync_debug_mode("warn")` reports the real ones. Data loading is not counted (it is host work).
Each model is trained on generated phantom data with its demo recipe shrunk to tiny sizes (batch 4, 2 micro-batches
a step, logging every 1000 steps); the count covers the steps between the first and the last (neither logs).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("dapt", "psd", "vqa", "blip2")
# Ops whose result the host must read (a scalar, or an output size that depends on the values).
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}


@dataclass
class SyncCount:
    """Syncs by phase: "inside" = forward + loss combination + backward, "outside" = the rest of the step."""

    inside: int = 0
    outside: int = 0
    phase: str = "outside"  # inside | outside | data (not counted)
    in_deepspeed: int = 0  # of inside + outside, those made by DeepSpeed's own code (its optimizers' checks)
    where: dict[str, int] = field(default_factory=dict)  # op -> count, for finding them
    # step -> (inside, outside, in_deepspeed) at its boundary
    at_step: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def add(self, what: str) -> None:
        if self.phase == "data":
            return
        setattr(self, self.phase, getattr(self, self.phase) + 1)
        deepspeed = _in_deepspeed()
        self.in_deepspeed += deepspeed
        key = f"{self.phase}:{what}@{_caller()}{' (in deepspeed)' * deepspeed}"
        self.where[key] = self.where.get(key, 0) + 1


def _caller() -> str:
    """file:line of the innermost frame in this repository outside this file (where a sync comes from)."""
    import traceback

    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path != Path(__file__).resolve() and ROOT in path.parents and "tests" not in path.parts:
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return "?"


def _in_deepspeed() -> bool:
    """True if the innermost frame outside torch is DeepSpeed's: a sync DeepSpeed makes, not the framework."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        parts = Path(frame.filename).parts
        if "torch" in parts or Path(frame.filename) == Path(__file__).resolve():
            continue
        return "deepspeed" in parts
    return False


class _CountingMode(TorchDispatchMode):
    """Counts host reads among the dispatched ops (CPU runs)."""

    def __init__(self, count: SyncCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = func._schema.name.split("::")[-1]
        if name == "repeat_interleave":  # reads its repeats on the host unless told the output size
            if (kwargs or {}).get("output_size") is None and not (len(args) > 1 and args[-1] is not None):
                self.count.add(name)
        elif name in _SYNC_OPS:
            self.count.add(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.count.add(f"{name}[bool mask]")  # a boolean mask becomes indices: its size is read on the host
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst_dev = (args[0].device if name == "copy_" else (kwargs or {}).get("device"))
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_dev is not None \
                    and torch.device(dst_dev).type == "cpu":
                self.count.add("device_to_host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(count: SyncCount, device: torch.device) -> Iterator[None]:
    """Count syncs into `count` while the block runs (CPU: dispatch mode; CUDA: the sync debug mode's warnings)."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            if device.type == "cpu":  # on a GPU the debug mode sees the copy these make
                count.add(name)
            return fn(self, *a, **k)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        if device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                seen = 0

                def flush() -> None:  # attribute the warnings seen so far to the phase they happened in
                    nonlocal seen
                    for w in caught[seen:]:
                        if "synchroniz" in str(w.message):
                            count.add("cuda_sync")
                    seen = len(caught)

                count.flush = flush  # type: ignore[attr-defined]
                try:
                    yield
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                    flush()
        else:
            count.flush = lambda: None  # type: ignore[attr-defined]
            with _CountingMode(count):
                yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _phased(count: SyncCount, phase: str, fn: Callable) -> Callable:
    def run(*a: Any, **k: Any) -> Any:
        count.flush()  # type: ignore[attr-defined]
        before, count.phase = count.phase, phase
        try:
            return fn(*a, **k)
        finally:
            count.flush()  # type: ignore[attr-defined]
            count.phase = before
    return run


@contextlib.contextmanager
def instrumented(count: SyncCount) -> Iterator[list]:
    """Patch framework.build.build_run so that the run it builds marks its phases (forward, combine, backward:
    inside; evaluation, checkpoints and data: not counted), and Trainer.finish_step so that each optimizer
    step's counts are noted when it is finished; yields the list the built runs are appended to."""
    import framework.build as build
    import framework.checkpoint as checkpoint
    import framework.engine as engine

    runs: list = []
    real_build, real_loader, real_finish, real_save = (build.build_run, engine.make_loader,
                                                       engine.Trainer.finish_step, checkpoint.save)

    def finish_step(self: Any, *a: Any, **k: Any) -> Any:
        done = real_finish(self, *a, **k)
        count.flush()  # type: ignore[attr-defined]
        # the optimizer step is done (position advanced, plugins run); its logging, evaluation, checkpoint follow
        count.at_step[self.progress.step] = (count.inside, count.outside, count.in_deepspeed)
        return done

    def build_run(*a: Any, **k: Any) -> Any:
        run = real_build(*a, **k)
        run.forward = _phased(count, "inside", run.forward)
        run.combine = _phased(count, "inside", run.combine)
        run.ds.backward = _phased(count, "inside", run.ds.backward)
        if run.task.evaluate is not None:  # evaluation is not part of a training step
            run.task.evaluate = _phased(count, "data", run.task.evaluate)
        for plugin in run.plugins:  # their state is read for a checkpoint (host work), not for the step
            plugin.state_dict = _phased(count, "data", plugin.state_dict)
        runs.append(run)
        return run

    def make_loader(*a: Any, **k: Any) -> Any:
        loader = real_loader(*a, **k)

        class Counted:  # the loader, its iteration not counted (decoding and collation are host work)
            def __getattr__(self, name: str) -> Any:
                return getattr(loader, name)

            def __setattr__(self, name: str, value: Any) -> None:
                setattr(loader, name, value)

            def __iter__(self) -> Iterator:
                it = iter(loader)
                while True:
                    with _data_phase(count):
                        try:
                            batch = next(it)
                        except StopIteration:
                            return
                    yield batch

        return Counted()

    build.build_run, engine.make_loader, engine.Trainer.finish_step = build_run, make_loader, finish_step
    checkpoint.save = _phased(count, "data", real_save)  # writing a checkpoint is host work
    try:
        yield runs
    finally:
        build.build_run, engine.make_loader, engine.Trainer.finish_step = real_build, real_loader, real_finish
        checkpoint.save = real_save


@contextlib.contextmanager
def _data_phase(count: SyncCount) -> Iterator[None]:
    count.flush()  # type: ignore[attr-defined]
    before, count.phase = count.phase, "data"
    try:
        yield
    finally:
        count.phase = before


def write_data(root: Path) -> Path:
    """Phantom demo data (captions, VQA, vocabulary) under root/demo, once."""
    from corpora.phantoms import PhantomSpec, write_demo_data

    out = root / "demo"
    write_demo_data(out, PhantomSpec(image_size=32, train_captions=64, val_captions=8, samples_per_shard=32,
                                     vqa_train_images=8, vqa_test_images=4))
    return out


def recipe(model: str, data: Path, run_dir: Path, steps: int, extra: list[str] = ()) -> tuple[str, list[str]]:
    """(recipe YAML, overrides) of a tiny `model` run: batch 4, 2 micro-batches a step, no logging step."""
    vocab = data / "vocab.txt"
    common = [f"run.dir={run_dir}", "run.resume=none", "run.init_from=null", "run.save_every=0",
              "run.eval_every=0", "run.log_every=1000", f"model.tokenizer={vocab}", "data.batch_size=4",
              "train.grad_accum=2", "train.epochs=null", f"train.max_steps={steps}", "train.precision=fp32",
              "image.size=32", "data.num_workers=0", "data.shuffle_buffer=8"]
    shards = [f"data.train={data / 'shards' / 'train'}", "data.val=null"]
    if model in ("dapt", "psd"):
        path = ROOT / "recipes" / "medblip" / "demo" / f"{model}.yaml"
        over = [*common, *shards, "model.queue_size=16", "model.embed_dim=16"]
    elif model == "vqa":
        path = ROOT / "recipes" / "medblip" / "demo" / "vqa.yaml"
        over = [*common, f"vqa.root={data / 'vqa'}"]
    elif model == "blip2":
        path = ROOT / "recipes" / "blip2" / "demo" / "stage1.yaml"
        over = [*common, *shards, "model.vision_weights=null"]
    else:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    return str(path), [*over, *extra]


def count_syncs(model: str, data: Path, run_dir: Path, steps: int = 5, extra: list[str] = ()) -> dict[str, Any]:
    """Train `model` for `steps` optimizer steps through launch/train.py's main(); syncs per step by phase, counted
    over steps 2 .. steps-1 (the first has one-off work; the last logs and saves, as every log_every-th does)."""
    from tests.conftest import load_launch

    path, over = recipe(model, data, run_dir, steps, list(extra))
    train = load_launch("train")
    count = SyncCount()
    from framework.distributed import init_distributed

    device = init_distributed().device
    with instrumented(count) as runs, counting(count, device):
        code = train.main(["--recipe", path, *over])
    if code != 0 or not runs:
        raise RuntimeError(f"{model}: launch/train.py exited with {code}")
    if steps < 3 or sorted(count.at_step) != list(range(1, steps + 1)):
        raise RuntimeError(f"{model}: expected steps 1..{steps} (>= 3), saw {sorted(count.at_step)}")
    (i0, o0, d0), (i1, o1, d1) = count.at_step[1], count.at_step[steps - 1]
    n = steps - 2
    return {"model": model, "steps": n, "inside_per_step": (i1 - i0) / n, "outside_per_step": (o1 - o0) / n,
            "per_step": (i1 - i0 + o1 - o0) / n, "deepspeed_per_step": (d1 - d0) / n, "where": dict(sorted(count.where.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per model (>= 3)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--verbose", action="store_true", help="print where the syncs come from")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides after the tiny run's own (train.grad_accum=4, train.precision=bf16)")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="syncs-") as tmp:
        data = write_data(Path(tmp))
        for model in args.models:
            r = count_syncs(model, data, Path(tmp) / model, args.steps, args.set)
            results.append(r)
            accum = next((o.split("=", 1)[1] for o in reversed(args.set) if o.startswith("train.grad_accum=")), "2")
            print(f"{model:>6}: {r['per_step']:.1f} syncs per optimizer step ({r['inside_per_step']:.1f} inside "
                  f"forward+backward, {r['outside_per_step']:.1f} outside; {r['deepspeed_per_step']:.1f} of them in "
                  f"DeepSpeed's own code) over {r['steps']} steps of {accum} micro-batches", flush=True)
            if args.verbose:
                print("        " + ", ".join(f"{k} {v}" for k, v in r["where"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
