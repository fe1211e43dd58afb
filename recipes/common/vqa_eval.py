"""VQA evaluation pieces every VQA recipe shares: the vqa: keys they all have, the split it announces, rank
candidates and their coverage, where the trained weights are, metrics.json + predictions.jsonl, TensorBoard samples."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import numpy as np
import torch

from framework.distributed import say
from framework.files import atomic_write_text
from recipes.common.image_text import open_image
from recipes.common.vqa_document import questions_sha256
from recipes.common.vqa_rad import (
    ANSWER_TYPES,
    SPLITS,
    VqaRecord,
    VqaSplit,
    answer_list,
    load_split,
    read_answer_list,
)


DATASETS = ("vqa_rad", "slake", "pathvqa")


def check_dataset(dataset: str, split: str) -> None:
    """vqa.dataset and vqa.split together: SLAKE and PathVQA have one split, their release's ('official')."""
    from framework.config import ConfigError

    if dataset not in DATASETS:
        raise ConfigError(f"vqa.dataset: unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    if dataset != "vqa_rad" and split != "official":
        raise ConfigError(f"vqa.split: {dataset} has one split, its release's: use vqa.split=official, not {split!r}")


RETIRED_VQA_KEYS = ("vqa.save_predictions",)  # a setting once: the results are always written (rank 0)


@dataclass
class VqaSectionConfig:
    """The `vqa:` keys every VQA recipe has (data, split, candidates, evaluation); a recipe's VqaConfig adds its own
    and may change a default by declaring the field again."""

    INFERENCE: ClassVar[tuple[str, ...]] = ("rank", "generate")  # the recipe's vqa.inference modes

    dataset: str = "vqa_rad"  # vqa_rad | slake (English) | pathvqa (the parquet copy)
    root: str = "data/vqa_rad"  # folder of the release: 'VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/'
    split: str = "official"  # official (451 test: test_freeform + test_para) | mevf (trainset/testset.json)
    image_cache: Optional[str] = None  # pathvqa: where its parquet images are written once (default root/images)
    inference: str = "rank"  # one of INFERENCE
    answer_list: str = "train"  # rank candidates: "train" (distinct training answers) or a JSON list file
    k_test: int = 128  # rank: candidates kept by first-token probability, then rescored in full (BLIP: 128)
    num_beams: int = 3  # generate: beams
    max_question_words: int = 35  # BLIP's pre_question word limit
    eval_batch_size: int = 32
    eval_limit: Optional[int] = None  # evaluate only the first N test questions (quick checks); None = all

    def check(self) -> None:
        from framework.config import ConfigError

        check_dataset(self.dataset, self.split)
        if self.split not in SPLITS:
            raise ConfigError(f"vqa.split: unknown split {self.split!r}; known: {', '.join(SPLITS)}")
        if self.inference not in self.INFERENCE:
            raise ConfigError(f"vqa.inference: unknown mode {self.inference!r}; known: {', '.join(self.INFERENCE)}")
        for name in ("k_test", "num_beams", "max_question_words", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vqa.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"vqa.eval_limit must be >= 1 or null, got {self.eval_limit}")


def load_vqa(cfg: Any, announce: bool = True) -> VqaSplit:
    """The configured data set and split (printed, so every log names the split that was used)."""
    v = cfg.vqa
    dataset = getattr(v, "dataset", "vqa_rad")
    if dataset == "slake":
        from recipes.common.slake import load_slake

        split = load_slake(v.root, v.max_question_words)
    elif dataset == "pathvqa":
        from recipes.common.pathvqa import load_pathvqa

        split = load_pathvqa(v.root, v.max_question_words, getattr(v, "image_cache", None))
    else:
        split = load_split(v.root, v.split, v.max_question_words)
    if announce:
        say(split.describe())
        for note in split.notes:
            say(f"  note: {note}")
    return split


def candidate_answers(cfg: Any, split: VqaSplit) -> list[str]:
    """Rank candidates: the distinct training answers (most frequent first) or the answers of vqa.answer_list."""
    spec = cfg.vqa.answer_list
    return answer_list(split.train) if spec == "train" else read_answer_list(spec)


def trained_checkpoint(cfg: Any, given: Optional[str] = None) -> str:
    """The weights to use after training: `given`, else run.dir (its newest complete checkpoint must exist)."""
    from framework.checkpoint import find_resume_tag

    if given is not None:
        return given
    run_dir = Path(cfg.run.dir)
    if find_resume_tag(run_dir / "checkpoints") is None:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'}: train first or pass "
                                "--checkpoint PATH")
    return str(run_dir)


def rank_coverage(candidates: list[str], test: list[VqaRecord]) -> dict[str, Optional[float]]:
    """Share of test answers that are among the candidates: the ceiling of rank accuracy, per answer type."""
    known = set(candidates)
    out: dict[str, Optional[float]] = {}
    for group in ("overall",) + ANSWER_TYPES:
        rows = [r for r in test if group == "overall" or r.answer_type == group]
        out[group] = sum(r.answer in known for r in rows) / len(rows) if rows else None
    return out


def add_statistics(document: dict[str, Any], predictions: list[dict]) -> dict[str, Any]:
    """metrics.json's statistics from the predictions: 95% intervals by bootstrap over images (seeded) and the
    per-type breakdown (VQA-RAD question_type, SLAKE content_type) when the rows carry a type."""
    from recipes.common.stats import N_BOOT, prediction_intervals
    from recipes.common.vqa_metrics import score_by_type

    if predictions and all(k in predictions[0] for k in ("image", "match", "edit_similarity")):
        document["intervals"] = {"method": f"percentile, cluster bootstrap over images, {N_BOOT} resamples, seed 0",
                                 "level": 0.95, "groups": prediction_intervals(predictions)}
    if predictions and any(p.get("question_type") for p in predictions):
        field = document.get("split", {}).get("type_field", "question_type")
        document["by_type"] = {"field": field, "groups": score_by_type(predictions)}
    return document


def run_seed(cfg: Any, checkpoint: Optional[str]) -> Optional[int]:
    """train.seed of the run that made `checkpoint` (its config.yaml), else the config's: make_table aggregates
    runs of one label over seeds and refuses two runs of one seed."""
    import yaml

    from framework.rundir import run_dir_of

    try:
        run = run_dir_of(checkpoint) if checkpoint else None
        saved = yaml.safe_load((run / "config.yaml").read_text()) if run else None
    except (OSError, ValueError, yaml.YAMLError):  # no run directory around the weights: the config's seed
        saved = None
    seed = (saved or {}).get("train", {}).get("seed") if isinstance(saved, dict) else None
    return int(seed) if seed is not None else getattr(getattr(cfg, "train", None), "seed", None)


BLANK_GREY = (128, 128, 128)  # a constant image: what the model answers without seeing anything


def blank_image_split(split: VqaSplit, where: Union[str, Path]) -> VqaSplit:
    """The split with every image replaced by one constant grey image (links to one file under `where`), for the
    blank-image baseline: the fine-tuned model answering from the question alone."""
    import dataclasses

    from PIL import Image

    folder = Path(where)
    folder.mkdir(parents=True, exist_ok=True)
    grey = folder / "_blank.png"
    Image.new("RGB", (64, 64), BLANK_GREY).save(grey)
    for name in {r.image for r in split.train + split.test + list(getattr(split, "validation", []))}:
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(grey.resolve())
    return dataclasses.replace(split, image_dir=folder)


@torch.no_grad()
def write_results(out_dir: Union[str, Path], document: dict[str, Any], predictions: list[dict]) -> Path:
    """Write metrics.json (with intervals and the per-type breakdown) and predictions.jsonl into out_dir (each
    atomically); returns out_dir."""
    add_statistics(document, predictions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # make_table compares runs only on the same questions: a split name alone does not say which were asked
    document = {**document, "questions_sha256": questions_sha256(predictions)}
    atomic_write_text(out / "metrics.json", json.dumps(document, indent=2) + "\n")
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    return out


def samples_markdown(predictions: list[dict], n: int = 8) -> str:
    """A few predictions as a Markdown table (TensorBoard text)."""
    lines = ["| question | type | truth | prediction |", "|---|---|---|---|"]
    for p in predictions[:n]:
        cells = [str(p[k]).replace("|", "/") for k in ("question", "answer_type", "ground_truth", "prediction")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_images(predictions: list[dict], image_dir: Union[str, Path], n: int = 4,
                  side: int = 256) -> dict[str, torch.Tensor]:
    """The first n predictions as TensorBoard images [3, H, W] in [0, 1]: the image above its question,
    ground truth and prediction (green when it matches, red when not)."""
    from PIL import Image, ImageDraw

    out = {}
    for i, p in enumerate(predictions[:n]):
        try:
            img = open_image((Path(image_dir) / p["image"]).read_bytes()).resize((side, side))
        except (OSError, ValueError):  # an unreadable image must not stop an evaluation
            continue
        canvas = Image.new("RGB", (side, side + 48), "black")
        canvas.paste(img, (0, 0))
        draw = ImageDraw.Draw(canvas)
        font = label_font()
        for row, (text, colour) in enumerate([(f"Q: {p['question']}", "white"),
                                              (f"truth: {p['ground_truth']}", "white"),
                                              (f"pred: {p['prediction']}", "lime" if p["match"] else "red")]):
            draw.text((4, side + 2 + 15 * row), fit_text(text, font, side - 8), fill=colour, font=font)
        out[f"sample_{i}"] = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return out


def label_font() -> Any:
    """Pillow's default font at 13 px: at its default ~10 px, hinting shrinks spaces to nothing ("is thisabdomen")."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font, whose spaces are whole
        return ImageFont.load_default()


def fit_text(text: str, font: Any, width: int) -> str:
    """`text`, or its first whole words and "..." when it is wider than `width` px (not cut mid-word)."""
    if font.getlength(text) <= width:
        return text
    words = text.split(" ")
    while len(words) > 1 and font.getlength(" ".join(words) + " ...") > width:
        words.pop()
    return " ".join(words) + " ..."


def config_for_checkpoint(recipe: Optional[str], checkpoint: Optional[str],
                          overrides: list[str]) -> Any:
    """The VQA config to evaluate or export `checkpoint` with: `recipe`, but with the model shape (model:,
    image.size) of the checkpoint's own run (its config.yaml), said in one line; without `recipe`, the run's own
    config. A pretraining (DAPT/PSD) run is evaluated with a warning: its answer decoder never saw VQA."""
    import yaml

    from framework.config import (
        apply_overrides,
        config_from_dict,
        config_to_dict,
        load_config,
    )
    from framework.rundir import run_dir_of

    if checkpoint is not None and not checkpoint.startswith(("http://", "https://")) and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (give a run directory, a step_N directory, a "
                                ".pth/.safetensors file or an exported transformers directory)")
    if checkpoint is None and recipe is not None:
        checkpoint = load_config(recipe, overrides).run.dir  # what trained_checkpoint will take
    run = run_dir_of(checkpoint) if checkpoint else None
    saved = yaml.safe_load((run / "config.yaml").read_text()) if run else None
    pretraining = saved is not None and "vqa" not in saved
    if recipe is None:
        if saved is None:
            raise ValueError("give --recipe (a VQA recipe, e.g. recipes/medblip/vqa.yaml) or --checkpoint RUN "
                             "of a run directory that holds its config.yaml")
        if pretraining:
            raise ValueError(f"{run} is a pretraining run ({saved.get('recipe')}): evaluate it with --recipe "
                             "recipes/medblip/vqa.yaml (its answer decoder was never fine-tuned for VQA)")
        return load_config(run / "config.yaml", overrides)
    if saved is None:
        return load_config(recipe, overrides)
    data = config_to_dict(load_config(recipe))  # the recipe resolved (bases merged), validated: its errors name it
    trained_with = str(saved.get("recipe", ""))
    if trained_with and trained_with.split(".")[:2] != str(data.get("recipe", "")).split(".")[:2]:  # another model
        raise ValueError(f"{run} was trained with {trained_with} (another model than {recipe}'s {data.get('recipe')}):"
                         f" evaluate it with a {'.'.join(trained_with.split('.')[:2])} VQA recipe, or leave --recipe"
                         " out to use the run's own config.yaml")
    # the run's shape; a pretraining run's own settings (queue, momentum, ...) are not the VQA model's
    data["model"] = {k: v for k, v in saved.get("model", data["model"]).items() if k in data["model"]}
    data["image"] = {**data["image"], "size": saved.get("image", {}).get("size", data["image"]["size"])}
    say(f"model: the checkpoint's own shape from {run / 'config.yaml'} (model: and image.size; "
        f"the model: section of {recipe} is not used)")
    if pretraining:
        say(f"warning: {run} is a pretraining run ({saved.get('recipe')}): its answer decoder was never fine-tuned "
            f"for VQA, so expect answers near chance; fine-tune first: launch/train.py --recipe {recipe} "
            f"run.init_from={run}")
    return config_from_dict(apply_overrides(data, overrides, recipe), recipe)
