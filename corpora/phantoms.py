"""Seeded radiology-like phantoms for the offline demo: caption shards and a VQA-RAD-format question set.

Every image is an axial slice of a head or an abdomen of an adult or a child, CT-like (with or without
contrast) or MR-like (T1 or T2 weighted), with or without one focal lesion (left or right, bright or
dark, small or large). Captions state every one of these attributes and every answer follows from the
pixels, so a tiny BLIP can learn the task on a CPU in a minute or two and beat the majority answer clearly.

Why so many attributes: BLIP's ITM takes as negatives the in-batch captions most similar to the positive.
With only modality, organ and the lesion described, half of the images (the lesion-free ones) fell into 4
descriptions, 76% of the samples of a batch of 32 had a twin with the same description, and the "negatives"
mined from them were true matches: the best ITM head then answers "no match" to every pair (accuracy 2/3).
Age and contrast/weighting (global, easy to see) make 144 descriptions and twins rare (see docs/demo.md).

Sides follow the radiological convention: the patient's left is on the image's right.
Everything is a pure function of (seed, split, index): a sample never changes when counts change.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from framework.files import sha256_file

VERSION = 5  # bump when rendering or text changes: make_demo_data regenerates on a version change
VQA_JSON = "VQA_RAD Dataset Public.json"  # the official release's file and folder names
VQA_IMAGES = "VQA_RAD Image Folder"
_SPLIT_IDS = {"train": 1, "val": 2, "vqa_train": 3, "vqa_test": 4}
CASE_LABELS = ("modality", "phase", "organ", "age", "lesion", "side", "brightness", "size")  # what a caption states


# ----------------------------------------------------------------------------- one case


@dataclass
class Case:
    """What one phantom shows; `render(case)` draws it and the text helpers describe it."""

    modality: str  # "ct" | "mri"
    organ: str  # "head" | "abdomen"
    lesion: bool
    age: str = "adult"  # "adult" | "child" (a smaller body)
    phase: str = "plain"  # CT: "plain" | "contrast" (enhanced tissue, a bright vessel); MRI: "t1" | "t2"
    side: Optional[str] = None  # patient side "left" | "right" (image right | image left)
    brightness: Optional[str] = None  # "bright" | "dark"
    size: Optional[str] = None  # "small" | "large"
    # Geometry and texture, in the [-1, 1] image frame (x to the image right, y down).
    center: tuple[float, float] = (0.0, 0.0)
    axes: tuple[float, float] = (0.7, 0.84)
    lesion_xy: tuple[float, float] = (0.0, 0.0)
    lesion_radius: float = 0.0
    noise_seed: int = 0


def sample_case(rng: np.random.Generator, lesion_prob: float = 0.5) -> Case:
    """Draw a case with independent uniform attributes (modality, organ, age, phase, side, brightness, size)."""
    modality = ("ct", "mri")[rng.integers(2)]
    organ = ("head", "abdomen")[rng.integers(2)]
    age = ("adult", "child")[rng.integers(2)]
    phase = PHASES[modality][rng.integers(2)]
    scale = 1.0 if age == "adult" else CHILD_SCALE
    center = (float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03)))
    if organ == "head":
        axes = (float(rng.uniform(0.67, 0.73)) * scale, float(rng.uniform(0.81, 0.87)) * scale)
    else:
        axes = (float(rng.uniform(0.85, 0.91)) * scale, float(rng.uniform(0.59, 0.65)) * scale)
    case = Case(modality, organ, False, age, phase, center=center, axes=axes, noise_seed=int(rng.integers(2**31)))
    if rng.random() < lesion_prob:
        case.lesion = True
        case.side = ("left", "right")[rng.integers(2)]
        case.brightness = ("bright", "dark")[rng.integers(2)]
        case.size = ("small", "large")[rng.integers(2)]
        radius = rng.uniform(0.15, 0.17) if case.size == "small" else rng.uniform(0.27, 0.3)
        case.lesion_radius = float(radius * (1.0 if age == "adult" else CHILD_LESION_SCALE))
        # Lateral offset as a fraction of the half-axis, clear of the midline structures.
        frac = rng.uniform(0.42, 0.5) if organ == "head" else rng.uniform(0.45, 0.55)
        sign = 1.0 if case.side == "left" else -1.0  # patient left = image right
        dy = rng.uniform(-0.25, 0.25) if organ == "head" else rng.uniform(-0.3, 0.1)
        case.lesion_xy = (center[0] + sign * frac * axes[0], center[1] + dy * axes[1])
    return case


# ----------------------------------------------------------------------------- rendering

PHASES = {"ct": ("plain", "contrast"), "mri": ("t1", "t2")}
CHILD_SCALE = 0.8  # a child's body outline, relative to an adult's
CHILD_LESION_SCALE = 0.85  # lesions shrink less than the body: a large lesion in a child stays larger than a small one
# Tissue intensities in [0, 1]: CT has a bright bone rim and dark fat; MR a bright scalp/fat rim and a dark skull.
# CT with contrast: enhanced tissue and a bright vessel (aorta / sagittal sinus). MR T2: bright fluid (ventricles,
# kidneys), T1: dark fluid. Modality shows in rim, tissue level and noise; phase in fluid, tissue and the vessel.
_LEVELS = {
    ("ct", "plain"): {"outer": 0.95, "inner": 0.95, "tissue": 0.38, "fluid": 0.18, "kidney": 0.42, "spine": 0.95,
                      "vessel": 0.42, "noise": 0.03},
    ("ct", "contrast"): {"outer": 0.95, "inner": 0.95, "tissue": 0.47, "fluid": 0.18, "kidney": 0.75, "spine": 0.95,
                         "vessel": 0.95, "noise": 0.03},
    ("mri", "t1"): {"outer": 0.85, "inner": 0.08, "tissue": 0.58, "fluid": 0.12, "kidney": 0.3, "spine": 0.2,
                    "vessel": 0.1, "noise": 0.045},
    ("mri", "t2"): {"outer": 0.75, "inner": 0.08, "tissue": 0.55, "fluid": 0.9, "kidney": 0.88, "spine": 0.2,
                    "vessel": 0.1, "noise": 0.045},
}
_LESION_CONTRAST = {"bright": 0.5, "dark": -0.38}


def render(case: Case, size: int = 64, with_lesion: bool = True) -> np.ndarray:
    """Draw `case` as a float32 image [size, size] in [0, 1] (with_lesion=False: the same slice, no lesion)."""
    lv = _LEVELS[(case.modality, case.phase)]
    rng = np.random.default_rng(case.noise_seed)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(coords, coords)
    (cx, cy), (a, b) = case.center, case.axes
    rho = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)  # 1 on the body outline
    img = np.zeros((size, size), np.float32)
    if case.organ == "head":
        img[rho <= 1.0] = lv["outer"]
        img[rho <= 0.93] = lv["inner"]
        img[rho <= 0.86] = lv["tissue"]
        for s in (-1, 1):  # two ventricles either side of the midline
            v = ((x - cx - s * 0.1 * a) / (0.07 * a)) ** 2 + ((y - cy) / (0.25 * b)) ** 2
            img[v <= 1] = lv["fluid"]
        sinus = ((x - cx) / (0.1 * a)) ** 2 + ((y - cy - 0.78 * b) / (0.07 * b)) ** 2  # posterior midline
        img[sinus <= 1] = lv["vessel"]
    else:
        img[rho <= 1.0] = lv["outer"] * 0.3 if case.modality == "ct" else lv["outer"]  # subcutaneous fat
        img[rho <= 0.9] = lv["tissue"]
        for s in (-1, 1):  # two kidneys either side of the spine (symmetric: never mistaken for a lesion)
            k = ((x - cx - s * 0.32 * a) / (0.1 * a)) ** 2 + ((y - cy - 0.45 * b) / (0.18 * b)) ** 2
            img[k <= 1] = lv["kidney"]
        aorta = ((x - cx) / (0.09 * a)) ** 2 + ((y - cy - 0.3 * b) / (0.13 * b)) ** 2  # in front of the spine
        img[aorta <= 1] = lv["vessel"]
        spine = ((x - cx) / (0.1 * a / 0.88)) ** 2 + ((y - cy - 0.62 * b) / (0.1 * b / 0.62)) ** 2
        img[spine <= 1] = lv["spine"]
    body = rho <= 1.0
    # Smooth texture (upsampled coarse noise) plus fine noise, inside the body only.
    coarse = Image.fromarray(rng.normal(0, 1, (8, 8)).astype(np.float32), mode="F")
    texture = np.asarray(coarse.resize((size, size), Image.BICUBIC), np.float32)
    img += body * (0.04 * texture + rng.normal(0, lv["noise"], (size, size)).astype(np.float32))
    if case.lesion and with_lesion:
        lx, ly = case.lesion_xy
        d = np.sqrt((x - lx) ** 2 + (y - ly) ** 2)
        edge = 0.03  # soft rim, as real lesions have
        mask = np.clip((case.lesion_radius - d) / edge + 0.5, 0, 1)
        img += mask * _LESION_CONTRAST[case.brightness]
    img += rng.normal(0, 0.01, (size, size)).astype(np.float32)  # scanner noise outside the body too
    return np.clip(img, 0, 1)


def to_png(img: np.ndarray) -> bytes:
    """Float image [H,W] in [0,1] -> RGB PNG bytes (deterministic)."""
    return _encode(img, "png")


def _encode(img: np.ndarray, fmt: str) -> bytes:
    u8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    pil = Image.fromarray(u8, mode="L").convert("RGB")
    if fmt == "png":
        pil.save(buf, format="PNG", optimize=False)
    else:
        pil.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ----------------------------------------------------------------------------- text

_MOD_WORDS = {"ct": ["ct", "computed tomography"], "mri": ["mri", "magnetic resonance"]}
_TECH = {("ct", "bright"): "hyperdense", ("ct", "dark"): "hypodense",
         ("mri", "bright"): "hyperintense", ("mri", "dark"): "hypointense"}
_REGION = {"head": "hemisphere", "abdomen": "abdomen"}
_ORGAN_WORDS = {"head": ["head", "brain"], "abdomen": ["abdomen", "abdomen"]}


_PHASE_WORDS = {"plain": ["unenhanced", "plain"], "contrast": ["contrast enhanced", "post contrast"],
                "t1": ["t1 weighted", "t1"], "t2": ["t2 weighted", "t2"]}
_AGE_WORDS = {"adult": ["in an adult", "in an adult patient"], "child": ["in a child", "in a paediatric patient"]}


def caption(case: Case, rng: np.random.Generator) -> str:
    """A radiology-style caption that names every attribute: modality, phase, organ, age and the lesion (or none)."""
    mod = _MOD_WORDS[case.modality][rng.integers(2)]
    scan = f"{_PHASE_WORDS[case.phase][rng.integers(2)]} {mod}"
    organ = _ORGAN_WORDS[case.organ][rng.integers(2)]
    age = _AGE_WORDS[case.age][rng.integers(2)]
    if not case.lesion:
        return [f"axial {scan} of the {organ} {age} with no focal lesion",
                f"normal axial {scan} of the {organ} {age}",
                f"{scan} of the {organ} {age} without abnormality"][rng.integers(3)]
    look = case.brightness if rng.random() < 0.6 else _TECH[(case.modality, case.brightness)]
    where = f"{case.side} {_REGION[case.organ]}"
    return [f"axial {scan} of the {organ} {age} showing a {case.size} {look} lesion in the {where}",
            f"a {case.size} {look} lesion is seen in the {where} on this axial {scan} {age}",
            f"{scan} of the {organ} {age}: {case.size} {look} lesion in the {where}"][rng.integers(3)]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _question_groups(case: Case) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Question groups that apply to `case`: (answer_type, question_type, [(question, answer), ...]).

    Each group lists phrasings of one question; the first is the "freeform" one, the rest paraphrases.
    Closed groups pick the asked value at random (see `questions`) so yes and no are balanced.
    """
    other = {"ct": "mri", "mri": "ct", "head": "abdomen", "abdomen": "head", "left": "right", "right": "left",
             "bright": "dark", "dark": "bright", "small": "large", "large": "small"}
    groups = []

    def closed(qtype: str, value: str, truth: str, phrasings: list[str]) -> None:
        groups.append(("CLOSED", qtype, [(p.format(v=value), _yes(value == truth)) for p in phrasings]))

    # Each closed group is added twice (asking the true and the other value); `questions` picks one of them.
    for value in (case.modality, other[case.modality]):
        art = "an" if value == "mri" else "a"
        closed("MODALITY", value, case.modality, [f"is this {art} {{v}} scan?", "was this image taken with {v}?"])
    for value in (case.organ, other[case.organ]):
        closed("ORGAN", value, case.organ, ["is this an image of the {v}?", "does this image show the {v}?"])
    groups.append(("CLOSED", "PRES", [("is there a lesion?", _yes(case.lesion)),
                                      ("is a focal lesion present?", _yes(case.lesion))]))
    groups.append(("CLOSED", "ABN", [(f"is this {case.organ} normal?", _yes(not case.lesion)),
                                     ("is this image normal?", _yes(not case.lesion))]))
    groups.append(("OPEN", "MODALITY", [("what imaging modality was used?", case.modality),
                                        ("what type of scan is this?", case.modality)]))
    groups.append(("OPEN", "ORGAN", [("what organ is shown?", case.organ),
                                     ("what part of the body is this?", case.organ)]))
    if case.lesion:
        for value in (case.side, other[case.side]):
            closed("POS", value, case.side, ["is the lesion on the {v}?", "is the lesion on the {v} side?"])
        for value in (case.brightness, other[case.brightness]):
            closed("ATTRIB", value, case.brightness, ["is the lesion {v}?", "does the lesion look {v}?"])
        for value in (case.size, other[case.size]):
            closed("SIZE", value, case.size, ["is the lesion {v}?", "is it a {v} lesion?"])
        groups.append(("OPEN", "POS", [("which side is the lesion on?", case.side),
                                       ("where is the lesion?", f"{case.side} {_REGION[case.organ]}")]))
        groups.append(("OPEN", "ATTRIB", [("how does the lesion appear?", case.brightness),
                                          ("is the lesion bright or dark?", case.brightness)]))
        groups.append(("OPEN", "SIZE", [("how large is the lesion?", case.size),
                                        ("what is the size of the lesion?", case.size)]))
    return groups


def questions(case: Case, rng: np.random.Generator, n: int) -> list[dict[str, str]]:
    """Up to `n` distinct questions about `case`: {question, answer, answer_type, question_type, paraphrase}."""
    groups = _question_groups(case)
    # Closed yes/no groups come in pairs (true value, other value): keep one of each pair at random.
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, (atype, qtype, _) in enumerate(groups):
        by_key.setdefault((atype, qtype), []).append(i)
    kept = [idx[rng.integers(len(idx))] if atype == "CLOSED" and len(idx) == 2 else idx[0]
            for (atype, _), idx in by_key.items()]
    # PRES and ABN ask the same thing: one of them is asked about every image. Were it drawn like the others,
    # lesion-free images (fewer applicable questions) would get it more often and "no lesion" would be a prior.
    pres = [i for i in kept if groups[i][1] in ("PRES", "ABN")]
    rest = [i for i in kept if i not in pres]
    chosen = [pres[rng.integers(len(pres))]] + [rest[j] for j in sorted(rng.permutation(len(rest))[:n - 1])]
    out = []
    for g in chosen:
        atype, qtype, phrasings = groups[g]
        p = int(rng.integers(len(phrasings)))
        q, a = phrasings[p]
        out.append({"question": q, "answer": a, "answer_type": atype, "question_type": qtype,
                    "paraphrase": p > 0})
    return out


# ----------------------------------------------------------------------------- datasets on disk


@dataclass
class PhantomSpec:
    """Sizes of the generated demo data (all configurable from launch/make_demo_data.py)."""

    seed: int = 0
    image_size: int = 64
    train_captions: int = 2000
    val_captions: int = 200
    samples_per_shard: int = 250
    vqa_train_images: int = 600
    vqa_test_images: int = 100
    questions_per_image: int = 4
    lesion_prob: float = 0.5
    version: int = field(default=VERSION)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def make_case(spec: PhantomSpec, split: str, index: int) -> tuple[Case, np.random.Generator]:
    """The `index`-th case of `split` and the generator its text is drawn from (deterministic)."""
    rng = _rng(spec.seed, split, index)
    return sample_case(rng, spec.lesion_prob), rng


def write_caption_shards(out_dir: Path, spec: PhantomSpec, split: str, n: int) -> dict[str, Any]:
    """Write `n` caption samples of `split` as tar shards + manifest.json into out_dir; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, n, spec.samples_per_shard):
        name = f"phantom-{split}-{first // spec.samples_per_shard:04d}.tar"
        with tarfile.open(out_dir / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            count = 0
            for i in range(first, min(n, first + spec.samples_per_shard)):
                case, rng = make_case(spec, split, i)
                key = f"phantom_{split}_{i:06d}"
                meta = {"image_id": key, "modality": "CT" if case.modality == "ct" else "MRI",
                        "organ": case.organ, "cui": [], "source": "phantom", "case": _case_labels(case)}
                sample = {"png": to_png(render(case, spec.image_size)), "txt": caption(case, rng).encode(),
                          "json": json.dumps(meta, sort_keys=True).encode()}
                for ext in sorted(sample):  # webdataset groups files by key: key.png, key.txt, key.json
                    _add(tar, f"{key}.{ext}", sample[ext])
                count += 1
        path = out_dir / name
        shards.append({"name": name, "samples": count, "sha256": sha256_file(path), "bytes": path.stat().st_size})
    total = sum(s["samples"] for s in shards)
    manifest = {"shards": shards, "total_samples": total,  # same shard fields as prepare_rocov2's manifest
                "totals": {"samples": total, "bytes": sum(s["bytes"] for s in shards), "shards": len(shards)},
                "source": "phantom", "split": split, "seed": spec.seed, "image_size": spec.image_size}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_vqa(out_dir: Path, spec: PhantomSpec) -> dict[str, Any]:
    """Write `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/` (official VQA-RAD layout); returns counts.

    Train questions are phrase_type freeform/para, test questions test_freeform/test_para, on separate images.
    """
    img_dir = out_dir / VQA_IMAGES
    img_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for split, n_images, prefix in (("vqa_train", spec.vqa_train_images, ""),
                                    ("vqa_test", spec.vqa_test_images, "test_")):
        for i in range(n_images):
            case, rng = make_case(spec, split, i)
            name = f"phantom_{split.split('_')[1]}_{i:05d}.jpg"
            (img_dir / name).write_bytes(_encode(render(case, spec.image_size), "jpg"))
            for q in questions(case, rng, spec.questions_per_image):
                rows.append({
                    "qid": len(rows), "phrase_type": prefix + ("para" if q["paraphrase"] else "freeform"),
                    "qid_linked_id": f"phantom-{len(rows):06d}", "image_case_url": "NULL",
                    "image_name": name, "image_organ": "HEAD" if case.organ == "head" else "ABD",
                    "evaluation": "not evaluated", "question": q["question"], "question_rephrase": "NULL",
                    "question_relation": "NULL", "question_frame": "NULL", "question_type": q["question_type"],
                    "answer": q["answer"], "answer_type": q["answer_type"]})
    (out_dir / VQA_JSON).write_text(json.dumps(rows, indent=1) + "\n")
    test = [r for r in rows if r["phrase_type"].startswith("test_")]
    return {"questions": len(rows), "test_questions": len(test),
            "test_closed": sum(r["answer_type"] == "CLOSED" for r in test),
            "test_open": sum(r["answer_type"] == "OPEN" for r in test)}


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: BLIP's text config pads with id 0


def demo_vocab(spec: PhantomSpec) -> list[str]:
    """A WordPiece vocabulary holding every word the demo's captions, questions and answers use (~80 entries).

    With it the tiny demo model's LM head and softmax are ~400x smaller than over bert-base-uncased's 30522
    words, which dominate a CPU step at these sizes; load_tokenizer adds [DEC]/[ENC] to it as to the real one.
    """
    words: set[str] = set()
    for split, n in (("train", spec.train_captions), ("val", spec.val_captions)):
        for i in range(n):
            case, rng = make_case(spec, split, i)
            words.update(_basic_tokens(caption(case, rng)))
    for split, n in (("vqa_train", spec.vqa_train_images), ("vqa_test", spec.vqa_test_images)):
        for i in range(n):
            case, rng = make_case(spec, split, i)
            for group in _question_groups(case):
                for q, a in group[2]:
                    words.update(_basic_tokens(q) + _basic_tokens(a))
    return list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS))


DEMO_DATA_NAMES = frozenset({"phantoms.json", "shards", "vocab.txt", "vqa"})  # all write_demo_data puts in `out`


def write_demo_data(out: Path, spec: PhantomSpec, force: bool = False) -> dict[str, Any]:
    """Generate everything under `out` (shards/train, shards/val, vqa/, vocab.txt) once; an identical spec is a no-op.

    Writes into a temporary sibling and renames it into place, so an interrupted run leaves no half data.
    Returns the summary saved in out/phantoms.json.
    """
    if spec.image_size < 16 or spec.samples_per_shard < 1 or spec.questions_per_image < 1:
        raise ValueError(f"phantoms: image_size must be >= 16, samples_per_shard and questions_per_image >= 1; "
                         f"got {spec.image_size}, {spec.samples_per_shard}, {spec.questions_per_image}")
    out = Path(out)
    stamp = out / "phantoms.json"
    wanted = asdict(spec)
    if not force and stamp.is_file():
        try:
            summary = json.loads(stamp.read_text())
        except json.JSONDecodeError:
            summary = {}
        if summary.get("spec") == wanted:
            return {**summary, "reused": True}
    _refuse_foreign(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = {"spec": wanted,
                   "train": write_caption_shards(tmp / "shards" / "train", spec, "train", spec.train_captions)
                   ["total_samples"],
                   "val": write_caption_shards(tmp / "shards" / "val", spec, "val", spec.val_captions)
                   ["total_samples"],
                   "vqa": write_vqa(tmp / "vqa", spec)}
        vocab = demo_vocab(spec)
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        summary["vocab"] = len(vocab)
        (tmp / "phantoms.json").write_text(json.dumps(summary, indent=1) + "\n")
        if out.exists():
            _refuse_foreign(out)  # checked again: someone may have put files there while we generated
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:  # a failed or interrupted generation leaves no <out>.tmpPID behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "reused": False}


def _refuse_foreign(out: Path) -> None:
    """Raise ValueError unless `out` is absent, an empty folder, or demo data this module wrote (its phantoms.json).

    The folder is deleted and rewritten, so anything else there (a user's ROCOv2, VQA-RAD) must never be touched.
    """
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink():
        names = {p.name for p in out.iterdir()}
        if not names or "phantoms.json" in names and names <= DEMO_DATA_NAMES:
            return
        foreign = ", ".join(sorted(names - DEMO_DATA_NAMES)) or "no phantoms.json"
        raise ValueError(f"{out} is not empty and holds no demo data ({foreign[:80]}): it is left as it is; "
                         f"demo data goes into a new or empty folder, or one it wrote before")
    raise ValueError(f"{out} exists and is not a folder of demo data: choose another --data/--out")


def _basic_tokens(text: str) -> list[str]:
    """BERT's basic tokenisation for ASCII text: lowercase, words and single punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _case_labels(case: Case) -> dict[str, Any]:
    return {k: v for k, v in asdict(case).items() if k in CASE_LABELS}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: byte-identical shards per seed
    info.uname = info.gname = "phantom"
    tar.addfile(info, io.BytesIO(data))


