"""Triton kernel: fused GroupNorm + SiLU, layout aware (NCHW or NHWC / channels_last), float32 statistics.

``y = silu((x - mean_g) * rstd_g * weight_c + bias_c)`` with ``silu(v) = v * sigmoid(v)``; mean and variance
per (sample, group) over the group's ``C / G`` channels and ``H * W`` positions, computed in float32 in two
passes (mean, then the centred sum of squares, as accurate as PyTorch's Welford). Every pass works on
``x - p`` with ``p`` the group's first value (a shifted-data variance): a large common offset (mean / std of
1e3 and more) then costs no precision in the statistics nor in the output, where ``x * scale + shift`` would
cancel two numbers ``mean / std`` times larger than the result; a constant group gives exactly ``silu(bias)``.
In small pixel-space UNets
these memory-bound pairs cost about half as much as the convolutions; fusing them saves the normalised
tensor's write and re-read and one launch.

Two schedules, by layout (the output keeps the input's memory format):

- NCHW: one program per (sample, group), whose channels are one contiguous block of memory; two passes for
  the statistics (mean, centred sum of squares) and one to normalise, activate and store.
- NHWC (channels_last): a group's channels are a few adjacent values in every pixel's row of C, so a
  program per group would read 2-8 useful bytes per 32-byte sector. Instead tiles of [BLOCK_HW pixels,
  BLOCK_C channels] (whole contiguous rows) are read: kernel 1 writes per-tile, per-channel (mean, M2),
  kernel 2 merges them per (sample, group) with Chan et al.'s parallel variance formula, kernel 3 reads the
  same tiles again and writes the output. Two reads and one write of the tensor, all coalesced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scale_shift(
    w_ptr,
    b_ptr,
    ch,
    mask,
    mean,
    rstd,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-channel ``y = x * scale + shift`` folding the normalisation and the affine weight/bias."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + ch, mask=mask, other=1.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_C,), tl.float32)
    scale = w * rstd
    return scale, b - mean * scale


@triton.jit
def _silu_store(x_ptr, out_ptr, off, m, pivot, scale, shift):
    """Load x, apply the folded normalisation (of ``x - pivot``) and SiLU in float32, store in the output dtype."""
    v = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - pivot) * scale[None, :] + shift[None, :]
    tl.store(out_ptr + off, (v / (1.0 + tl.exp(-v))).to(out_ptr.dtype.element_ty), mask=m)


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
    pivot = tl.load(x_ptr + base).to(tl.float32)

    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        offs_hw = start + tl.arange(0, BLOCK_HW)
        m = (offs_hw[:, None] < HW) & mask_c[None, :]
        ptrs = (
            x_ptr + base + offs_hw[:, None].to(tl.int64) * stride_hw + offs_c[None, :].to(tl.int64) * stride_c
        )
        acc += tl.where(m, tl.load(ptrs, mask=m, other=0.0).to(tl.float32) - pivot, 0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count  # of x - pivot

    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        offs_hw = start + tl.arange(0, BLOCK_HW)
        m = (offs_hw[:, None] < HW) & mask_c[None, :]
        ptrs = (
            x_ptr + base + offs_hw[:, None].to(tl.int64) * stride_hw + offs_c[None, :].to(tl.int64) * stride_c
        )
        d = (tl.load(ptrs, mask=m, other=0.0).to(tl.float32) - pivot) - mean
        acc += tl.where(m, d * d, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / count
    rstd = 1.0 / tl.sqrt(var + eps)

    ch = g * CPG + offs_c
    scale, shift = _scale_shift(w_ptr, b_ptr, ch, mask_c, mean, rstd, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    for start in range(0, HW, BLOCK_HW):
        offs_hw = start + tl.arange(0, BLOCK_HW)
        m = (offs_hw[:, None] < HW) & mask_c[None, :]
        off = base + offs_hw[:, None].to(tl.int64) * stride_hw + offs_c[None, :].to(tl.int64) * stride_c
        _silu_store(x_ptr, out_ptr, off, m, pivot, scale, shift)


@triton.jit
def _nhwc_partial_kernel(
    x_ptr, pmean_ptr, pm2_ptr, HW, C, CPG, n_tiles, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr
):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    cblk = tl.program_id(2)
    rows = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    mrow = rows < HW
    m = mrow[:, None] & (cols[None, :] < C)
    off = n.to(tl.int64) * HW * C + rows[:, None].to(tl.int64) * C + cols[None, :]
    # each column's group pivot: the group's first channel at pixel 0
    pivot = tl.load(x_ptr + n.to(tl.int64) * HW * C + (cols // CPG) * CPG, mask=cols < C, other=0.0)
    v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - pivot.to(tl.float32)[None, :]
    count = tl.minimum(HW - tile * BLOCK_HW, BLOCK_HW).to(tl.float32)
    mean = tl.sum(tl.where(m, v, 0.0), axis=0) / count
    d = tl.where(m, v - mean[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    poff = (n.to(tl.int64) * n_tiles + tile) * C + cols
    tl.store(pmean_ptr + poff, mean, mask=cols < C)
    tl.store(pm2_ptr + poff, m2, mask=cols < C)


@triton.jit
def _nhwc_stats_kernel(
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    rstd_ptr,
    HW,
    C,
    CPG,
    G,
    n_tiles,
    eps,
    TILE_HW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_CPG: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    cc = tl.arange(0, BLOCK_CPG)
    mc = cc < CPG
    total = (HW * CPG).to(tl.float32)
    # pass 1: the group mean, each tile-channel entry weighted by its pixel count
    acc = tl.zeros((BLOCK_T, BLOCK_CPG), dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = (t[:, None] < n_tiles) & mc[None, :]
        cnt = tl.minimum(HW - t * TILE_HW, TILE_HW).to(tl.float32)
        off = (n.to(tl.int64) * n_tiles + t[:, None]) * C + g * CPG + cc[None, :]
        acc += tl.where(m, tl.load(pmean_ptr + off, mask=m, other=0.0) * cnt[:, None], 0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    # pass 2: M2 = sum of the entries' M2 + count * (entry mean - group mean)^2 (Chan et al.)
    acc = tl.zeros((BLOCK_T, BLOCK_CPG), dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = (t[:, None] < n_tiles) & mc[None, :]
        cnt = tl.minimum(HW - t * TILE_HW, TILE_HW).to(tl.float32)
        off = (n.to(tl.int64) * n_tiles + t[:, None]) * C + g * CPG + cc[None, :]
        dm = tl.load(pmean_ptr + off, mask=m, other=0.0) - mean
        acc += tl.where(m, tl.load(pm2_ptr + off, mask=m, other=0.0) + cnt[:, None] * dm * dm, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _nhwc_apply_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    out_ptr,
    HW,
    C,
    CPG,
    G,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    cblk = tl.program_id(2)
    rows = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    mcol = cols < C
    m = (rows[:, None] < HW) & mcol[None, :]
    grp = n * G + cols // CPG
    mean = tl.load(mean_ptr + grp, mask=mcol, other=0.0)
    rstd = tl.load(rstd_ptr + grp, mask=mcol, other=0.0)
    scale, shift = _scale_shift(w_ptr, b_ptr, cols, mcol, mean, rstd, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    pivot = tl.load(x_ptr + n.to(tl.int64) * HW * C + (cols // CPG) * CPG, mask=mcol, other=0.0)
    off = n.to(tl.int64) * HW * C + rows[:, None].to(tl.int64) * C + cols[None, :]
    _silu_store(x_ptr, out_ptr, off, m, pivot.to(tl.float32)[None, :], scale, shift)


def nhwc_blocks(hw: int, c: int, cpg: int) -> tuple[int, int, int, int]:
    """(BLOCK_HW, BLOCK_C, num_warps) of the NHWC partial/apply kernels and BLOCK_T of the stats kernel."""
    block_c = min(triton.next_power_of_2(c), 256)
    block_hw = max(1, min(triton.next_power_of_2(hw), 8192 // block_c))
    n_tiles = triton.cdiv(hw, block_hw)
    block_t = max(1, min(triton.next_power_of_2(n_tiles), 2048 // triton.next_power_of_2(cpg)))
    return block_hw, block_c, 8 if block_hw * block_c >= 4096 else 4, block_t


def nchw_blocks(hw: int, cpg: int) -> tuple[int, int, int]:
    """(BLOCK_HW, BLOCK_C, num_warps) of the NCHW kernel."""
    block_c = triton.next_power_of_2(cpg)
    # ~4K elements per tile: enough loads in flight per program without spilling registers
    block_hw = max(16, min(triton.next_power_of_2(hw), max(1, 4096 // block_c)))
    return block_hw, block_c, 4 if block_hw * block_c <= 2048 else 8


def _groupnorm_silu_nhwc(x, num_groups, weight, bias, eps, out):
    n, c, h, w = x.shape
    hw = h * w
    cpg = c // num_groups
    block_hw, block_c, warps, block_t = nhwc_blocks(hw, c, cpg)
    n_tiles = triton.cdiv(hw, block_hw)
    n_cblk = triton.cdiv(c, block_c)
    pmean = torch.empty((n, n_tiles, c), device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _nhwc_partial_kernel[(n, n_tiles, n_cblk)](
        x, pmean, pm2, hw, c, cpg, n_tiles, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=warps
    )
    block_cpg = triton.next_power_of_2(cpg)
    _nhwc_stats_kernel[(n * num_groups,)](
        pmean,
        pm2,
        mean,
        rstd,
        hw,
        c,
        cpg,
        num_groups,
        n_tiles,
        float(eps),
        TILE_HW=block_hw,
        BLOCK_T=block_t,
        BLOCK_CPG=block_cpg,
    )
    _nhwc_apply_kernel[(n, n_tiles, n_cblk)](
        x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        mean,
        rstd,
        out,
        hw,
        c,
        cpg,
        num_groups,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_HW=block_hw,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return out


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
        if x.numel() == 0:
            return out
        return _groupnorm_silu_nhwc(x, num_groups, weight, bias, eps, out)
    else:
        x = x.contiguous()
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        stride_c, stride_hw = h * w, 1
    if x.numel() == 0:
        return out
    cpg = c // num_groups
    hw = h * w
    block_hw, block_c, warps = nchw_blocks(hw, cpg)
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
        num_warps=warps,
    )
    return out
