"""One question about one image, answered by a trained VQA run (MedBLIP or BLIP-2) as launch/evaluate.py would.

    from recipes.common.ask import Asker
    asker = Asker("runs/vqa-psd")                       # a run directory, a step_N directory or a weights file
    answer = asker.ask("scan.png", "is there a lesion?")
    answer.ranked[0].answer, answer.ranked[0].score, answer.generated

The ranked answers come from the models' own rank inference (MedBlipVqa.rank_all / Blip2LLM.rank_all_answers, the code
evaluate.py's rank mode runs), over the same candidates (vqa.answer_list: the run's training answers by default),
with the same question normalisation and test-time image transform, so the top one is evaluate.py's rank prediction
for that question. The generated answer is the models' beam search with the run's vqa settings.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image, UnidentifiedImageError

from recipes.common.image_text import open_image
from recipes.common.vqa_eval import candidate_answers, config_for_checkpoint, load_vqa, trained_checkpoint
from recipes.common.vqa_rad import VqaDataset, normalize_text
from recipes.common.vqa_recipe import NotAVqaRecipe, vqa_recipe

ImageInput = Union[str, Path, bytes, Image.Image]

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # VQA-RAD's largest image is ~1 MB; a 32 MB upload is a mistake, not a scan
MAX_IMAGE_PIXELS = 50_000_000  # decoding more than this would take GBs of memory for a 224 px model input
MAX_QUESTION_CHARS = 2000


class AskError(ValueError):
    """Input the asker cannot use (no image, not an image, too large, an empty question, not a VQA run)."""


@dataclass(frozen=True)
class Ranked:
    """One candidate answer and its rank score (the answer's log-likelihood given image and question)."""

    answer: str
    score: float


@dataclass(frozen=True)
class Answer:
    """A question's answers: the ranked candidates (best first), the generated answer, and evaluate.py's choice."""

    question: str  # as asked
    normalized_question: str  # what the model reads (lower case, BLIP's punctuation removed, word limit)
    ranked: list[Ranked]
    generated: str
    prediction: str  # what evaluate.py's metrics.json scores for this run: rank's top answer or the generated one
    mode: str  # "rank" | "generate": which of the two `prediction` is

    @property
    def top(self) -> str:
        """The best-ranked answer."""
        return self.ranked[0].answer

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the web page's and --json's answer)."""
        return asdict(self)


def read_image(image: ImageInput) -> Image.Image:
    """A path, bytes or PIL image -> a decoded RGB image; anything else is one AskError line."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise AskError(f"image not found: {path}" if not path.exists() else f"not a file: {path}")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise AskError(f"{path}: {path.stat().st_size / 2**20:.0f} MB is larger than the "
                           f"{MAX_IMAGE_BYTES // 2**20} MB an image may be")
        data, name = path.read_bytes(), str(path)
    elif isinstance(image, (bytes, bytearray)):
        data, name = bytes(image), "the upload"
    else:
        raise AskError(f"an image is a path, bytes or a PIL image, not {type(image).__name__}")
    if not data:
        raise AskError(f"{name} is empty: give an image file (PNG, JPEG, ...)")
    if len(data) > MAX_IMAGE_BYTES:
        raise AskError(f"{name}: {len(data) / 2**20:.0f} MB is larger than the {MAX_IMAGE_BYTES // 2**20} MB an "
                       "image may be")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below says it in one line
            with Image.open(io.BytesIO(data)) as header:  # the size, before anything is decoded
                width, height = header.size
        if width * height > MAX_IMAGE_PIXELS:
            raise AskError(f"{name}: {width}x{height} pixels is more than the {MAX_IMAGE_PIXELS:,} an image may have")
        return open_image(data)  # evaluate.py's decoder (16-bit greyscale scaled, not clipped); it decodes whole
    except UnidentifiedImageError:  # PIL's message names a BytesIO object, which says nothing to a user
        raise AskError(f"{name} is not an image (PNG, JPEG, ... that PIL can read)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, AskError):
            raise
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AskError(f"{name} cannot be decoded as an image, damaged or cut short? ({why})") from None


def _saved_config(checkpoint: str) -> Optional[dict[str, Any]]:
    """The config.yaml of the run that holds `checkpoint` (None for a bare weights file or a missing path)."""
    import yaml

    from framework.rundir import run_dir_of

    run = run_dir_of(checkpoint) if Path(checkpoint).exists() else None
    if run is None:
        return None
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None  # config_for_checkpoint reads it again and says what is wrong
    return saved if isinstance(saved, dict) else None


class Asker:
    """A trained VQA run, loaded once, answering questions about images (rank with scores, and generation)."""

    def __init__(self, checkpoint: str, *, recipe: Optional[str] = None, overrides: Sequence[str] = (),
                 device: Optional[str] = None, top: int = 5) -> None:
        """Load `checkpoint` (a VQA run dir, step dir or weights file) with its own config, or `recipe`'s."""
        if top < 1:
            raise AskError(f"top must be >= 1, got {top}")
        self.top = top
        if checkpoint is None or not str(checkpoint).strip():
            raise AskError("give the checkpoint of a VQA run (--checkpoint RUN)")
        saved = _saved_config(str(checkpoint))
        if recipe is None and saved is not None and "vqa" not in saved:  # evaluate.py's message would say evaluate
            raise AskError(f"{checkpoint} is a {saved.get('recipe') or 'pretraining'} run, not a VQA run: its answer "
                           "decoder was never fine-tuned to answer questions; ask a run of recipes/medblip/vqa.yaml "
                           "or recipes/blip2/vqa.yaml")
        self.cfg = config_for_checkpoint(recipe, str(checkpoint), list(overrides))
        try:
            recipe = vqa_recipe(self.cfg)
        except NotAVqaRecipe:
            raise AskError(f"{checkpoint}: a {self.cfg.recipe} run is not a VQA run; ask a run of "
                           "recipes/medblip/vqa.yaml or recipes/blip2/vqa.yaml") from None
        self.checkpoint = trained_checkpoint(self.cfg, str(checkpoint))
        v = self.cfg.vqa
        # the candidates evaluate.py ranks: the run's training answers need its VQA data (or vqa.answer_list=FILE)
        split = load_vqa(self.cfg, announce=False) if v.answer_list == "train" else None
        self.candidates = candidate_answers(self.cfg, split)
        with contextlib.redirect_stdout(io.StringIO()):  # the load report is for training logs, not for answers
            self.model = recipe.load_trained(self.cfg, self.checkpoint)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.blip2 = self.cfg.recipe.startswith("recipes.blip2")
        # evaluate.py's primary answer: MedBLIP's vqa.inference, BLIP-2's vqa.primary
        self.mode = v.primary if self.blip2 else v.inference
        # what evaluate.py builds for a test question: the same transform, decoded at the same size
        self._images = VqaDataset([], ".", self.cfg.image, train=False)
        with torch.no_grad():
            self._cand = (self.model.text.targets(self.candidates, self.device) if self.blip2
                          else self.model.encode_answers(self.candidates, self.device))

    @property
    def kind(self) -> str:
        """'blip2' or 'medblip'."""
        return "blip2" if self.blip2 else "medblip"

    def question(self, text: str) -> str:
        """The question as the model reads it (evaluate.py's normalisation); an empty one is an AskError."""
        if not isinstance(text, str) or not text.strip():
            raise AskError("the question is empty: ask something about the image")
        if len(text) > MAX_QUESTION_CHARS:
            raise AskError(f"the question has {len(text)} characters; at most {MAX_QUESTION_CHARS}")
        q = normalize_text(text, self.cfg.vqa.max_question_words)
        if not q:
            raise AskError(f"the question {text!r} has no words once punctuation is removed")
        return q

    def ask(self, image: ImageInput, question: str, top: Optional[int] = None) -> Answer:
        """Answer one question about one image."""
        return self.ask_many([(image, question)], top=top)[0]

    @torch.no_grad()
    def ask_many(self, pairs: Sequence[tuple[ImageInput, str]], top: Optional[int] = None) -> list[Answer]:
        """Answer (image, question) pairs in one batch; every input is checked before the model runs."""
        if not pairs:
            return []
        top = top or self.top
        questions = [self.question(q) for _, q in pairs]
        images = torch.stack([self._images.transform(read_image(img)) for img, _ in pairs]).to(self.device)
        v = self.cfg.vqa
        if self.blip2:
            prompts = [self.cfg.model.prompt.format(q) for q in questions]
            embeds = self.model.image_embeds(images)
            index, scores = self.model.rank_all_answers(embeds, prompts, *self._cand, k=v.k_test)
            generated = self.model.generate(embeds, prompts, num_beams=v.num_beams, max_new_tokens=v.max_new_tokens,
                                            length_penalty=v.length_penalty)
        else:
            batch = self.model.collate_fn()([{"image": img, "question": q, "answers": ["?"], "weights": [1.0]}
                                             for img, q in zip(images, questions)])
            q_ids, q_mask = batch["question_ids"].to(self.device), batch["question_mask"].to(self.device)
            index, scores = self.model.rank_all(images, q_ids, q_mask, *self._cand, k=v.k_test,
                                                label_smoothing=v.rank_label_smoothing)
            generated = self.model.generate(images, q_ids, q_mask, num_beams=v.num_beams,
                                            max_length=v.max_generate_len)
        out = []
        for i, (_, raw) in enumerate(pairs):
            ranked = [Ranked(self.candidates[j], round(float(s), 6))
                      for j, s in zip(index[i, :top].tolist(), scores[i, :top].tolist())]
            gen = normalize_text(generated[i])  # evaluate.py scores (and writes) the normalised text
            out.append(Answer(question=raw, normalized_question=questions[i], ranked=ranked, generated=gen,
                              prediction=ranked[0].answer if self.mode == "rank" else gen, mode=self.mode))
        return out
