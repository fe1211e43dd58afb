"""salesforce/BLIP's pretraining step written out literally on our MedBLIP modules, for comparison only.

BLIP_Pretrain.forward, _momentum_update and _dequeue_and_enqueue (world of one) as BLIP's code writes them: each text
pass projects the image tokens itself, the hard negatives are drawn row by row, a new tensor per momentum parameter.
tests/test_blip_training_sequence.py trains it beside our engine step for step (every parameter, momentum parameter
and queue equal); launch/bench/benchmark_vs_blip.py times it against our step. Not used in training.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def blip_momentum_update(model: Any, momentum: float) -> None:
    """BLIP_Pretrain._momentum_update: a new tensor per parameter, as BLIP writes it."""
    model_pairs = [[model.visual_encoder, model.visual_encoder_m], [model.vision_proj, model.vision_proj_m],
                   [model.text_encoder, model.text_encoder_m], [model.text_proj, model.text_proj_m]]
    for model_pair in model_pairs:
        for param, param_m in zip(model_pair[0].parameters(), model_pair[1].parameters()):
            param_m.data = param_m.data * momentum + param.data * (1. - momentum)


@torch.no_grad()
def blip_dequeue_and_enqueue(model: Any, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
    """BLIP_Pretrain._dequeue_and_enqueue in a world of one (concat_all_gather is the identity)."""
    image_feats, text_feats = image_feat, text_feat
    batch_size = image_feats.shape[0]
    ptr = int(model.queue_ptr)
    queue_size = model.image_queue.shape[1]
    assert queue_size % batch_size == 0
    model.image_queue[:, ptr:ptr + batch_size] = image_feats.T
    model.text_queue[:, ptr:ptr + batch_size] = text_feats.T
    ptr = (ptr + batch_size) % queue_size
    model.queue_ptr[0] = ptr


def blip_itc(model: Any, image: torch.Tensor, ids: torch.Tensor, att: torch.Tensor, alpha: float,
             momentum: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BLIP_Pretrain.forward's encoders and image-text contrastive loss with momentum-distilled targets and the
    queue: (loss_ita, image_embeds, image_atts, sim_i2t, sim_t2i)."""
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    image_embeds = model.visual_encoder.forward_features(image)
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_output = model.text_encoder(ids, attention_mask=att)  # mode='text': no cross-attention
    text_feat = F.normalize(model.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)

    with torch.no_grad():
        blip_momentum_update(model, momentum)
        image_embeds_m = model.visual_encoder_m.forward_features(image)
        image_feat_m = F.normalize(model.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
        image_feat_all = torch.cat([image_feat_m.t(), model.image_queue.clone().detach()], dim=1)
        text_output_m = model.text_encoder_m(ids, attention_mask=att)
        text_feat_m = F.normalize(model.text_proj_m(text_output_m.last_hidden_state[:, 0, :]), dim=-1)
        text_feat_all = torch.cat([text_feat_m.t(), model.text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / model.temp
        sim_t2i_m = text_feat_m @ image_feat_all / model.temp
        sim_targets = torch.zeros(sim_i2t_m.size())
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / model.temp
    sim_t2i = text_feat @ image_feat_all / model.temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2
    blip_dequeue_and_enqueue(model, image_feat_m, text_feat_m)
    return loss_ita, image_embeds, image_atts, sim_i2t, sim_t2i


def blip_hard_negatives(image_embeds: torch.Tensor, encoder_input_ids: torch.Tensor, att: torch.Tensor,
                        sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                        generator: Optional[torch.Generator]) -> tuple[torch.Tensor, ...]:
    """BLIP_Pretrain.forward's hard negatives, drawn row by row by similarity: (image_embeds_neg, text_ids_neg,
    text_atts_neg, neg_images, neg_texts)."""
    bs = image_embeds.size(0)
    with torch.no_grad():
        weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1) + 1e-4
        weights_t2i.fill_diagonal_(0)
        weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1) + 1e-4
        weights_i2t.fill_diagonal_(0)
    image_embeds_neg, neg_images = [], []
    for b in range(bs):
        neg_idx = torch.multinomial(weights_t2i[b], 1, generator=generator).item()
        neg_images.append(neg_idx)
        image_embeds_neg.append(image_embeds[neg_idx])
    image_embeds_neg = torch.stack(image_embeds_neg, dim=0)
    text_ids_neg, text_atts_neg, neg_texts = [], [], []
    for b in range(bs):
        neg_idx = torch.multinomial(weights_i2t[b], 1, generator=generator).item()
        neg_texts.append(neg_idx)
        text_ids_neg.append(encoder_input_ids[neg_idx])
        text_atts_neg.append(att[neg_idx])
    text_ids_neg = torch.stack(text_ids_neg, dim=0)
    text_atts_neg = torch.stack(text_atts_neg, dim=0)
    return image_embeds_neg, text_ids_neg, text_atts_neg, torch.tensor(neg_images), torch.tensor(neg_texts)


def blip_itm(model: Any, image_embeds: torch.Tensor, image_atts: torch.Tensor, ids: torch.Tensor, att: torch.Tensor,
             sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
             generator: Optional[torch.Generator]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """BLIP_Pretrain.forward's image-text matching loss over the positives and the hard negatives:
    (loss_itm, (negative image rows, negative text rows))."""
    encoder_input_ids = ids.clone()
    encoder_input_ids[:, 0] = model.enc_token_id
    bs = image_embeds.size(0)
    output_pos = model.text_encoder(encoder_input_ids, attention_mask=att, encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_atts)
    image_embeds_neg, text_ids_neg, text_atts_neg, neg_images, neg_texts = blip_hard_negatives(
        image_embeds, encoder_input_ids, att, sim_i2t, sim_t2i, generator)
    text_ids_all = torch.cat([encoder_input_ids, text_ids_neg], dim=0)
    text_atts_all = torch.cat([att, text_atts_neg], dim=0)
    image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
    image_atts_all = torch.cat([image_atts, image_atts], dim=0)
    output_neg = model.text_encoder(text_ids_all, attention_mask=text_atts_all,
                                    encoder_hidden_states=image_embeds_all, encoder_attention_mask=image_atts_all)
    vl_embeddings = torch.cat([output_pos.last_hidden_state[:, 0, :], output_neg.last_hidden_state[:, 0, :]], dim=0)
    vl_output = model.itm_head(vl_embeddings)
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)], dim=0)
    loss_itm = F.cross_entropy(vl_output, itm_labels)
    return loss_itm, (neg_images, neg_texts)


def blip_lm(model: Any, image_embeds: torch.Tensor, image_atts: torch.Tensor, ids: torch.Tensor,
            att: torch.Tensor) -> torch.Tensor:
    """BLIP_Pretrain.forward's language-modelling loss of the captions given the image."""
    decoder_input_ids = ids.clone()
    decoder_input_ids[:, 0] = model.bos_token_id
    decoder_targets = decoder_input_ids.masked_fill(decoder_input_ids == model.pad_token_id, -100)
    decoder_output = model.text_decoder(decoder_input_ids, attention_mask=att, encoder_hidden_states=image_embeds,
                                        encoder_attention_mask=image_atts, labels=decoder_targets, use_cache=False)
    loss_lm = decoder_output.loss  # label smoothing 0.1, as med.py
    return loss_lm


def blip_forward(model: Any, batch: dict, alpha: float, momentum: float,
                 generator: Optional[torch.Generator] = None) -> tuple[dict, tuple]:
    """BLIP_Pretrain.forward on tokenised captions (the row loops draw from `generator`, else the global RNG):
    {"itc", "itm", "lm"} losses and the drawn negatives (image rows, text rows)."""
    image, ids, att = batch["image"], batch["input_ids"], batch["attention_mask"]
    loss_ita, image_embeds, image_atts, sim_i2t, sim_t2i = blip_itc(model, image, ids, att, alpha, momentum)
    loss_itm, negatives = blip_itm(model, image_embeds, image_atts, ids, att, sim_i2t, sim_t2i, generator)
    loss_lm = blip_lm(model, image_embeds, image_atts, ids, att)
    return {"itc": loss_ita, "itm": loss_itm, "lm": loss_lm}, negatives
