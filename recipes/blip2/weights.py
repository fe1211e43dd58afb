"""Published BLIP-2 weights into a recipes.blip2 model (Blip2Stage1 or Blip2LLM), offline, every key reported.

Layouts read (each file with safetensors or torch.load(weights_only=True) only, via recipes.medblip.model.weights):
- transformers `save_pretrained` directories of Blip2ForConditionalGeneration (`Salesforce/blip2-opt-2.7b`) or
  Blip2ForImageTextRetrieval: our names already (old `self_attn.q_bias`/`v_bias` ViT keys are folded into qkv.bias);
- LAVIS checkpoints ({'model': state_dict}): `blip2_pretrained.pth` (stage 1: Qformer.bert.*, Qformer.cls.*,
  query_tokens, vision_proj, text_proj, itm_head, temp, ln_vision.*; LAVIS saves only trainable tensors),
  `blip2_pretrained_opt2.7b.pth` (opt_proj, ...), and visual_encoder.* (EVA ViT-g) keys;
- EVA's bare `eva_vit_g.pth` (cls_token, blocks.N.*) and a bare language model directory (OPT / T5
  `save_pretrained`), e.g. for model.vision_weights / model.llm_weights;
- our own DeepSpeed runs (a "student." prefix from self-distillation is stripped).
Tied tensors count once: a tensor is missing only when none of its names was given.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
from torch import nn

from recipes.medblip.model.weights import CheckpointError, LoadReport, read_state_dict

if TYPE_CHECKING:  # the model modules import this one's key patterns
    from .qformer_model import Blip2Base

IGNORED = re.compile(r"(^|\.)position_ids$")  # old BERT/LAVIS persistent buffers; transformers' are not saved
STAGE1_ONLY = re.compile(r"^(embeddings\.|vision_projection\.|text_projection\.|itm_head\.|itg_head\.|temp$|"
                         r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.)")
LLM_ONLY = re.compile(r"^(language_projection\.|language_model\.)")

# LAVIS name -> ours (regex substitution, first match wins); transformers' convert_blip_2_original_to_pytorch.py
# renames the same way (attention.self -> attention.attention, ln_vision -> vision_model.post_layernorm).
LAVIS_RULES = [(re.compile(p), r) for p, r in [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm(1|2)\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.", r"vision_model.encoder.layers.\1.self_attn."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),  # a BLIP/CLIP (timm) ViT's final LayerNorm
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.", "embeddings."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.", r"qformer.encoder.layer.\1.\2.attention."),
    (r"^Qformer\.bert\.encoder\.", "qformer.encoder."),
    (r"^Qformer\.cls\.", "itg_head."),
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
    (r"^(opt|t5)_proj\.", "language_projection."),
    (r"^(opt|t5)_model\.", "language_model."),
]]
QV_BIAS = re.compile(r"^(vision_model\.encoder\.layers\.\d+\.self_attn)\.(q|v)_bias$")


def lavis_name(key: str) -> str:
    """A LAVIS BLIP-2 key in our (transformers') names; keys without a rule come back unchanged."""
    for pattern, repl in LAVIS_RULES:
        if pattern.search(key):
            return pattern.sub(repl, key, count=1)
    return key


def fold_qv_bias(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EVA / old transformers ViT keys q_bias + v_bias -> qkv.bias = [q_bias, 0, v_bias] (the key has no bias)."""
    out, parts = {}, {}
    for k, v in sd.items():
        m = QV_BIAS.match(k)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            out[k] = v
    for prefix, qv in parts.items():
        if set(qv) != {"q", "v"}:
            raise CheckpointError(f"{prefix}: has {'q' if 'q' in qv else 'v'}_bias without its partner")
        out[f"{prefix}.qkv.bias"] = torch.cat([qv["q"], torch.zeros_like(qv["v"]), qv["v"]])
    return out


def _candidates(sd: dict[str, torch.Tensor]) -> list[tuple[str, Callable[[str], str]]]:
    """Ways to read a source's keys: as ours, LAVIS's, a bare EVA/timm ViT, a bare LLM, or under one prefix (a
    wrapper such as self-distillation's "student.", or another model's image tower such as CLIP's "visual.")."""
    ways: list[tuple[str, Callable[[str], str]]] = [
        ("ours", lambda k: k), ("lavis", lavis_name), ("vit", lambda k: lavis_name("visual_encoder." + k)),
        ("llm", lambda k: "language_model." + k), ("llm", lambda k: "language_model.model." + k)]
    for prefix in sorted({k.split(".", 1)[0] + "." for k in sd if "." in k}):
        ways.append((f"under {prefix!r}", lambda k, p=prefix: lavis_name(k[len(p):]) if k.startswith(p) else k))
        ways.append((f"vit under {prefix!r}",
                     lambda k, p=prefix: lavis_name("visual_encoder." + k[len(p):]) if k.startswith(p) else k))
    return ways


def _tensor_groups(model: nn.Module) -> list[list[str]]:
    """state_dict names grouped by the tensor they name (tied weights form one group), in model order."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


ROLES = {"all": "", "vision": "vision_model.", "llm": "language_model."}


def map_onto(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
             role: str = "all") -> tuple[dict[str, torch.Tensor], str]:
    """The source's tensors under our names, read the way that matches the most model keys (of the role's tower:
    "vision" / "llm" count only vision_model.* / language_model.*); and that way's name."""
    wanted = {k for k in model.state_dict() if k.startswith(ROLES[role])}
    best, best_hits, best_name = None, 0, ""
    for name, rename in _candidates(sd):
        mapped = fold_qv_bias({rename(k): v for k, v in sd.items()})
        hits = sum(k in wanted for k in mapped)
        if hits > best_hits:
            best, best_hits, best_name = mapped, hits, name
    if best is None:
        raise CheckpointError(f"{source}: no key matches the BLIP-2 model (first keys: {', '.join(list(sd)[:3])}); "
                              "expected transformers' Blip2*, LAVIS's blip2 keys, EVA ViT-g or an OPT/T5 model")
    return best, best_name


Source = Union[str, tuple[str, str]]


def _sort_mapped(model: Blip2Base, mapped: dict[str, torch.Tensor], role: str, given: dict[str, torch.Tensor],
                 report: LoadReport) -> list[str]:
    """File the mapped tensors: the model's into `given`, the rest into the report (ignored: stale buffers and the
    other stage's tensors; unexpected: anything else); returns the keys outside the role's tower."""
    model_keys, foreign = model.state_dict().keys(), []
    for k in sorted(mapped):
        if not k.startswith(ROLES[role]):
            foreign.append(k)
        elif k in model_keys:
            given[k] = mapped[k]
        elif IGNORED.search(k) or model.other_stage_keys.match(k):
            report.ignored.append(k)
        else:
            report.unexpected.append(k)
    return foreign


def _fit_shapes(given: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor], source: str) -> None:
    """Reshape a one-element tensor to the model's shape (temp: LAVIS saves 0-dim, the model holds [1], a DeepSpeed
    need); refuse any other shape mismatch with a hint at its likely cause."""
    for k, v in list(given.items()):
        target = model_sd[k]
        if v.shape != target.shape and v.numel() == target.numel() == 1:
            given[k] = v.reshape(target.shape)
        elif v.shape != target.shape:
            hint = (" (the ViT was built for another image size: set image.size to the checkpoint's)"
                    if "position_embedding" in k else " (check model.preset and the model.* sizes)")
            raise CheckpointError(f"{source}: {k} is {tuple(v.shape)} in the checkpoint but {tuple(target.shape)} "
                                  f"in the model{hint}")


@torch.no_grad()
def load_pretrained(model: Blip2Base, sources: Union[Source, Sequence[Source]], strict: bool = False) -> LoadReport:
    """Load one or more checkpoints (later ones win) into `model`; every missing / unexpected key is reported.

    A source is a path, or (path, role) with role "vision" / "llm": then only that tower is taken from it (e.g. the
    image tower of a CLIP or BLIP run) and its other tensors are listed as ignored.
    """
    items = [sources] if isinstance(sources, (str, tuple)) else list(sources)
    pairs = [(s, "all") if isinstance(s, str) else s for s in items if s and (isinstance(s, str) or s[0])]
    sources = [p for p, _ in pairs]
    model_sd = model.state_dict()
    given: dict[str, torch.Tensor] = {}
    report = LoadReport(", ".join(sources), "")
    layouts = []
    for spec, role in pairs:
        raw, _, where = read_state_dict(spec)
        mapped, way = map_onto(model, raw, where, role)
        layouts.append(way)
        foreign = _sort_mapped(model, mapped, role, given, report)
        if foreign:
            report.ignored += foreign
            report.notes.append(f"{where}: only its {role} tower is used ({len(foreign)} other tensors ignored)")
    report.layout = "+".join(layouts)
    if any(STAGE1_ONLY.match(k) and not IGNORED.search(k) for k in report.ignored):  # not embeddings.position_ids
        report.notes.append("stage-1 heads (text embeddings, ITC/ITM/ITG heads, text FFN) are not used by this model")
    if any(LLM_ONLY.match(k) for k in report.ignored):
        report.notes.append("language-model tensors are not used by the stage-1 model")
    _fit_shapes(given, model_sd, sources[0] if len(sources) == 1 else report.source)
    final: dict[str, torch.Tensor] = {}
    for group in _tensor_groups(model):
        names = [k for k in group if k in given]
        if not names:
            report.missing.append(group[0] + (f" (+{len(group) - 1} tied)" if len(group) > 1 else ""))
            continue
        for k in group:
            final[k] = given[names[-1]]
        report.loaded += 1
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{report.source}: strict loading failed\n{report.summary()}")
    for k, v in final.items():
        model_sd[k].copy_(v.to(model_sd[k].dtype))
    return report


def weight_sources(init_from: Optional[str], vision_weights: Optional[str],
                   llm_weights: Optional[str]) -> list[tuple[str, str]]:
    """run.init_from first, then the separate ViT and LLM files (LAVIS ships them apart), each for its tower only."""
    return [(s, role) for s, role in ((init_from, "all"), (vision_weights, "vision"), (llm_weights, "llm")) if s]
