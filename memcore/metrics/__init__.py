"""Metrics: precision–recall over the extraction ranking (this module); ROC / AMS–UMS live beside it."""

from __future__ import annotations

from memcore.metrics.pr import (
    PRCurve,
    flagged_precision_recall,
    pr_from_records,
    precision_recall,
    ranking_key,
)

__all__ = ["PRCurve", "flagged_precision_recall", "pr_from_records", "precision_recall", "ranking_key"]
