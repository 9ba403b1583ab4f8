"""Argument checks shared by the public APIs (one wording for one rule)."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np


def finite_real(value: object, name: str) -> float:
    """``value`` as a float if it is a finite real number (int, float, numpy scalar, Fraction, ...).

    Used for thresholds compared as ``d <= alpha`` (``inf`` would join every pair, infinite distances too, and
    NaN none: both more likely a bug upstream than a choice) and the sampler's guidance and eta.

    Raises:
        TypeError: not a real number (bools included).
        ValueError: NaN, +-inf, or a number too large for a float (``10**400``; an OverflowError otherwise).
    """
    if not isinstance(value, Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got a number too large for a float") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v
