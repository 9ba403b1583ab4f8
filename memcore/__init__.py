"""memcore: a fast engine that audits diffusion models for memorized training data.

Implements the extraction attacks of Carlini et al. 2023 (generate-and-filter with tiled L2 and cliques,
nearest-neighbour extraction), SIDE (surrogate classifier guidance) and membership inference. See README.md.
"""

from __future__ import annotations

from memcore._info import build_info, has_cuda

__version__ = "0.1.0"

__all__ = ["__version__", "build_info", "has_cuda"]
