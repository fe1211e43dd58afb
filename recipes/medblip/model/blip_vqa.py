"""BLIP's VQA model (salesforce/BLIP models/blip_vqa.py): question encoder over the image, answer decoder over the
question, trained with the answer LM loss; answers by beam search (`generate`) or by ranking a list (`rank`).

Names are BLIP_VQA's checkpoint keys (visual_encoder.*, text_encoder.*, text_decoder.bert.*, text_decoder.cls.*), so
BLIP's model_base.pth, our DAPT/PSD runs and transformers' BlipForQuestionAnswering checkpoints load by name.
Differences from BLIP_VQA, on purpose:
- the cross-attention padding mask is honoured (towers.fix_cross_attention_mask; BLIP's med.py masks too, while
  BLIP's `generate` passes an all-ones question mask and transformers drops the mask altogether);
- the vision encoder is frozen by default (the study) and then runs in eval mode under no_grad;
- rank scores are plain answer log-likelihoods by default (BLIP scores with its label-smoothed training loss;
  `rank_label_smoothing=0.1` reproduces that);
- rank inference runs batched over questions, in chunks of question x candidate rows.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from recipes.common.tokenizer import load_tokenizer
from recipes.medblip.model.config import TowersConfig
from recipes.medblip.model.losses import lm_chance, lm_loss, lm_targets
from recipes.medblip.model.towers import (
    build_text_decoder,
    build_text_encoder,
    build_vit,
)
from recipes.medblip.model.weights import (
    LoadReport,
    load_state_dict_into,
    read_state_dict,
)

RANK_CHUNK_ROWS = 512  # question x candidate rows scored per decoder call (bounds activation memory)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor], num_questions: int,
                label_smoothing: float = 0.1) -> torch.Tensor:
    """BLIP_VQA's loss: sum over answers of weight x (label-smoothed CE summed over the answer's tokens), divided by
    the number of questions. logits [N, La, V] (any dtype; computed in fp32), labels [N, La] (-100 ignored)."""
    per_answer = lm_loss(logits, labels, label_smoothing, reduction="none")  # [N] fp32
    weights = torch.ones_like(per_answer) if weights is None else weights.to(per_answer)
    return (weights * per_answer).sum() / num_questions


class VqaCollate:
    """Dataset items -> batch: {"image" [B,3,H,W], "question_ids"/"question_mask" [B,Lq], "answer_ids"/"answer_mask"
    [N,La] (N = all answers of the batch), "answer_weights" [N], "answer_counts" [B], the texts as lists, and
    "answer_tokens" (float: sum over answers of weight x scored tokens, per question; for the chance level)}."""

    def __init__(self, tokenizer: Any, max_question_len: int, max_answer_len: int):
        self.tokenizer, self.max_question_len, self.max_answer_len = tokenizer, max_question_len, max_answer_len

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        questions = [s["question"] for s in samples]
        answers = [a for s in samples for a in s["answers"]]
        q = self.tokenizer(questions, padding="longest", truncation=True, max_length=self.max_question_len,
                           return_tensors="pt")
        a = self.tokenizer(answers, padding="longest", truncation=True, max_length=self.max_answer_len,
                           return_tensors="pt")
        weights = [w for s in samples for w in s["weights"]]
        scored = (a["attention_mask"].sum(1) - 1).tolist()  # every answer token after [DEC] is predicted
        return {"image": torch.stack([s["image"] for s in samples]),
                "question_ids": q["input_ids"], "question_mask": q["attention_mask"],
                "answer_ids": a["input_ids"], "answer_mask": a["attention_mask"],
                "answer_weights": torch.tensor(weights, dtype=torch.float32),
                "answer_tokens": sum(w * n for w, n in zip(weights, scored)) / len(samples),
                "answer_counts": torch.tensor([len(s["answers"]) for s in samples], dtype=torch.long),
                "questions": questions, "answers": [s["answers"][0] for s in samples],
                "answer_types": [s.get("answer_type", "") for s in samples],
                "qids": [s.get("qid", "") for s in samples]}


class MedBlipVqa(nn.Module):
    """BLIP_VQA: forward(batch) -> {"losses": {"vqa": fp32 scalar}, "metrics": {"answer_token_acc"}, "chance"}."""

    towers = ("visual_encoder", "text_encoder", "text_decoder")  # what train.compile compiles (framework.compile)

    def __init__(self, cfg: TowersConfig, *, freeze_vision: bool = True, max_question_len: int = 35,
                 max_answer_len: int = 32, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.enc_token_id = int(self.tokenizer.enc_token_id)
        self.bos_token_id = int(self.tokenizer.bos_token_id)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.sep_token_id = int(self.tokenizer.sep_token_id)
        self.max_question_len, self.max_answer_len = max_question_len, max_answer_len
        vocab = len(self.tokenizer)
        self.visual_encoder = build_vit(cfg)
        self.text_encoder = build_text_encoder(cfg, vocab)  # the question encoder, cross-attending to the image
        self.text_decoder = build_text_decoder(cfg, vocab)  # the answer decoder: its own weights (BLIP_VQA ties none)
        self.freeze_vision = freeze_vision
        if freeze_vision:
            self.visual_encoder.requires_grad_(False)
            self.visual_encoder.eval()

    def collate_fn(self) -> VqaCollate:
        return VqaCollate(self.tokenizer, self.max_question_len, self.max_answer_len)

    def train(self, mode: bool = True) -> "MedBlipVqa":
        super().train(mode)
        if self.freeze_vision:  # no drop-path/dropout noise in a tower that does not learn
            self.visual_encoder.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_encoder.cls_token.dtype

    # ------------------------------------------------------------------ encoders

    def image_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> ViT tokens [B, 1 + N, width] (no graph when the tower is frozen)."""
        image = image.to(self.dtype)
        if self.freeze_vision:
            with torch.no_grad():
                return self.visual_encoder.forward_features(image)
        return self.visual_encoder.forward_features(image)

    def encode_question(self, image_embeds: torch.Tensor, question_ids: torch.Tensor,
                        question_mask: torch.Tensor) -> torch.Tensor:
        """Question tokens [B, Lq] ([CLS] first, replaced by [ENC]) over image tokens -> states [B, Lq, hidden]."""
        ids = question_ids.clone()
        ids[:, 0] = self.enc_token_id
        out = self.text_encoder(ids, attention_mask=question_mask, encoder_hidden_states=image_embeds)
        return out.last_hidden_state

    def _decoder_inputs(self, answer_ids: torch.Tensor) -> torch.Tensor:
        ids = answer_ids.clone()
        ids[:, 0] = self.bos_token_id  # [CLS] -> [DEC]
        return ids

    def answer_log_likelihood(self, question_states: torch.Tensor, question_mask: torch.Tensor,
                              answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                              label_smoothing: float = 0.0) -> torch.Tensor:
        """Sum of log p(answer token) for each row: states [N, Lq, H] + answers [N, La] ([CLS] ... [SEP]) -> [N] fp32.

        With label_smoothing > 0 this is minus BLIP's per-answer training loss (what BLIP's rank_answer scores).
        """
        length = int(answer_mask.sum(1).max())  # candidates are padded to the longest of the whole list
        ids = self._decoder_inputs(answer_ids[:, :length])
        hidden = self.text_decoder.bert(ids, attention_mask=answer_mask[:, :length], use_cache=False, is_decoder=True,
                                        encoder_hidden_states=question_states,
                                        encoder_attention_mask=question_mask).last_hidden_state
        # Vocabulary logits only where a token is scored (not at padding): [T, V] instead of [N, La, V].
        targets = lm_targets(ids, self.pad_token_id)[:, 1:]
        valid = targets != -100
        logits = self.text_decoder.cls(hidden[:, :-1][valid]).float()
        nll = F.cross_entropy(logits, targets[valid], reduction="none", label_smoothing=label_smoothing)
        row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(targets)[valid]
        return -torch.zeros(ids.shape[0], device=ids.device).index_add_(0, row, nll)

    # ------------------------------------------------------------------ training

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """batch from VqaCollate -> {"losses": {"vqa": sum_a w_a * CE_sum(answer a) / B}, "metrics": {...}} and,
        when the batch has "answer_tokens", "chance": {"vqa": answer_tokens * ln V}: the uniform prediction's loss
        (label smoothing does not change it), a model that learned nothing."""
        image_embeds = self.image_embeddings(batch["image"])
        q_mask = batch["question_mask"]
        states = self.encode_question(image_embeds, batch["question_ids"], q_mask)
        counts = batch.get("answer_counts")
        if counts is not None:  # several answers per question: repeat its states (a copy when each has one)
            rows = batch["answer_ids"].shape[0]  # the output size, known on the host: no read of `counts`
            states = states.repeat_interleave(counts, dim=0, output_size=rows)
            q_mask = q_mask.repeat_interleave(counts, dim=0, output_size=rows)
        ids = self._decoder_inputs(batch["answer_ids"])
        labels = lm_targets(ids, self.pad_token_id)
        out = self.text_decoder(ids, attention_mask=batch["answer_mask"], encoder_hidden_states=states,
                                encoder_attention_mask=q_mask, use_cache=False)
        loss = answer_loss(out.logits, labels, batch.get("answer_weights"), batch["question_ids"].shape[0],
                           self.cfg.label_smoothing)
        with torch.no_grad():
            pred, target = out.logits[:, :-1].argmax(-1), labels[:, 1:]
            valid = target != -100
            acc = ((pred == target) & valid).sum().float() / valid.sum().clamp(min=1)
        out = {"losses": {"vqa": loss}, "metrics": {"answer_token_acc": acc}}
        if "answer_tokens" in batch:
            out["chance"] = {"vqa": float(batch["answer_tokens"]) * lm_chance(self.text_decoder.config.vocab_size)}
        return out

    # ------------------------------------------------------------------ inference

    def encode_answers(self, answers: list[str],
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate answers -> ids [A, La] ([CLS] ... [SEP], padded), mask [A, La]."""
        enc = self.tokenizer(answers, padding="longest", truncation=True, max_length=self.max_answer_len,
                             return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def _question_states(self, image: torch.Tensor, question_ids: torch.Tensor,
                         question_mask: torch.Tensor) -> torch.Tensor:
        return self.encode_question(self.image_embeddings(image), question_ids, question_mask)

    @torch.no_grad()
    def rank(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
             answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int = 128,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP's rank_answer, batched: keep each question's k candidates with the most probable first token, rescore
        them in full; returns (index into the candidates [B], its score [B])."""
        topk, scores = self.rank_all(image, question_ids, question_mask, answer_ids, answer_mask, k, label_smoothing)
        return topk[:, 0], scores[:, 0]

    @torch.no_grad()
    def rank_states(self, states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor,
                    answer_mask: torch.Tensor, k: int = 128,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """rank() from question states [B, Lq, H]."""
        topk, scores = self.rank_all_states(states, question_mask, answer_ids, answer_mask, k, label_smoothing)
        return topk[:, 0], scores[:, 0]

    @torch.no_grad()
    def rank_all(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                 answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int = 128,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """rank() with every rescored candidate: (candidate indices [B, k], their scores [B, k]), best first."""
        states = self._question_states(image, question_ids, question_mask)
        return self.rank_all_states(states, question_mask, answer_ids, answer_mask, k, label_smoothing)

    @torch.no_grad()
    def rank_all_states(self, states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor,
                        answer_mask: torch.Tensor, k: int = 128,
                        label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """rank_all() from question states [B, Lq, H]; rank() keeps column 0."""
        b, n_cand = states.shape[0], answer_ids.shape[0]
        k = max(1, min(k, n_cand))
        start = torch.full((b, 1), self.bos_token_id, dtype=torch.long, device=states.device)
        first = self.text_decoder(start, encoder_hidden_states=states, encoder_attention_mask=question_mask,
                                  use_cache=False).logits[:, 0].float()
        prob_first = F.softmax(first, dim=-1).index_select(1, answer_ids[:, 1])  # [B, A]
        _, topk = prob_first.topk(k, dim=1)  # [B, k]
        rows = topk.reshape(-1)
        scores = []
        per_chunk = max(1, RANK_CHUNK_ROWS // k) * k  # whole questions per chunk
        for s in range(0, b * k, per_chunk):
            r = rows[s:s + per_chunk]
            q_index = torch.arange(s, s + len(r), device=states.device) // k
            scores.append(self.answer_log_likelihood(states[q_index], question_mask[q_index], answer_ids[r],
                                                     answer_mask[r], label_smoothing))
        scores = torch.cat(scores).view(b, k)
        # stable: among equal scores the earlier candidate wins, as argmax picked it before this returned them all
        order = scores.sort(dim=1, descending=True, stable=True).indices
        return topk.gather(1, order), scores.gather(1, order)

    @torch.no_grad()
    def generate(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                 num_beams: int = 3, max_length: int = 10, min_length: int = 1) -> list[str]:
        """Beam search from [DEC] (BLIP: 3 beams, at most 10 tokens incl. [DEC], stop at [SEP]) -> answers [B]."""
        ids = self.generate_ids(image, question_ids, question_mask, num_beams, max_length, min_length)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate_ids(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                     num_beams: int = 3, max_length: int = 10, min_length: int = 1) -> torch.Tensor:
        """generate() as token ids [B, <=max_length], [DEC] first, padded after [SEP]."""
        from transformers import GenerationConfig

        states = self._question_states(image, question_ids, question_mask)
        start = torch.full((states.shape[0], 1), self.bos_token_id, dtype=torch.long, device=states.device)
        config = GenerationConfig(max_length=max_length, min_length=min_length, num_beams=num_beams,
                                  do_sample=False, eos_token_id=self.sep_token_id, pad_token_id=self.pad_token_id,
                                  bos_token_id=self.bos_token_id, use_cache=True)
        return self.text_decoder.generate(input_ids=start, generation_config=config, encoder_hidden_states=states,
                                          encoder_attention_mask=question_mask)

    @torch.no_grad()
    def predict(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor, *,
                mode: str = "rank", candidates: Optional[list[str]] = None,
                candidate_tokens: Optional[tuple[torch.Tensor, torch.Tensor]] = None, k: int = 128,
                num_beams: int = 3, max_length: int = 10, label_smoothing: float = 0.0) -> list[str]:
        """Answers for a batch by `rank` over candidates (pre-tokenised via encode_answers, or given as text) or by
        `generate`."""
        if mode == "generate":
            return self.generate(image, question_ids, question_mask, num_beams=num_beams, max_length=max_length)
        if mode != "rank":
            raise ValueError(f"vqa.inference: unknown mode {mode!r}; known: rank, generate")
        if not candidates:
            raise ValueError("rank inference needs a non-empty candidate answer list")
        ids, mask = candidate_tokens or self.encode_answers(candidates, question_ids.device)
        index, _ = self.rank(image, question_ids, question_mask, ids, mask, k, label_smoothing)
        return [candidates[i] for i in index.tolist()]


def pretrain_only_keys(keys: Iterable[str]) -> list[str]:
    """Keys of a BLIP pretraining checkpoint that BLIP_VQA has no place for (ITC/ITM heads, momentum copies,
    queues, temperature), under any wrapper prefix ('student.' of our PSD runs)."""
    heads = {"vision_proj", "text_proj", "itm_head", "visual_encoder_m", "vision_proj_m", "text_encoder_m",
             "text_proj_m", "image_queue", "text_queue", "queue_ptr", "temp"}
    out = []
    for k in keys:
        parts = k.split(".")
        if parts[0] in heads or (len(parts) > 1 and parts[1] in heads and parts[0] in ("student", "module", "model")):
            out.append(k)
    return out


_HEAD = "text_decoder.cls.predictions.decoder.weight"
_DEC_EMB = "text_decoder.bert.embeddings.word_embeddings.weight"


def load_vqa_weights(model: MedBlipVqa, spec: str, sha256: Optional[str] = None) -> LoadReport:
    """Initialise a VQA model as BLIP's load_checkpoint does into BLIP_VQA: from BLIP's model_base.pth, our DAPT/PSD
    runs (text_encoder -> question encoder, text_decoder -> answer decoder), a VQA run, or a transformers
    BlipForQuestionAnswering directory. The pretraining-only tensors are dropped (and counted in the report)."""
    sd, layout, source = read_state_dict(spec, sha256)
    dropped = pretrain_only_keys(sd)
    for k in dropped:
        del sd[k]
    notes = []
    for head in [k for k in sd if k.endswith(_HEAD)]:
        emb = head[: -len(_HEAD)] + _DEC_EMB
        if emb in sd and not torch.equal(sd[emb], sd[head]):
            # A pretraining checkpoint written without BLIP HEAD's tying (BLIP's first commit, model.tie_lm_head=false,
            # our runs before it) holds the LM head apart from the decoder's input embedding. BLIP_VQA's decoder ties
            # the two, and BLIP's load_state_dict writes the head last: the head wins.
            sd[emb] = sd[head]
            notes.append("answer decoder: word embeddings tied to the pretraining LM head weights (as BLIP_VQA's "
                         "load_checkpoint leaves them)")
    report = load_state_dict_into(model, sd, source=source, layout=layout)
    if dropped:
        report.notes.append(f"{len(dropped)} pretraining-only tensors not used (ITC/ITM heads, momentum encoders, "
                            "queues, temp)")
    report.notes += notes
    return report
