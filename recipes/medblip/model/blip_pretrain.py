"""BLIP's pretraining model (salesforce/BLIP models/blip_pretrain.py) with ITC, ITM and LM, switchable per objective.

Parameter and buffer names are BLIP's checkpoint keys: visual_encoder.*, text_encoder.*, text_decoder.bert.*,
text_decoder.cls.*, vision_proj, text_proj, itm_head, temp, the momentum copies (*_m) and image_queue,
text_queue, queue_ptr. As BLIP at HEAD, text-encoder and decoder word embeddings and the LM head are one Parameter
(`model.tie_lm_head`), and the momentum update runs at the start of the training forward, before that step's
momentum features: once per optimizer step (at its first micro-batch under gradient accumulation; BLIP updates in
every forward, which is the same without accumulation). Differences from BLIP, all equivalent for training:
- ITM negatives are drawn from the same distribution as BLIP's (torch.multinomial's own one-draw algorithm per row
  of the masked softmax, losses.draw_one_per_row) on the model's device with the model's own generator, saved with
  the plugin state, so a resumed run draws the same; nothing is read back to the host in the forward;
- the queue pointer is kept on the host (`queue_ptr` the buffer, BLIP's checkpoint key, is written alongside and
  read back only when a state dict is loaded);
- the queue is only written, and the momentum encoders only updated, in training mode, so evaluating held-out
  losses leaves them untouched.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from framework.distributed import all_gather_cat
from framework.ema import ema_update_
from framework.master_weights import MasterWeights
from framework.preflight import transformer_activation_bytes
from framework.progress import Progress
from recipes.common.tokenizer import load_tokenizer
from recipes.medblip.model.config import ModelConfig
from recipes.medblip.model.losses import (
    ITM_CHANCE,
    OBJECTIVES,
    TEMP_MAX,
    TEMP_MIN,
    itc_chance,
    itc_loss,
    itc_targets,
    itm_labels,
    itm_loss,
    lm_chance,
    lm_loss,
    lm_targets,
    sample_itm_negatives,
)
from recipes.medblip.model.shared_kv import enable_shared_image_kv, share_image_kv
from recipes.medblip.model.towers import (
    build_text_decoder,
    build_text_encoder,
    build_vit,
    tie_text_towers,
)

_QUEUES = ("image_queue", "text_queue")


def _read_queue_ptr(module: "MedBlipPretrain", incompatible_keys: Any) -> None:
    """After load_state_dict: the host pointer from the loaded buffer (one read per load, not per step)."""
    module._queue_ptr = int(module.queue_ptr)


class MedBlipPretrain(nn.Module):
    """BLIP_Pretrain: forward(batch) -> {"losses": {itc, itm, lm (enabled ones)}, "metrics": {...}, ...}."""

    # train.compile compiles these (framework.compile); the momentum copies run every step too
    towers = ("visual_encoder", "text_encoder", "text_decoder", "visual_encoder_m", "text_encoder_m")

    def __init__(self, cfg: ModelConfig, objectives: Iterable[str] = ("itc", "itm", "lm"), *,
                 tokenizer: Any = None, seed: int = 0):
        super().__init__()
        self.objectives = frozenset(objectives)
        unknown = sorted(self.objectives - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"unknown objective {unknown[0]!r}; known: {', '.join(OBJECTIVES)}")
        if not self.objectives:
            raise ValueError("MedBlipPretrain needs at least one objective (itc, itm, lm)")
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.enc_token_id = int(self.tokenizer.enc_token_id)
        self.bos_token_id = int(self.tokenizer.bos_token_id)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        vocab = len(self.tokenizer)
        width, hidden = cfg.vit.width, cfg.text.hidden

        # Registration order follows BLIP_Pretrain.__init__ (so named_parameters() names shared tensors as BLIP).
        self.visual_encoder = build_vit(cfg)
        self.text_encoder = build_text_encoder(cfg, vocab)
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)

        no_ckpt = cfg.replace(grad_checkpointing_vit=False, grad_checkpointing_text=False)  # no_grad anyway
        self.visual_encoder_m = build_vit(no_ckpt)
        self.vision_proj_m = nn.Linear(width, cfg.embed_dim)
        self.text_encoder_m = build_text_encoder(no_ckpt, vocab)
        self.text_proj_m = nn.Linear(hidden, cfg.embed_dim)

        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._queue_ptr = 0  # the pointer the forward uses: reading the buffer would be a host sync per step
        self.register_load_state_dict_post_hook(_read_queue_ptr)
        # BLIP's temp is 0-dim ([]); [1] here because DeepSpeed's parameter broadcast cannot view a 0-dim
        # tensor as bytes. weights.py converts between the two shapes on load and save.
        self.temp = nn.Parameter(cfg.temp * torch.ones(1))

        self.text_decoder = build_text_decoder(cfg, vocab)
        tie_text_towers(self.text_encoder, self.text_decoder, lm_head=cfg.tie_lm_head)
        self.copy_params()  # after the tie: the online encoder now holds the decoder's tensors
        enable_shared_image_kv(self.text_encoder, self.text_decoder)
        # Non-reentrant checkpointing recomputes each text layer alone, where a gather from projections done in
        # another layer call would not match the recorded graph: share only without text checkpointing.
        self.share_image_kv = cfg.share_image_kv and not cfg.grad_checkpointing_text

        self.itm_seed = seed
        self.itm_generator = torch.Generator().manual_seed(seed)  # moved to the model's device by seed_negatives
        # the run's Progress, handed over by MomentumUpdate.setup (its step drives the alpha ramp and the momentum
        # update); this one serves a model used without the Trainer
        self.progress = Progress()
        self.momentum_updated_at = -1  # progress.step when the momentum encoders last took their update (-1: never)
        # set by MomentumUpdate under DeepSpeed: the momentum copies then follow the fp32 masters, not the half weights
        self.master_weights: Optional[MasterWeights] = None

    # ------------------------------------------------------------------ momentum encoders and queue

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs as BLIP's model_pairs."""
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def fp32_modules(self) -> list[nn.Module]:
        """Modules the engine keeps in fp32 under fp16/bf16 (0.995-weighted updates would round away in half)."""
        return [m for _, m in self.momentum_pairs()]

    def _param_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for online, momentum in self.momentum_pairs():
            a, b = list(online.named_parameters()), list(momentum.named_parameters())
            if [n for n, _ in a] != [n for n, _ in b]:
                raise RuntimeError("momentum encoder does not mirror its online encoder")
            pairs += [(p, p_m) for (_, p), (_, p_m) in zip(a, b)]
        return pairs

    @torch.no_grad()
    def copy_params(self) -> None:
        """Momentum copies := online weights, frozen (BLIP's copy_params)."""
        for p, p_m in self._param_pairs():
            p_m.copy_(p)
            p_m.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self, momentum: Optional[float] = None) -> None:
        """p_m <- m * p_m + (1 - m) * p for every momentum parameter (in the momentum copy's dtype, fp32); p is the
        fp32 master of the online weight where `master_weights` holds one."""
        m = self.cfg.momentum if momentum is None else momentum
        pairs = self._param_pairs()
        online = [p for p, _ in pairs]
        sources = online if self.master_weights is None else self.master_weights.of(online)
        ema_update_([p_m for _, p_m in pairs], sources, m)

    @torch.no_grad()
    def momentum_update_for_step(self) -> bool:
        """BLIP's `_momentum_update()` for the current step, unless done: True when it ran.

        Runs at the first training forward of each optimizer step (progress.step = steps done), with the weights that
        step starts from, as BLIP's forward does; later micro-batches of the same step do not update again.
        """
        if self.momentum_updated_at >= self.progress.step:
            return False
        self.momentum_update()
        self.momentum_updated_at = self.progress.step
        return True

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        """Write the global batch of momentum features [world*B, E] at queue_ptr; the pointer wraps."""
        image_feats, text_feats = all_gather_cat(image_feat), all_gather_cat(text_feat)
        n = image_feats.shape[0]
        size = self.image_queue.shape[1]
        if size % n:
            raise ValueError(f"model.queue_size={size} is not a multiple of the global batch {n} "
                             "(data.batch_size x ranks); BLIP's queue needs whole batches")
        ptr = self._queue_ptr
        self.image_queue[:, ptr:ptr + n] = image_feats.T.to(self.image_queue.dtype)
        self.text_queue[:, ptr:ptr + n] = text_feats.T.to(self.text_queue.dtype)
        self._queue_ptr = (ptr + n) % size
        self.queue_ptr.fill_(self._queue_ptr)  # the checkpoint's copy: a fill from a host int, no sync

    def _apply(self, fn: Any, recurse: bool = True) -> "MedBlipPretrain":
        # The feature queues stay fp32 whatever the model is cast to (model.half(), .to(bfloat16)); moves keep working.
        before = {n: self._buffers[n] for n in _QUEUES}
        super()._apply(fn, recurse)
        for n, old in before.items():
            new = self._buffers[n]
            if old.dtype == torch.float32 and new.dtype != torch.float32:
                self._buffers[n] = old.to(new.device)
        return self

    # ------------------------------------------------------------------ RNG and schedule state

    def rng_state(self) -> torch.Tensor:
        """State of the generator that draws ITM negatives (a CPU ByteTensor; its device: itm_generator.device)."""
        return self.itm_generator.get_state()

    def set_rng_state(self, state: torch.Tensor, device_type: str = "cpu") -> None:
        """Restore rng_state(); a state saved on another kind of device (a CPU run resumed on a GPU) cannot be: the
        stream restarts from the seed, moved on by `progress.step`, with a warning."""
        if device_type != self.itm_generator.device.type:
            warnings.warn(f"ITM negatives: the checkpoint's generator ran on {device_type}, this run's on "
                          f"{self.itm_generator.device.type}: the negatives' stream restarts (seeded) instead of "
                          "resuming exactly")
            self.seed_negatives(self.itm_seed + 7919 * (self.progress.step + 1))
            return
        self.itm_generator.set_state(state)

    def seed_negatives(self, seed: int, device: Optional[torch.device] = None) -> None:
        """(Re)start the ITM-negative stream from `seed`, on `device` (default: the generator's current one)."""
        device = torch.device(device) if device is not None else self.itm_generator.device
        self.itm_seed = seed
        if self.itm_generator.device != device:
            self.itm_generator = torch.Generator(device=device)
        self.itm_generator.manual_seed(seed)

    def _negatives_generator(self, device: torch.device) -> torch.Generator:
        """The generator, on `device`: a model used without the engine on another device starts its stream there."""
        if self.itm_generator.device != device:
            self.seed_negatives(self.itm_seed, device)
        return self.itm_generator

    @property
    def alpha(self) -> float:
        """ITC distillation weight at the current optimizer step (BLIP's ramp when alpha_ramp_steps > 0)."""
        ramp = self.cfg.alpha_ramp_steps
        return self.cfg.alpha * (min(1.0, self.progress.step / ramp) if ramp > 0 else 1.0)

    def chance_levels(self, batch_size: int) -> dict[str, float]:
        """Per enabled objective, the loss of a model that learned nothing on a local batch of `batch_size` pairs."""
        levels = {"itc": itc_chance(batch_size + self.image_queue.shape[1]), "itm": ITM_CHANCE,
                  "lm": lm_chance(self.text_decoder.config.vocab_size)}
        return {name: level for name, level in levels.items() if name in self.objectives}

    def activation_bytes(self, batch_size: int, precision: str) -> int:
        """Estimated activation memory of one training micro-batch (for the start-up memory check).

        Passes that keep activations for backward: the ViT (B images), the ITC text encoder (B captions, no
        cross-attention), the ITM encoder (B positives + 2B negatives, cross-attending to the image tokens)
        and the LM decoder (B captions, cross-attention, plus its vocabulary logits in half and fp32).
        """
        cfg, half = self.cfg, precision in ("fp16", "bf16")
        width = 2 if half else 4
        vit_seq = (cfg.vit.image_size // cfg.vit.patch_size) ** 2 + 1
        L, t = cfg.max_text_len, cfg.text
        total = transformer_activation_bytes(batch_size, vit_seq, cfg.vit.width, cfg.vit.heads, cfg.vit.depth,
                                             half=half, checkpointed=cfg.grad_checkpointing_vit,
                                             mlp_ratio=cfg.vit.mlp_ratio)

        def text(batch: int, cross: bool) -> int:
            return transformer_activation_bytes(batch, L, t.hidden, t.heads, t.layers, half=half,
                                                checkpointed=cfg.grad_checkpointing_text,
                                                cross_seq=vit_seq if cross else 0,
                                                mlp_ratio=t.intermediate / t.hidden)

        if "itc" in self.objectives or "itm" in self.objectives:
            total += text(batch_size, cross=False)
        if "itm" in self.objectives:
            total += text(3 * batch_size, cross=True)
        if "lm" in self.objectives:
            total += text(batch_size, cross=True) + batch_size * L * len(self.tokenizer) * (width + 4)
        return int(total)

    # ------------------------------------------------------------------ features (also the Python API)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_encoder.cls_token.dtype

    def image_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> ViT tokens [B, 1 + H*W/patch^2, width]."""
        return self.visual_encoder.forward_features(image.to(self.dtype))

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> L2-normalised ITC image features [B, embed_dim] (fp32)."""
        return F.normalize(self.vision_proj(self.image_embeddings(image)[:, 0]).float(), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L] ([CLS] first) -> L2-normalised ITC text features [B, embed_dim] (fp32)."""
        out = self.text_encoder(input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_proj(out.last_hidden_state[:, 0]).float(), dim=-1)

    def tokenize(self, captions: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Captions (already pre_caption'ed) -> {"input_ids", "attention_mask"} [B, L<=max_text_len]."""
        enc = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.cfg.max_text_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, N, D] + texts [B, L] -> itm_head logits [B, 2] (index 1 = match); first token -> [ENC]."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        out = self.text_encoder(ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds)
        return self.itm_head(out.last_hidden_state[:, 0]).float()

    def itm_scores(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Probability that image i matches text i: [B]."""
        return self.itm_logits(self.image_embeddings(image), input_ids, attention_mask).softmax(-1)[:, 1]

    @torch.no_grad()
    def _momentum_features(self, image: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 weights; under fp16/bf16 training the compute runs at that precision through autocast.
        main, mom = self.dtype, self.visual_encoder_m.cls_token.dtype
        ctx = torch.autocast(image.device.type, dtype=main) if main != mom and mom == torch.float32 else nullcontext()
        with ctx:
            emb = self.visual_encoder_m.forward_features(image.to(mom))
            image_feat = F.normalize(self.vision_proj_m(emb[:, 0]).float(), dim=-1)
            out = self.text_encoder_m(input_ids, attention_mask=attention_mask)
            text_feat = F.normalize(self.text_proj_m(out.last_hidden_state[:, 0]).float(), dim=-1)
        return image_feat, text_feat

    # ------------------------------------------------------------------ the training step

    def forward(self, batch: dict[str, Any], *, return_logits: bool = False,
                reuse: Optional[dict[str, torch.Tensor]] = None) -> dict[str, Any]:
        """batch {"image": [B,3,H,W], "input_ids": [B,L] ([CLS] first), "attention_mask": [B,L]} -> ModelOutput.

        Returns {"losses": {name: fp32 scalar}, "metrics": {...}, "reuse": {"itm_neg_image": [B],
        "itm_neg_text": [B]} (when ITM runs)}, plus with return_logits {"logits": {"itc": {"i2t", "t2i"}
        [B, B+Q], "itm": [3B, 2], "lm": {"logits": [B, L-1, V], "labels": [B, L-1]} (aligned, -100 ignored)}}.
        `reuse` (a previous output's "reuse") makes ITM use those negatives instead of drawing new ones.
        "chance": {name: float} is each loss as a model that learned nothing would have it (`chance_levels`).
        In training mode the momentum encoders first take this optimizer step's update (momentum_update_for_step).
        """
        image, ids, att = batch["image"], batch["input_ids"], batch["attention_mask"]
        bs = ids.shape[0]
        obj = self.objectives
        losses: dict[str, torch.Tensor] = {}
        logits: dict[str, Any] = {}
        out: dict[str, Any] = {"losses": losses, "chance": self.chance_levels(bs)}
        if self.training:
            self.momentum_update_for_step()

        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        temp = self.temp.float()
        metrics: dict[str, Any] = {"temp": temp.detach()[0]}
        image_embeds = self.image_embeddings(image)

        inbatch = None  # the in-batch similarities ITM draws its hard negatives from
        if "itc" in obj or "itm" in obj:
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)
            text_feat = self.text_features(ids, att)
            if "itc" in obj:
                inbatch = self._itc(image, ids, att, image_feat, text_feat, temp, losses, metrics, logits)
            else:
                inbatch_i2t = image_feat @ text_feat.t() / temp
                inbatch = (inbatch_i2t, inbatch_i2t.t())

        # ITM and LM cross-attend to the image: kv.view(...) shares their image key/value projections
        with share_image_kv(image_embeds, enabled=self.share_image_kv) as kv:
            if "itm" in obj:
                out["reuse"] = self._itm(ids, att, kv, inbatch, reuse, losses, metrics, logits)
            if "lm" in obj:
                self._lm(ids, att, kv, losses, logits if return_logits else None)

        out["metrics"] = metrics
        if return_logits:
            out["logits"] = logits
        return out

    def _itc(self, image: torch.Tensor, ids: torch.Tensor, att: torch.Tensor, image_feat: torch.Tensor,
             text_feat: torch.Tensor, temp: torch.Tensor, losses: dict, metrics: dict,
             logits: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP's ITC against the momentum features and the queues (adds its loss, alpha and logits); returns the
        in-batch similarities [B, B] (i2t, t2i) for ITM's hard negatives."""
        bs, alpha = ids.shape[0], self.alpha
        with torch.no_grad():
            image_feat_m, text_feat_m = self._momentum_features(image, ids, att)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().float()], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().float()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_all / temp
            sim_t2i_m = text_feat_m @ image_feat_all / temp
            targets_i2t, targets_t2i = itc_targets(sim_i2t_m, sim_t2i_m, alpha)
        sim_i2t = image_feat @ text_feat_all / temp
        sim_t2i = text_feat @ image_feat_all / temp
        losses["itc"] = itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
        metrics["alpha"] = alpha
        if self.training:
            self._dequeue_and_enqueue(image_feat_m, text_feat_m)
        logits["itc"] = {"i2t": sim_i2t, "t2i": sim_t2i}
        return sim_i2t[:, :bs], sim_t2i[:, :bs]

    def _itm(self, ids: torch.Tensor, att: torch.Tensor, kv: Any, inbatch: tuple[torch.Tensor, torch.Tensor],
             reuse: Optional[dict[str, torch.Tensor]], losses: dict, metrics: dict,
             logits: dict) -> dict[str, torch.Tensor]:
        """BLIP's ITM on the positives and on hard negatives drawn from `inbatch` (or `reuse`'s); adds its loss,
        accuracy and logits; returns the negatives drawn ({"itm_neg_image", "itm_neg_text"}: [B] each)."""
        bs = ids.shape[0]
        if reuse is not None and "itm_neg_image" in reuse:
            neg_image, neg_text = reuse["itm_neg_image"].to(ids.device), reuse["itm_neg_text"].to(ids.device)
        else:
            inbatch_i2t, inbatch_t2i = inbatch
            neg_image, neg_text = sample_itm_negatives(inbatch_i2t.detach(), inbatch_t2i.detach(),
                                                       self._negatives_generator(inbatch_i2t.device))
        enc_ids = ids.clone()
        enc_ids[:, 0] = self.enc_token_id
        out_pos = self.text_encoder(enc_ids, attention_mask=att, encoder_hidden_states=kv.view())
        # rows B..2B: each text with a hard-negative image; rows 2B..3B: each image with a hard-negative text
        neg_rows = torch.cat([neg_image.to(ids.device), torch.arange(bs, device=ids.device)])
        out_neg = self.text_encoder(torch.cat([enc_ids, enc_ids[neg_text]]),
                                    attention_mask=torch.cat([att, att[neg_text]]),
                                    encoder_hidden_states=kv.view(neg_rows))
        vl = torch.cat([out_pos.last_hidden_state[:, 0], out_neg.last_hidden_state[:, 0]])
        itm_out = self.itm_head(vl).float()
        losses["itm"] = itm_loss(itm_out)
        with torch.no_grad():
            metrics["itm_acc"] = (itm_out.argmax(-1) == itm_labels(bs, itm_out.device)).float().mean()
        logits["itm"] = itm_out
        return {"itm_neg_image": neg_image, "itm_neg_text": neg_text}

    def _lm(self, ids: torch.Tensor, att: torch.Tensor, kv: Any, losses: dict, logits: Optional[dict]) -> None:
        """BLIP's image-grounded captioning loss (label smoothing); with `logits`, adds the aligned LM logits."""
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.bos_token_id
        labels = lm_targets(dec_ids, self.pad_token_id)
        dec = self.text_decoder(dec_ids, attention_mask=att, encoder_hidden_states=kv.view(), use_cache=False)
        losses["lm"] = lm_loss(dec.logits, labels, self.cfg.label_smoothing)
        if logits is not None:
            logits["lm"] = {"logits": dec.logits[:, :-1].float(), "labels": labels[:, 1:]}

