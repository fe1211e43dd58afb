#!/usr/bin/env python
"""Evaluate a VQA run on its test split: `python launch/evaluate.py --recipe FILE [--checkpoint PATH] [key=value ...]`.

Writes metrics.json and predictions.jsonl into the run directory (or --out) and prints accuracy and edit
similarity (overall / closed / open, with counts) next to the majority-answer baselines. Without --checkpoint the
newest complete checkpoint of run.dir is evaluated.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from framework.cli import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None,
                        help="VQA recipe YAML (e.g. recipes/medblip/vqa.yaml); default: the checkpoint run's own "
                             "config.yaml. The model's shape always comes from the run's config.yaml when it has one")
    parser.add_argument("--checkpoint", default=None,
                        help="weights to evaluate: a run dir, a checkpoint tag dir, a .pth/.safetensors file or an "
                             "exported transformers dir (default: newest checkpoint of run.dir)")
    parser.add_argument("--out", default=None, help="directory for metrics.json / predictions.jsonl (default: run.dir)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. vqa.inference=generate")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options

    def evaluate() -> int:
        import importlib

        import torch

        from framework.preflight import check_cuda_device
        from recipes.common.vqa_eval import config_for_checkpoint
        from recipes.common.vqa_metrics import format_table

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_cuda_device(device)  # one line naming the build to install, not CUDA's "no kernel image"

        cfg = config_for_checkpoint(args.recipe, args.checkpoint, args.overrides)
        recipe = importlib.import_module(cfg.recipe)  # a VQA recipe module: load_vqa, evaluate_model, ...
        if not hasattr(recipe, "evaluate_model"):
            raise ValueError(f"{cfg.source}: recipe {cfg.recipe!r} is not a VQA recipe (use recipes.medblip.vqa)")
        checkpoint = recipe.trained_checkpoint(cfg, args.checkpoint)
        split = recipe.load_vqa(cfg)
        model = recipe.load_trained(cfg, checkpoint)
        model.to(device)
        started = time.time()
        result = recipe.evaluate_model(model, cfg, split, num_workers=min(2, cfg.data.num_workers))
        doc = recipe.results_document(cfg, split, result, checkpoint=checkpoint)
        doc["seconds"] = round(time.time() - started, 1)
        out = recipe.write_results(args.out or cfg.run.dir, doc, result["predictions"])
        inf = doc["inference"]
        how = (f"rank over {inf['candidates']} candidates (k {inf['k_test']}); the candidates hold "
               f"{100 * inf['coverage']['overall']:.1f}% of the test answers (closed "
               f"{100 * inf['coverage']['closed']:.1f}%, open {100 * inf['coverage']['open']:.1f}%)"
               if inf["mode"] == "rank" else f"generate (beam {inf['num_beams']}, max {inf['max_length']} tokens)")
        b = doc["baselines"]
        rows = [("model", doc["scores"]),
                ("majority per type", b["majority_per_type"]["scores"]),
                ("majority overall", b["majority_overall"]["scores"])]
        print(f"split: {split.name} ({doc['evaluated_questions']} test questions); inference: {how}")
        print(format_table(rows))
        print(f"majority answers: closed {b['majority_per_type']['answers']['closed']!r}, open "
              f"{b['majority_per_type']['answers']['open']!r}, overall {b['majority_overall']['answers']['overall']!r}")
        print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'} ({doc['seconds']} s)", flush=True)
        return 0

    return run_cli(evaluate)


if __name__ == "__main__":
    sys.exit(main())
