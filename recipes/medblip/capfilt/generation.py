"""The captioner: k synthetic captions per image by nucleus sampling from the image-grounded decoder, seeded per
caption so that a caption depends on (seed, shard, sample, k) and on nothing else (not the batch, not the rank).

BLIP's `generate(sample=True)` (models/blip.py) runs transformers' generate with do_sample, top_p 0.9 and
repetition_penalty 1.1, min_length 5 and max_length 20 (configs/caption_coco.yaml). Its draw comes from torch's
global generator, one multinomial over the whole batch, so a caption would change with its batch-mates. Here
transformers' own repetition-penalty and min-length processors and its `TopPLogitsWarper` shape the distribution,
then `SeededDraw` draws each row from its own generator and leaves only that token finite, and the greedy step
takes it: the same distribution, one private random stream per caption.

No prompt: BLIP's captioner is fine-tuned with the prompt "a picture of " (its first tokens are masked from the
loss, and generation starts from [DEC] + prompt). Our decoder is DAPT-trained (and captioner-fine-tuned) on
[DEC] + caption without one, so generation starts from [DEC] alone; a prompt it never saw would only shift the
captions away from what it learned. BLIP's lengths count the prompt ([DEC] a picture of = 4 of the 20 tokens); ours
count [DEC] only, so a synthetic caption has 4 to 19 word pieces (BLIP's: 1 to 16 after the prompt).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from recipes.common.text import pre_caption
from recipes.medblip.model.blip_pretrain import MedBlipPretrain


@dataclass(frozen=True)
class SamplingOptions:
    """Nucleus sampling as BLIP's captioner (models/blip.py generate(sample=True), configs/caption_coco.yaml)."""

    k: int = 1  # synthetic captions per image (BLIP's CapFilt: one)
    top_p: float = 0.9
    min_length: int = 5  # decoder tokens, [DEC] included (transformers' min_length)
    max_length: int = 20  # decoder tokens, [DEC] included
    repetition_penalty: float = 1.1  # BLIP's sampling path hard-codes 1.1 (beam search: 1.0)

    def check(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(f"need 2 <= --min-length <= --max-length, got {self.min_length} and {self.max_length}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")


def caption_seed(seed: int, shard: str, index: int, key: str, j: int) -> int:
    """The seed of synthetic caption j of sample `index` (key `key`) of `shard`: the same in every process."""
    digest = hashlib.sha256(f"{seed}|{shard}|{index}|{key}|{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SeededDraw(LogitsProcessor):
    """Draw row i's next token from softmax(scores[i]) with generators[i]; return scores with only it finite.

    Inverse-CDF sampling with one float64 uniform per row and step, drawn on the CPU, so the draw does not depend
    on the device either. Tokens the earlier processors removed (-inf) have probability 0 and are never drawn.
    """

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"SeededDraw: {scores.shape[0]} rows but {len(self.generators)} generators")
        probs = scores.double().softmax(-1)
        cdf = probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        target = u.to(cdf.device)[:, None] * cdf[:, -1:]  # < cdf[:, -1]: some token's cdf exceeds it
        token = torch.searchsorted(cdf, target, right=True).clamp_max(scores.shape[-1] - 1)  # first cdf > u
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


@torch.no_grad()
def sample_captions(model: MedBlipPretrain, image_embeds: torch.Tensor, seeds: list[list[int]],
                    opts: SamplingOptions) -> list[list[str]]:
    """Image tokens [B, N, D] + seeds [B][k] -> k captions per image (pre_caption'ed text), caption (i, j) drawn
    with seeds[i][j] alone."""
    b = image_embeds.shape[0]
    if len(seeds) != b or any(len(s) != opts.k for s in seeds):
        raise ValueError(f"sample_captions: need {opts.k} seeds for each of {b} images")
    embeds = image_embeds.repeat_interleave(opts.k, dim=0)  # rows: image 0 caption 1..k, image 1 ...
    generators = [torch.Generator().manual_seed(s) for row in seeds for s in row]
    tok = model.tokenizer
    start = torch.full((b * opts.k, 1), model.bos_token_id, dtype=torch.long, device=embeds.device)
    out = model.text_decoder.generate(
        input_ids=start, max_length=opts.max_length, min_length=opts.min_length, do_sample=False, num_beams=1,
        repetition_penalty=opts.repetition_penalty, eos_token_id=tok.sep_token_id, pad_token_id=model.pad_token_id,
        logits_processor=LogitsProcessorList([TopPLogitsWarper(top_p=opts.top_p), SeededDraw(generators)]),
        encoder_hidden_states=embeds,
        encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device))
    texts = [pre_caption(t) for t in tok.batch_decode(out, skip_special_tokens=True)]
    return [texts[i * opts.k:(i + 1) * opts.k] for i in range(b)]
