#!/usr/bin/env python
"""Export a fine-tuned VQA model to transformers' BlipForQuestionAnswering format (save_pretrained directory):
`python launch/export_hf.py --recipe FILE --out DIR [--checkpoint PATH] [key=value ...]`.

Without --checkpoint the newest complete checkpoint of the recipe's run.dir is exported. Use the result with
`BlipForQuestionAnswering.from_pretrained(DIR)` and `BlipProcessor.from_pretrained(DIR)`; what the export does not
carry (rank inference, the cross-attention padding-mask fix) is listed in DIR/medblip_export.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from framework.cli import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="the VQA recipe YAML the model was trained with")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--checkpoint", default=None, help="weights (default: newest checkpoint of run.dir)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options

    def export() -> int:
        from framework.checkpoint import find_resume_tag
        from framework.config import load_config
        from recipes.medblip.export_hf import NOT_CARRIED, export_vqa
        from recipes.medblip.vqa import build_model
        from recipes.medblip.vqa_model import load_vqa_weights

        cfg = load_config(args.recipe, args.overrides)
        if "vqa" not in cfg.sections:
            raise ValueError(f"{args.recipe}: not a VQA recipe (recipe: recipes.medblip.vqa)")
        checkpoint = args.checkpoint
        if checkpoint is None:
            run_dir = Path(cfg.run.dir)
            if find_resume_tag(run_dir / "checkpoints") is None:
                raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'}: train first or pass "
                                        "--checkpoint PATH")
            checkpoint = str(run_dir)
        model = build_model(cfg, load_weights=False)
        report = load_vqa_weights(model, checkpoint)
        print(report.summary(), flush=True)
        if report.missing:
            raise ValueError(f"{checkpoint}: {len(report.missing)} model tensors missing (e.g. {report.missing[0]}); "
                             "it does not fit this recipe's model")
        out = export_vqa(model.eval(), args.out, cfg.image)
        print(f"exported BlipForQuestionAnswering to {out}\nnot carried: " + "; ".join(NOT_CARRIED), flush=True)
        return 0

    return run_cli(export)


if __name__ == "__main__":
    sys.exit(main())
