#!/usr/bin/env python
"""How well CapFilt's filter removes known noise: phantom captions swapped to other images, a tiny DAPT trained on
the noisy shards (CPU, minutes), CapFilt with it, precision and recall at removing the swapped captions.

    python launch/bench/capfilt_noise.py --noise 0.2 0.4 --seeds 0 1 2 [--out runs/capfilt-noise]

For each noise level and seed: swap_captions(seed) of the phantom training shards; demo DAPT (train.seed = seed) on
them; an ITC+ITM filter fine-tune from it (demo/capfilt_filter.yaml; --filter-epochs 0 skips it); launch/capfilt.py
with the DAPT captioner and each filter (the DAPT model itself, the fine-tuned one); removal precision and recall at
--threshold and over a sweep of thresholds from the recorded scores; the ROC AUC of clean vs swapped originals.
Results go to OUT/results.json and OUT/results.md (mean and min-max over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from corpora.phantoms import PhantomSpec, write_demo_data  # noqa: E402
from recipes.medblip.capfilt.noise import (  # noqa: E402
    removal_quality,
    roc_auc,
    swap_captions,
    threshold_sweep,
)

DEMO = ROOT / "recipes" / "medblip" / "demo"
SWEEP = [0.2, 0.25, 0.3, 0.325, 0.35, 0.4, 0.5]  # the tiny models' scores crowd near 1/3


def run(cmd: list[str], log: Path) -> float:
    """Run a python entry point quietly (output to `log`); returns seconds; raises with the log's tail on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"error: {' '.join(cmd[:3])} failed (exit {code}); see {log}:\n"
                         + "".join(log.read_text().splitlines(True)[-15:]))
    return time.time() - t0


def one(data: Path, out: Path, noise: float, seed: int, args: argparse.Namespace) -> dict:
    tag = f"noise{noise:g}-seed{seed}"
    work = out / tag
    work.mkdir(parents=True, exist_ok=True)
    truth = swap_captions(data / "shards" / "train", work / "noisy", noise, seed=seed)
    common = [f"model.tokenizer={data / 'vocab.txt'}", "run.resume=none", f"train.seed={seed}",
              f"data.val={data / 'shards' / 'val'}"]
    times = {"dapt": run(["launch/train.py", "--recipe", str(DEMO / "dapt.yaml"), f"run.dir={work / 'dapt'}",
                          f"data.train={work / 'noisy'}", f"train.epochs={args.dapt_epochs}", *common],
                         work / "dapt.log")}
    filters = {"dapt": work / "dapt"}
    if args.filter_epochs:
        times["filter"] = run(["launch/train.py", "--recipe", str(DEMO / "capfilt_filter.yaml"),
                               f"run.dir={work / 'filter'}", f"run.init_from={work / 'dapt'}",
                               f"data.train={work / 'noisy'}", f"train.epochs={args.filter_epochs}", *common],
                              work / "filter.log")
        filters["fine-tuned"] = work / "filter"
    swapped = set(truth["swapped"])
    results = []
    for name, filter_run in filters.items():  # the same captioner (the DAPT run): the same synthetic captions
        times[f"capfilt {name}"] = run(["launch/capfilt.py", "--captioner", str(work / "dapt"), "--filter",
                                        str(filter_run), "--shards", str(work / "noisy"), "--out",
                                        str(work / f"capfilt-{name}"), "--k", str(args.k), "--threshold",
                                        str(args.threshold), "--seed", str(seed), "--overwrite"],
                                       work / f"capfilt-{name}.log")
        manifest = json.loads((work / f"capfilt-{name}" / "manifest.json").read_text())
        result = {"noise": noise, "seed": seed, "filter": name, "threshold": args.threshold,
                  **removal_quality(manifest["decisions"], swapped), "auc": roc_auc(manifest["decisions"], swapped),
                  "sweep": threshold_sweep(manifest["decisions"], swapped, SWEEP),
                  "original_score_deciles": manifest["scores"]["original"].get("deciles"),
                  "synthetic_kept": manifest["counts"]["synthetic"]["kept"], "pairs": manifest["totals"]["samples"]}
        results.append(result)
        print(f"{tag} filter {name}: precision {result['precision']}, recall {result['recall']}, clean removed "
              f"{result['clean_removed']}, AUC {result['auc']:.3f}", flush=True)
    for r in results:
        r["seconds"] = {k: round(v, 1) for k, v in times.items()}
    print(f"{tag}: {results[0]['seconds']}", flush=True)
    return results


def _spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(results: list[dict], threshold: float) -> str:
    lines = ["| filter | noise | threshold | runs | precision | recall | clean removed | ROC AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["filter"] for r in results):
        for noise in sorted({r["noise"] for r in results}):
            rows = [r for r in results if r["noise"] == noise and r["filter"] == name]
            for t in sorted({threshold} | {s["threshold"] for s in rows[0]["sweep"]}):
                got = [next((s for s in r["sweep"] if s["threshold"] == t), None) or r for r in rows]
                lines.append(f"| {name} | {noise:g} | {t:g}{' (run)' if t == threshold else ''} | {len(rows)} | "
                             f"{_spread([g['precision'] for g in got])} | {_spread([g['recall'] for g in got])} | "
                             f"{_spread([g['clean_removed'] for g in got])} | "
                             f"{_spread([r['auc'] for r in rows]) if t == threshold else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dapt-epochs", type=int, default=4, help="demo DAPT epochs on the noisy shards (demo: 4)")
    p.add_argument("--filter-epochs", type=int, default=2,
                   help="ITC+ITM filter fine-tune epochs (demo/capfilt_filter.yaml); 0: the DAPT model only")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--data", default="data/demo", help="phantom data (written if absent)")
    p.add_argument("--out", default="runs/capfilt-noise")
    args = p.parse_args(argv)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    write_demo_data(data, PhantomSpec())
    out.mkdir(parents=True, exist_ok=True)
    results = [r for noise in args.noise for seed in args.seeds for r in one(data, out, noise, seed, args)]
    doc = {"args": vars(args), "results": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = table(results, args.threshold)
    (out / "results.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
