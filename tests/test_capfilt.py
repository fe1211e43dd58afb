"""CapFilt: seeded nucleus sampling, ITM scores and decisions, the output shards (one pair per kept caption,
readable by DAPT's decode), determinism across batch sizes, resuming, the manifest and the report."""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

import tests.capfilt_tiny as tiny
from corpora.shard_writer import PrepareError
from framework.shards import count_samples, expand_shards
from recipes.common.image_text import ImageConfig, make_decode
from recipes.common.text import pre_caption
from recipes.medblip.capfilt import bootstrap, writing
from recipes.medblip.capfilt.bootstrap import run_capfilt
from recipes.medblip.capfilt.generation import (
    SamplingOptions,
    SeededDraw,
    caption_seed,
    sample_captions,
)
from recipes.medblip.capfilt.noise import (
    removal_quality,
    swap_captions,
    swap_cycle,
    threshold_sweep,
)
from recipes.medblip.capfilt.report import histogram_png, pick_examples
from recipes.medblip.capfilt.scoring import DECIMALS, decide, match_scores
from recipes.medblip.capfilt.writing import score_summary

QUIET = dict(log=lambda s: None)


# ----------------------------------------------------------------------------- sampling


def test_seeded_draw_is_the_inverse_cdf_of_each_rows_own_generator() -> None:
    inf = float("inf")
    scores = torch.tensor([[0.0, math.log(3.0), -inf, 0.0], [math.log(2.0), 0.0, 0.0, -inf]])
    probs = [[0.2, 0.6, 0.0, 0.2], [0.5, 0.25, 0.25, 0.0]]
    out = SeededDraw([torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)])(None, scores)
    for row, seed in enumerate((11, 12)):
        u = float(torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        cdf = [sum(probs[row][:i + 1]) for i in range(4)]
        expected = next(i for i, c in enumerate(cdf) if c > u)
        assert out[row, expected] == 0.0 and torch.isinf(out[row]).sum() == 3
    # many draws from one generator follow the distribution and never take a removed (-inf) token
    draw = SeededDraw([torch.Generator().manual_seed(0)])
    counts = Counter(int(draw(None, scores[:1]).argmax()) for _ in range(4000))
    assert counts[2] == 0
    for token, p in enumerate(probs[0]):
        assert abs(counts[token] / 4000 - p) < 0.03, counts


def test_a_caption_depends_on_its_seed_alone_not_on_its_batch(tmp_path: Path) -> None:
    model = tiny.model(tmp_path)
    with torch.no_grad():
        embeds = model.image_embeddings(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    opts = SamplingOptions(k=2)
    seeds = [[caption_seed(0, "s.tar", i, f"key{i}", j) for j in (1, 2)] for i in range(3)]
    together = sample_captions(model, embeds, seeds, opts)
    alone = [sample_captions(model, embeds[i:i + 1], seeds[i:i + 1], opts)[0] for i in range(3)]
    assert together == alone
    assert all(len(row) == 2 and all(row) for row in together)
    reseeded = sample_captions(model, embeds, [[s + 1 for s in row] for row in seeds], opts)
    assert reseeded != together


def test_nucleus_of_almost_nothing_is_greedy_decoding_with_blips_penalty_and_min_length(tmp_path: Path) -> None:
    """top_p -> 0 keeps the top token only: the draw must come after transformers' repetition penalty and
    min-length processors and after the top-p filter, so the result is transformers' own greedy decoding."""
    model = tiny.model(tmp_path)
    with torch.no_grad():
        embeds = model.image_embeddings(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        tok = model.tokenizer
        greedy = model.text_decoder.generate(
            input_ids=torch.full((4, 1), model.bos_token_id), max_length=20, min_length=5, do_sample=False,
            repetition_penalty=1.1, eos_token_id=tok.sep_token_id, pad_token_id=model.pad_token_id,
            encoder_hidden_states=embeds, encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    expected = [pre_caption(t) for t in tok.batch_decode(greedy, skip_special_tokens=True)]
    ours = sample_captions(model, embeds, [[i] for i in range(4)], SamplingOptions(k=1, top_p=1e-9))
    assert [row[0] for row in ours] == expected


# ----------------------------------------------------------------------------- scores and decisions


def test_match_scores_are_blips_itm_probability_of_each_caption_beside_its_image(tmp_path: Path) -> None:
    model = tiny.model(tmp_path)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    captions = [["axial ct of the head"], ["normal mri of the abdomen", "ct of the brain"], []]
    with torch.no_grad():
        embeds = model.image_embeddings(images)
        got = match_scores(model, embeds, captions)
        rows = torch.tensor([0, 1, 1])
        flat = [c for caps in captions for c in caps]
        tok = model.tokenize(flat)
        want = model.itm_scores(images[rows], tok["input_ids"], tok["attention_mask"])
    assert [len(g) for g in got] == [1, 2, 0]
    assert [s for g in got for s in g] == [round(float(w), DECIMALS) for w in want]


def test_decision_is_score_at_or_above_the_threshold() -> None:
    assert decide(0.5, 0.5) == "kept" and decide(0.4999, 0.5) == "removed" and decide(None, 0.0) == "empty"


# ----------------------------------------------------------------------------- the whole run, in-process


def median_score(manifest: dict) -> float:
    import statistics

    return statistics.median([s["score"] for d in manifest["decisions"] for s in [d["original"], *d["synthetic"]]])


def _read(folder: Path) -> dict[str, dict]:
    return {s["__key__"]: s for u in expand_shards(str(folder)) for s in wds.WebDataset(u, shardshuffle=False)}


def test_output_is_one_pair_per_kept_caption_that_dapt_decodes(tmp_path: Path) -> None:
    inputs = tiny.shards(tmp_path)
    out = tmp_path / "out"
    everything = run_capfilt(tiny.options(tmp_path, tmp_path / "all", inputs, k=2, threshold=0.0), **QUIET)
    t = median_score(everything)  # a random tiny filter scores everything alike: split it in the middle
    manifest = run_capfilt(tiny.options(tmp_path, out, inputs, k=2, threshold=t), **QUIET)
    assert [[s["score"] for s in d["synthetic"]] for d in manifest["decisions"]] == \
        [[s["score"] for s in d["synthetic"]] for d in everything["decisions"]]  # the threshold decides alone
    source, written = _read(inputs), _read(out)
    decisions = manifest["decisions"]
    assert len(decisions) == 12 and [d["index"] for d in decisions] == [0, 1, 2, 3, 4] * 2 + [0, 1]
    expected = {}
    for d in decisions:
        if d["original"]["decision"] == "kept":
            expected[d["key"]] = source[d["key"]]["txt"].decode()
        for j, syn in enumerate(d["synthetic"], 1):
            assert (syn["score"] >= t) == (syn["decision"] == "kept") or syn["decision"] == "duplicate"
            if syn["decision"] == "kept":
                expected[f"{d['key']}_syn{j}"] = syn["caption"]
        assert (d["original"]["score"] >= t) == (d["original"]["decision"] == "kept")
    assert 0 < len(expected) < 36
    assert {k: s["txt"].decode() for k, s in written.items()} == expected
    assert manifest["totals"]["samples"] == len(expected) == count_samples(expand_shards(str(out)))
    for key, s in written.items():
        src = source[key.split("_syn")[0]]
        assert s["png"] == src["png"]  # the image bytes unchanged
        meta, src_meta = json.loads(s["json"]), json.loads(src["json"])
        audit = meta.pop("capfilt")
        assert meta == src_meta  # the input's json is kept as it was
        assert audit["original_caption"] == src["txt"].decode() and audit["score"] >= t
        assert audit["caption"] == ("synthetic" if "_syn" in key else "original")
    decode = make_decode(ImageConfig(size=32), train=True)  # DAPT's training decode, unchanged
    assert all(decode(s)["image"].shape == (3, 32, 32) for s in written.values())
    # counts per modality from the inputs' json
    modality = {k: json.loads(s["json"])["modality"] for k, s in source.items()}
    assert {m: c["images"] for m, c in manifest["modalities"].items()} == dict(Counter(modality.values()))
    kept_by_mod = Counter(modality[k] for k in expected if "_syn" not in k)
    assert {m: c["original_kept"] for m, c in manifest["modalities"].items() if c["original_kept"]} == kept_by_mod
    assert manifest["scores"]["original"]["count"] == 12 and manifest["scores"]["synthetic"]["count"] == 24
    assert (out / "report" / "index.md").is_file() and (out / "report" / "itm_scores.png").is_file()


def test_same_output_byte_for_byte_whatever_the_batch_size_and_a_rerun_does_nothing(tmp_path: Path) -> None:
    inputs = tiny.shards(tmp_path)
    a = run_capfilt(tiny.options(tmp_path, tmp_path / "a", inputs, batch_size=4), **QUIET)
    b = run_capfilt(tiny.options(tmp_path, tmp_path / "b", inputs, batch_size=3), **QUIET)
    assert len(a["shards"]) == 3 and all(a["counts"][kind]["kept"] and a["counts"][kind]["removed"]
                                         for kind in ("original", "synthetic"))  # not two empty outputs
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["decisions"] == b["decisions"] and a["fingerprint"] == b["fingerprint"]
    lines: list[str] = []
    again = run_capfilt(tiny.options(tmp_path, tmp_path / "a", inputs, batch_size=5), log=lines.append)
    assert again == a and any("up to date" in line for line in lines)
    other = run_capfilt(tiny.options(tmp_path, tmp_path / "c", inputs, seed=1), **QUIET)
    assert [d["synthetic"] for d in other["decisions"]] != [d["synthetic"] for d in a["decisions"]]


def test_an_interrupted_run_keeps_finished_shards_and_finishes_identically(tmp_path: Path, monkeypatch) -> None:
    inputs = tiny.shards(tmp_path)
    clean = run_capfilt(tiny.options(tmp_path, tmp_path / "clean", inputs), **QUIET)
    assert len(clean["shards"]) == 3  # every shard keeps something (the threshold of capfilt_tiny)
    out = tmp_path / "out"
    real = writing.filter_shard
    done: list[str] = []

    def dies_on_the_second(job, *a, **kw):
        if job.index == 1:
            (Path(job.out) / (job.name + ".tmp")).write_bytes(b"half a shard")
            raise KeyboardInterrupt
        done.append(job.name)
        return real(job, *a, **kw)

    monkeypatch.setattr(bootstrap, "filter_shard", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_capfilt(tiny.options(tmp_path, out, inputs), **QUIET)
    assert done == ["phantom-train-0000.tar"] and (out / "phantom-train-0000.tar").is_file()
    assert not (out / "manifest.json").exists()
    done.clear()
    monkeypatch.setattr(bootstrap, "filter_shard", lambda job, *a, **kw: (done.append(job.name), real(job, *a, **kw))[1])
    resumed = run_capfilt(tiny.options(tmp_path, out, inputs), **QUIET)
    assert done == ["phantom-train-0001.tar", "phantom-train-0002.tar"]  # the finished shard was not redone
    assert not list(out.glob("*.tmp"))
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]


def test_other_options_into_the_same_out_are_refused_unless_overwrite(tmp_path: Path) -> None:
    inputs = tiny.shards(tmp_path)
    out = tmp_path / "out"
    run_capfilt(tiny.options(tmp_path, out, inputs), **QUIET)
    with pytest.raises(PrepareError, match="other inputs or options"):
        run_capfilt(tiny.options(tmp_path, out, inputs, threshold=0.4), **QUIET)
    redone = run_capfilt(tiny.options(tmp_path, out, inputs, threshold=0.0, overwrite=True), **QUIET)
    # threshold 0 keeps every caption but duplicates: originals all kept
    assert redone["counts"]["original"]["kept"] == 12 and redone["counts"]["original"]["removed"] == 0
    assert redone["totals"]["samples"] == 12 + redone["counts"]["synthetic"]["kept"]
    assert redone["counts"]["synthetic"]["kept"] + redone["counts"]["synthetic"]["duplicate"] == 24
    (out / "notes.tar").write_bytes(b"mine")  # a file no run wrote is never deleted, even with --overwrite
    with pytest.raises(PrepareError, match="notes.tar, which no conversion wrote"):
        run_capfilt(tiny.options(tmp_path, out, inputs, threshold=0.3, overwrite=True), **QUIET)
    assert (out / "notes.tar").read_bytes() == b"mine"


def test_out_in_the_input_folder_is_refused(tmp_path: Path) -> None:
    inputs = tiny.shards(tmp_path)
    with pytest.raises(ValueError, match="folder of the input shards"):
        run_capfilt(tiny.options(tmp_path, inputs, inputs), **QUIET)
    assert sorted(p.name for p in inputs.iterdir()) == sorted(
        [f"phantom-train-000{i}.tar" for i in range(3)] + ["manifest.json"])


def test_two_models_one_captioner_one_filter(tmp_path: Path) -> None:
    """--captioner and --filter apart: the captions are the captioner's, the scores the filter's."""
    inputs = tiny.shards(tmp_path, n=5)
    a, b = str(tiny.weights(tmp_path, 0)), str(tiny.weights(tmp_path, 1))
    one = run_capfilt(tiny.options(tmp_path, tmp_path / "one", inputs, captioner=a), **QUIET)
    two = run_capfilt(tiny.options(tmp_path, tmp_path / "two", inputs, captioner=a, filter_model=b), **QUIET)
    assert one["models"]["one_model"] and not two["models"]["one_model"]
    assert two["models"]["filter"]["weights_sha256"] != two["models"]["captioner"]["weights_sha256"]
    caps = lambda m: [[s["caption"] for s in d["synthetic"]] for d in m["decisions"]]  # noqa: E731
    assert caps(one) == caps(two)
    assert [d["original"]["score"] for d in one["decisions"]] != [d["original"]["score"] for d in two["decisions"]]


# ----------------------------------------------------------------------------- manifest and report


def test_score_summary_by_hand() -> None:
    s = score_summary([0.0, 0.04, 0.5, 0.51, 1.0])
    assert s["count"] == 5 and s["mean"] == round((0.0 + 0.04 + 0.5 + 0.51 + 1.0) / 5, 4)
    counts = s["histogram"]["counts"]
    assert len(counts) == 20 and counts[0] == 2 and counts[10] == 2 and counts[19] == 1 and sum(counts) == 5


def test_histogram_png_draws_each_kind_in_its_bin() -> None:
    scores = {"original": score_summary([0.82] * 10), "synthetic": score_summary([0.12] * 5)}
    img = Image.open(io.BytesIO(histogram_png(scores, 0.5, size=(720, 420)))).convert("RGB")
    assert img.size == (720, 420)
    left, right, bottom = 60, 20, 50
    x = lambda v: int(left + v * (720 - left - right))  # noqa: E731
    y = 420 - bottom - 10  # just above the x axis
    blue, orange = (31, 119, 180), (255, 127, 14)
    row = [img.getpixel((i, y)) for i in range(720)]
    assert blue in row[x(0.80):x(0.85)] and orange in row[x(0.10):x(0.15)]
    assert blue not in row[:x(0.80)] + row[x(0.85) + 1:] and orange not in row[:x(0.10)] + row[x(0.15) + 1:]


def test_examples_span_the_scores_and_the_report_shows_them(tmp_path: Path) -> None:
    decisions = [{"shard": "s", "key": f"k{i}", "original": {"score": s}} for i, s in enumerate([0.9, 0.1, 0.5, 0.3])]
    assert [d["key"] for d in pick_examples(decisions, 3)] == ["k1", "k2", "k0"]  # lowest, middle, highest
    inputs = tiny.shards(tmp_path, n=5)
    out = tmp_path / "out"
    run_capfilt(tiny.options(tmp_path, out, inputs, examples=3), **QUIET)
    page = (out / "report" / "index.md").read_text()
    thumbs = sorted((out / "report" / "thumbs").glob("*.png"))
    assert len(thumbs) == 3 and all(f"thumbs/{t.name}" in page for t in thumbs)
    assert max(Image.open(thumbs[0]).size) <= 128
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert {"capfilt/itm_original", "capfilt/itm_synthetic"} <= set(acc.Tags()["histograms"])
    assert acc.Histograms("capfilt/itm_original")[0].histogram_value.num == 5


# ----------------------------------------------------------------------------- known noise


def test_swap_cycle_moves_every_chosen_caption_to_an_image_with_other_labels() -> None:
    import numpy as np

    labels = ["a", "a", "b", "b", "c", "a", None, "b"]
    chosen = [0, 1, 2, 3, 4, 5, 7]
    source = swap_cycle(labels, chosen, np.random.default_rng(0))
    assert sorted(source) == chosen and sorted(source.values()) == chosen  # a permutation of the chosen
    assert all(i != j and labels[i] != labels[j] for i, j in source.items())
    with pytest.raises(ValueError):
        swap_cycle(["a", "a", "a"], [0, 1, 2], np.random.default_rng(0))


def test_swap_captions_and_removal_quality(tmp_path: Path) -> None:
    inputs = tiny.shards(tmp_path, n=12)
    truth = swap_captions(str(inputs), tmp_path / "noisy", 0.25, seed=3)
    before, after = _read(inputs), _read(tmp_path / "noisy")
    assert len(truth["swapped"]) == 3 and set(after) == set(before)
    assert sorted(s["txt"] for s in after.values()) == sorted(s["txt"] for s in before.values())
    for key, s in after.items():
        noise = json.loads(s["json"])["noise"]
        assert s["png"] == before[key]["png"] and noise["swapped"] == (key in truth["swapped"])
        assert s["txt"] == before[noise["caption_from"]]["txt"]
    decisions = [{"key": k, "original": {"decision": "removed" if k in ("a", "b", "x") else "kept",
                                         "score": 0.2 if k in ("a", "b", "x") else 0.9}} for k in "abcxyz"]
    q = removal_quality(decisions, {"a", "b", "c"})
    assert (q["precision"], q["recall"], q["clean_removed"]) == (2 / 3, 2 / 3, 1 / 3)
    assert threshold_sweep(decisions, {"a", "b", "c"}, [0.1])[0]["removed"] == 0
