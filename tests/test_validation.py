"""DAPT/PSD validation: recall@k against hand computations and BLIP's evaluation code; the evaluator on a tiny
model and tiny shards (finite losses, recalls in [0, 1], no side effects on the training state, 1 == 2 ranks)."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import ROOT, free_port
from PIL import Image

from framework.config import load_config
from recipes.common.image_text import make_collate, make_decode
from recipes.medblip.pretrain import build_model
from recipes.medblip.pretrain.validation import (
    ValidationConfig,
    caption_ids,
    captions_markdown,
    make_pretrain_evaluator,
    recall_at_k,
    retrieval_recalls,
)

DAPT = ROOT / "recipes" / "medblip" / "dapt.yaml"
CAPTIONS = ["chest x ray with a small nodule", "ct of the head", "mri of the brain showing a lesion",
            "abdominal ultrasound", "ct of the chest", "pelvic x ray", "knee mri", "ct angiography of the aorta"]

# ----------------------------------------------------------------------------- recall@k (pure)


def test_recall_at_k_hand_computed():
    sim = torch.tensor([[0.9, 0.1, 0.5],   # ranking 0,2,1: own pair first            -> hit at 1
                        [0.8, 0.3, 0.7],   # ranking 0,2,1: own pair (1) third         -> hit at 3
                        [0.2, 0.6, 0.4]])  # ranking 1,2,0: own pair (2) second        -> hit at 2
    assert recall_at_k(sim, [1, 2, 3]) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    assert recall_at_k(sim, [5]) == {5: 1.0}  # k beyond the gallery counts every candidate
    # ids: candidates 0 and 2 are the same caption (id 7); query 1 asks for id 7 too -> its top-1 (cand 0) hits
    ids = torch.tensor([7, 8, 7])
    assert recall_at_k(sim, [1, 2], query_ids=torch.tensor([7, 7, 7]), candidate_ids=ids) == \
        pytest.approx({1: 2 / 3, 2: 1.0})
    # transposed (text->image): rows are texts; text 0 ranks 0,1,2; text 1: 2,1,0; text 2: 0,2,1
    assert recall_at_k(sim.t(), [1, 2]) == pytest.approx({1: 1 / 3, 2: 2 / 3})


def test_recall_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="query_ids"):
        recall_at_k(torch.zeros(2, 3), [1])
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(torch.zeros(2, 2), [0])


def blip_itm_eval_ranks(scores: np.ndarray, positives: list[list[int]]) -> np.ndarray:
    """salesforce/BLIP train_retrieval.py itm_eval, image->text part, verbatim logic (the oracle)."""
    ranks = np.zeros(scores.shape[0])
    for index, score in enumerate(scores):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in positives[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    return ranks


def test_retrieval_recalls_match_blip_and_are_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    n = 40
    img = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(n, 16, generator=g), dim=1)
    ids = torch.arange(n)
    ids[5], ids[17] = ids[3], ids[3]  # three pairs share a caption: each is a positive for the others
    full = retrieval_recalls(img, txt, [1, 5, 10], ids=ids, chunk=10_000)
    assert retrieval_recalls(img, txt, [1, 5, 10], ids=ids, chunk=7) == pytest.approx(full)
    sim = (img @ txt.t()).numpy()
    groups = [[j for j in range(n) if ids[j] == ids[i]] for i in range(n)]
    for name, scores in (("i2t", sim), ("t2i", sim.T)):
        ranks = blip_itm_eval_ranks(scores, groups)
        for k in (1, 5, 10):
            assert full[f"{name}_r{k}"] == pytest.approx((ranks < k).mean())
    assert full["r_mean"] == pytest.approx(np.mean([full[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]))
    assert 0.0 < full["i2t_r1"] < full["i2t_r5"] < 1.0  # a non-trivial case


def test_identical_features_retrieve_perfectly_and_caption_ids_are_stable():
    feats = torch.eye(6)
    assert retrieval_recalls(feats, feats, [1]) == {"i2t_r1": 1.0, "t2i_r1": 1.0, "r_mean": 1.0}
    ids = caption_ids(["a", "b", "a"])
    assert ids[0] == ids[2] != ids[1] and ids.dtype == torch.long
    assert caption_ids(["a"]).item() == ids[0].item()  # a pure function of the text (same in every process)


def test_captions_markdown_escapes_pipes():
    md = captions_markdown([("k1", "a | b", "gen")])
    assert md.splitlines() == ["| key | reference | generated |", "|---|---|---|", "| k1 | a \\| b | gen |"]


# ----------------------------------------------------------------------------- the evaluator


def write_shards(out: Path, captions: list[str], per_shard: int, size: int = 40) -> Path:
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(math.ceil(len(captions) / per_shard)):
        with wds.TarWriter(str(out / f"val-{s:04d}.tar")) as w:
            for i in range(s * per_shard, min((s + 1) * per_shard, len(captions))):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
                w.write({"__key__": f"img{i:03d}", "jpg": buf.getvalue(), "txt": captions[i],
                         "json": json.dumps({"image_id": f"img{i:03d}"})})
    return out


def tiny_cfg(val: Path, batch_size: int, *extra: str):
    return load_config(DAPT, [f"data.val={val}", f"data.batch_size={batch_size}", "data.num_workers=0",
                              "model.preset=tiny", "image.size=32", "model.queue_size=8", "model.embed_dim=16",
                              "run.init_from=null", "train.seed=0", *extra])


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("val") / "shards", CAPTIONS, per_shard=4)


def test_evaluator_losses_recalls_and_no_side_effects(val_dir):
    cfg = tiny_cfg(val_dir, 4)
    model = build_model(cfg).train()
    evaluate = make_pretrain_evaluator(cfg, model.tokenizer, ValidationConfig(captions=2, caption_beams=1))
    queues = [model.image_queue.clone(), model.text_queue.clone(), model.queue_ptr.clone()]
    rng, global_rng = model.rng_state().clone(), torch.get_rng_state()
    params = {k: v.clone() for k, v in model.state_dict().items()}

    m = evaluate(model, 0)
    assert {"loss_itc", "loss_itm", "loss_lm", "itm_acc", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "r_mean",
            "samples", "captions"} <= set(m)
    assert all(math.isfinite(m[f"loss_{n}"]) and m[f"loss_{n}"] > 0 for n in ("itc", "itm", "lm"))
    assert all(0.0 <= m[k] <= 1.0 for k in ("itm_acc", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"))
    assert m["i2t_r5"] >= m["i2t_r1"] and m["samples"] == 8
    assert m["captions"].count("\n") == 3 and "| img0" in m["captions"]  # header, rule, 2 rows
    # the training state is untouched: queues and pointer, ITM-negative generator, weights, train mode
    assert torch.equal(model.image_queue, queues[0]) and torch.equal(model.text_queue, queues[1])
    assert torch.equal(model.queue_ptr, queues[2])
    assert torch.equal(model.rng_state(), rng) and model.training
    assert torch.equal(torch.get_rng_state(), global_rng)  # training's dropout stream is not consumed
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    # deterministic: the same numbers again (fixed ITM negatives, no augmentation, no dropout)
    again = evaluate(model, 1)
    assert {k: v for k, v in again.items() if k != "captions"} == \
        pytest.approx({k: v for k, v in m.items() if k != "captions"})


def test_evaluator_equals_one_whole_batch_forward(val_dir):
    """With one batch holding the whole set, losses and recalls equal the model's own computation on it."""
    cfg = tiny_cfg(val_dir, 8)
    model = build_model(cfg)
    m = make_pretrain_evaluator(cfg, model.tokenizer, ValidationConfig(captions=0))(model, 0)
    decode, collate = make_decode(cfg.image, train=False), make_collate(model.tokenizer, cfg.model.max_text_len)
    samples = [decode(s) for s in wds.WebDataset(sorted(str(p) for p in val_dir.glob("*.tar")), shardshuffle=False)]
    batch = collate(samples)
    model.eval()
    with torch.no_grad():
        out = model(batch)
        ref = retrieval_recalls(model.image_features(batch["image"]),
                                model.text_features(batch["input_ids"], batch["attention_mask"]), [1, 5])
    # ITC (mean over rows) and LM (mean over tokens) do not depend on the order of the samples in the batch
    assert m["loss_itc"] == pytest.approx(out["losses"]["itc"].item(), rel=1e-5)
    assert m["loss_lm"] == pytest.approx(out["losses"]["lm"].item(), rel=1e-5)
    assert {k: m[k] for k in ref} == pytest.approx(ref)
    assert "captions" not in m


def test_no_val_set_means_no_evaluator_and_bad_options_fail(val_dir, tmp_path):
    cfg = tiny_cfg(val_dir, 4)
    cfg.data.val = None
    assert make_pretrain_evaluator(cfg, None) is None
    cfg = tiny_cfg(val_dir, 4)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="max_batches"):
        make_pretrain_evaluator(cfg, model.tokenizer, ValidationConfig(max_batches=0))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_pretrain_evaluator(cfg, model.tokenizer, ValidationConfig(batch_size=64))
    with pytest.raises(ValueError, match="shard not found"):
        make_pretrain_evaluator(tiny_cfg(tmp_path / "missing", 4), model.tokenizer)


def test_max_batches_bounds_the_set_from_the_recipe_section(val_dir):
    cfg = tiny_cfg(val_dir, 2, "validation.max_batches=3", "validation.captions=0", "validation.recall_k=[2]")
    model = build_model(cfg)
    m = make_pretrain_evaluator(cfg, model.tokenizer)(model, 0)
    assert m["samples"] == 6 and "captions" not in m and {"i2t_r2", "t2i_r2"} <= set(m) and "i2t_r1" not in m


_RANK_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
from framework.config import load_config
from recipes.medblip.pretrain import build_model
from framework.distributed import shutdown_distributed
from recipes.medblip.pretrain.validation import ValidationConfig, make_pretrain_evaluator
torch.distributed.init_process_group("gloo")
cfg = load_config({dapt!r}, {overrides!r})
model = build_model(cfg)
m = make_pretrain_evaluator(cfg, model.tokenizer, ValidationConfig(captions=0))(model, 0)
if int(os.environ["RANK"]) == 0:
    print("METRICS" + json.dumps(m))
shutdown_distributed()  # without it gloo may abort at exit while the peer still receives
"""


@pytest.mark.slow  # two Python processes with a gloo group: ~10-25 s on 2 busy cores
def test_two_ranks_equal_one_process(val_dir, tmp_path):
    """2 ranks (gloo) over 2 shards, one batch each, give the single process's gathered recalls and LM loss."""
    overrides = [f"data.val={val_dir}", "data.batch_size=4", "data.num_workers=0", "model.preset=tiny",
                 "image.size=32", "model.queue_size=8", "model.embed_dim=16", "run.init_from=null", "train.seed=0",
                 "objectives.itm.enabled=false"]  # ITM negatives depend on the batch split; checked above
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT.format(root=str(ROOT), dapt=str(DAPT), overrides=overrides))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR":
                                              "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    two = json.loads(outs[0][0].split("METRICS", 1)[1])

    cfg = load_config(DAPT, overrides)
    model = build_model(cfg)
    one = make_pretrain_evaluator(cfg, model.tokenizer, ValidationConfig(captions=0))(model, 0)
    assert two["samples"] == one["samples"] == 8
    assert {k: two[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "loss_lm")} == \
        pytest.approx({k: one[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "loss_lm")}, rel=1e-5)
    assert math.isfinite(two["loss_itc"])
