"""The one table of test tolerances: (family, dtype) -> (rtol, atol) against a float64 reference.

Integer (uint8) paths are exact by construction and use (0, 0). Float paths accumulate in float32;
16-bit inputs are upcast before arithmetic, so their error is the float32 accumulation error only.
"""

from __future__ import annotations

import torch

TOL: dict[tuple[str, torch.dtype], tuple[float, float]] = {
    # distances on the [0, 1] scale; values are O(0.1-1)
    ("distance", torch.uint8): (0.0, 0.0),
    ("distance", torch.float64): (1e-12, 1e-12),
    ("distance", torch.float32): (1e-5, 1e-6),
    ("distance", torch.float16): (1e-5, 1e-6),
    ("distance", torch.bfloat16): (1e-5, 1e-6),
    # Triton tl.dot in tf32 / 16-bit operands (GPU); the interpreter computes in full precision
    ("distance_triton", torch.float32): (2e-3, 2e-4),
    ("distance_triton", torch.float16): (2e-3, 2e-4),
    ("distance_triton", torch.bfloat16): (2e-3, 2e-4),
    ("distance_triton", torch.uint8): (0.0, 0.0),
    # fused sampler step in fp32 mode against diffusers' per-op rounding
    ("step_fp32", torch.float32): (1e-5, 1e-6),
    ("step_fp32", torch.float16): (2e-3, 2e-3),
    ("step_fp32", torch.bfloat16): (1.6e-2, 1.6e-2),
    # sampled images in [0, 1]: fused fp32-mode step against the parity-mode step, a few float32 UNet steps
    ("sample_fp32_vs_parity", torch.float32): (0.0, 1e-4),
    # fused GroupNorm + SiLU against torch.nn.GroupNorm -> SiLU
    ("groupnorm_silu", torch.float32): (1e-4, 1e-5),
    ("groupnorm_silu", torch.float16): (1e-2, 1e-2),
    ("groupnorm_silu", torch.bfloat16): (3e-2, 3e-2),
    # clique statistics (medoid, mean pairwise distance): float64 sums of the given distances
    ("clique", torch.float64): (1e-12, 1e-12),
    ("clique", torch.float32): (1e-6, 1e-7),
}


def tol(family: str, dtype: torch.dtype) -> dict[str, float]:
    """Keyword arguments for ``torch.testing.assert_close``."""
    rtol, atol = TOL[(family, dtype)]
    return {"rtol": rtol, "atol": atol}
