"""NVTX ranges around pipeline stages, so Nsight shows the pipeline; free when no profiler is attached."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

try:  # nvtx is a declared dependency; keep memcore importable if a minimal install lacks it
    import nvtx as _nvtx
except ImportError:  # pragma: no cover
    _nvtx = None

_COLORS = {"unet": "green", "step": "blue", "decode": "purple", "distance": "orange", "clique": "red"}


@contextlib.contextmanager
def stage(name: str, domain: str = "memcore") -> Iterator[None]:
    """``with stage("unet"): ...`` marks one NVTX range (colour by stage name)."""
    if _nvtx is None:
        yield
        return
    with _nvtx.annotate(name, color=_COLORS.get(name.split(":")[0], "gray"), domain=domain):
        yield
