#!/usr/bin/env python
"""Evaluate a VQA run on its test split: `python launch/evaluate.py --recipe FILE [--checkpoint PATH] [key=value ...]`.

Writes metrics.json and predictions.jsonl into the run directory (or --out; a partial check with vqa.eval_limit
writes into RUN/eval/limit_N instead, leaving the run's metrics.json as it is) and prints accuracy and edit
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

        from framework.gpu import user_device
        from recipes.common.vqa_eval import config_for_checkpoint
        from recipes.common.vqa_metrics import format_table

        if args.device:
            user_device(args.device)  # a typo or a missing GPU: one line before minutes of loading
        cfg = config_for_checkpoint(args.recipe, args.checkpoint, args.overrides)
        recipe = importlib.import_module(cfg.recipe)  # a VQA recipe module: load_vqa, evaluate_model, ...
        if not hasattr(recipe, "evaluate_model"):
            raise ValueError(f"{cfg.source}: recipe {cfg.recipe!r} is not a VQA recipe (use recipes.medblip.vqa)")
        checkpoint = recipe.trained_checkpoint(cfg, args.checkpoint)
        split = recipe.load_vqa(cfg)
        model = recipe.load_trained(cfg, checkpoint)
        device = user_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available()
                                                                            else "cpu")
        model.to(device)
        started = time.time()
        result = recipe.evaluate_model(model, cfg, split, num_workers=min(2, cfg.data.num_workers))
        doc = recipe.results_document(cfg, split, result, checkpoint=checkpoint)
        doc["seconds"] = round(time.time() - started, 1)
        out = Path(args.out or cfg.run.dir)
        if len(result["predictions"]) < len(split.test) and out.resolve() == Path(cfg.run.dir).resolve():
            # a partial check (vqa.eval_limit) must not replace the run's full-test metrics.json that make_table reads
            out = out / "eval" / f"limit_{len(result['predictions'])}"
            print(f"vqa.eval_limit: {len(result['predictions'])} of {len(split.test)} test questions; the run's "
                  f"metrics.json is left as it is", flush=True)
        out = recipe.write_results(out, doc, result["predictions"])
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
