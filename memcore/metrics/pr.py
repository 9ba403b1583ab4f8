"""Precision–recall of "flagged" against "extracted" over the generate-and-filter ranking [C23 §4, SPEC §2.6].

The ranking is that of SPEC §2.4: the **flagged** conditions (clique ≥ min_clique), by mean pairwise tiled L2
inside the clique, lower first. Walking down it, the positives are conditions whose representative was
verified as extracted against the training set. ``precision[k]`` and ``recall[k]`` are taken after the first
``cutoffs[k]`` flagged conditions; recall counts against every extracted condition, flagged or not (an
extracted condition the attack did not flag is one it missed), so the last point of the curve is the
precision and recall of the flagged set itself (:func:`flagged_precision_recall`) and recall reaches 1 only
when every extraction was flagged. Conditions that were not flagged are no claim of the attack and take no
place in the ranking. Tied ranking keys are never split (a cutoff only falls between different keys), as
in scikit-learn's ``precision_recall_curve``.

"Extractions at zero false positives" is the number of extracted conditions ranked before the first
flagged condition that is not extracted: how many true extractions an auditor gets by taking the ranking
from the top before the first mistake (the figure [C23] reports). It never exceeds the number of flagged
conditions.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class PRCurve:
    """Precision–recall over a ranking.

    Attributes:
        cutoffs: number of top-ranked conditions at each point (increasing, tie groups never split).
        precision: precision at each cutoff.
        recall: recall at each cutoff (0 everywhere when there is no positive).
        num_positive: how many conditions are extracted in total (ranked or not: recall's denominator).
        extractions_at_zero_fp: extracted conditions ranked before the first non-extracted one.
        average_precision: sum over cutoffs of (recall step) × precision (scikit-learn's definition; positives
            outside the ranking are never retrieved and add no area); NaN when there is no positive.
    """

    cutoffs: tuple[int, ...]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    num_positive: int
    extractions_at_zero_fp: int
    average_precision: float

    def at(self, k: int) -> tuple[float, float]:
        """(precision, recall) after the top ``k`` conditions (k must be one of ``cutoffs``, or 0)."""
        if k == 0:
            return (1.0, 0.0)
        try:
            i = self.cutoffs.index(k)
        except ValueError as exc:
            raise ValueError(
                f"{k} is not a cutoff of this curve (ties are not split); cutoffs: {self.cutoffs}"
            ) from exc
        return self.precision[i], self.recall[i]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _vector(x: Any, name: str, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """``x`` as a 1-D tensor, or a TypeError naming ``name`` (2-D input was flattened without a word)."""
    try:
        t = torch.as_tensor(x, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a 1-D sequence of {what}, got {_brief(x)}") from None
    if t.dim() > 1:
        raise TypeError(f"{name} must be a 1-D sequence of {what}, got shape {tuple(t.shape)}")
    return t.reshape(-1)


def _brief(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def precision_recall(
    keys: Sequence[float] | torch.Tensor,
    positive: Sequence[bool] | torch.Tensor,
    *,
    num_positive: int | None = None,
) -> PRCurve:
    """Precision–recall along the ranking that sorts ``keys`` ascending (lower key = more suspicious).

    Args:
        keys: [K] ranking keys; NaN is not allowed (use +inf for "no evidence").
        positive: [K] booleans, True where the condition was extracted.
        num_positive: recall's denominator, when positives exist outside the ranking (extracted conditions
            that were not flagged); at least the positives ranked. None: the positives ranked.

    Returns:
        PRCurve.
    """
    k = _vector(
        keys, "keys", torch.float64, "numbers (tuple keys such as ranking_key's: see pr_from_records)"
    )
    y = _vector(positive, "positive", None, "booleans (or 0/1)")
    if y.numel() == 0:
        y = y.bool()
    if y.dtype != torch.bool:
        if y.is_floating_point() or (y.numel() and ((y != 0) & (y != 1)).any()):
            raise TypeError("positive must be booleans (or 0/1)")
        y = y.bool()
    if k.numel() != y.numel():
        raise ValueError(f"keys and positive differ in length ({k.numel()} vs {y.numel()})")
    if torch.isnan(k).any():
        raise ValueError("ranking keys contain NaN; use +inf for conditions with no clique evidence")
    order = torch.sort(k, stable=True).indices
    ks, ys = k[order], y[order]
    n_ranked = int(ys.sum())
    if num_positive is None:
        n_pos = n_ranked
    else:
        ok = isinstance(num_positive, numbers.Integral) and not isinstance(num_positive, bool)
        if not ok or num_positive < n_ranked:
            raise ValueError(
                f"num_positive must be an int at least the {n_ranked} positives ranked, got {num_positive!r}"
            )
        n_pos = int(num_positive)
    if ks.numel() == 0:
        return PRCurve((), (), (), n_pos, 0, 0.0 if n_pos else math.nan)
    tp = torch.cumsum(ys.to(torch.int64), 0)
    # last index of every run of equal keys
    last = torch.ones_like(ys)
    last[:-1] = ks[1:] != ks[:-1]
    idx = torch.nonzero(last).reshape(-1)
    cut = (idx + 1).tolist()
    tps = tp[idx].tolist()
    prec = [t / c for t, c in zip(tps, cut)]
    rec = [t / n_pos if n_pos else 0.0 for t in tps]
    # zero false positives: count positives before the first negative, whole tie groups only
    first_neg = torch.nonzero(~ys).reshape(-1)
    if first_neg.numel() == 0:
        at0 = n_ranked
    else:
        j = int(first_neg[0])
        # a tie group containing the first negative cannot be taken without it
        group_start = int(torch.nonzero(ks == ks[j]).reshape(-1)[0])
        at0 = int(tp[group_start - 1]) if group_start > 0 else 0
    if n_pos:
        ap, prev_r = 0.0, 0.0
        for p, r in zip(prec, rec):
            ap += (r - prev_r) * p
            prev_r = r
    else:
        ap = math.nan
    return PRCurve(tuple(cut), tuple(prec), tuple(rec), n_pos, at0, ap)


def ranking_key(flagged: bool, mean_clique_distance: float | None) -> tuple[int, float]:
    """Sort key of SPEC §2.4: flagged conditions first, then by mean clique distance (lower first)."""
    d = (
        math.inf
        if mean_clique_distance is None or mean_clique_distance != mean_clique_distance
        else float(mean_clique_distance)
    )
    return (0 if flagged else 1, d)


def flagged_precision_recall(flagged: Sequence[bool], extracted: Sequence[bool]) -> tuple[float, float]:
    """Precision and recall of the flagged set against the extracted set (NaN when undefined)."""
    f = [bool(x) for x in flagged]
    e = [bool(x) for x in extracted]
    if len(f) != len(e):
        raise ValueError(f"flagged and extracted differ in length ({len(f)} vs {len(e)})")
    tp = sum(a and b for a, b in zip(f, e))
    nf, ne = sum(f), sum(e)
    return (tp / nf if nf else math.nan, tp / ne if ne else math.nan)


def pr_from_records(records: Sequence[dict]) -> PRCurve | None:
    """The PR curve of a run's records over the ranking of its flagged conditions (SPEC §2.4, §2.6).

    Only records that carry verification count (``extracted`` not None); extracted conditions that were not
    flagged count in recall's denominator only. None when no record carries verification.
    """
    rows = [r for r in records if r.get("extracted") is not None]
    if not rows:
        return None
    flagged = [r for r in rows if r.get("flagged")]
    # the distance of ranking_key (None or NaN: +inf, last); ties stay ties
    keys = [ranking_key(True, r.get("mean_clique_distance"))[1] for r in flagged]
    return precision_recall(
        keys,
        [bool(r["extracted"]) for r in flagged],
        num_positive=sum(bool(r["extracted"]) for r in rows),
    )
