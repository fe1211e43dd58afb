"""Honest statistics for small VQA test sets: intervals by bootstrap over images, paired tests, seed aggregates.

Questions cluster on images (VQA-RAD's 451 test questions sit on 203 images; SLAKE's 1,061 on 96), so a question-level
bootstrap treats correlated answers as independent and gives intervals that are too narrow. Every resampling here
draws whole images with replacement and keeps all questions of a drawn image (a cluster bootstrap); a statistic is
the sum over the drawn questions divided by their number. Percentile intervals, seeded numpy generator.
"""
from __future__ import annotations

import math
from typing import Any, Hashable, Optional, Sequence

import numpy as np

N_BOOT = 2000  # enough for a 95% percentile interval to be stable to ~0.005 on a few hundred questions
LEVEL = 0.95


def _clusters(values: Sequence[float], clusters: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and sizes, clusters in order of first appearance."""
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    if not len(values):
        raise ValueError("no questions to resample")
    index: dict[Hashable, int] = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters])
    sums = np.bincount(ids, weights=np.asarray(values, dtype=np.float64), minlength=len(index))
    sizes = np.bincount(ids, minlength=len(index)).astype(np.float64)
    return sums, sizes


def _draws(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_clusters] counts: how often each cluster is drawn in each resample (multinomial = draw with
    replacement), so a statistic is one matrix product instead of a Python loop."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot).astype(np.float64)


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence[Hashable], n_boot: int = N_BOOT,
                         seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (per question) resampling whole clusters (images)."""
    sums, sizes = _clusters(values, clusters)
    w = _draws(len(sums), n_boot, seed)
    means = (w @ sums) / (w @ sizes)  # every resample draws >= 1 cluster, and every cluster has >= 1 question
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], method="inverted_cdf")
    return float(lo), float(hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def paired_accuracy_test(match_a: Sequence[bool], match_b: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar on two runs' per-question correctness (same questions, same order)."""
    if len(match_a) != len(match_b):
        raise ValueError(f"paired test needs the same questions: {len(match_a)} vs {len(match_b)}")
    b = sum(bool(x) and not bool(y) for x, y in zip(match_a, match_b))  # A right, B wrong
    c = sum(bool(y) and not bool(x) for x, y in zip(match_a, match_b))  # B right, A wrong
    return {"test": "exact McNemar", "a_only": b, "b_only": c, "p": mcnemar_exact(b, c)}


def paired_bootstrap_test(values_a: Sequence[float], values_b: Sequence[float], clusters: Sequence[Hashable],
                          n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    """Paired cluster bootstrap of mean(B) - mean(A): the difference, its interval and a two-sided p-value
    (twice the smaller share of resampled differences on either side of 0, with the +1 correction so p > 0)."""
    if len(values_a) != len(values_b):
        raise ValueError(f"paired test needs the same questions: {len(values_a)} vs {len(values_b)}")
    diff = np.asarray(values_b, dtype=np.float64) - np.asarray(values_a, dtype=np.float64)
    sums, sizes = _clusters(diff, clusters)
    w = _draws(len(sums), n_boot, seed)
    d = (w @ sums) / (w @ sizes)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(d, [alpha, 1.0 - alpha], method="inverted_cdf")
    if not np.any(diff):
        p = 1.0  # identical answers: no evidence of any difference
    else:
        below, above = int(np.sum(d <= 0)), int(np.sum(d >= 0))
        p = min(1.0, 2.0 * (min(below, above) + 1) / (n_boot + 1))
    return {"test": "paired cluster bootstrap", "difference": float(diff.sum() / len(diff)),
            "interval": [float(lo), float(hi)], "p": p, "n_boot": n_boot}


def seed_aggregate(values: Sequence[Optional[float]]) -> dict[str, Optional[float]]:
    """Mean, sample standard deviation (ddof 1; None for one run) and n of one metric over seeds."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else None
    return {"mean": float(np.mean(xs)), "sd": sd, "n": len(xs)}


def prediction_intervals(rows: Sequence[dict], groups: Sequence[str] = ("overall", "closed", "open"),
                         n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict[str, Any]]:
    """95% cluster-bootstrap intervals of accuracy and edit similarity per answer-type group, from
    predictions.jsonl rows (keys image, answer_type, match, edit_similarity); a group without questions is absent."""
    out: dict[str, dict[str, Any]] = {}
    for g in groups:
        sel = [r for r in rows if g == "overall" or r.get("answer_type") == g]
        if not sel:
            continue
        images = [r["image"] for r in sel]
        out[g] = {"count": len(sel), "images": len(set(images)),
                  "accuracy": list(cluster_bootstrap_ci([float(r["match"]) for r in sel], images, n_boot, seed)),
                  "edit_similarity": list(cluster_bootstrap_ci([float(r["edit_similarity"]) for r in sel], images,
                                                               n_boot, seed))}
    return out
