"""The per-GPU memory estimate of a BLIP-2 recipe without weights, tokenizers or a GPU (the model is built on the
meta device from the preset's shapes), as framework.preflight prints it before training (see docs/blip2.md):

    python -m recipes.blip2.memory --recipe recipes/blip2/vqa.yaml --precision fp16 data.batch_size=8
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Union

import torch

from framework.preflight import GIB, MemoryEstimate, count_params, estimate_for_task

from .build import enabled, task_for
from .llm_model import Blip2LLM
from .stage1_model import STAGE1, Blip2Stage1

STAGES = {"recipes.blip2.stage1": "stage1", "recipes.blip2.stage2": "lm", "recipes.blip2.vqa": "vqa"}


def shape_model(cfg: Any, precision: str) -> Union[Blip2Stage1, Blip2LLM]:
    """The recipe's BLIP-2 model on the meta device (no memory, no tokenizer files), with the precision policy applied."""
    stage = STAGES[cfg.recipe]
    with torch.device("meta"):
        if stage == "stage1":
            model = Blip2Stage1(cfg.model, image_size=cfg.image.size, tokenizer=_vocab_stub(30523),
                                objectives=enabled(cfg, STAGE1))
        else:
            model = Blip2LLM(cfg.model, image_size=cfg.image.size, lm_objective=stage)
    model.keep_trainable_fp32 = precision == "fp16"
    return model


class _vocab_stub:  # noqa: N801 - a tokenizer-shaped stand-in: only len() is read at construction
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def estimate(cfg: Any, precision: str) -> tuple[MemoryEstimate, dict[str, float]]:
    """(framework.preflight's estimate for this config, the figures in GiB and parameter counts)."""
    model = shape_model(cfg, precision)
    est = estimate_for_task(cfg, task_for(model, collate=list, train_dataset=[]), precision, world_size=1, cuda=True)
    trainable, frozen = count_params(model)
    figures = {"trainable_M": trainable / 1e6, "frozen_M": frozen / 1e6,
               "vision_M": sum(p.numel() for p in model.vision_model.parameters()) / 1e6,
               "llm_M": sum(p.numel() for p in model.language_model.parameters()) / 1e6
               if isinstance(model, Blip2LLM) else 0.0,
               "preflight_GiB": est.total / GIB, "activations_GiB": est.parts.get("activations", 0) / GIB}
    return est, figures


def main(argv: list[str] | None = None) -> int:
    from framework.config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    if cfg.recipe not in STAGES:
        print(f"error: {args.recipe} is not a BLIP-2 recipe ({', '.join(STAGES)})", file=sys.stderr)
        return 2
    est, f = estimate(cfg, args.precision)
    print(f"{cfg.source}: {f['trainable_M']:.1f}M trainable, {f['frozen_M']:.1f}M frozen (ViT {f['vision_M']:.1f}M, "
          f"LLM {f['llm_M']:.1f}M)")
    print(est.table())
    print(f"fits a 16 GB P100: {'yes' if f['preflight_GiB'] * GIB < 0.95 * 16e9 else 'NO'} ({f['preflight_GiB']:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
