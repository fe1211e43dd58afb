"""What launch/demo.py --compare needs to put DAPT on noisy captions beside DAPT on CapFilt-cleaned ones, through VQA.

`compare_runs(data, runs, common)` swaps a fraction of the phantom training captions (runs/capfilt-noisy) and returns
the stages to run, in order, as the commands a user would type, and the two make_table rows:

    DAPT on the noisy shards -> filter fine-tune (ITC + ITM) from it -> CapFilt (DAPT's decoder as captioner)
    -> DAPT on the bootstrapped shards -> VQA fine-tuning + evaluation from each of the two DAPT runs
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from recipes.medblip.capfilt.noise import swap_captions

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "recipes" / "medblip" / "demo"
NOISE = 0.4  # share of the training captions moved to other images
# The demo's tiny models give match probabilities crowded near ITM's 1/3 prior, never BLIP's 0.5 (docs/capfilt.md,
# "Measured"): at 0.3 the fine-tuned filter removed swapped captions with high precision on every measured seed.
THRESHOLD = 0.3
RUN_DIRS = ("capfilt-noisy", "dapt-noisy", "capfilt-filter", "capfilt-shards", "dapt-capfilt", "vqa-dapt-noisy",
            "vqa-dapt-capfilt")


@dataclass
class Stage:
    """One command of the comparison: `python <args...>`, its output logged to runs/<log>."""

    title: str
    args: list[str]
    log: str


@dataclass
class CompareRuns:
    stages: list[Stage]
    table: list[str]  # launch/make_table.py specs RUN=LABEL of the two VQA runs (noisy first)
    noise: dict  # what swap_captions did (fraction, seed, the swapped keys)


def compare_runs(data: Path, runs: Path, common: list[str], *, noise: float = NOISE, seed: int = 0,
                 threshold: float = THRESHOLD) -> CompareRuns:
    """Write the noisy shards (runs/capfilt-noisy) and return the stages; `data` is the demo's (write_demo_data),
    `common` the overrides every training stage gets (model.tokenizer=..., run.resume=none, the user's)."""
    data, runs = Path(data), Path(runs)
    for name in RUN_DIRS:  # a fresh comparison every time, as the demo's own stages
        shutil.rmtree(runs / name, ignore_errors=True)
    noisy, cleaned = runs / "capfilt-noisy", runs / "capfilt-shards"
    truth = swap_captions(str(data / "shards" / "train"), noisy, noise, seed=seed)
    train, evaluate = str(ROOT / "launch" / "train.py"), str(ROOT / "launch" / "evaluate.py")
    val = f"data.val={data / 'shards' / 'val'}"
    pct = f"{round(100 * noise)}%"

    def dapt(name: str, shards: Path) -> list[str]:
        return [train, "--recipe", str(DEMO / "dapt.yaml"), f"run.dir={runs / name}", f"data.train={shards}", val,
                *common]

    def vqa(name: str, init: str) -> list[str]:
        return ["--recipe", str(DEMO / "vqa.yaml"), f"run.dir={runs / name}", f"vqa.root={data / 'vqa'}",
                f"run.init_from={runs / init}", *common]

    stages = [
        Stage(f"DAPT on noisy captions ({pct} swapped to other images)", dapt("dapt-noisy", noisy), "dapt-noisy.log"),
        Stage("CapFilt filter: ITC + ITM fine-tuning from that DAPT run, same shards",
              [train, "--recipe", str(DEMO / "capfilt_filter.yaml"), f"run.dir={runs / 'capfilt-filter'}",
               f"run.init_from={runs / 'dapt-noisy'}", f"data.train={noisy}", val, *common], "capfilt-filter.log"),
        Stage(f"CapFilt: caption (DAPT's decoder) and filter (threshold {threshold:g}) the noisy shards",
              [str(ROOT / "launch" / "capfilt.py"), "--captioner", str(runs / "dapt-noisy"), "--filter",
               str(runs / "capfilt-filter"), "--shards", str(noisy), "--out", str(cleaned), "--threshold",
               str(threshold), "--seed", str(seed)], "capfilt.log"),
        Stage("DAPT on the CapFilt-bootstrapped captions", dapt("dapt-capfilt", cleaned), "dapt-capfilt.log"),
    ]
    for name, init, title in (("vqa-dapt-noisy", "dapt-noisy", "from DAPT on noisy captions"),
                              ("vqa-dapt-capfilt", "dapt-capfilt", "from DAPT on CapFilt captions")):
        stages.append(Stage(f"VQA fine-tuning (vision frozen) {title}", [train, *vqa(name, init)], f"{name}.log"))
        stages.append(Stage(f"evaluation {title}", [evaluate, *vqa(name, init)], f"evaluate-{name}.log"))
    table = [f"{runs / 'vqa-dapt-noisy'}=dapt-noisy", f"{runs / 'vqa-dapt-capfilt'}=dapt-capfilt"]
    return CompareRuns(stages, table, truth)
