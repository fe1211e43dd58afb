#!/usr/bin/env python
"""Evaluate a VQA run on its test split: `python launch/evaluate.py --recipe FILE [--checkpoint PATH] [key=value ...]`.

Writes metrics.json and predictions.jsonl into the run directory (or --out; a partial check with vqa.eval_limit
writes into RUN/eval/limit_N instead, leaving the run's metrics.json as it is) and prints accuracy and edit
similarity (overall / closed / open, with counts and 95% intervals by bootstrap over images) next to the
majority-answer and question-only baselines. Without --checkpoint the newest complete checkpoint of run.dir is
evaluated. --blank-image answers every question with the image replaced by one constant grey image (default
output: RUN/blank_image/): how much of the score the image earns.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from framework.cli import run_cli  # noqa: E402


def _is_retrieval(recipe: str, overrides: list[str]) -> bool:
    """A retrieval recipe (recipes/medblip/retrieval.yaml) rather than a VQA one."""
    from framework.config import load_config

    return load_config(recipe, overrides).recipe == "recipes.medblip.retrieval"


def build_parser() -> argparse.ArgumentParser:
    """The command line of launch/evaluate.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None,
                        help="VQA recipe YAML (e.g. recipes/medblip/vqa.yaml); default: the checkpoint run's own "
                             "config.yaml. The model's shape always comes from the run's config.yaml when it has one")
    parser.add_argument("--checkpoint", default=None,
                        help="weights to evaluate: a run dir, a checkpoint tag dir, a .pth/.safetensors file or an "
                             "exported transformers dir (default: newest checkpoint of run.dir)")
    parser.add_argument("--out", default=None, help="directory for metrics.json / predictions.jsonl (default: run.dir)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--blank-image", action="store_true",
                        help="baseline: every image replaced by one constant grey image (writes RUN/blank_image/ "
                             "unless --out); make_table labels it blank")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. vqa.inference=generate")
    return parser


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate the asked checkpoint (VQA, or retrieval for a retrieval recipe), write and print its results."""
    import torch

    from framework.gpu import user_device
    from framework.preflight import check_cuda_device

    # a typo or a missing GPU: one line before minutes of loading
    device = user_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available()
                                                                        else "cpu")
    check_cuda_device(device)  # one line naming the build to install, not CUDA's "no kernel image"
    if args.recipe is not None and _is_retrieval(args.recipe, args.overrides):
        from recipes.medblip.retrieval import config_for, run

        cfg = config_for(args.recipe, args.checkpoint, args.overrides)
        checkpoint = args.checkpoint or cfg.run.dir
        run(cfg, checkpoint, Path(args.out or cfg.run.dir), device)
        return 0
    return evaluate_vqa(args, device)


def evaluate_vqa(args: argparse.Namespace, device: Any) -> int:
    """Evaluate a VQA checkpoint on device: write metrics.json / predictions.jsonl and print the table."""
    from recipes.common.vqa_eval import (
        blank_image_split,
        config_for_checkpoint,
        load_vqa,
        run_seed,
        trained_checkpoint,
        write_results,
    )
    from recipes.common.vqa_recipe import vqa_recipe

    cfg = config_for_checkpoint(args.recipe, args.checkpoint, args.overrides)
    recipe = vqa_recipe(cfg)  # one line for a recipe that is not a VQA recipe
    checkpoint = trained_checkpoint(cfg, args.checkpoint)
    split = load_vqa(cfg)
    out_dir = Path(args.out or cfg.run.dir)
    if args.blank_image:
        out_dir = Path(args.out) if args.out else out_dir / "blank_image"
        split = blank_image_split(split, out_dir / "blank_images")
        print(f"blank-image baseline: every image replaced by one constant grey image ({split.image_dir})")
    model = recipe.load_trained(cfg, checkpoint)
    model.to(device)
    started = time.time()
    result = recipe.evaluate_model(model, cfg, split, num_workers=min(2, cfg.data.num_workers))
    doc = recipe.results_document(cfg, split, result, checkpoint=checkpoint)
    doc["seconds"] = round(time.time() - started, 1)
    doc["seed"] = run_seed(cfg, checkpoint)
    doc["blank_image"] = bool(args.blank_image)
    if len(result["predictions"]) < len(split.test) and out_dir.resolve() == Path(cfg.run.dir).resolve():
        # a partial check (vqa.eval_limit) must not replace the run's full-test metrics.json that make_table reads
        out_dir = out_dir / "eval" / f"limit_{len(result['predictions'])}"
        print(f"vqa.eval_limit: {len(result['predictions'])} of {len(split.test)} test questions; the run's "
              f"metrics.json is left as it is", flush=True)
    out = write_results(out_dir, doc, result["predictions"])
    print_results(doc, split.name, blank_image=args.blank_image)
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'} ({doc['seconds']} s)", flush=True)
    return 0


def _pct(v: float | None) -> str:
    """A fraction as a percentage; None (no question of that type: a slice, or a split without one) as "-"."""
    return "-" if v is None else f"{100 * v:.1f}%"


def print_results(doc: dict[str, Any], split_name: str, *, blank_image: bool) -> None:
    """The inference mode, the score table next to the baselines, the 95% intervals and the majority answers."""
    from recipes.common.vqa_metrics import format_table

    inf = doc["inference"]
    cov = inf.get("coverage", {})
    how = (f"rank over {inf['candidates']} candidates (k {inf['k_test']}); the candidates hold "
           f"{_pct(cov.get('overall'))} of the test answers (closed {_pct(cov.get('closed'))}, open "
           f"{_pct(cov.get('open'))})"
           if inf["mode"] == "rank" else f"generate (beam {inf['num_beams']}, max {inf['max_length']} tokens)")
    b = doc["baselines"]
    rows = [("blank image" if blank_image else "model", doc["scores"]),
            ("majority per type", b["majority_per_type"]["scores"]),
            ("majority overall", b["majority_overall"]["scores"]),
            ("question-only majority", b["question_majority"]["scores"])]
    print(f"split: {split_name} ({doc['evaluated_questions']} test questions); inference: {how}")
    print(format_table(rows))
    for group, ci in doc.get("intervals", {}).get("groups", {}).items():
        print(f"95% interval ({group}, {ci['count']} questions on {ci['images']} images, bootstrap over images): "
              f"accuracy {ci['accuracy'][0]:.3f}-{ci['accuracy'][1]:.3f}, edit similarity "
              f"{ci['edit_similarity'][0]:.3f}-{ci['edit_similarity'][1]:.3f}")
    print(f"majority answers: closed {b['majority_per_type']['answers']['closed']!r}, open "
          f"{b['majority_per_type']['answers']['open']!r}, overall {b['majority_overall']['answers']['overall']!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after the options
    return run_cli(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
