"""The offline demo: its recipes validate, its verdict is computed right, and end to end every objective learns."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from framework.config import distill_settings, load_config
from tests.conftest import ROOT, run_entry

sys.path.insert(0, str(ROOT / "launch"))
import demo  # noqa: E402

DEMO = ROOT / "recipes" / "medblip" / "demo"


@pytest.mark.parametrize("name", ["dapt.yaml", "psd.yaml", "vqa.yaml"])
def test_demo_recipes_validate_with_cpu_sizes(name: str) -> None:
    cfg = load_config(DEMO / name)
    assert cfg.model.preset == "tiny" and cfg.image.size == 64 and not cfg.image.hflip  # never mirror left/right
    assert cfg.train.precision == "fp32" and cfg.data.num_workers == 0
    assert cfg.model.tokenizer == "data/demo/vocab.txt" and cfg.run.dir.startswith("runs/demo/")
    assert (distill_settings(cfg) is not None) == (name == "psd.yaml")  # PSD switches it on despite its dapt base
    if name != "vqa.yaml":
        assert cfg.model.queue_size % cfg.data.batch_size == 0 and cfg.data.train == "data/demo/shards/train"
    else:
        assert cfg.vqa.freeze_vision and cfg.vqa.root == "data/demo/vqa"  # the study's frozen ViT


def _metrics(tmp_path: Path, acc: float, per_type: float, overall: float) -> Path:
    def scores(a: float) -> dict:
        return {g: {"accuracy": a, "count": 10} for g in ("overall", "closed", "open")}

    doc = {"scores": scores(acc), "evaluated_questions": 10,
           "baselines": {"majority_per_type": {"scores": scores(per_type)},
                         "majority_overall": {"scores": scores(overall)}}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(doc))
    return path


LEARNED = {"itm_acc": 0.76, "i2t_r1": 0.04, "t2i_r1": 0.03, "samples": 192.0}  # DAPT validation of a run that learned


def _failed(verdict: dict) -> list[str]:
    return [c["name"] for c in verdict["checks"] if not c["ok"]]


def test_verdict_needs_a_clear_margin_over_the_stronger_majority_baseline(tmp_path: Path) -> None:
    v = demo.check(_metrics(tmp_path, 0.41 + demo.VQA_MARGIN + 0.01, 0.41, 0.33), LEARNED)
    assert v["passed"] and v["majority"] == 0.41 and not _failed(v)
    for acc in (0.41 + demo.VQA_MARGIN - 0.01, 0.40):  # above the baseline by a hair is not enough
        v = demo.check(_metrics(tmp_path, acc, 0.41, 0.33), LEARNED)
        assert not v["passed"] and _failed(v) == ["VQA accuracy"] and "NOT" in v["message"]


def test_verdict_fails_when_itm_answers_no_match_or_retrieval_is_at_chance(tmp_path: Path) -> None:
    metrics = _metrics(tmp_path, 0.8, 0.41, 0.33)
    v = demo.check(metrics, {**LEARNED, "itm_acc": 2 / 3})  # the head that always says "no match"
    assert not v["passed"] and _failed(v) == ["DAPT held-out ITM accuracy"]
    chance = 1 / 192
    v = demo.check(metrics, {**LEARNED, "i2t_r1": 2 * chance, "t2i_r1": 2 * chance})
    assert not v["passed"] and _failed(v) == ["DAPT held-out recall@1"]
    v = demo.check(metrics, {})  # no validation line in the DAPT log
    assert not v["passed"] and len(_failed(v)) == 2


def test_final_eval_reads_the_last_validation_line_of_a_stage_log(tmp_path: Path) -> None:
    log = tmp_path / "dapt.log"
    log.write_text("step 10/20 ep 0 | loss 1.0\n"
                   "eval step 10: loss_itm 0.6365, itm_acc 0.6667, samples 192.0000\n"
                   "eval step 20: loss_itc 3.4610, loss_itm 0.4341, itm_acc 0.7465, i2t_r1 0.0365, t2i_r1 0.0312, "
                   "samples 192.0000\ndone: finished at step 20\n")
    got = demo.final_eval(log)
    assert got == {"step": 20.0, "loss_itc": 3.461, "loss_itm": 0.4341, "itm_acc": 0.7465, "i2t_r1": 0.0365,
                   "t2i_r1": 0.0312, "samples": 192.0}


# ----------------------------------------------------------------------------- why the demo's ITM learns


@pytest.fixture(scope="module")
def phantom_pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """256 decoded phantom caption samples and the vocabulary of their texts."""
    import webdataset as wds

    from corpora.phantoms import PhantomSpec, write_demo_data
    from framework.shards import expand_shards
    from recipes.common.image_text import make_decode

    root = tmp_path_factory.mktemp("phantoms")
    write_demo_data(root, PhantomSpec(train_captions=256, val_captions=32, vqa_train_images=4, vqa_test_images=2))
    decode = make_decode(load_config(DEMO / "dapt.yaml").image, train=False, max_words=30)
    samples = [decode(s) for s in wds.WebDataset(expand_shards(str(root / "shards" / "train")), shardshuffle=False)]
    return root / "vocab.txt", samples


def _demo_model(vocab: Path, objectives: set[str], overrides: list[str] = ()):  # noqa: ANN202
    from recipes.medblip.model.blip_pretrain import MedBlipPretrain
    from recipes.medblip.pretrain import model_config

    cfg = load_config(DEMO / "dapt.yaml", [f"model.tokenizer={vocab}", *overrides])
    torch.manual_seed(0)
    return MedBlipPretrain(model_config(cfg), objectives, seed=0)


def test_demo_text_tower_starts_with_caption_dependent_features(phantom_pairs) -> None:
    """With BERT's initializer_range 0.02 at width 64 every caption starts with the same [CLS] feature (cosine
    1.000): ITC and ITM then have no text signal to start from. The demo's 0.1 gives them one."""
    from recipes.common.image_text import make_collate

    vocab, samples = phantom_pairs

    def mean_cosine(overrides: list[str]) -> float:
        model = _demo_model(vocab, {"itc", "itm", "lm"}, overrides).eval()
        batch = make_collate(model.tokenizer, 30)(samples[:32])
        with torch.no_grad():
            f = model.text_features(batch["input_ids"], batch["attention_mask"])
        sim = f @ f.t()
        return float((sim.sum() - sim.diagonal().sum()) / (32 * 31))

    assert mean_cosine([]) < 0.99
    assert mean_cosine(["model.text.initializer_range=0.02"]) > 0.999  # what BERT's init gives at this width


@pytest.mark.slow  # ~12 s
def test_demo_itm_alone_learns_on_random_negatives(phantom_pairs) -> None:
    """ITM alone (its negatives from untrained projections: random pairs, easy to tell apart) must leave the prior
    entropy 0.6365 within 120 steps of 16; with BERT's init at this width it stays there for the whole demo."""
    from recipes.common.image_text import make_collate

    vocab, samples = phantom_pairs
    model = _demo_model(vocab, {"itm"}).train()
    collate = make_collate(model.tokenizer, 30)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.02)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(120):
        batch = collate([samples[i] for i in torch.randperm(len(samples), generator=g)[:16]])
        loss = model(batch)["losses"]["itm"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.60, losses[-10:]  # prior entropy of 1 positive : 2 negatives: 0.6365


@pytest.mark.slow
def test_demo_end_to_end_learns_every_objective(tmp_path: Path) -> None:
    """The README's second command: exit 0 only when VQA, held-out ITM and recall@1 beat their chance levels (its
    duration is a benchmark figure in the README, never a test's assertion)."""
    res = run_entry("demo.py", "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "demo.json").read_text())
    assert result["passed"] and all(c["ok"] for c in result["checks"]), result
    assert result["accuracy"] > result["majority"] + demo.VQA_MARGIN, result  # clearly above, not by a hair
    assert result["dapt"]["itm_acc"] >= demo.ITM_MIN > 2 / 3, result["dapt"]  # ITM learned, not "no match" always
    assert result["environment"]["cpu_capability"] and len(result["data_sha256"]) == 64
    table = (tmp_path / "runs" / "table1.md").read_text()
    assert "DAPT + PSD" in table and "Majority" in table
    assert "phantoms, official layout" in table and "not VQA-RAD" in table  # never labelled as VQA-RAD results
    for stage in ("dapt", "psd", "vqa-psd"):  # TensorBoard events for every stage
        assert list((tmp_path / "runs" / stage / "tb").glob("events.out.tfevents.*")), stage
    assert "tensorboard --logdir" in res.stdout


def test_make_table_labels_phantom_results_as_phantoms(tmp_path: Path) -> None:
    from tests.conftest import load_launch

    doc = json.loads(_metrics(tmp_path, 0.8, 0.41, 0.33).read_text())
    doc["baselines"]["majority_per_type"]["answers"] = {"closed": "no", "open": "mri"}
    for group in doc["baselines"]["majority_per_type"]["scores"].values():
        group["edit_similarity"] = group["accuracy"]
    doc |= {"metrics": {"accuracy": 0.8}, "inference": {"mode": "rank"},
            "split": {"split": "official", "test": 10, "description": "VQA-RAD official split: test = ..."}}
    run = tmp_path / "vqa-psd"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(doc))
    make_table = load_launch("make_table")
    assert make_table.main([f"{run}=psd", "--data", "phantoms", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table1.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| DAPT + PSD") or line.startswith("| Majority")]
    assert len(rows) == 2 and all("| phantoms, official layout |" in r for r in rows)
    assert "- Data: phantoms, not VQA-RAD." in table and "- Split:" not in table
    assert make_table.main([f"{run}=psd", "--out", str(tmp_path)]) == 0  # real VQA-RAD runs: as before
    assert "| official |" in (tmp_path / "table1.md").read_text()


# ----------------------------------------------------------------------------- --compare: CapFilt beside the ablations


def _outputs(args: list[str]) -> set[str]:
    """The folders a stage writes: its run.dir, or capfilt.py's --out."""
    out = {a.partition("=")[2] for a in args if a.startswith("run.dir=")}
    return out | {args[i + 1] for i, a in enumerate(args) if a == "--out"}


def _inputs(args: list[str], runs: Path) -> set[str]:
    """The folders under `runs` a stage reads: run.init_from, data.train, capfilt.py's models and shards."""
    got = {a.partition("=")[2] for a in args if a.startswith(("run.init_from=", "data.train="))}
    got |= {args[i + 1] for i, a in enumerate(args) if a in ("--captioner", "--filter", "--shards")}
    return {g for g in got if g.startswith(str(runs))}


def test_compare_plan_runs_capfilt_between_the_ablations_and_tables_both(tmp_path: Path) -> None:
    from corpora.phantoms import PhantomSpec, write_demo_data
    from tests.conftest import load_launch

    data, runs = tmp_path / "data", tmp_path / "runs"
    write_demo_data(data, PhantomSpec(train_captions=40, val_captions=8, samples_per_shard=20, vqa_train_images=4,
                                      vqa_test_images=2))
    common = [f"model.tokenizer={data / 'vocab.txt'}", "run.resume=none"]
    plain = demo.plan_stages(data, runs, common)
    assert [s.log for s in plain.stages] == ["dapt.log", "psd.log", "vqa-psd.log", "evaluate-vqa-psd.log"]
    assert plain.table == [f"{runs / 'vqa-psd'}=psd"] and plain.capfilt is None
    assert not (runs / "capfilt-noisy").exists()  # nothing of CapFilt's is written without --compare

    plan = demo.plan_stages(data, runs, common, compare=True, seed=3)
    logs = [s.log for s in plan.stages]
    assert logs[:8] == [*[s.log for s in plain.stages], "vqa-dapt.log", "evaluate-vqa-dapt.log", "vqa-scratch.log",
                        "evaluate-vqa-scratch.log"]
    assert logs[8:] == ["dapt-noisy.log", "capfilt-filter.log", "capfilt.log", "dapt-capfilt.log",
                        "vqa-dapt-noisy.log", "evaluate-vqa-dapt-noisy.log", "vqa-dapt-capfilt.log",
                        "evaluate-vqa-dapt-capfilt.log"]
    # every folder a stage reads under runs/ is written by an earlier stage (or is the noisy copy written now)
    written = {str(runs / "capfilt-noisy")}
    for stage in plan.stages:
        assert _inputs(stage.args, runs) <= written, (stage.title, _inputs(stage.args, runs) - written)
        written |= _outputs(stage.args)
    by_log = {s.log: s.args for s in plan.stages}
    capfilt = by_log["capfilt.log"]
    assert Path(capfilt[0]).name == "capfilt.py" and capfilt[capfilt.index("--shards") + 1] == str(runs / "capfilt-noisy")
    assert capfilt[capfilt.index("--captioner") + 1] == str(runs / "dapt-noisy")
    assert capfilt[capfilt.index("--filter") + 1] == str(runs / "capfilt-filter")
    assert f"data.train={runs / 'capfilt-shards'}" in by_log["dapt-capfilt.log"]
    assert f"data.train={runs / 'capfilt-noisy'}" in by_log["dapt-noisy.log"]
    for run, init in (("vqa-dapt-noisy", "dapt-noisy"), ("vqa-dapt-capfilt", "dapt-capfilt")):
        assert f"run.init_from={runs / init}" in by_log[f"{run}.log"]
        assert by_log[f"{run}.log"][1:] == by_log[f"evaluate-{run}.log"][1:]  # evaluated as trained
    # the two CapFilt rows join the three of the ablation in one table, under make_table's labels
    assert plan.table == [f"{runs / 'vqa-psd'}=psd", f"{runs / 'vqa-dapt'}=dapt", f"{runs / 'vqa-scratch'}=scratch",
                          f"{runs / 'vqa-dapt-noisy'}=dapt-noisy", f"{runs / 'vqa-dapt-capfilt'}=dapt-capfilt"]
    make_table = load_launch("make_table")
    assert {spec.rpartition("=")[2] for spec in plan.table} <= set(make_table.ALIASES)
    # the noisy copy holds the known truth the summary scores the filter against
    truth = json.loads((runs / "capfilt-noisy" / "noise.json").read_text())
    assert truth["seed"] == 3 and len(truth["swapped"]) == round(0.4 * 40) == len(plan.capfilt.noise["swapped"])


def test_capfilt_summary_scores_the_filter_against_the_swapped_captions(tmp_path: Path) -> None:
    from recipes.medblip.capfilt.compare import CompareRuns

    def decision(key: str, score: float) -> dict:
        return {"key": key, "original": {"score": score, "decision": "kept" if score >= 0.3 else "removed"},
                "synthetic": []}

    # 4 swapped (a-d), 6 clean (e-j); removed: a, b, c (swapped) and e (clean) -> precision 3/4, recall 3/4
    scores = {"a": 0.1, "b": 0.2, "c": 0.25, "d": 0.6, "e": 0.29, "f": 0.5, "g": 0.7, "h": 0.4, "i": 0.9, "j": 0.31}
    manifest = {"decisions": [decision(k, v) for k, v in scores.items()], "options": {"threshold": 0.3},
                "counts": {"original": {"kept": 6, "removed": 4}}, "totals": {"samples": 6}}
    (tmp_path / "capfilt-shards").mkdir()
    (tmp_path / "capfilt-shards" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "dapt-noisy.log").write_text("eval step 248: itm_acc 0.6667, i2t_r1 0.0208, samples 192.0000\n")
    (tmp_path / "dapt-capfilt.log").write_text("eval step 292: itm_acc 0.6788, i2t_r1 0.0521, samples 192.0000\n")
    noise = {"fraction": 0.4, "swapped": {k: "x" for k in "abcd"}}
    got = demo.capfilt_summary(tmp_path, CompareRuns([], [], noise))
    assert (got["removed"], got["swapped"], got["swapped_removed"]) == (4, 4, 3)
    assert got["precision"] == 0.75 and got["recall"] == 0.75 and got["clean_removed"] == 1 / 6
    assert got["threshold"] == 0.3 and got["noise"] == 0.4 and got["pairs"] == 6
    assert got["dapt_noisy"]["itm_acc"] == 0.6667 and got["dapt_capfilt"] == {"step": 292.0, "itm_acc": 0.6788,
                                                                                "i2t_r1": 0.0521, "samples": 192.0}
