"""Precision–recall over the extraction ranking, against scikit-learn and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from memcore.metrics import flagged_precision_recall, pr_from_records, precision_recall
from memcore.metrics.pr import ranking_key


def test_by_hand():
    keys = [0.1, 0.2, 0.3, 0.4, 0.5]
    pos = [True, True, False, True, False]
    c = precision_recall(keys, pos)
    assert c.cutoffs == (1, 2, 3, 4, 5)
    assert c.precision == pytest.approx((1, 1, 2 / 3, 3 / 4, 3 / 5))
    assert c.recall == pytest.approx((1 / 3, 2 / 3, 2 / 3, 1, 1))
    assert c.extractions_at_zero_fp == 2
    assert c.num_positive == 3
    assert c.at(4) == pytest.approx((0.75, 1.0))


def test_ties_are_not_split():
    c = precision_recall([0.1, 0.1, 0.2], [True, False, True])
    assert c.cutoffs == (2, 3)
    assert c.extractions_at_zero_fp == 0  # the first group holds a negative
    with pytest.raises(ValueError, match="not a cutoff"):
        c.at(1)


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 15, size=40).astype(float)
    pos = rng.random(40) < 0.4
    pos[0] = True
    c = precision_recall(keys, pos)
    p, r, _thr = precision_recall_curve(pos, -keys)
    # sklearn lists thresholds increasing (cutoffs decreasing) and appends (1, 0)
    assert np.allclose(c.precision, p[:-1][::-1])
    assert np.allclose(c.recall, r[:-1][::-1])
    assert math.isclose(c.average_precision, average_precision_score(pos, -keys))


def test_no_positive_and_empty_and_bad_input():
    c = precision_recall([1.0, 2.0], [False, False])
    assert c.recall == (0.0, 0.0) and math.isnan(c.average_precision) and c.extractions_at_zero_fp == 0
    assert precision_recall([], []).cutoffs == ()
    with pytest.raises(ValueError, match="NaN"):
        precision_recall([float("nan")], [True])
    with pytest.raises(ValueError, match="length"):
        precision_recall([1.0], [True, False])
    with pytest.raises(TypeError):
        precision_recall([1.0], [0.5])
    # 2-D input is refused, not flattened; what cannot be a tensor is named
    with pytest.raises(TypeError, match=r"keys must be a 1-D .* see pr_from_records\), got shape \(2, 2\)"):
        precision_recall([ranking_key(True, 0.1), ranking_key(False, None)], [True, False])
    with pytest.raises(TypeError, match=r"positive must be a 1-D sequence of booleans .* got shape \(1, 2\)"):
        precision_recall([1.0, 2.0], [[True, False]])
    with pytest.raises(TypeError, match=r"positive must be .* got \[None, True\]"):
        precision_recall([1.0, 2.0], [None, True])
    with pytest.raises(TypeError, match=r"keys must be .* got \['a'\]"):
        precision_recall(["a"], [True])


def test_records_ranking_flagged_first():
    recs = [
        {"condition_id": 0, "flagged": False, "mean_clique_distance": 0.01, "extracted": False},
        {"condition_id": 1, "flagged": True, "mean_clique_distance": 0.05, "extracted": True},
        {"condition_id": 2, "flagged": True, "mean_clique_distance": 0.02, "extracted": True},
        {"condition_id": 3, "flagged": False, "mean_clique_distance": None, "extracted": True},
    ]
    c = pr_from_records(recs)
    # the ranking is of the flagged conditions (SPEC §2.4); the unflagged extraction is missed recall
    assert c.cutoffs == (1, 2)
    assert c.extractions_at_zero_fp == 2
    assert c.num_positive == 3
    assert c.recall == pytest.approx((1 / 3, 2 / 3))
    assert pr_from_records([{"condition_id": 0, "flagged": True}]) is None
    assert flagged_precision_recall([True, True, False], [True, False, True]) == (0.5, 0.5)


def test_unflagged_extractions_are_not_extractions_at_zero_fp():
    # the attack flagged one condition; an extracted condition it did not flag ranked right after it used to
    # count as a second "extraction at zero false positives", and recall reached 1 with AP 1
    recs = [
        {"condition_id": 0, "flagged": True, "mean_clique_distance": 0.02, "extracted": True},
        {"condition_id": 1, "flagged": False, "mean_clique_distance": 0.01, "extracted": True},
        {"condition_id": 2, "flagged": False, "mean_clique_distance": 0.03, "extracted": False},
    ]
    c = pr_from_records(recs)
    assert c.extractions_at_zero_fp == 1
    assert (c.cutoffs, c.precision, c.recall) == ((1,), (1.0,), (0.5,))
    assert c.num_positive == 2 and c.average_precision == pytest.approx(0.5)
    # the curve ends at the precision and recall of the flagged set
    assert (c.precision[-1], c.recall[-1]) == flagged_precision_recall(
        [True, False, False], [True, True, False]
    )
    # nothing flagged: no ranking, nothing extracted at zero false positives, whatever the unflagged hold
    c = pr_from_records(
        [{"condition_id": 0, "flagged": False, "mean_clique_distance": 0.0, "extracted": True}]
    )
    assert c.cutoffs == () and c.extractions_at_zero_fp == 0 and c.num_positive == 1
    assert c.average_precision == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_records_curve_is_sklearns_over_the_flagged_prefix(seed):
    # sklearn over every verified condition, the unflagged ones scored below every flagged one: its points
    # up to the flagged set are ours; ties (equal distances, and clique-of-one None/NaN as +inf) stay whole
    rng = np.random.default_rng(seed)
    n = 60
    flagged = rng.random(n) < 0.5
    dist = rng.integers(0, 8, size=n) / 100
    ext = rng.random(n) < np.where(flagged, 0.6, 0.2)
    ext[0] = True
    flagged[0] = True
    recs = []
    for i in range(n):
        d = None if i % 7 == 3 else math.nan if i % 7 == 5 else float(dist[i])
        recs.append(
            {
                "condition_id": i,
                "flagged": bool(flagged[i]),
                "mean_clique_distance": d,
                "extracted": bool(ext[i]),
            }
        )
    c = pr_from_records(recs)
    key = np.array([ranking_key(True, r["mean_clique_distance"])[1] for r in recs])
    score = np.where(flagged, -np.where(np.isinf(key), 10.0, key), -100.0)
    p, r, _thr = precision_recall_curve(ext, score)
    k = len(c.cutoffs)
    assert np.allclose(c.precision, p[:-1][::-1][:k]) and np.allclose(c.recall, r[:-1][::-1][:k])
    assert c.cutoffs[-1] == flagged.sum() and c.num_positive == ext.sum()
    assert c.extractions_at_zero_fp <= (flagged & ext).sum()


def test_num_positive_is_checked():
    c = precision_recall([0.1, 0.2], [True, False], num_positive=np.int64(4))
    assert c.recall == (0.25, 0.25) and c.num_positive == 4 and c.extractions_at_zero_fp == 1
    with pytest.raises(ValueError, match="at least the 1 positives ranked"):
        precision_recall([0.1, 0.2], [True, False], num_positive=0)
    with pytest.raises(ValueError, match="num_positive"):
        precision_recall([0.1], [True], num_positive=True)
