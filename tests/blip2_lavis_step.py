"""LAVIS's BLIP-2 stage-1 ITC and ITM step written out on the recipe's modules, beside Blip2Stage1.stage1_losses.

Written from salesforce/LAVIS blip2_qformer.py (Blip2Qformer.forward) and base_model.py (concat_all_gather,
GatherLayer / all_gather_with_grad) at 506965b: ln_vision is a fresh nn.LayerNorm(width) at torch's default eps
sharing the recipe's weights; the ITC features are gathered under no_grad (LAVIS does so in a world of one too, as
its forward calls dist.get_rank()); ITM's image embeddings are gathered with their gradient; negatives are drawn
row by row with torch.multinomial. The Q-Former passes are transformers' modules called as LAVIS's Qformer.bert
calls (query_embeds; input_ids; both), which issue 21's independent check found equal to LAVIS's.

`python tests/blip2_lavis_step.py --world N --out FILE` runs both on N gloo processes (FileStore rendezvous, no
port), averages every gradient over the ranks as DDP / DeepSpeed do, and writes the losses and gradients compared.
For tests only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PER_RANK = 3  # pairs per rank
GROUPS = ("query_tokens", "vision_projection.weight", "text_projection.weight", "temp",
          "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias", "itm_head.weight",
          "embeddings.word_embeddings.weight", "qformer.")
CAPTIONS = ["ct of the head", "mri of the abdomen shows a small bright lesion", "a scan", "left lesion",
            "the right organ is large", "is there a dark lesion with the ct scan of the head ?"]


# ----------------------------------------------------------------------------- LAVIS, written out

@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """LAVIS base_model.concat_all_gather: all_gather without gradient."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensors_gather = [torch.ones_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(tensors_gather, tensor, async_op=False)
    return torch.cat(tensors_gather, dim=0)


class GatherLayer(torch.autograd.Function):
    """LAVIS base_model.GatherLayer: all_gather forward; backward all-reduces the gradients, keeps this rank's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(output, x)
        return tuple(output)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        all_gradients = torch.stack(grads)
        dist.all_reduce(all_gradients)
        return all_gradients[dist.get_rank()]


def all_gather_with_grad(tensors: torch.Tensor) -> torch.Tensor:
    """LAVIS base_model.all_gather_with_grad: the tensor itself in a world of one."""
    if dist.get_world_size() == 1:
        return tensors
    return torch.cat(GatherLayer.apply(tensors), dim=0)


def lavis_features(model: Any, vit_output: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blip2Qformer.forward's ln_vision, query and text passes: (image_embeds, image_feats, text_feat)."""
    post = model.vision_model.post_layernorm
    ln_vision = nn.LayerNorm(vit_output.shape[-1])  # LAVIS init_vision_encoder: LayerNorm(num_features)
    ln_vision.weight, ln_vision.bias = post.weight, post.bias  # the trained tensors are the recipe's
    image_embeds = ln_vision(vit_output)

    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_output = model.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds)
    image_feats = F.normalize(model.vision_projection(query_output.last_hidden_state), dim=-1)
    text_output = model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0,
                                attention_mask=attention_mask)
    text_feat = F.normalize(model.text_projection(text_output.last_hidden_state[:, 0, :]), dim=-1)
    return image_embeds, image_feats, text_feat


def lavis_itc(model: Any, image_feats: torch.Tensor,
              text_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blip2Qformer.forward's ITC over the gathered features: (loss_itc, sim_i2t, sim_t2i)."""
    image_feats_all = concat_all_gather(image_feats)  # [batch_size*num_gpu, num_query_tokens, embed_dim]
    text_feat_all = concat_all_gather(text_feat)  # [batch_size*num_gpu, embed_dim]
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1)
    sim_i2t, _ = sim_q2t.max(-1)
    sim_i2t = sim_i2t / model.temp.reshape(())
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats_all.permute(0, 2, 1)).squeeze(-2)
    sim_t2i, _ = sim_t2q.max(-1)
    sim_t2i = sim_t2i / model.temp.reshape(())
    rank = dist.get_rank()
    bs = image_feats.size(0)
    targets = torch.linspace(rank * bs, rank * bs + bs - 1, bs, dtype=int)
    loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
    return loss_itc, sim_i2t, sim_t2i


def lavis_hard_negatives(image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         sim_i2t: torch.Tensor, sim_t2i: torch.Tensor) -> tuple[Any, ...]:
    """Blip2Qformer.forward's ITM negatives drawn row by row from the gathered batch: (image_embeds_neg,
    text_ids_neg, text_atts_neg, neg_images, neg_texts)."""
    rank = dist.get_rank()
    bs = image_embeds.size(0)
    text_input_ids_world = concat_all_gather(input_ids)
    text_attention_mask_world = concat_all_gather(attention_mask)
    image_embeds_world = all_gather_with_grad(image_embeds)
    with torch.no_grad():
        sim_t2i[:, rank * bs: rank * bs + bs].fill_diagonal_(-10000)
        sim_i2t[:, rank * bs: rank * bs + bs].fill_diagonal_(-10000)
        weights_t2i = F.softmax(sim_t2i, dim=1)
        weights_i2t = F.softmax(sim_i2t, dim=1)
    image_embeds_neg, neg_images = [], []
    for b in range(bs):
        neg_idx = torch.multinomial(weights_t2i[b], 1).item()
        neg_images.append(neg_idx)
        image_embeds_neg.append(image_embeds_world[neg_idx])
    image_embeds_neg = torch.stack(image_embeds_neg, dim=0)
    text_ids_neg, text_atts_neg, neg_texts = [], [], []
    for b in range(bs):
        neg_idx = torch.multinomial(weights_i2t[b], 1).item()
        neg_texts.append(neg_idx)
        text_ids_neg.append(text_input_ids_world[neg_idx])
        text_atts_neg.append(text_attention_mask_world[neg_idx])
    return image_embeds_neg, text_ids_neg, text_atts_neg, neg_images, neg_texts


def lavis_itm(model: Any, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              sim_i2t: torch.Tensor, sim_t2i: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """Blip2Qformer.forward's ITM on the positives and the hard negatives: (loss_itm, neg_images, neg_texts)."""
    bs = image_embeds.size(0)
    image_embeds_neg, text_ids_neg, text_atts_neg, neg_images, neg_texts = lavis_hard_negatives(
        image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i)
    text_ids_all = torch.cat([input_ids, input_ids, torch.stack(text_ids_neg)], dim=0)  # pos, pos, neg
    text_atts_all = torch.cat([attention_mask, attention_mask, torch.stack(text_atts_neg)], dim=0)
    query_tokens_itm = model.query_tokens.expand(text_ids_all.shape[0], -1, -1)
    query_atts_itm = torch.ones(query_tokens_itm.size()[:-1], dtype=torch.long)
    attention_mask_all = torch.cat([query_atts_itm, text_atts_all], dim=1)
    image_embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds], dim=0)  # pos, neg, pos
    output_itm = model.qformer(query_embeds=model.embeddings(input_ids=text_ids_all, query_embeds=query_tokens_itm),
                               query_length=query_tokens_itm.size(1), attention_mask=attention_mask_all,
                               encoder_hidden_states=image_embeds_all)
    vl_embeddings = output_itm.last_hidden_state[:, : query_tokens_itm.size(1), :]
    logits = model.itm_head(vl_embeddings).mean(dim=1)
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)], dim=0)
    loss_itm = F.cross_entropy(logits, itm_labels)
    return loss_itm, neg_images, neg_texts


def lavis_itc_itm(model: Any, vit_output: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> dict[str, Any]:
    """Blip2Qformer.forward's ITC and ITM (captions already tokenised with padding="max_length")."""
    image_embeds, image_feats, text_feat = lavis_features(model, vit_output, input_ids, attention_mask)
    loss_itc, sim_i2t, sim_t2i = lavis_itc(model, image_feats, text_feat)
    loss_itm, neg_images, neg_texts = lavis_itm(model, image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i)
    return {"itc": loss_itc, "itm": loss_itm,
            "negatives": (torch.tensor(neg_images), torch.tensor(neg_texts))}


# ----------------------------------------------------------------------------- the comparison

def inputs(model: Any, world: int) -> tuple[torch.Tensor, list[str]]:
    """The global batch: frozen-ViT outputs (half of the tokens of low variance, where ln_vision's eps matters) and
    captions of different lengths on each rank."""
    g = torch.Generator().manual_seed(11)
    n = world * PER_RANK
    v = model.config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    vit = torch.randn(n, tokens, v.hidden_size, generator=g)
    quiet = torch.randn(n, tokens, 1, generator=g) + 3e-3 * torch.randn(n, tokens, v.hidden_size, generator=g)
    vit[:, ::2] = quiet[:, ::2]
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return vit, texts


def grads(loss: torch.Tensor, named: dict[str, torch.Tensor], retain: bool = False) -> dict[str, torch.Tensor]:
    """d loss / d parameter, averaged over the ranks (as DDP and DeepSpeed average them)."""
    got = torch.autograd.grad(loss, list(named.values()), allow_unused=True, retain_graph=retain)
    out = {}
    for (name, p), g in zip(named.items(), got):
        g = torch.zeros_like(p) if g is None else g.clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(g)
            g /= dist.get_world_size()
        out[name] = g
    return out


def grouped(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {grp: torch.cat([t.reshape(-1) for n, t in g.items() if n.startswith(grp)]) for grp in GROUPS}


def worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    from recipes.blip2.stage1_model import Blip2Stage1
    from tests.blip2_tiny import model_config, qformer_tok

    torch.manual_seed(0)
    model = Blip2Stage1(model_config(), image_size=32, tokenizer=qformer_tok(), objectives=("itc", "itm")).train()
    with torch.no_grad():  # BERT's init (std 0.02) makes every feature alike (ITC at ln B): spread the matrices
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    vit_all, texts_all = inputs(model, world)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    vit, texts = vit_all[rows], texts_all[rows]
    tok = model.tokenizer
    fixed = tok(texts, padding="max_length", truncation=True, max_length=model.mc.max_text_len, return_tensors="pt")
    longest = tok(texts, padding="longest", truncation=True, max_length=model.mc.max_text_len,
                  return_tensors="pt")  # each rank its own length, as the collate made them before: the recipe pads
    torch.manual_seed(100 + rank)
    result: dict[str, Any] = {"world": world, "rank": rank, "losses": {}, "grads": {}}
    ref = lavis_itc_itm(model, vit, fixed.input_ids, fixed.attention_mask)
    mine = range(rank * PER_RANK, (rank + 1) * PER_RANK)
    result["foreign_negative_images"] = sum(int(i) not in mine for i in ref["negatives"][0])
    g_ref = {loss: grouped(grads(ref[loss], named, retain=True)) for loss in ("itc", "itm")}
    # after LAVIS's backward: the recipe clamps the temperature in place (a no-op in range)
    ours = model.stage1_losses(model.image_embeds(None, vit), longest.input_ids, longest.attention_mask,
                               negatives=ref["negatives"])
    for loss in ("itc", "itm"):
        g_ours = grouped(grads(ours["losses"][loss], named, retain=True))
        result["losses"][loss] = {"lavis": ref[loss].item(), "ours": ours["losses"][loss].item()}
        result["grads"][loss] = {
            grp: {"lavis_norm": g_ref[loss][grp].norm().item(), "ours_norm": g_ours[grp].norm().item(),
                  "max_abs_diff": (g_ref[loss][grp] - g_ours[grp]).abs().max().item(),
                  "lavis_max_abs": g_ref[loss][grp].abs().max().item(),
                  "cosine": F.cosine_similarity(g_ref[loss][grp], g_ours[grp], dim=0, eps=1e-30).item()}
            for grp in GROUPS}
    all_results: list[Any] = [None] * world
    dist.all_gather_object(all_results, result)
    if rank == 0:
        Path(out).write_text(json.dumps(all_results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if args.world == 1:
            worker(0, 1, store, args.out)
        else:
            torch.multiprocessing.spawn(worker, args=(args.world, store, args.out), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
