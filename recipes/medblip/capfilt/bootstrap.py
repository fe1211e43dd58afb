"""CapFilt over a shard corpus, on one process or many: plan (rank 0), shards split across ranks, manifest merged.

Rank 0 holds the output's lock (corpora.shard_writer.exclusive) for the whole run, cleans leftovers of interrupted runs
and decides which shards are still to do; the rest is done in rounds, shard r*world + rank in round r, each round
ending in one exchange (ranks.agree) that carries progress and any failure. Rank 0 then merges the per-shard
reports into manifest.json (written last) and the report. A shard's content depends only on its input, the
models, the options and the seeds (per caption), never on the rank that wrote it or the batch size, so the same
command with another number of ranks resumes the same output. Several nodes need --out on a shared file system.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from corpora.shard_writer import (
    STATE_DIR,
    clean_out,
    complete_report,
    exclusive,
    write_json_atomic,
)
from framework.distributed import say
from framework.rundir import run_dir_of
from framework.shards import count_samples, expand_shards, read_manifest
from recipes.medblip.capfilt.generation import SamplingOptions
from recipes.medblip.capfilt.models import (
    LoadedModel,
    inference_precision,
    load_model,
    resolve_device,
)
from recipes.medblip.capfilt.ranks import agree, broadcast, world
from recipes.medblip.capfilt.scoring import DECIMALS
from recipes.medblip.capfilt.writing import (
    FORMAT_VERSION,
    FilterSettings,
    ShardJob,
    build_manifest,
    filter_shard,
)


@dataclass
class CapFiltOptions:
    """Everything launch/capfilt.py passes on (models, input, output, sampling and filter settings, runtime)."""

    shards: list[str]  # input shards: folders, patterns or files (as data.train)
    out: str
    captioner: str  # run dir / checkpoint / weights of the captioner
    filter: str  # ... of the filter (the same spec: one model for both)
    settings: FilterSettings = field(default_factory=lambda: FilterSettings(SamplingOptions()))
    recipe: Optional[str] = None  # the model shape for weights outside a run directory (default dapt.yaml)
    overrides: list[str] = field(default_factory=list)  # dotted overrides of that recipe (e.g. model.preset=tiny)
    batch_size: int = 16  # images per generation batch (x k captions; x (k+1) ITM pairs)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (training's rules)
    device: Optional[str] = None  # default: this rank's GPU, else the CPU
    overwrite: bool = False  # replace the output of other inputs/options/models in --out
    examples: int = 12  # example images in the report
    report: bool = True

    def check(self) -> None:
        self.settings.sampling.check()
        if not 0.0 <= self.settings.threshold <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], got {self.settings.threshold}")
        if self.batch_size < 1 or self.examples < 0:
            raise ValueError(f"--batch-size must be >= 1 and --examples >= 0 (got {self.batch_size}, {self.examples})")
        if self.device:
            resolve_device(self.device)  # a typo or a missing GPU: one line now, not a traceback after loading
        out = Path(self.out).resolve()
        for option, spec in (("--captioner", self.captioner), ("--filter", self.filter)):
            run = run_dir_of(spec)
            if run is not None and (out == run.resolve() or run.resolve() in out.parents):
                raise ValueError(f"--out {self.out} lies in the run directory of {option} {spec}: the shards would "
                                 "mix with the run's files; choose another --out")


@dataclass
class Plan:
    urls: list[str]
    names: list[str]
    images: list[int]  # per input shard
    fingerprint: str
    todo: list[int]  # indices of shards not finished by an earlier run with the same fingerprint
    info: dict[str, Any]  # options, models and inputs for the manifest


def input_identity(urls: list[str]) -> list[dict[str, Any]]:
    """name, size and sha256 of each input shard (the sha256 of its manifest when that lists the same size)."""
    listed: dict[str, dict] = {}
    for folder in sorted({str(Path(u).parent) for u in urls}):
        doc = read_manifest([str(Path(folder) / "x")]) or {}
        listed |= {str(Path(folder) / str(e.get("name"))): e for e in doc.get("shards", [])}
    out = []
    for u in urls:
        size = Path(u).stat().st_size
        entry = listed.get(str(Path(u)), {})
        digest = entry.get("sha256") if entry.get("bytes") == size else None
        if not digest:
            h = hashlib.sha256()
            with open(u, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        out.append({"name": Path(u).name, "bytes": size, "sha256": digest})
    return out


def _model_info(m: LoadedModel) -> dict[str, Any]:
    return {"spec": m.spec, "weights_sha256": m.weights_sha256, **m.config}


def check_output(out: Path, urls: list[str]) -> None:
    """--out must be a writable folder that is not the folder of an input shard."""
    inputs = {Path(u).resolve().parent for u in urls}
    if out.resolve() in inputs:
        raise ValueError(f"--out {out} is the folder of the input shards: the output would mix with the input; "
                         "choose another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_DIR).mkdir(exist_ok=True)


def make_plan(opts: CapFiltOptions, captioner: LoadedModel, filter_model: LoadedModel, precision: str) -> Plan:
    """Rank 0, holding the lock: the inputs, the fingerprint, leftovers cleaned, the shards still to do."""
    urls = expand_shards(opts.shards)
    names = [Path(u).name for u in urls]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--shards lists two shards named {twice[0]}: the output shards take their inputs' names; "
                         "give the inputs distinct names")
    out = Path(opts.out)
    s = opts.settings
    info = {"options": {"sampling": asdict(s.sampling), "threshold": s.threshold, "seed": s.seed,
                        "precision": precision, "score_decimals": DECIMALS},
            "models": {"captioner": _model_info(captioner), "filter": _model_info(filter_model),
                       "one_model": captioner.model is filter_model.model},
            "inputs": input_identity(urls)}
    content = {"v": FORMAT_VERSION, **info, "models": {k: {kk: vv for kk, vv in v.items() if kk != "spec"}
                                                       for k, v in info["models"].items() if k != "one_model"}}
    fp = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    planned = set(names)
    clean_out(out, fp, planned, opts.overwrite,
              shard_name=lambda n: n in planned or (out / STATE_DIR / (n + ".json")).is_file())
    todo = [i for i, n in enumerate(names) if complete_report(out, n, fp) is None]
    images = [count_samples([u]) for u in urls]
    info["source"] = {"shards": urls, "images": sum(images)}
    return Plan(urls, names, images, fp, todo, info)


class Progress:
    """Rank 0's progress line with ETA, at most every `every` seconds: rank 0's rate times the ranks."""

    def __init__(self, total: int, done: int, ranks: int, log: Callable[[str], None], every: float = 10.0):
        self.total, self.done, self.ranks, self.log, self.every = total, done, ranks, log, every
        self.t0 = self.last = time.time()
        self.mine = 0  # images rank 0 did since the start
        self.round = 0  # ... in the current round (other ranks' progress is known only at the round's end)

    def add(self, images: int) -> None:
        self.mine += images
        self.round += images
        if time.time() - self.last >= self.every:
            self.show()

    def end_round(self, done: int) -> None:
        """Every rank's images so far (known after each round's exchange)."""
        shown = self.done + self.round * self.ranks
        self.done, self.round = done, 0
        if done != shown or done == self.total:
            self.show()

    def show(self) -> None:
        self.last = time.time()
        rate = self.mine / max(self.last - self.t0, 1e-9)
        est = min(self.total, self.done + self.round * self.ranks)
        eta = (self.total - est) / (rate * self.ranks) if rate > 0 else math.inf
        when = "-" if est >= self.total else "?" if math.isinf(eta) else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        self.log(f"capfilt: {est}/{self.total} images | {rate:.1f} img/s on rank 0 x {self.ranks} rank(s) | "
                 f"ETA {when}")


def load_models(opts: CapFiltOptions, log: Callable[[str], None]) -> tuple[LoadedModel, LoadedModel, str]:
    """(captioner, filter, precision name) on this rank's device; one model when both specs are the same."""
    device = resolve_device(opts.device)
    precision = inference_precision(opts.precision, device)
    kw = dict(recipe=opts.recipe, overrides=opts.overrides, device=device, precision=precision, log=log)
    captioner = load_model(opts.captioner, **kw)
    same = Path(opts.filter).expanduser().resolve() == Path(opts.captioner).expanduser().resolve()
    filter_model = captioner if same else load_model(opts.filter, **kw)
    return captioner, filter_model, precision.name


def run_capfilt(opts: CapFiltOptions, log: Callable[[str], None] = say) -> Optional[dict]:
    """CapFilt `opts.shards` into `opts.out` on every rank of the process group (or alone); returns the manifest
    on rank 0 (None elsewhere). Raises RankFailure (several ranks) or the step's own error (one process)."""
    opts.check()
    rank, size = world()
    captioner, filter_model, precision = agree(lambda: load_models(opts, log))[rank]
    out = Path(opts.out)
    with ExitStack() as stack:
        def plan_on_rank0() -> Optional[Plan]:
            if rank != 0:
                return None
            check_output(out, expand_shards(opts.shards))
            stack.enter_context(exclusive(out))  # held until the manifest is written
            return make_plan(opts, captioner, filter_model, precision)

        plan: Plan = broadcast(agree(plan_on_rank0)[0])
        done = sum(n for i, n in enumerate(plan.images) if i not in plan.todo)
        log(f"capfilt: {len(plan.urls)} shards, {sum(plan.images)} images; {len(plan.urls) - len(plan.todo)} "
            f"already done; k={opts.settings.sampling.k}, threshold {opts.settings.threshold}, {precision}, "
            f"{size} rank(s)")
        progress = Progress(sum(plan.images), done, size, log)
        for r in range(math.ceil(len(plan.todo) / size)):
            slot = r * size + rank
            job = None
            if slot < len(plan.todo):
                i = plan.todo[slot]
                job = ShardJob(i, plan.urls[i], plan.names[i], str(out), plan.fingerprint)

            def one_shard() -> int:
                if job is None:
                    return 0
                add = progress.add if rank == 0 else (lambda n: None)
                return filter_shard(job, captioner, filter_model, opts.settings, opts.batch_size, add)["images"]

            done += sum(agree(one_shard))
            progress.end_round(done)

        def merge() -> Optional[dict]:
            if rank != 0:
                return None
            manifest = out / "manifest.json"
            if not plan.todo and manifest.is_file():
                doc = json.loads(manifest.read_text())
                if doc.get("fingerprint") == plan.fingerprint:
                    log(f"capfilt: {out} is up to date")
                    return doc
            return finish(opts, plan, log)

        return agree(merge)[0]


def finish(opts: CapFiltOptions, plan: Plan, log: Callable[[str], None]) -> dict:
    """Rank 0 after every shard is done: manifest.json (last) and the report from the per-shard reports."""
    out = Path(opts.out)
    reports = []
    for name in plan.names:
        rep = complete_report(out, name, plan.fingerprint)
        if rep is None:
            raise ValueError(f"{out / STATE_DIR / (name + '.json')} is missing after every rank finished: is --out "
                             "on a file system that every rank (every node) writes to?")
        reports.append(rep)
    manifest = build_manifest(reports, plan.fingerprint, plan.info)
    if opts.report:
        from recipes.medblip.capfilt.report import write_report

        write_report(out, manifest, plan.urls, examples=opts.examples, log=log)
    write_json_atomic(out / "manifest.json", manifest)
    t, c = manifest["totals"], manifest["counts"]
    log(f"capfilt: {t['images']} images -> {t['samples']} pairs in {t['shards']} shards; original kept "
        f"{c['original']['kept']}, removed {c['original']['removed']}; synthetic kept {c['synthetic']['kept']}, "
        f"removed {c['synthetic']['removed']} -> {out / 'manifest.json'}")
    if not t["samples"]:
        median = manifest["scores"]["original"].get("deciles", [None] * 9)[4]
        log(f"warning: no caption reached --threshold {opts.settings.threshold} (median original score {median}): "
            "the output holds no shards. A filter whose match probabilities stay near the 1/3 prior of ITM "
            "training has not learned enough (docs/capfilt.md); train it further or lower --threshold")
    return manifest
