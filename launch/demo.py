#!/usr/bin/env python
"""The whole method on generated phantoms, offline on a CPU in a few minutes: data -> DAPT -> PSD -> VQA -> report.

Every stage is the command a user would run on real data (printed as it starts), with the demo recipes in
recipes/medblip/demo/ and paths pointed at --data and --runs. The report compares the fine-tuned model with the
majority-answer baselines on the demo's test questions; the exit status is 1 if the model does not beat them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from corpora.phantoms import PhantomSpec, write_demo_data  # noqa: E402

RECIPES = ROOT / "recipes" / "medblip" / "demo"
# VQA runs: (run dir, init_from run, make_table label, title); --compare adds the last two (~2 more minutes).
VQA_RUNS = [("vqa-psd", "psd", "psd", "from DAPT+PSD"), ("vqa-dapt", "dapt", "dapt", "from DAPT only"),
            ("vqa-scratch", None, "scratch", "from random weights (no pretraining)")]
STAGES = ("dapt", "psd", *(r[0] for r in VQA_RUNS))
# Lines of a stage's output worth showing live (the full output goes to <runs>/<stage>.log).
_SHOW = re.compile(r"^(step \d|eval step|done:|error|VQA-RAD split|stopped"  # training
                   r"|split:|\s+acc\s|-{20}|model |majority)|Error")  # evaluate.py's table


class DemoError(RuntimeError):
    """A stage failed; the message names it and its log."""


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
                print("   " + line.rstrip()[:160], flush=True)
    if proc.returncode != 0:
        raise DemoError(f"stage {name} failed (exit {proc.returncode}); see {log}")
    took = time.time() - t0
    print(f"   ({took:.0f} s)", flush=True)
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/demo", help="where the phantom data is generated (default data/demo)")
    parser.add_argument("--runs", default="runs/demo", help="run directories of the stages; replaced on each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data (training seeds: YAMLs)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per stage (default 1: at these sizes more threads only contend)")
    parser.add_argument("--compare", action="store_true",
                        help="also fine-tune from DAPT only and from random weights, to show what pretraining adds")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every training stage")
    args = parser.parse_args(argv)
    data, runs = Path(args.data).resolve(), Path(args.runs).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a plain single-process run, whatever launched us
    t_start = time.time()
    times: dict[str, float] = {}
    try:
        print(f"== data: phantoms into {data}", flush=True)
        t0 = time.time()
        summary = write_demo_data(data, PhantomSpec(seed=args.seed))
        vqa = summary["vqa"]
        print(f"   {summary['train']} train + {summary['val']} val captions, {vqa['questions']} questions "
              f"(test: {vqa['test_questions']} on unseen images){' (reused)' if summary['reused'] else ''}",
              flush=True)
        times["data"] = time.time() - t0
        runs.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            shutil.rmtree(runs / stage, ignore_errors=True)  # a fresh demo every time
        common = [f"model.tokenizer={data / 'vocab.txt'}", "run.resume=none", *args.overrides]
        shards = [f"data.train={data / 'shards' / 'train'}", f"data.val={data / 'shards' / 'val'}"]
        train = str(ROOT / "launch" / "train.py")
        times["dapt"] = _run("DAPT (ITC + ITM + LM)", [train, "--recipe", str(RECIPES / "dapt.yaml"),
                                                          f"run.dir={runs / 'dapt'}", *shards, *common],
                             runs / "dapt.log", env)
        times["psd"] = _run("PSD (EMA teacher, adaptive loss weights)",
                            [train, "--recipe", str(RECIPES / "psd.yaml"), f"run.dir={runs / 'psd'}",
                             f"run.init_from={runs / 'dapt'}", *shards, *common], runs / "psd.log", env)
        runs_for_table = []
        for name, init, label, title in VQA_RUNS[: 3 if args.compare else 1]:
            # run.init_from also goes to evaluate.py: metrics.json records it (make_table names rows by it)
            vqa_args = ["--recipe", str(RECIPES / "vqa.yaml"), f"run.dir={runs / name}", f"vqa.root={data / 'vqa'}",
                        f"run.init_from={runs / init if init else 'null'}", *common]
            times[name] = _run(f"VQA fine-tuning (vision frozen) {title}", [train, *vqa_args],
                               runs / f"{name}.log", env)
            times[f"evaluate {name}"] = _run(f"evaluation {title}", [str(ROOT / "launch" / "evaluate.py"), *vqa_args],
                                             runs / f"evaluate-{name}.log", env)
            runs_for_table.append(f"{runs / name}={label}" if label else str(runs / name))
        times["report"] = _run("report (Table 1 layout)", [str(ROOT / "launch" / "make_table.py"), *runs_for_table,
                                                           "--out", str(runs)], runs / "report.log", env)
    except (DemoError, ValueError, OSError) as e:  # a failed stage, bad --seed/--data: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = time.time() - t_start
    report = runs / "table1.md"
    print("\n" + report.read_text() if report.is_file() else "", flush=True)
    print("(The paper's columns are BLIP-base on real VQA-RAD; the demo's rows are a tiny model on phantoms.)")
    verdict = check(runs / "vqa-psd" / "metrics.json")
    print(f"{verdict['message']}\nstage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
          + f"; total {total:.0f}s\nTensorBoard: tensorboard --logdir {runs}   (then open http://localhost:6006)",
          flush=True)
    (runs / "demo.json").write_text(json.dumps({**verdict, "seconds": times, "total_seconds": total}, indent=1))
    return 0 if verdict["beats_majority"] else 1


def check(metrics_file: Path) -> dict:
    """The fine-tuned accuracy against the best majority-answer baseline on the same test questions."""
    doc = json.loads(metrics_file.read_text())
    acc = doc["scores"]["overall"]["accuracy"]
    majority = max(b["scores"]["overall"]["accuracy"] for b in doc["baselines"].values())
    beats = acc > majority
    msg = (f"fine-tuned accuracy {acc:.3f} vs majority baseline {majority:.3f} on {doc['evaluated_questions']} "
           f"test questions: {'the model learned' if beats else 'NOT above the baseline'}")
    return {"accuracy": acc, "majority": majority, "beats_majority": beats, "message": msg,
            "closed": doc["scores"]["closed"]["accuracy"], "open": doc["scores"]["open"]["accuracy"]}


if __name__ == "__main__":
    sys.exit(main())
