"""Triton kernel: fused GroupNorm + SiLU, layout aware (NCHW or NHWC / channels_last), float32 statistics.

``y = silu((x - mean_g) * rstd_g * weight_c + bias_c)`` with ``silu(v) = v * sigmoid(v)``; mean and variance
per (sample, group) over the group's ``C / G`` channels and ``H * W`` positions, computed in float32 in two
passes (mean, then the centred sum of squares, as accurate as PyTorch's Welford). In small pixel-space UNets
these memory-bound pairs cost about half as much as the convolutions; fusing them saves the normalised
tensor's write and re-read and one launch.

One program per (sample, group). The group is walked as a [BLOCK_HW, BLOCK_C] tile through (stride_hw,
stride_c), which covers both layouts: NCHW (stride_c = H*W, stride_hw = 1) and channels_last (stride_c = 1,
stride_hw = C, the channel tile is contiguous). The output has the input's strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _groupnorm_silu_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    HW,
    C,
    CPG,
    G,
    stride_n,
    stride_c,
    stride_hw,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CPG
    count = HW * CPG

    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        offs_hw = start + tl.arange(0, BLOCK_HW)
        m = (offs_hw[:, None] < HW) & mask_c[None, :]
        ptrs = (
            x_ptr + base + offs_hw[:, None].to(tl.int64) * stride_hw + offs_c[None, :].to(tl.int64) * stride_c
        )
        acc += tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count

    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        offs_hw = start + tl.arange(0, BLOCK_HW)
        m = (offs_hw[:, None] < HW) & mask_c[None, :]
        ptrs = (
            x_ptr + base + offs_hw[:, None].to(tl.int64) * stride_hw + offs_c[None, :].to(tl.int64) * stride_c
        )
        d = tl.load(ptrs, mask=m, other=0.0).to(tl.float32) - mean
        acc += tl.where(m, d * d, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / count
    rstd = 1.0 / tl.sqrt(var + eps)

    ch = g * CPG + offs_c
    if HAS_WEIGHT:
        w = tl.load(w_ptr + ch, mask=mask_c, other=1.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_C,), tl.float32)
    scale = w * rstd
    shift = b - mean * scale
    for start in range(0, HW, BLOCK_HW):
        offs_hw = start + tl.arange(0, BLOCK_HW)
        m = (offs_hw[:, None] < HW) & mask_c[None, :]
        off = base + offs_hw[:, None].to(tl.int64) * stride_hw + offs_c[None, :].to(tl.int64) * stride_c
        v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
        y = v / (1.0 + tl.exp(-v))
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


def groupnorm_silu_triton(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Launch the kernel. x: [N, C, H, W] contiguous or channels_last; weight, bias: [C] or None.

    Returns:
        [N, C, H, W] in x's dtype and memory format.
    """
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last:
        out = torch.empty_like(x, memory_format=torch.channels_last)
        stride_c, stride_hw = 1, c
    else:
        x = x.contiguous()
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        stride_c, stride_hw = h * w, 1
    if x.numel() == 0:
        return out
    cpg = c // num_groups
    hw = h * w
    block_c = triton.next_power_of_2(cpg)
    # ~4K elements per tile: enough loads in flight per program without spilling registers
    block_hw = max(16, min(triton.next_power_of_2(hw), max(1, 4096 // block_c)))
    grid = (n * num_groups,)
    _groupnorm_silu_kernel[grid](
        x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        out,
        hw,
        c,
        cpg,
        num_groups,
        c * hw,
        stride_c,
        stride_hw,
        float(eps),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_HW=block_hw,
        BLOCK_C=block_c,
        num_warps=4 if block_hw * block_c <= 2048 else 8,
    )
    return out
