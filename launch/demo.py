#!/usr/bin/env python
"""The whole method on generated phantoms, offline on a CPU in a few minutes: data -> DAPT -> PSD -> VQA -> report.

Every stage is the command a user would run on real data (printed as it starts), with the demo recipes in
recipes/medblip/demo/ and paths pointed at --data and --runs. The verdict checks that every objective learned, each by
a margin over its chance level (the `CHECKS` below); the exit status is 1 if one of them did not. --compare adds
what pretraining adds (VQA from DAPT only, from random weights) and CapFilt (DAPT on noisy phantom captions vs on
their CapFilt bootstrap, each through VQA; recipes/medblip/capfilt/compare.py) to the same table1.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from corpora.phantoms import PhantomSpec, write_demo_data  # noqa: E402
from framework.files import check_own_folder, claim_folder  # noqa: E402
from recipes.medblip.capfilt.compare import CompareRuns, Stage, compare_runs  # noqa: E402
from recipes.medblip.capfilt.noise import removal_quality  # noqa: E402

RECIPES = ROOT / "recipes" / "medblip" / "demo"
# VQA runs: (run dir, init_from run, make_table label, title); --compare adds the last two and CapFilt's stages.
VQA_RUNS = [("vqa-psd", "psd", "psd", "from DAPT+PSD"), ("vqa-dapt", "dapt", "dapt", "from DAPT only"),
            ("vqa-scratch", None, "scratch", "from random weights (no pretraining)")]
STAGES = ("dapt", "psd", *(r[0] for r in VQA_RUNS))
# Pass/fail margins over chance. The figures differ from machine to machine (float rounding of the CPU's kernels
# grows over ~1,500 steps) and from seed to seed; these margins sit well inside the spread measured over seeds and
# kernel paths (docs/demo.md) and far above what a model that learned nothing scores.
VQA_MARGIN = 0.15  # fine-tuned accuracy minus the better majority-answer baseline
ITM_MIN = 0.70  # held-out ITM accuracy after DAPT; 2/3 is a head that always answers "no match"
RECALL_CHANCE_X = 3  # held-out recall@1 (mean of image->text, text->image) after DAPT, in multiples of chance 1/N
_EVAL = re.compile(r"^eval step (\d+): (.*)$")
# Lines of a stage's output worth showing live (the full output goes to <runs>/<stage>.log).
_SHOW = re.compile(r"^(step \d|eval step|done:|error|VQA-RAD split|stopped"  # training
                   r"|split:|\s+acc\s|-{20}|model |majority"  # evaluate.py's table
                   r"|capfilt: \d+ images|warning)|Error")  # capfilt.py's summary


class DemoError(RuntimeError):
    """A stage failed; the message names it and its log."""


RUNS_MARKER = ".medvlm-demo"  # written into --runs before the first stage: the demo replaces what is in that folder


def check_runs(runs: Path) -> None:
    """Raise ValueError unless `runs` is absent, empty, or a folder the demo wrote (its marker, or the demo.json of
    an earlier version): the demo replaces its stage folders, logs and tables there, so nothing else may be in it."""
    check_own_folder(runs, RUNS_MARKER, "--runs", "the demo", legacy=("demo.json",))


def claim_runs(runs: Path) -> None:
    """Create `runs` (checked by check_runs) and mark it as the demo's."""
    claim_folder(runs, RUNS_MARKER, "launch/demo.py replaces the stage folders, logs and tables in this folder")


def console_line(line: str, width: int = 160) -> str:
    """A log line for the console: whole, or cut at a word boundary with " ..." (never mid-word; the log has all)."""
    line = line.rstrip()
    if len(line) <= width:
        return line
    cut = line[:width - 4]
    head = cut.rsplit(" ", 1)[0] if " " in cut[width // 2:] else cut  # a single giant word: cut it anyway
    return head.rstrip() + " ..."


def _run(name: str, args: list[str], log: Path, env: dict[str, str]) -> float:
    """Run `python launch/<args...>`, echo its key lines, write all output to `log`; returns seconds taken."""
    cmd = [sys.executable, *args]
    shown = " ".join(str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in args)
    print(f"\n== {name}: python {shown}", flush=True)
    t0 = time.time()
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            f.write(line)
            if _SHOW.search(line) and not line.startswith("[rank"):
                print("   " + console_line(line), flush=True)
    if proc.returncode != 0:
        raise DemoError(f"stage {name} failed (exit {proc.returncode}); see {log}")
    took = time.time() - t0
    print(f"   ({took:.0f} s)", flush=True)
    return took


@dataclass
class Plan:
    """The demo's stages in order, make_table's RUN=LABEL specs, and --compare's CapFilt comparison (or None)."""

    stages: list[Stage]
    table: list[str]
    capfilt: CompareRuns | None


def plan_stages(data: Path, runs: Path, common: list[str], compare: bool = False, seed: int = 0) -> Plan:
    """What the demo runs on the phantoms in `data` (write_demo_data) into `runs`; `common` goes to every training
    stage. With `compare` this also writes CapFilt's noisy shards (runs/capfilt-noisy, seeded by `seed`)."""
    shards = [f"data.train={data / 'shards' / 'train'}", f"data.val={data / 'shards' / 'val'}"]
    train, evaluate = str(ROOT / "launch" / "train.py"), str(ROOT / "launch" / "evaluate.py")
    stages = [Stage("DAPT (ITC + ITM + LM)", [train, "--recipe", str(RECIPES / "dapt.yaml"), f"run.dir={runs / 'dapt'}",
                                              *shards, *common], "dapt.log"),
              Stage("PSD (EMA teacher, adaptive loss weights)",
                    [train, "--recipe", str(RECIPES / "psd.yaml"), f"run.dir={runs / 'psd'}",
                     f"run.init_from={runs / 'dapt'}", *shards, *common], "psd.log")]
    table = []
    for name, init, label, title in VQA_RUNS[: 3 if compare else 1]:
        # run.init_from also goes to evaluate.py: metrics.json records it (make_table names rows by it)
        vqa_args = ["--recipe", str(RECIPES / "vqa.yaml"), f"run.dir={runs / name}", f"vqa.root={data / 'vqa'}",
                    f"run.init_from={runs / init if init else 'null'}", *common]
        stages += [Stage(f"VQA fine-tuning (vision frozen) {title}", [train, *vqa_args], f"{name}.log"),
                   Stage(f"evaluation {title}", [evaluate, *vqa_args], f"evaluate-{name}.log")]
        table.append(f"{runs / name}={label}")
    capfilt = compare_runs(data, runs, common, seed=seed) if compare else None
    if capfilt:
        stages += capfilt.stages
        table += capfilt.table
    return Plan(stages, table, capfilt)


def capfilt_summary(runs: Path, capfilt: CompareRuns) -> dict:
    """How the comparison's filter did against the captions it knows were swapped (removal_quality, counts), and
    the held-out validation (final_eval, on the clean data.val) of DAPT on the noisy and on the cleaned shards."""
    manifest = json.loads((runs / "capfilt-shards" / "manifest.json").read_text())
    quality = removal_quality(manifest["decisions"], set(capfilt.noise["swapped"]))
    return {**quality, "noise": capfilt.noise["fraction"], "threshold": manifest["options"]["threshold"],
            "counts": manifest["counts"], "pairs": manifest["totals"]["samples"],
            "dapt_noisy": final_eval(runs / "dapt-noisy.log"), "dapt_capfilt": final_eval(runs / "dapt-capfilt.log")}


def final_eval(log: Path) -> dict[str, float]:
    """The last validation line of a training stage's log ("eval step N: name value, ...") as {name: value}."""
    found: dict[str, float] = {}
    for line in log.read_text().splitlines():
        m = _EVAL.match(line)
        if m:
            found = {"step": float(m.group(1))}
            for item in m.group(2).split(", "):
                name, _, value = item.rpartition(" ")
                try:
                    found[name] = float(value)
                except ValueError:
                    pass
    return found


def build_parser() -> argparse.ArgumentParser:
    """The command line of launch/demo.py."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/demo", help="where the phantom data is generated (default data/demo)")
    parser.add_argument("--runs", default="runs/demo", help="run directories of the stages; replaced on each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data (training seeds: YAMLs)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per stage (default 1: at these sizes more threads only contend)")
    parser.add_argument("--compare", action="store_true",
                        help="also fine-tune from DAPT only and from random weights (what pretraining adds), and "
                             "DAPT on noisy captions vs on their CapFilt bootstrap (what CapFilt adds)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every training stage")
    return parser


def stage_env(threads: int) -> dict[str, str]:
    """The environment of every stage: a plain single-process run with `threads` torch threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a plain single-process run, whatever launched us
    return env


def run_all(args: argparse.Namespace, data: Path, runs: Path,
            env: dict[str, str]) -> tuple[dict[str, float], dict | None]:
    """Generate the data, run every stage and the report: (seconds per stage, the CapFilt summary or None)."""
    times: dict[str, float] = {}
    check_runs(runs)  # before anything is written
    print(f"== data: phantoms into {data}", flush=True)
    t0 = time.time()
    summary = write_demo_data(data, PhantomSpec(seed=args.seed))
    vqa = summary["vqa"]
    print(f"   {summary['train']} train + {summary['val']} val captions, {vqa['questions']} questions "
          f"(test: {vqa['test_questions']} on unseen images){' (reused)' if summary['reused'] else ''}",
          flush=True)
    times["data"] = time.time() - t0
    claim_runs(runs)
    for stage in STAGES:
        shutil.rmtree(runs / stage, ignore_errors=True)  # a fresh demo every time (compare_runs cleans its own)
    common = [f"model.tokenizer={data / 'vocab.txt'}", "run.resume=none", *args.overrides]
    plan = plan_stages(data, runs, common, args.compare, args.seed)
    for stage in plan.stages:
        times[stage.log.removesuffix(".log")] = _run(stage.title, stage.args, runs / stage.log, env)
    times["report"] = _run("report (Table 1 layout)", [str(ROOT / "launch" / "make_table.py"), *plan.table,
                                                       "--data", "phantoms", "--out", str(runs)],
                           runs / "report.log", env)
    capfilt = capfilt_summary(runs, plan.capfilt) if plan.capfilt else None
    return times, capfilt


def print_capfilt(capfilt: dict) -> None:
    """What CapFilt removed of the swapped captions, and what DAPT learnt from the noisy vs the filtered pairs."""
    print(f"CapFilt on {capfilt['noise']:.0%} swapped captions (threshold {capfilt['threshold']:g}): removed "
          f"{capfilt['removed']} of {capfilt['images']} originals, {capfilt['swapped_removed']} of the "
          f"{capfilt['swapped']} swapped (precision {_fmt(capfilt['precision'])}, recall "
          f"{_fmt(capfilt['recall'])}); {capfilt['pairs']} pairs to DAPT", flush=True)
    for name in ("dapt_noisy", "dapt_capfilt"):  # the clean held-out pairs: what the captions taught
        ev = capfilt[name]
        print(f"  held-out after DAPT {name[5:]:<7}: ITM accuracy {_fmt(ev.get('itm_acc'))}, recall@1 "
              f"{_fmt(ev.get('i2t_r1'))} / {_fmt(ev.get('t2i_r1'))} (image->text / text->image)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed < 0 or args.threads < 1:  # numpy's "expected non-negative integer" names no option
        print(f"error: {'--seed must be >= 0' if args.seed < 0 else '--threads must be >= 1'}", file=sys.stderr)
        return 2
    data, runs = Path(args.data).resolve(), Path(args.runs).resolve()
    env = stage_env(args.threads)
    t_start = time.time()
    try:
        times, capfilt = run_all(args, data, runs, env)
    except (DemoError, ValueError, OSError) as e:  # a failed stage, bad --seed/--data: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = time.time() - t_start
    report = runs / "table1.md"
    print("\n" + report.read_text() if report.is_file() else "", flush=True)
    verdict = check(runs / "vqa-psd" / "metrics.json", final_eval(runs / "dapt.log"))
    if capfilt:
        print_capfilt(capfilt)
    print(f"{verdict['message']}\nstage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
          + f"; total {total:.0f}s\nTensorBoard: tensorboard --logdir {runs}   (then open http://localhost:6006)",
          flush=True)
    (runs / "demo.json").write_text(json.dumps({**verdict, "capfilt": capfilt, "seconds": times, "total_seconds": total,
                                                "environment": environment(args.threads),
                                                "data_sha256": data_fingerprint(data)}, indent=1))
    return 0 if verdict["passed"] else 1


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def environment(threads: int) -> dict[str, object]:
    """What decides the exact figures besides the seed: library versions, the CPU kernels torch picks, threads."""
    import numpy
    import PIL
    import torch

    kernel_vars = {k: v for k, v in os.environ.items() if k.startswith(("ATEN_CPU", "MKL_", "ONEDNN_", "DNNL_"))}
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl": torch.backends.mkl.is_available(), "numpy": numpy.__version__, "pillow": PIL.__version__,
            "threads": threads, "kernel_env": kernel_vars, "cpu": _cpu_model()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def data_fingerprint(data: Path) -> str:
    """sha256 over the generated files (names and bytes): equal on two machines = the same demo data."""
    h = hashlib.sha256()
    for f in sorted(p for p in data.rglob("*") if p.is_file() and p.name != "phantoms.json"):
        h.update(str(f.relative_to(data)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def check(metrics_file: Path, dapt: dict[str, float]) -> dict:
    """Verdict: VQA accuracy vs the better majority baseline, DAPT's held-out ITM accuracy and recall@1 vs chance.

    `dapt` is the DAPT stage's final validation (final_eval); each check passes with the margin set at the top.
    """
    doc = json.loads(metrics_file.read_text())
    acc = doc["scores"]["overall"]["accuracy"]
    majority = max(b["scores"]["overall"]["accuracy"] for b in doc["baselines"].values())
    n = dapt.get("samples", 0.0)
    recall1 = (dapt.get("i2t_r1", 0.0) + dapt.get("t2i_r1", 0.0)) / 2
    chance = 1 / n if n else float("nan")
    checks = [
        {"name": "VQA accuracy", "value": acc, "chance": majority, "threshold": majority + VQA_MARGIN,
         "what": f"majority baseline {majority:.3f} + {VQA_MARGIN}, on {doc['evaluated_questions']} test questions"},
        {"name": "DAPT held-out ITM accuracy", "value": dapt.get("itm_acc", 0.0), "chance": 2 / 3,
         "threshold": ITM_MIN, "what": f"2/3 = always 'no match'; pass >= {ITM_MIN}"},
        {"name": "DAPT held-out recall@1", "value": recall1, "chance": chance, "threshold": RECALL_CHANCE_X * chance,
         "what": f"mean of image->text and text->image over {n:.0f} pairs, chance 1/{n:.0f} = {chance:.3f}; "
                 f"pass >= {RECALL_CHANCE_X}x chance"}]
    for c in checks:
        c["ok"] = bool(c["value"] >= c["threshold"])  # NaN (no validation found) fails
    passed = all(c["ok"] for c in checks)
    lines = [f"  {'ok ' if c['ok'] else 'NOT'} {c['name']} {c['value']:.3f} ({c['what']})" for c in checks]
    msg = ("every objective learned:" if passed else "NOT every objective learned:") + "\n" + "\n".join(lines)
    return {"passed": passed, "checks": checks, "message": msg, "accuracy": acc, "majority": majority,
            "closed": doc["scores"]["closed"]["accuracy"], "open": doc["scores"]["open"]["accuracy"], "dapt": dapt}


if __name__ == "__main__":
    sys.exit(main())
