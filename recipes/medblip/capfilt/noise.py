"""Known noise for measuring the filter: a fraction of captions moved to other images, and the filter's precision
and recall at removing exactly those.

`swap_captions` copies caption shards, giving a seeded `fraction` of the images the caption of another chosen image
(one cycle through them, so every chosen caption moves and none stays). Where the json carries labels (the
phantoms' "case": modality, organ, lesion, side, brightness, size: everything their captions state) a caption only
moves to an image with other labels, so every swapped caption is false about its new image. The truth goes into
each sample's json ("noise": {"swapped": bool, "caption_from": key}) and into noise.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from corpora.shard_writer import atomic_shard, write_json_atomic
from framework.shards import expand_shards
from recipes.medblip.capfilt.scoring import KEPT
from recipes.medblip.capfilt.writing import read_samples


def _label(meta: dict) -> Optional[str]:
    case = meta.get("case")
    return json.dumps(case, sort_keys=True) if isinstance(case, dict) else None


def swap_cycle(labels: list[Optional[str]], chosen: list[int], rng: np.random.Generator,
               tries: int = 100) -> dict[int, int]:
    """{image: image whose caption it gets} over `chosen`: one random cycle (no image keeps its own caption), each
    link between images of different labels where labels are known. Raises ValueError if none is found."""
    if len(chosen) < 2:
        raise ValueError(f"swapping needs at least 2 chosen images, got {len(chosen)}")
    for _ in range(tries):
        order = [chosen[i] for i in rng.permutation(len(chosen))]
        # greedy: each next image has labels unlike the previous one (drawn among the remaining)
        cycle, rest = [order[0]], order[1:]
        while rest:
            prev = labels[cycle[-1]]
            fits = [i for i, j in enumerate(rest) if prev is None or labels[j] is None or labels[j] != prev]
            if not fits:
                break
            cycle.append(rest.pop(fits[int(rng.integers(len(fits)))]))
        first, last = labels[cycle[0]], labels[cycle[-1]]
        if not rest and (first is None or last is None or first != last):
            return {cycle[i]: cycle[(i + 1) % len(cycle)] for i in range(len(cycle))}
    raise ValueError("could not swap captions between images of different labels (too few distinct labels)")


def swap_captions(shards: Any, out: Path, fraction: float, seed: int = 0) -> dict[str, Any]:
    """Copy `shards` into `out` (same names, same samples, images unchanged) with round(fraction * N) captions
    swapped; returns (and writes to out/noise.json) {"fraction", "seed", "swapped": {key: caption_from}, ...}."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"noise fraction must be in (0, 1), got {fraction}")
    urls = expand_shards(shards if isinstance(shards, list) else str(shards))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = [(Path(u).name, s) for u in urls for s in read_samples(u)]
    metas = [json.loads(s["json"]) if s.get("json") else {} for _, s in samples]
    keys = [str(s["__key__"]) for _, s in samples]
    rng = np.random.default_rng([seed, 16])
    n = round(fraction * len(samples))
    chosen = sorted(int(i) for i in rng.choice(len(samples), size=n, replace=False))
    source = swap_cycle([_label(m) for m in metas], chosen, rng)
    entries = []
    for name in dict.fromkeys(name for name, _ in samples):
        with atomic_shard(out, name) as shard:
            count = 0
            for i, (shard_name, s) in enumerate(samples):
                if shard_name != name:
                    continue
                j = source.get(i, i)
                meta = {**metas[i], "noise": {"swapped": j != i, "caption_from": keys[j]}}
                ext = next(k for k in ("jpg", "jpeg", "png", "webp") if s.get(k) is not None)
                shard.add(f"{keys[i]}.{ext}", s[ext])
                shard.add(f"{keys[i]}.json", json.dumps(meta, sort_keys=True).encode())
                shard.add(f"{keys[i]}.txt", samples[j][1]["txt"])
                count += 1
        entries.append({"name": name, "samples": count, "bytes": shard.bytes, "sha256": shard.sha256})
    truth = {"fraction": fraction, "seed": seed, "images": len(samples),
             "swapped": {keys[i]: keys[j] for i, j in sorted(source.items())}}
    write_json_atomic(out / "noise.json", truth)
    write_json_atomic(out / "manifest.json", {"shards": entries, "source": "swap_captions",
                                              "totals": {"samples": len(samples), "shards": len(entries)},
                                              "noise": {k: v for k, v in truth.items() if k != "swapped"}})
    return truth


def removal_quality(decisions: list[dict], swapped: set[str]) -> dict[str, Any]:
    """Precision and recall of the filter at removing the swapped originals (decision records of a manifest).

    precision = swapped among the removed / removed; recall = swapped removed / swapped; clean_removed = the share
    of clean captions removed too.
    """
    removed = {d["key"] for d in decisions if d["original"]["decision"] != KEPT}
    keys = {d["key"] for d in decisions}
    noisy = swapped & keys
    hit = len(removed & noisy)
    clean = len(keys - noisy)
    return {"images": len(keys), "swapped": len(noisy), "removed": len(removed), "swapped_removed": hit,
            "precision": hit / len(removed) if removed else None,
            "recall": hit / len(noisy) if noisy else None,
            "clean_removed": len(removed - noisy) / clean if clean else None}


def threshold_sweep(decisions: list[dict], swapped: set[str], thresholds: list[float]) -> list[dict[str, Any]]:
    """removal_quality at other thresholds, from the recorded original scores (no re-scoring)."""
    rows = []
    for t in thresholds:
        redecided = [{**d, "original": {**d["original"], "decision": KEPT if d["original"]["score"] is not None
                                        and d["original"]["score"] >= t else "removed"}} for d in decisions]
        rows.append({"threshold": t, **removal_quality(redecided, swapped)})
    return rows


def roc_auc(decisions: list[dict], swapped: set[str]) -> Optional[float]:
    """Probability that a clean original scores above a swapped one (ties count half): threshold-free separation."""
    clean = np.array([d["original"]["score"] for d in decisions if d["key"] not in swapped
                      and d["original"]["score"] is not None])
    noisy = np.array([d["original"]["score"] for d in decisions if d["key"] in swapped
                      and d["original"]["score"] is not None])
    if not clean.size or not noisy.size:
        return None
    greater = (clean[:, None] > noisy[None, :]).mean()
    ties = (clean[:, None] == noisy[None, :]).mean()
    return float(greater + 0.5 * ties)
