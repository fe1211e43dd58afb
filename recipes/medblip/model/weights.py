"""Weights in and out of a MedBLIP model: BLIP's `{'model': state_dict}`, transformers' Salesforce/blip-* layout,
our DeepSpeed checkpoints and our own files; every missing or unexpected key reported, nothing executed on load.

Tensors shared under several names (BLIP's tied encoder/decoder weights) count as one: a tensor is missing
only when none of its names is in the checkpoint. The LM head is tied as the file ties it: a file whose LM head
differs from its word embeddings (BLIP's first commit, our runs before BLIP HEAD's tying) gets a separate head.
Files are read with torch.load(weights_only=True) or safetensors, never by unpickling arbitrary objects.
"""
from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from framework.checkpoint import CheckpointReadError, safe_load
from framework.files import replacing, sha256_file
from recipes.medblip.model.towers import (
    interpolate_pos_embed,
    lm_head_is_tied,
    untie_lm_head,
)

QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")
LM_HEAD = "text_decoder.cls.predictions.decoder.weight"
WORD_EMBEDDINGS = ("text_decoder.bert.embeddings.word_embeddings.weight",  # the head's own first, as the decoder ties
                   "text_encoder.embeddings.word_embeddings.weight")
_MODULE_PREFIXES = ("visual_encoder.", "text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.",
                    "visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
_IGNORED = re.compile(r"(^|\.)embeddings\.position_ids$")  # med.py's persistent buffer; transformers' is not saved
# transformers' BlipVisionModel names <-> timm/BLIP ViT names; {i} is a block index, a name ending in "." a prefix
VISION_NAMES = [
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
    ("vision_model.encoder.layers.{i}.self_attn.qkv.", "visual_encoder.blocks.{i}.attn.qkv."),
    ("vision_model.encoder.layers.{i}.self_attn.projection.", "visual_encoder.blocks.{i}.attn.proj."),
    ("vision_model.encoder.layers.{i}.layer_norm1.", "visual_encoder.blocks.{i}.norm1."),
    ("vision_model.encoder.layers.{i}.layer_norm2.", "visual_encoder.blocks.{i}.norm2."),
    ("vision_model.encoder.layers.{i}.mlp.", "visual_encoder.blocks.{i}.mlp."),
    ("vision_model.post_layernorm.", "visual_encoder.norm."),
]


def _vision_rules(to_hf: bool) -> list[tuple[re.Pattern, str]]:
    rules = []
    for hf, ours in VISION_NAMES:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)") + ("" if src.endswith(".") else "$")
        rules.append((re.compile(pattern), dst))
    return rules


_VISION_RULES = {False: _vision_rules(False), True: _vision_rules(True)}


def rename_vision(key: str, to_hf: bool = False) -> str:
    """A ViT key from transformers' names to BLIP's (to_hf: the other way); other keys come back unchanged."""
    for pattern, dst in _VISION_RULES[to_hf]:
        m = pattern.match(key)
        if m:
            return (dst.format(i=m["i"]) if "{i}" in dst else dst) + key[m.end():]
    return key


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, fails its checksum, or does not fit the model."""


@dataclass
class LoadReport:
    """What loading did: every missing/unexpected key and every adjustment, printable as a summary."""

    source: str
    layout: str  # blip | transformers | deepspeed | ours
    loaded: int = 0  # model tensors filled (shared tensors counted once)
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint lacks (left as initialised)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model does not have (not loaded)
    ignored: list[str] = field(default_factory=list)  # known-harmless extras (med.py position_ids buffers)
    notes: list[str] = field(default_factory=list)  # interpolations, re-initialised queues, copied momentum...

    def summary(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source} ({self.layout} layout)"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}, left as initialised): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}, not loaded): " + ", ".join(self.unexpected))
        if self.ignored:
            lines.append(f"  ignored ({len(self.ignored)}): " + ", ".join(self.ignored))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading files


def split_spec(spec: str) -> tuple[str, Optional[str]]:
    """'path-or-url#sha256=HEX' -> (path-or-url, HEX); the checksum part is optional."""
    if "#sha256=" in spec:
        where, digest = spec.rsplit("#sha256=", 1)
        return where, digest.strip().lower()
    return spec, None


def fetch_on_rank0(spec: Optional[str]) -> None:
    """Call on every rank before loading `spec`: a URL is downloaded by rank 0 while the others wait for it (one
    download, not one per rank, into the cache the others then read); a path needs nothing. A rank whose node does
    not share rank 0's cache (torch hub dir) downloads its own copy when it loads. Rank 0's error stops every rank."""
    from framework.distributed import gather_objects, rank

    if not spec or not split_spec(str(spec))[0].startswith(("http://", "https://")):
        return
    error = None
    if rank() == 0:
        try:
            fetch(str(spec))
        except CheckpointError as e:
            error = str(e)
    errors = gather_objects(error)  # the other ranks wait here for rank 0's download
    if errors[0] is not None:
        raise CheckpointError(errors[0] if rank() == 0 else f"rank 0: {errors[0]}")


def fetch(spec: str, sha256: Optional[str] = None, cache_dir: Optional[Path] = None) -> Path:
    """A local path, or a URL downloaded once into the torch hub cache; checked against sha256 when given."""
    where, digest = split_spec(spec)
    digest = sha256 or digest
    if where.startswith(("http://", "https://")):
        cache = Path(cache_dir or Path(torch.hub.get_dir()) / "checkpoints")
        name = Path(urllib.parse.urlparse(where).path).name or "checkpoint.pth"
        path = cache / name
        if not path.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(where, str(path), progress=True)
            except Exception as e:  # noqa: BLE001 - any network failure becomes one clear line
                raise CheckpointError(f"could not download {where} ({type(e).__name__}: {e}); download it "
                                      "yourself and give the local path instead") from None
    else:
        path = Path(where).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {where}")
    if digest:
        if not path.is_file():
            raise CheckpointError(f"{where}: a sha256 can only be checked for a single file")
        actual = sha256_file(path)
        if actual != digest:
            raise CheckpointError(f"{path}: sha256 {actual} does not match the expected {digest}; the file is "
                                  "corrupt or not the one you meant (delete it to download again)")
    return path


def _deepspeed_file(path: Path) -> Optional[Path]:
    """A run dir, its checkpoints/ dir or one tag dir -> that checkpoint's mp_rank_00_model_states.pt."""
    from framework.checkpoint import find_resume_tag

    for ckpt_dir in (path / "checkpoints", path):
        tag = find_resume_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag and (ckpt_dir / tag / "mp_rank_00_model_states.pt").is_file():
            return ckpt_dir / tag / "mp_rank_00_model_states.pt"
    direct = path / "mp_rank_00_model_states.pt"
    return direct if direct.is_file() else None


def _torch_load(path: Path) -> dict:
    try:
        return safe_load(path)  # weights_only: never runs code from a downloaded file
    except CheckpointReadError as e:
        raise CheckpointError(str(e)) from None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    for alias, name in json.loads(meta.get("medblip_aliases", "{}")).items():  # our deduplicated shared tensors
        tensors[alias] = tensors[name]
    return tensors


def read_state_dict(spec: Union[str, Path], sha256: Optional[str] = None) -> tuple[dict[str, torch.Tensor], str, str]:
    """Any supported checkpoint -> (flat state dict, layout guess, resolved source)."""
    path = fetch(str(spec), sha256)
    layout = "ours"
    if path.is_dir():
        ds = _deepspeed_file(path)
        if ds is not None:
            path, layout = ds, "deepspeed"
        else:
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
            if not files:
                raise CheckpointError(f"{path}: no DeepSpeed checkpoint (latest/COMPLETE + mp_rank_00_model_states.pt)"
                                      ", *.safetensors or pytorch_model.bin in this directory")
            sd: dict[str, torch.Tensor] = {}
            for f in files:  # sharded transformers checkpoints
                sd.update(_safetensors_load(f) if f.suffix == ".safetensors" else _torch_load(f))
            return sd, _guess_layout(sd), str(path)
    if path.suffix == ".safetensors":
        sd = _safetensors_load(path)
    else:
        obj = _torch_load(path)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            obj, layout = obj["model"], "blip"  # BLIP's {'model': state_dict}
        elif isinstance(obj, dict) and isinstance(obj.get("module"), dict):
            obj, layout = obj["module"], "deepspeed"  # DeepSpeed's model states
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors (expected BLIP's {{'model': state_dict}}, "
                                  "a DeepSpeed checkpoint, or a plain state dict)")
        sd = obj
    if layout == "ours":
        layout = _guess_layout(sd)
    return sd, layout, str(path)


def _guess_layout(sd: dict) -> str:
    if any(k.startswith("vision_model.") for k in sd):
        return "transformers"
    return "blip" if any(_IGNORED.search(k) for k in sd) else "ours"


# ----------------------------------------------------------------------------- mapping onto the model


def map_transformers(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers' Blip* keys -> BLIP keys (vision tower renamed; text keys are BLIP's already)."""
    out, notes = {}, []
    for k, v in sd.items():
        out[rename_vision(k)] = v
    head, emb = "text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight"
    if head not in out and emb in out:  # transformers saves the tied LM head once, under the embedding's name
        out[head] = out[emb]
        notes.append("LM head weight taken from the decoder's word embeddings (tied in transformers)")
    if "text_decoder.cls.predictions.decoder.bias" not in out and "text_decoder.cls.predictions.bias" in out:
        out["text_decoder.cls.predictions.decoder.bias"] = out["text_decoder.cls.predictions.bias"]
    notes.append("transformers layout: vision_model.* mapped to visual_encoder.* (its ViT LayerNorm eps is 1e-5, "
                 "BLIP's 1e-6; weights are the same)")
    return out, notes


def _strip_prefix(sd: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """Our DeepSpeed checkpoints may hold the model under a wrapper (e.g. 'student.'): pick the best prefix."""
    best, best_hits = None, sum(k in model_keys for k in sd)
    prefixes = {k.split(".", 1)[0] + "." for k in sd if "." in k}
    for p in sorted(prefixes):
        hits = sum(k[len(p):] in model_keys for k in sd if k.startswith(p))
        if hits > best_hits:
            best, best_hits = p, hits
    if best is None:
        return sd, None
    return {k[len(best):]: v for k, v in sd.items() if k.startswith(best)}, best


def _follow_lm_head_tie(model: nn.Module, sd: dict[str, torch.Tensor]) -> Optional[str]:
    """Untie the model's LM head from its word embeddings when the file holds them apart; returns the note."""
    decoder = getattr(model, "text_decoder", None)
    emb = next((k for k in WORD_EMBEDDINGS if k in sd), None)
    if decoder is None or LM_HEAD not in sd or emb is None or not lm_head_is_tied(decoder):
        return None
    if torch.equal(sd[LM_HEAD], sd[emb].to(sd[LM_HEAD].dtype)):
        return None
    untie_lm_head(decoder)
    return (f"{LM_HEAD} differs from {emb} in this file (written by code that does not tie them, e.g. BLIP's first "
            "commit): kept apart, the LM head is a parameter of its own")


def _shared_groups(model: nn.Module) -> list[list[str]]:
    """state_dict names grouped by the tensor they name (tied weights form one group), in model order."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def _model_named(sd: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor], report: LoadReport,
                 source: str) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's names: mapped from transformers, unwrapped, ignorable keys dropped."""
    sd = dict(sd)
    if report.layout == "transformers":
        sd, notes = map_transformers(sd)
        report.notes += notes
    sd, prefix = _strip_prefix(sd, set(model_sd))
    if prefix:
        report.notes.append(f"using the weights under {prefix!r}")
    for k in sorted(sd):
        if _IGNORED.search(k) and k not in model_sd:
            report.ignored.append(k)
            del sd[k]
    report.unexpected = sorted(k for k in sd if k not in model_sd)
    if not any(k in model_sd for k in sd):
        raise CheckpointError(f"{source}: no key matches the MedBLIP model (first keys: {', '.join(list(sd)[:3])}); "
                              "expected BLIP's layout (visual_encoder.*, text_encoder.*, ...) or transformers' Blip*")
    return sd


def _fit_sizes(model: nn.Module, sd: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor],
               report: LoadReport) -> None:
    """Adapt in place what BLIP's loader adapts: position embeddings, the feature queue, temp's shape."""
    # position embeddings for another image size (BLIP's interpolate_pos_embed)
    for name in ("visual_encoder", "visual_encoder_m"):
        key = f"{name}.pos_embed"
        if key in sd and sd[key].shape != model_sd[key].shape:
            old = sd[key].shape[-2]
            sd[key] = interpolate_pos_embed(sd[key], getattr(model, name))
            report.notes.append(f"{key}: interpolated from {old} to {sd[key].shape[-2]} positions")
    # a queue of another size is re-initialised (BLIP drops shape-mismatched keys)
    if "image_queue" in sd and "image_queue" in model_sd and sd["image_queue"].shape != model_sd["image_queue"].shape:
        report.notes.append(f"feature queue of size {sd['image_queue'].shape[-1]} does not fit model.queue_size="
                            f"{model_sd['image_queue'].shape[-1]}: queue re-initialised (random, pointer 0)")
        for k in QUEUE_KEYS:
            sd.pop(k, None)
        model.queue_ptr.zero_()

    for k in list(sd):  # temp: BLIP saves a 0-dim tensor, the model holds [1] (a DeepSpeed constraint)
        if k in model_sd and sd[k].shape != model_sd[k].shape and sd[k].numel() == model_sd[k].numel() == 1:
            sd[k] = sd[k].reshape(model_sd[k].shape)


def _check_architecture(sd: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor], report: LoadReport,
                        source: str) -> None:
    """CheckpointError when the file's shapes or layers do not fit the model (another preset or depth)."""
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
                  for k in sd if k in model_sd and sd[k].shape != model_sd[k].shape]
    if mismatched:
        raise CheckpointError(f"{source} does not fit this architecture ({len(mismatched)} shape mismatches, e.g. "
                              f"{'; '.join(mismatched[:3])}); check model.preset / model.vit / model.text sizes")
    extra_layers = [k for k in report.unexpected if k.startswith(_MODULE_PREFIXES)]
    if extra_layers:
        raise CheckpointError(f"{source} does not fit this architecture: it has {len(extra_layers)} tensors the model "
                              f"lacks (e.g. {', '.join(extra_layers[:3])}); check model depth/layers")


def _resolve_ties(model: nn.Module, sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """One value per tied group, under every name of the group; a group the file lacks is reported missing."""
    final: dict[str, torch.Tensor] = {}
    for group in _shared_groups(model):
        given = [k for k in group if k in sd]
        if not given:
            report.missing.append(group[0] + (f" (+{len(group) - 1} tied names)" if len(group) > 1 else ""))
            continue
        # the last name in model order wins, as with BLIP's load_state_dict (each name copies into the one tensor)
        value = sd[given[-1]]
        for other in given[:-1]:
            if not torch.equal(sd[other].to(value.dtype), value):
                report.notes.append(f"tied tensor saved with different values: {given[-1]} used, {other} ignored")
        for k in group:
            final[k] = value
        report.loaded += 1
    return final


def _fill_momentum_copies(model: nn.Module, final: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor],
                          report: LoadReport) -> None:
    """Momentum copies absent from the checkpoint (e.g. transformers' layout) start as copies of the online ones."""
    pairs = getattr(model, "momentum_pairs", lambda: [])()
    names = {id(m): n for n, m in model.named_children()}
    for online, momentum in pairs:
        mname = names[id(momentum)]
        keys = [k for k in model_sd if k.startswith(mname + ".")]
        if keys and not any(k in final for k in keys):
            oname = names[id(online)]
            for k in keys:
                src = oname + k[len(mname):]
                if src in final:
                    final[k] = final[src]
            report.missing = [m for m in report.missing if not m.startswith(mname + ".")]
            report.notes.append(f"{mname}: not in the checkpoint, copied from {oname}")


@torch.no_grad()
def load_state_dict_into(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str = "<state dict>",
                         layout: str = "ours", strict: bool = False) -> LoadReport:
    """Load BLIP-named tensors into `model` (BLIP's load_checkpoint semantics, strictly reported)."""
    report = LoadReport(source, layout)
    model_sd = model.state_dict()
    sd = _model_named(sd, model_sd, report, source)
    _fit_sizes(model, sd, model_sd, report)
    _check_architecture(sd, model_sd, report, source)
    note = _follow_lm_head_tie(model, sd)
    if note:
        report.notes.append(note)
    final = _resolve_ties(model, sd, report)
    _fill_momentum_copies(model, final, model_sd, report)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{source}: strict loading failed\n{report.summary()}")
    result = model.load_state_dict(final, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # final only holds model keys
    return report


def load_pretrained(model: nn.Module, path: Union[str, Path], *, sha256: Optional[str] = None,
                    strict: bool = False) -> LoadReport:
    """Load weights from BLIP's .pth (path or URL, '#sha256=HEX' suffix allowed), transformers' Blip* checkpoint
    (directory or .safetensors), one of our DeepSpeed runs/checkpoints, or a file saved by `save_weights`."""
    sd, layout, source = read_state_dict(path, sha256)
    return load_state_dict_into(model, sd, source=source, layout=layout, strict=strict)


def save_weights(model: nn.Module, path: Union[str, Path]) -> Path:
    """Save the model's tensors: .safetensors (shared tensors once, aliases in the metadata) or, for any other
    suffix, torch.save({'model': state_dict}) in BLIP's layout. Both reload exactly with `load_pretrained`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = dict(model.state_dict())
    if "temp" in sd and sd["temp"].numel() == 1:
        sd["temp"] = sd["temp"].reshape([])  # BLIP's shape, so BLIP's own loader takes it
    with replacing(path) as tmp:  # never a half-written file under the final name
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors, aliases = {}, {}
            for group in _shared_groups(model):
                for k in group[1:]:
                    aliases[k] = group[0]
                tensors[group[0]] = sd[group[0]].detach().contiguous().clone()
            save_file(tensors, str(tmp), metadata={"format": "pt", "medblip_aliases": json.dumps(aliases)})
        else:
            torch.save({"model": {k: v.detach().clone() for k, v in sd.items()}}, tmp)
    return path
