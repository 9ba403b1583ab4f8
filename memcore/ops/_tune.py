"""Autotuning of ``backend="auto"`` among backends that give bit-identical results.

For uint8 images every distance backend computes the same integers and the same IEEE epilogue, so which one
runs cannot change a result, only its speed. On the first ``auto`` call of a shape class (op, device, image
shape, grid, k, and the set sizes rounded up to powers of two) the candidates run on the caller's own tensors:
once to warm up (Triton compiles, cuBLAS picks its kernels) and to check that each reproduces the first
candidate's output bit for bit — a candidate that differs, or raises, is dropped with a warning, so a kernel
that is wrong on some device can slow ``auto`` down but never change its answer — then twice timed. The
fastest is cached for the process. This is ``cudnn.benchmark`` for exact kernels: tuning synchronises the
device, once per shape class; later calls of the class do not.

Tuning is skipped (the static order of ``memcore.ops._backend`` decides) under ``torch.compile`` tracing,
for float inputs (backends differ in their last bits there, so a timing-dependent choice would make results
depend on the run), and when ``MEMCORE_AUTOTUNE=0``. ``choices()`` reports what was chosen and measured.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off", "")


def _env_enabled() -> bool:
    """``MEMCORE_AUTOTUNE`` (read once, at import): on unless 0/false/no/off (any case) or empty; anything
    else is a ValueError, so that a typo such as ``MEMCORE_AUTOTUNE=of`` does not silently keep tuning."""
    raw = os.environ.get("MEMCORE_AUTOTUNE", "1")
    value = raw.strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(
            f"MEMCORE_AUTOTUNE={raw!r}: expected 1 or 0 (also true/false, yes/no, on/off; empty means off)"
        )
    return value in _ON


ENABLED = _env_enabled()

# Re-entrant: a candidate may tune inside its own run (the Triton k-NN tunes its filter launch on the first
# call, which can come from the backend tuning of ``auto``); a plain Lock would deadlock that thread.
_LOCK = threading.RLock()
_CHOSEN: dict[tuple, str] = {}
_TIMES: dict[tuple, dict[str, float]] = {}


def bucket(n: int) -> int:
    """Round a set size up to a power of two (shape classes for the cache)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def pick(
    key: tuple,
    candidates: Sequence[str],
    run: Callable[[str], Any],
    device: torch.device,
    *,
    repeats: int = 2,
) -> str:
    """The fastest of ``candidates`` for ``key`` (tuned on first use, then cached).

    Args:
        key: the shape class (hashable).
        candidates: available backends in preference order; the first one is the reference for the
            bit-identity check and the fallback when nothing else qualifies.
        run: ``run(backend)`` computes the op's result with that backend.
        device: where it runs (CUDA timings synchronise it).
        repeats: timed runs per candidate (the minimum counts).

    Returns:
        A backend name from ``candidates``.
    """
    if len(candidates) == 1:
        return candidates[0]
    hit = chosen(key, candidates)
    if hit is not None:
        return hit
    with _LOCK:
        hit = chosen(key, candidates)
        if hit is not None:
            return hit
        times: dict[str, float] = {}
        want = None
        for be in candidates:
            try:
                out = run(be)
                _sync(device)
            except Exception as exc:  # a backend that cannot run this shape simply does not compete
                if be == candidates[0]:
                    # the static choice: its error is the call's, as with tuning off (nothing to check the
                    # others against; and a passing one, out of memory, must not fix the shape class's choice)
                    raise
                warnings.warn(
                    f"memcore autotune: backend {be!r} failed on {key} ({type(exc).__name__}: {exc}); skipped",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            if want is None:
                want = out
            elif not _same(out, want):
                warnings.warn(
                    f"memcore autotune: backend {be!r} disagrees with {candidates[0]!r} on {key}; never used "
                    "for it. Please report this (with memcore.build_info()).",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            best = float("inf")
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                run(be)
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            times[be] = best
        fastest = min(times, key=times.__getitem__) if times else candidates[0]
        _TIMES[key] = times  # before the choice: choices() (lock-free) lists only what _CHOSEN holds
        _CHOSEN[key] = fastest
        return fastest


def chosen(key: tuple, candidates: Sequence[str] | None = None) -> str | None:
    """The cached choice for ``key``, None before it was tuned (no lock: a dict read).

    With ``candidates`` (what this call may run), a choice not among them gives the first: a shape class spans
    sizes up to 4x apart in N·M, so its choice may not be eligible for this call (a launch configuration over
    its memory budget here); then the static choice runs.
    """
    hit = _CHOSEN.get(key)
    if hit is None or candidates is None or hit in candidates:
        return hit
    return candidates[0]


def choices() -> dict[tuple, dict[str, Any]]:
    """What autotuning chose per shape class, with the measured seconds per candidate."""
    # No lock (another thread may be tuning for seconds under it), so iterate over a copy: dict.copy() is
    # atomic under the GIL, while iterating the live dict raises if another thread adds a choice meanwhile.
    return {k: {"chosen": v, "seconds": dict(_TIMES.get(k, {}))} for k, v in _CHOSEN.copy().items()}


def reset() -> None:
    """Forget every choice (tests; or after changing MEMCORE_AUTOTUNE-sensitive state)."""
    with _LOCK:
        _CHOSEN.clear()
        _TIMES.clear()
