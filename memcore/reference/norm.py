"""Reference GroupNorm + SiLU: ``torch.nn.functional.group_norm`` then SiLU (what diffusers' blocks run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def groupnorm_silu(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``silu(group_norm(x))`` unfused.

    Args:
        x: [N, C, H, W] any float dtype / memory format.
        num_groups: G, dividing C.
        weight: [C] or None.
        bias: [C] or None.
        eps: added to the variance.

    Returns:
        [N, C, H, W] in x's dtype.
    """
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))
