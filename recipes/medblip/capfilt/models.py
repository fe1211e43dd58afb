"""The captioner and the filter: a MedBLIP pretraining model loaded from a run (or BLIP's / transformers' weights),
ready for inference at the training precision rules, with a digest of its weights for the output's fingerprint."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from framework.run_env import Precision, resolve_precision
from framework.config import config_to_dict, load_config
from framework.gpu import gpu_facts
from framework.preflight import check_gpu_arch
from framework.gpu import user_device
from framework.rundir import run_dir_of
from recipes.common.image_text import ImageConfig, image_transform
from recipes.medblip.model.blip_pretrain import MedBlipPretrain
from recipes.medblip.model.losses import OBJECTIVES
from recipes.medblip.model.weights import load_pretrained
from recipes.medblip.pretrain import PretrainConfig, model_config

DEFAULT_RECIPE = "recipes/medblip/dapt.yaml"  # the model's shape for weights outside a run directory


@dataclass
class LoadedModel:
    """One role's model (eval mode, on its device, in its precision) and what decides its outputs."""

    spec: str  # what the user named: a run directory, a checkpoint, a weights file
    model: MedBlipPretrain
    image: ImageConfig  # the run's image settings: evaluation transform at image.size
    weights_sha256: str  # of the weights as loaded, before any cast (the same file in any layout: the same digest)
    config: dict[str, Any]  # the model: and image: sections, for the manifest

    @property
    def transform(self) -> Callable:
        """RGB PIL image -> normalised Tensor[3, size, size], BLIP's test transform (no augmentation)."""
        return image_transform(self.image, train=False)

    @property
    def max_text_len(self) -> int:
        return self.model.cfg.max_text_len


def model_recipe(spec: str, recipe: Optional[str], overrides: list[str]) -> PretrainConfig:
    """The config that gives `spec` its shape: the run's own config.yaml when `spec` lies in a run directory, else
    `recipe` (default dapt.yaml: BLIP base) with `overrides`."""
    run = run_dir_of(spec)
    path = run / "config.yaml" if run else Path(recipe or DEFAULT_RECIPE)
    cfg = load_config(path, overrides)
    if not isinstance(cfg, PretrainConfig):
        raise ValueError(f"{spec}: {path} is a {cfg.recipe} run, not a MedBLIP pretraining (DAPT, captioner or "
                         "filter) run; CapFilt needs the image-grounded decoder and the ITM head")
    return cfg


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (each shared tensor once, in state_dict order): equal weights, equal digest."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        data = t.detach().cpu().contiguous()
        h.update(f"{name}:{data.dtype}:{tuple(data.shape)}\n".encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def resolve_device(device: Optional[str]) -> torch.device:
    """cpu | cuda | cuda:N, default: this rank's GPU if there is one (the launcher's LOCAL_RANK)."""
    if device:
        return user_device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def inference_precision(requested: str, device: torch.device) -> Precision:
    """Training's rules (framework.run_env.resolve_precision): auto = bf16 on compute capability >= 8.0, fp16 on
    older GPUs, fp32 on the CPU; a GPU without kernels in this PyTorch build is refused first."""
    gpu = None
    if device.type == "cuda":
        gpu = gpu_facts(device)
        check_gpu_arch(gpu)
    return resolve_precision(requested, device, gpu)


def load_model(spec: str, *, recipe: Optional[str] = None, overrides: Optional[list[str]] = None,
               device: torch.device = torch.device("cpu"), precision: Precision = Precision("fp32", torch.float32),
               log: Callable[[str], None] = print) -> LoadedModel:
    """MedBlipPretrain with the weights of `spec` (a run dir, a checkpoint tag, BLIP's .pth, transformers' layout),
    in eval mode on `device` at `precision`. Refuses weights that leave model tensors missing."""
    cfg = model_recipe(spec, recipe, list(overrides or []))
    torch.manual_seed(cfg.train.seed)
    model = MedBlipPretrain(model_config(cfg), OBJECTIVES, seed=cfg.train.seed)
    report = load_pretrained(model, spec)
    log(report.summary())
    missing = [m for m in report.missing if not m.startswith(("image_queue", "text_queue", "queue_ptr"))]
    if missing:
        raise ValueError(f"{spec}: {len(missing)} model tensors are not in the checkpoint (e.g. {missing[0]}); "
                         "CapFilt needs a trained MedBLIP pretraining model (its decoder and ITM head)")
    digest = weights_digest(model)
    model.to(device=device, dtype=precision.dtype).eval()
    sections = config_to_dict(cfg)
    return LoadedModel(spec, model, cfg.image, digest, {"model": sections["model"], "image": asdict(cfg.image)})
