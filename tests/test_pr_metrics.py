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
    assert c.cutoffs == (1, 2, 3, 4)
    assert c.extractions_at_zero_fp == 2
    assert c.recall[1] == pytest.approx(2 / 3)
    assert pr_from_records([{"condition_id": 0, "flagged": True}]) is None
    assert flagged_precision_recall([True, True, False], [True, False, True]) == (0.5, 0.5)
