"""recipes/common/stats.py on tiny cases whose answers are computed by hand."""
from __future__ import annotations

import math

import pytest

from recipes.common.stats import (
    cluster_bootstrap_ci,
    mcnemar_exact,
    paired_accuracy_test,
    paired_bootstrap_test,
    prediction_intervals,
    seed_aggregate,
)


def test_mcnemar_exact_by_hand():
    # b=1, c=6: 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
    assert mcnemar_exact(1, 6) == pytest.approx(0.125)
    assert mcnemar_exact(6, 1) == pytest.approx(0.125)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 9) == pytest.approx(2 * sum(math.comb(12, k) for k in range(4)) / 2 ** 12)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_mcnemar_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(1, 6), (4, 11), (20, 31), (0, 3)]:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)


def test_paired_accuracy_counts_only_discordant_questions():
    a = [1, 1, 0, 0, 1, 0, 0, 0, 0, 1]
    b = [1, 0, 1, 1, 1, 1, 1, 1, 1, 1]  # A-only: 1 question; B-only: 6
    t = paired_accuracy_test(a, b)
    assert (t["a_only"], t["b_only"]) == (1, 6) and t["p"] == pytest.approx(0.125)


def test_cluster_bootstrap_resamples_images_not_questions():
    """10 images with 10 questions each, all answered alike per image, 5 images right: resampling images makes the
    mean Binomial(10, 1/2) / 10, whose 2.5% and 97.5% quantiles are 0.2 and 0.8 (P(X<=1) = 11/1024 < 0.025 <
    P(X<=2) = 56/1024). A question-level bootstrap would say about [0.40, 0.60]."""
    values = [float(i < 5) for i in range(10) for _ in range(10)]
    images = [f"img{i}" for i in range(10) for _ in range(10)]
    assert cluster_bootstrap_ci(values, images, n_boot=4000, seed=1) == (0.2, 0.8)
    naive = cluster_bootstrap_ci(values, list(range(100)), n_boot=4000, seed=1)  # each question its own cluster
    assert 0.38 <= naive[0] <= 0.42 and 0.58 <= naive[1] <= 0.62
    assert cluster_bootstrap_ci(values, images, seed=3) == cluster_bootstrap_ci(values, images, seed=3)  # seeded


def test_paired_bootstrap_by_hand():
    # image a: two questions, B better by 0.5 on each; image b: one question, no difference. A resample has
    # difference <= 0 only when it draws b twice (1/4), >= 0 always: p = 2 * 1/4 = 0.5
    t = paired_bootstrap_test([0.0, 0.0, 1.0], [0.5, 0.5, 1.0], ["a", "a", "b"], n_boot=4000, seed=0)
    assert t["difference"] == pytest.approx(1 / 3) and t["p"] == pytest.approx(0.5, abs=0.04)
    assert t["interval"] == [0.0, 0.5]
    # symmetric: +1 on one image, -1 on another -> P(d <= 0) = P(d >= 0) = 3/4 -> p clipped to 1
    assert paired_bootstrap_test([0.0, 1.0], [1.0, 0.0], ["a", "b"], seed=0)["p"] == 1.0
    assert paired_bootstrap_test([0.3, 0.7], [0.3, 0.7], ["a", "b"])["p"] == 1.0
    # B better on every image: the smallest p the resamples can give
    assert paired_bootstrap_test([0.0] * 6, [1.0] * 6, list("abcdef"), n_boot=999)["p"] == pytest.approx(2 / 1000)


def test_seed_aggregate():
    agg = seed_aggregate([0.70, 0.72, 0.74])
    assert agg["mean"] == pytest.approx(0.72) and agg["sd"] == pytest.approx(0.02) and agg["n"] == 3
    assert seed_aggregate([0.5]) == {"mean": 0.5, "sd": None, "n": 1}


def test_prediction_intervals_per_group():
    rows = [{"image": f"i{k % 7}", "answer_type": "closed" if k % 3 else "open", "match": k % 2 == 0,
             "edit_similarity": (k % 5) / 4} for k in range(60)]
    out = prediction_intervals(rows, n_boot=500)
    assert set(out) == {"overall", "closed", "open"} and out["overall"]["count"] == 60
    assert out["overall"]["images"] == 7 and out["open"]["count"] == 20
    for g in out.values():
        for metric in ("accuracy", "edit_similarity"):
            assert 0.0 <= g[metric][0] <= g[metric][1] <= 1.0


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match="3 values but 2 cluster labels"):
        cluster_bootstrap_ci([1, 0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="same questions"):
        paired_accuracy_test([1], [1, 0])
