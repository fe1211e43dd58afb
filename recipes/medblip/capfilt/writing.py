"""One input shard through the captioner and the filter into one output shard, with corpora/shard_writer.py's guarantees
(atomic_shard: written to .tmp, fsynced, hashed, renamed; the per-shard report in .prepare/ after the rename), and
the manifest merged from the per-shard reports.

A sample of the output is one (image, caption) pair, as BLIP trains on its bootstrapped corpus: every caption that
passes the filter, the original and each synthetic one, becomes its own sample, the image bytes repeated unchanged.
The original keeps its key; synthetic caption j of image KEY is `KEY_synJ`. An image whose captions all fail leaves
the corpus. Every written json is the input's json plus a "capfilt" block for audit: which caption this is, its
score, and the original caption with its score and decision.
"""
from __future__ import annotations

import json
import statistics
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import webdataset as wds

from corpora.shard_writer import STATE_DIR, atomic_shard, write_json_atomic
from framework.shards import DataError
from recipes.common.image_text import IMAGE_KEYS, open_image
from recipes.medblip.capfilt.generation import (
    SamplingOptions,
    caption_seed,
    sample_captions,
)
from recipes.medblip.capfilt.models import LoadedModel
from recipes.medblip.capfilt.scoring import (
    DUPLICATE,
    EMPTY,
    KEPT,
    REMOVED,
    decide,
    match_scores,
    normalise,
)

FORMAT_VERSION = 1
SYNTHETIC = "_syn"  # synthetic caption j of image KEY is written under the key KEY_synJ
HISTOGRAM_BINS = 20  # equal bins over [0, 1] in the manifest's score distribution


@dataclass(frozen=True)
class FilterSettings:
    """What decides the output besides the models and the input (all of it enters the fingerprint)."""

    sampling: SamplingOptions
    threshold: float = 0.5
    seed: int = 0


@dataclass
class ShardJob:
    index: int
    url: str  # the input shard
    name: str  # the output shard's name (the input's)
    out: str
    fingerprint: str


def read_samples(url: str) -> Iterator[dict]:
    """An input shard's samples in order, raw (bytes per extension); a damaged shard is a DataError naming it."""
    try:
        for sample in wds.tarfile_to_samples()(iter([{"url": url}])):
            yield sample
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        why = str(e.args[0] if e.args else type(e).__name__).split(" @ ")[0][:160]
        raise DataError(f"input shard {url} is damaged ({why}); re-create it (e.g. launch/prepare_rocov2.py) or "
                        "leave it out of --shards") from None


def _parts(sample: dict, url: str) -> tuple[str, str, str, dict]:
    """(key, image extension, raw caption, json metadata) of an input sample."""
    key = str(sample.get("__key__"))
    ext = next((k for k in IMAGE_KEYS if sample.get(k) is not None), None)
    if ext is None or sample.get("txt") is None:
        raise DataError(f"{url}: sample {key!r} has no {'caption (txt)' if ext else 'image (jpg/png)'}: CapFilt "
                        "reads image-caption shards (launch/prepare_rocov2.py writes them)")
    meta: dict = {}
    if sample.get("json") is not None:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{url}: sample {key!r} has a json that is not JSON; re-create the shard") from None
    return key, ext, sample["txt"].decode("utf-8"), meta if isinstance(meta, dict) else {"meta": meta}


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def judge_batch(samples: list[dict], first_index: int, job: ShardJob, captioner: LoadedModel,
                filter_model: LoadedModel, settings: FilterSettings) -> list[dict]:
    """Input samples -> one decision record per image: {"key", "index", "modality", "original": {caption, score,
    decision}, "synthetic": [{caption, score, decision}, ...]} (k synthetic captions, seeded per caption)."""
    parts = [_parts(s, job.url) for s in samples]
    images = []
    for (key, ext, _, _), s in zip(parts, samples):
        try:
            images.append(open_image(s[ext]))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise DataError(f"{job.url}: sample {key!r}: image not decodable ({type(e).__name__}); re-create the "
                            "shard") from None
    device = next(captioner.model.parameters()).device
    cap_embeds = captioner.model.image_embeddings(torch.stack([captioner.transform(im) for im in images]).to(device))
    k = settings.sampling.k
    seeds = [[caption_seed(settings.seed, job.name, first_index + i, key, j) for j in range(1, k + 1)]
             for i, (key, _, _, _) in enumerate(parts)]
    synthetic = sample_captions(captioner.model, cap_embeds, seeds, settings.sampling)
    if filter_model.model is captioner.model:
        fil_embeds = cap_embeds
    else:
        fdev = next(filter_model.model.parameters()).device
        pixels = torch.stack([filter_model.transform(im) for im in images]).to(fdev)
        fil_embeds = filter_model.model.image_embeddings(pixels)
    texts = [[normalise(raw)] + syn for (_, _, raw, _), syn in zip(parts, synthetic)]
    nonempty = [[t for t in row if t] for row in texts]
    scored = match_scores(filter_model.model, fil_embeds, nonempty)
    records = []
    for i, ((key, _, raw, meta), row, scores) in enumerate(zip(parts, texts, scored)):
        it = iter(scores)
        values = [next(it) if t else None for t in row]
        orig = {"caption": raw, "score": values[0], "decision": decide(values[0], settings.threshold)}
        seen = {row[0]} if row[0] else set()
        syn = []
        for text, score in zip(row[1:], values[1:]):
            decision = DUPLICATE if text and text in seen else decide(score, settings.threshold)
            seen.add(text)
            syn.append({"caption": text, "score": score, "decision": decision})
        records.append({"key": key, "index": first_index + i, "modality": meta.get("modality") or "none",
                        "original": orig, "synthetic": syn})
    return records


def _audit(record: dict, job: ShardJob, settings: FilterSettings, which: str, j: Optional[int]) -> dict:
    orig = record["original"]
    block = {"caption": which, "score": orig["score"] if j is None else record["synthetic"][j - 1]["score"],
             "original_caption": orig["caption"], "original_score": orig["score"],
             "original_decision": orig["decision"], "source_key": record["key"], "source_shard": job.name,
             "threshold": settings.threshold}
    if j is not None:
        block["synthetic_index"] = j
    return block


def write_pairs(shard: Any, sample: dict, record: dict, job: ShardJob, settings: FilterSettings) -> int:
    """Write the kept pairs of one image (original first, then synthetic 1..k); returns how many."""
    key, ext, raw, meta = _parts(sample, job.url)
    pairs = []
    if record["original"]["decision"] == KEPT:
        pairs.append((key, raw, _audit(record, job, settings, "original", None)))
    for j, syn in enumerate(record["synthetic"], 1):
        if syn["decision"] == KEPT:
            pairs.append((f"{key}{SYNTHETIC}{j}", syn["caption"], _audit(record, job, settings, "synthetic", j)))
    for out_key, text, audit in pairs:
        shard.add(f"{out_key}.{ext}", sample[ext])
        shard.add(f"{out_key}.json", json.dumps({**meta, "capfilt": audit}, sort_keys=True).encode())
        shard.add(f"{out_key}.txt", text.encode("utf-8"))
    return len(pairs)


def filter_shard(job: ShardJob, captioner: LoadedModel, filter_model: LoadedModel, settings: FilterSettings,
                 batch_size: int, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Caption, score and write one shard atomically; its report (decisions included) goes to .prepare/NAME.json."""
    out = Path(job.out)
    report: dict[str, Any] = {"name": job.name, "fingerprint": job.fingerprint, "source": job.url, "images": 0,
                              "samples": 0, "decisions": []}
    with atomic_shard(out, job.name) as shard:
        for batch in _batches(read_samples(job.url), batch_size):
            records = judge_batch(batch, report["images"], job, captioner, filter_model, settings)
            for sample, record in zip(batch, records):
                report["samples"] += write_pairs(shard, sample, record, job, settings)
            report["images"] += len(batch)
            report["decisions"] += records
            progress(len(batch))
    report["bytes"], report["sha256"] = shard.bytes, shard.sha256  # 0, None: nothing kept, no file
    write_json_atomic(out / STATE_DIR / (job.name + ".json"), report)
    return report


# ----------------------------------------------------------------------------- the manifest


def score_summary(scores: list[float]) -> dict[str, Any]:
    """count, mean, deciles and a HISTOGRAM_BINS-bin histogram over [0, 1] of ITM scores."""
    edges = [round(i / HISTOGRAM_BINS, 6) for i in range(HISTOGRAM_BINS + 1)]
    counts = [0] * HISTOGRAM_BINS
    for s in scores:
        counts[min(int(s * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    summary: dict[str, Any] = {"count": len(scores), "histogram": {"edges": edges, "counts": counts}}
    if scores:
        summary["mean"] = round(statistics.fmean(scores), 4)
        if len(scores) > 1:
            q = statistics.quantiles(scores, n=10, method="inclusive")
            summary["deciles"] = [round(v, 4) for v in q]
    return summary


def tally(decisions: list[dict]) -> tuple[dict, dict]:
    """(counts by caption kind and decision, counts by modality) over decision records."""
    counts = {"original": {KEPT: 0, REMOVED: 0, EMPTY: 0},
              "synthetic": {KEPT: 0, REMOVED: 0, DUPLICATE: 0, EMPTY: 0}}
    modalities: dict[str, dict[str, int]] = {}
    for rec in decisions:
        m = modalities.setdefault(rec["modality"], {"images": 0, "original_kept": 0, "original_removed": 0,
                                                    "synthetic_kept": 0, "synthetic_removed": 0})
        m["images"] += 1
        counts["original"][rec["original"]["decision"]] += 1
        m["original_kept" if rec["original"]["decision"] == KEPT else "original_removed"] += 1
        for syn in rec["synthetic"]:
            counts["synthetic"][syn["decision"]] += 1
            m["synthetic_kept" if syn["decision"] == KEPT else "synthetic_removed"] += 1
    return counts, dict(sorted(modalities.items()))


def build_manifest(reports: list[dict], fingerprint: str, info: dict[str, Any]) -> dict[str, Any]:
    """The output's manifest.json from the per-shard reports (in shard order); `info` adds options and models."""
    decisions = [{"shard": r["name"], **d} for r in reports for d in r["decisions"]]
    counts, modalities = tally(decisions)
    originals = [d["original"]["score"] for d in decisions if d["original"]["score"] is not None]
    synthetic = [s["score"] for d in decisions for s in d["synthetic"] if s["score"] is not None]
    shards = [{"name": r["name"], "samples": r["samples"], "images": r["images"], "bytes": r["bytes"],
               "sha256": r["sha256"], "source": r["source"]} for r in reports if r["samples"]]
    return {
        "format_version": FORMAT_VERSION,
        "kind": "capfilt",
        "fingerprint": fingerprint,
        **info,
        "sample_format": {"__key__": f"image id (original caption) or <id>{SYNTHETIC}<j> (synthetic caption j)",
                          "jpg|png": "image bytes (the input's, unchanged)", "txt": "caption (UTF-8)",
                          "json": "the input's json + capfilt {caption: original|synthetic, score, "
                                  "original_caption, original_score, original_decision, source_key, source_shard, "
                                  "threshold, synthetic_index}"},
        "shards": shards,
        "totals": {"images": len(decisions), "samples": sum(s["samples"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards), "shards": len(shards),
                   "empty_shards": [r["name"] for r in reports if not r["samples"]],
                   "images_dropped": sum(1 for d in decisions if d["original"]["decision"] != KEPT
                                         and all(s["decision"] != KEPT for s in d["synthetic"]))},
        "counts": counts,
        "modalities": modalities,
        "scores": {"original": score_summary(originals), "synthetic": score_summary(synthetic)},
        "decisions": decisions,
    }
