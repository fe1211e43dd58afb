"""Export a fine-tuned MedBlipVqa to transformers' BlipForQuestionAnswering (save_pretrained: config.json,
model.safetensors, tokenizer and image-processor files), usable with transformers alone.

What carries over exactly: every weight (timm ViT -> BlipVisionModel with BLIP's LayerNorm eps 1e-6, question encoder,
answer decoder), the [ENC]-first question (the exported tokenizer's cls_token is [ENC], so `processor(images, text)`
gives BLIP_VQA's input), [DEC] as decoder start and [SEP] as end, the image size and normalisation.
What does not: `rank` inference over an answer list (transformers only generates), the cross-attention padding-mask
fix (transformers attends to padded question tokens, so answers of a padded batch can differ; one question at a
time is exact), BLIP's beam settings as defaults (pass num_beams=3, max_length=10 to generate), the frozen-vision
training setup, and label smoothing in transformers' own training loss path.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from recipes.common.image_text import MEAN, STD, ImageConfig
from recipes.medblip.model.blip_vqa import MedBlipVqa
from recipes.medblip.model.weights import rename_vision

if TYPE_CHECKING:  # transformers' BLIP classes are imported lazily, where they are used
    from transformers import (
        BlipConfig,
        BlipForQuestionAnswering,
        PreTrainedTokenizerBase,
    )

NOT_CARRIED = [
    "rank inference over an answer list (transformers' BlipForQuestionAnswering only generates)",
    "the cross-attention padding-mask fix: transformers attends to padded question tokens, so a padded batch "
    "can answer differently; one question per call (no padding) is exact",
    "BLIP's generation settings as defaults: pass num_beams=3, max_length=10 to generate()",
    "the training set-up (frozen vision encoder, label smoothing 0.1 of the answer loss)",
]


class ExportError(ValueError):
    """A model that cannot be expressed as BlipForQuestionAnswering."""


def hf_config(model: MedBlipVqa) -> BlipConfig:
    """BlipConfig at the model's sizes; vision LayerNorm eps 1e-6 as BLIP's ViT (transformers' default: 1e-5)."""
    from transformers import BlipConfig, BlipVisionConfig

    v = model.cfg.vit
    vision = BlipVisionConfig(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                              num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                              patch_size=v.patch_size, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)
    text = model.text_decoder.config.to_dict()
    text.pop("_attn_implementation", None)
    text["label_smoothing"] = model.cfg.label_smoothing
    return BlipConfig(text_config=text, vision_config=vision.to_dict(), label_smoothing=model.cfg.label_smoothing)


def hf_state_dict(model: MedBlipVqa) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' BlipForQuestionAnswering names (fp32 copies)."""
    out = {}
    for k, v in model.state_dict().items():
        new = rename_vision(k, to_hf=True)
        if new.startswith("visual_encoder."):
            raise ExportError(f"no transformers name for {k}")
        out[new] = v.detach().float().clone()
    return out


def to_hf(model: MedBlipVqa) -> BlipForQuestionAnswering:
    """An in-memory BlipForQuestionAnswering holding the model's weights (eval mode)."""
    from transformers import BlipForQuestionAnswering

    hf = BlipForQuestionAnswering(hf_config(model))
    result = hf.load_state_dict(hf_state_dict(model), strict=False)
    # transformers ties the LM head to the decoder's word embeddings (as BLIP_VQA); those names may be reported
    missing = [k for k in result.missing_keys if not k.startswith("text_decoder.cls.predictions.decoder.")]
    if missing or result.unexpected_keys:
        raise ExportError(f"weights do not fit BlipForQuestionAnswering: missing {missing[:3]}, unexpected "
                          f"{result.unexpected_keys[:3]}")
    return hf.eval()


def export_tokenizer(model: MedBlipVqa) -> PreTrainedTokenizerBase:
    """A copy of BLIP's tokenizer whose texts start with [ENC] (the question encoder's first token) once saved."""
    tok = copy.deepcopy(model.tokenizer)
    tok.cls_token = "[ENC]"  # BertTokenizer builds "[CLS] text [SEP]" from cls_token when it is loaded
    return tok


def export_vqa(model: MedBlipVqa, out_dir: Union[str, Path], image: ImageConfig, overwrite: bool = False) -> Path:
    """Write BlipForQuestionAnswering + BlipProcessor files into out_dir (safetensors); returns out_dir.

    A folder holding other files is refused unless `overwrite`; the files are written into a temporary sibling
    and moved in at the end (medblip_export.json last), so a failed export leaves `out_dir` as it was.
    """
    from transformers import BlipImageProcessor, BlipProcessor

    if image.size != model.cfg.vit.image_size:
        raise ExportError(f"image.size={image.size} differs from the model's ViT size {model.cfg.vit.image_size}")
    out = Path(out_dir)
    check_export_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        hf = to_hf(model)
        hf.generation_config.update(num_beams=3, max_length=10, min_length=1)  # BLIP's beam search (outer model)
        hf.save_pretrained(tmp, safe_serialization=True)
        processor = BlipProcessor(image_processor=BlipImageProcessor(
            size={"height": image.size, "width": image.size}, resample=3,  # PIL bicubic, as our test transform
            image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True), tokenizer=export_tokenizer(model))
        processor.save_pretrained(tmp)
        (tmp / "medblip_export.json").write_text(json.dumps(
            {"exported_from": "recipes.medblip.vqa (MedBlipVqa)", "enc_token_id": model.enc_token_id,
             "decoder_start_token_id": model.bos_token_id, "eos_token_id": model.sep_token_id,
             "generate_kwargs": {"num_beams": 3, "max_length": 10, "min_length": 1},
             "not_carried": NOT_CARRIED}, indent=2) + "\n")
        mode = 0o666 & ~_umask()  # safetensors writes 0600; an export is meant to be shared like any other file
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "medblip_export.json"):
            if f.is_file():
                os.chmod(f, mode)
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_export_dir(out: Path, overwrite: bool) -> None:
    """Raise ExportError unless `out` is a new or empty folder (or `overwrite`): another model's files stay."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: the export is a folder; name a new folder")
    if out.is_dir() and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        if names:
            raise ExportError(f"--out {out} already holds {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: "
                              f"name a new folder, or --overwrite to replace the files of the same name")


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
