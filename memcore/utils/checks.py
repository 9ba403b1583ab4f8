"""Argument checks shared by the public APIs (one wording for one rule)."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np


def finite_threshold(alpha: object, name: str = "alpha") -> float:
    """``alpha`` as a float if it is a finite real number (int, float, numpy scalar, Fraction, ...).

    A threshold compared as ``d <= alpha``: ``inf`` would join every pair, infinite distances too, and NaN
    none; both are more likely a bug upstream than a choice.

    Raises:
        TypeError: not a real number (bools included).
        ValueError: NaN, +-inf, or a number too large for a float (``10**400``; an OverflowError otherwise).
    """
    if not isinstance(alpha, Real) or isinstance(alpha, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {type(alpha).__name__} ({alpha!r})")
    try:
        a = float(alpha)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got a number too large for a float") from None
    if not math.isfinite(a):
        raise ValueError(f"{name} must be finite, got {alpha!r}")
    return a
