"""Attack-cost model: UNet FLOPs per candidate and the projected cost of a full run (``--dry-run``), and the
short calibration behind ``memcore profile``.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one UNet forward at batch 1 (matmuls
and convolutions; elementwise work is not counted, as is usual for MFU), times the sampler steps, times 2 with
classifier-free guidance, plus one VAE decode per image for latent models. GPU-hours use a measured
throughput (images/s, from ``memcore profile``) when one is given, otherwise the FLOPs at an *assumed*
utilisation of a device peak (default: H100 bf16 dense ~800 TFLOP/s at 50 %), and say which.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

H100_BF16_TFLOPS = 800.0


def _forward_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def unet_flops(model: Any) -> dict[str, int]:
    """FLOPs of one UNet forward at batch 1 and of one decode, for a loaded model.

    Args:
        model: a ``memcore.models.loading.LoadedModel`` (or anything with ``kind``, ``unet``, ``sample_shape``
            or ``image_shape``, optional ``vae``).

    Returns:
        {"unet_forward": F, "decode": D} (D = 0 for pixel models).
    """
    unet = model.unet
    p = next(unet.parameters())
    shape = getattr(model, "sample_shape", None)
    if shape is None:
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
        shape = (cfg.in_channels, *size)
    x = torch.zeros((1, *shape), dtype=p.dtype, device=p.device)
    t = torch.tensor([10], device=p.device)
    kind = model.kind
    if kind == "class_unet":
        fwd = _forward_flops(
            lambda: unet(x, t, class_labels=torch.zeros(1, dtype=torch.long, device=p.device))
        )
    elif kind == "sd_pipeline":
        dim = unet.config.cross_attention_dim
        ctx = torch.zeros((1, 77, dim), dtype=p.dtype, device=p.device)
        fwd = _forward_flops(lambda: unet(x, t, encoder_hidden_states=ctx))
    else:
        fwd = _forward_flops(lambda: unet(x, t))
    dec = 0
    vae = getattr(model, "vae", None)
    if vae is not None:
        dec = _forward_flops(lambda: vae.decode(x.to(next(vae.parameters()).dtype)))
    return {"unet_forward": fwd, "decode": dec}


@dataclasses.dataclass(frozen=True)
class CostProjection:
    """Projected cost of an extraction run."""

    conditions: int
    candidates: int
    steps: int
    cfg: bool
    unet_flops_per_forward: int
    decode_flops_per_image: int
    total_flops: float
    gpu_hours: float
    basis: str  # how gpu_hours was obtained

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        return [
            f"conditions            {self.conditions:,}",
            f"candidates            {self.candidates:,}",
            f"UNet FLOPs / forward  {self.unet_flops_per_forward:.3e} (batch 1)",
            f"forwards / candidate  {self.steps * (2 if self.cfg else 1)} ({self.steps} steps"
            + (", x2 classifier-free guidance)" if self.cfg else ")"),
            f"decode FLOPs / image  {self.decode_flops_per_image:.3e}",
            f"total FLOPs           {self.total_flops:.3e}",
            f"projected GPU-hours   {self.gpu_hours:.4g} ({self.basis})",
        ]


def project(
    flops: dict[str, int],
    *,
    conditions: int,
    per_condition: int,
    steps: int,
    cfg: bool,
    throughput: float | None = None,
    peak_tflops: float = H100_BF16_TFLOPS,
    utilisation: float = 0.5,
    extra_candidates: int = 0,
) -> CostProjection:
    """Turn FLOPs into a projection. ``throughput`` in images/s (measured) wins over the assumed peak."""
    cands = conditions * per_condition + extra_candidates
    per_image = steps * flops["unet_forward"] * (2 if cfg else 1) + flops["decode"]
    total = float(per_image) * cands
    if throughput is not None:
        if throughput <= 0:
            raise ValueError(f"throughput must be > 0 images/s, got {throughput}")
        hours = cands / throughput / 3600
        basis = f"at the measured {throughput:.4g} images/s"
    else:
        if not 0 < utilisation <= 1 or peak_tflops <= 0:
            raise ValueError("peak_tflops must be > 0 and utilisation in (0, 1]")
        hours = total / (peak_tflops * 1e12 * utilisation) / 3600
        basis = f"assumed {utilisation:.0%} of {peak_tflops:g} TFLOP/s; run `memcore profile` to measure"
    return CostProjection(
        conditions, cands, steps, cfg, flops["unet_forward"], flops["decode"], total, hours, basis
    )
