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
    parser.add_argument("--recipe", default=None, help="the VQA recipe YAML the model was trained with (default: the "
                        "checkpoint run's own config.yaml, whose model shape is used in any case)")
    parser.add_argument("--out", required=True, help="output directory (created; a folder holding files is refused "
                        "unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that holds files, replacing "
                        "those of the same name")
    parser.add_argument("--checkpoint", default=None, help="weights (default: newest checkpoint of run.dir)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options

    def export() -> int:
        from recipes.common.vqa_eval import config_for_checkpoint, trained_checkpoint
        from recipes.common.vqa_recipe import vqa_recipe
        from recipes.medblip.model.to_transformers import NOT_CARRIED, check_export_dir, export_vqa
        from recipes.medblip.vqa import MedBlipVqaRecipe

        check_export_dir(Path(args.out), args.overwrite)  # before minutes of loading
        cfg = config_for_checkpoint(args.recipe, args.checkpoint, args.overrides)
        recipe = vqa_recipe(cfg)  # one line for a recipe that is not a VQA recipe
        if not isinstance(recipe, MedBlipVqaRecipe):  # the BlipForQuestionAnswering layout is BLIP's
            raise ValueError(f"{cfg.source}: export_hf.py exports MedBLIP VQA models (recipes.medblip.vqa) to "
                             f"BlipForQuestionAnswering; this is {cfg.recipe}, which it does not export")
        model = recipe.load_trained(cfg, trained_checkpoint(cfg, args.checkpoint))
        out = export_vqa(model.eval(), args.out, cfg.image, overwrite=args.overwrite)
        print(f"exported BlipForQuestionAnswering to {out}\nnot carried: " + "; ".join(NOT_CARRIED), flush=True)
        return 0

    return run_cli(export)


if __name__ == "__main__":
    sys.exit(main())
