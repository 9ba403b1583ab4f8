"""memcore: a fast engine that audits diffusion models for memorized training data.

Implements the extraction attacks of Carlini et al. 2023 (generate-and-filter with tiled L2 and cliques,
nearest-neighbour extraction); SIDE (surrogate classifier guidance) and membership inference are not built yet
(the fused step already takes SIDE's classifier-guidance term). See README.md.

Public API (SPEC §7): ``memcore.distance`` (l2, tiled_l2, knn, tiled_l2_graph), ``memcore.graph``
(max_clique, ...), ``memcore.sample`` / ``memcore.stream``, ``memcore.extract`` / ``memcore.iter_extract``.
Submodules that pull in diffusers load lazily, so ``import memcore`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from memcore._info import build_info, has_cuda

__version__ = "0.1.0"

_LAZY_ATTRS = {
    "sample": ("memcore.sampling", "sample"),
    "stream": ("memcore.sampling", "stream"),
    "extract": ("memcore.attacks.carlini", "extract"),
    "iter_extract": ("memcore.attacks.carlini", "iter_extract"),
    "extraction_sampler": ("memcore.attacks.carlini", "extraction_sampler"),
    "extraction_training_set": ("memcore.attacks.carlini", "extraction_training_set"),
}
_SUBMODULES = (
    "attacks",
    "distance",
    "graph",
    "io",
    "metrics",
    "models",
    "ops",
    "reference",
    "report",
    "sampling",
)

__all__ = ["__version__", "build_info", "has_cuda", *_LAZY_ATTRS, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"memcore.{name}")
    raise AttributeError(f"module 'memcore' has no attribute {name!r}")
