"""Triton kernel of the fused sampler step (CFG, classifier guidance, DDIM/DDPM update, noise; one pass).

Formula and numeric modes: ``memcore/ops/step.py``. The per-step scalars come from the coefficient table row
at the step index held in a device tensor, so a captured CUDA graph serves every step. Parity mode rounds to
the storage dtype after each operation exactly where PyTorch does; the kernel is launched with
``enable_fp_fusion=False`` because PyTorch never fuses a multiply and an add into one FMA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memcore.ops.step import (
    COL_A,
    COL_B,
    COL_DIV,
    COL_KC,
    COL_N,
    COL_NMODE,
    COL_RECIP,
    COL_SA,
    COL_SB,
    F_CFG,
    F_CLIP,
    F_CLS,
    F_DDPM,
    F_FP32,
    F_PRED_SAMPLE,
    F_PRED_V,
    F_RECIP,
    F_RESCALE,
    NCOL,
)

_BLOCK = 1024


@triton.jit
def _bf16_rne(x):
    # float32 -> nearest bfloat16 (ties to even), still held as float32. Done on the bits because the Triton
    # interpreter's float32 -> bfloat16 cast truncates; on the GPU this equals cvt.rn.bf16.f32. NaN stays NaN.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def _r(x, ROUND: tl.constexpr, DT: tl.constexpr):
    # Parity mode: round to the storage dtype after an operation, as PyTorch's per-op kernels do.
    if ROUND:
        if DT == tl.bfloat16:
            return _bf16_rne(x)
        else:
            return x.to(DT).to(tl.float32)
    else:
        return x


@triton.jit
def _step_kernel(
    sample_ptr,
    model_ptr,
    grad_ptr,
    noise_ptr,
    ratio_ptr,
    out_ptr,
    table_ptr,
    step_ptr,
    n,
    chw,
    g,
    gr,
    omgr,
    clip,
    CFG: tl.constexpr,
    RESCALE: tl.constexpr,
    CLS: tl.constexpr,
    PRED: tl.constexpr,  # 0 epsilon, 1 sample, 2 v_prediction
    CLIP: tl.constexpr,
    DDPM: tl.constexpr,
    ROUND: tl.constexpr,
    RECIP: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    NCOLS: tl.constexpr,
    C_SA: tl.constexpr,
    C_SB: tl.constexpr,
    C_DIV: tl.constexpr,
    C_RECIP: tl.constexpr,
    C_A: tl.constexpr,
    C_B: tl.constexpr,
    C_N: tl.constexpr,
    C_NMODE: tl.constexpr,
    C_KC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    step = tl.load(step_ptr)
    row = table_ptr + step * NCOLS
    sa = tl.load(row + C_SA)
    sb = tl.load(row + C_SB)
    a_coef = tl.load(row + C_A)
    b_coef = tl.load(row + C_B)
    nmode = tl.load(row + C_NMODE)

    x = tl.load(sample_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        u = tl.load(model_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(model_ptr + n + offs, mask=mask, other=0.0).to(tl.float32)
        e = _r(u + _r(g * _r(c - u, ROUND, DT), ROUND, DT), ROUND, DT)
        if RESCALE:
            ratio = tl.load(ratio_ptr + offs // chw, mask=mask, other=1.0)
            rs = _r(e * ratio, ROUND, DT)
            e = _r(_r(gr * rs, ROUND, DT) + _r(omgr * e, ROUND, DT), ROUND, DT)
    else:
        e = tl.load(model_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLS:
        kc = tl.load(row + C_KC)
        gx = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = _r(e - _r(kc * gx, ROUND, DT), ROUND, DT)

    if PRED == 2:
        x0 = _r(_r(sa * x, ROUND, DT) - _r(sb * e, ROUND, DT), ROUND, DT)
        eps = _r(_r(sa * e, ROUND, DT) + _r(sb * x, ROUND, DT), ROUND, DT)
    elif PRED == 1:
        x0 = e
        num = _r(x - _r(sa * x0, ROUND, DT), ROUND, DT)
        if RECIP:
            eps = _r(num * tl.load(row + C_RECIP), ROUND, DT)
        else:
            eps = _r(num / tl.load(row + C_DIV), ROUND, DT)
    else:
        num = _r(x - _r(sb * e, ROUND, DT), ROUND, DT)
        if RECIP:
            x0 = _r(num * tl.load(row + C_RECIP), ROUND, DT)
        else:
            x0 = _r(num / tl.load(row + C_DIV), ROUND, DT)
        eps = e
    if CLIP:
        # NaN passes through, as in torch.clamp; the bound is rounded to the storage dtype
        lo = _r(-clip + tl.zeros_like(x0), ROUND, DT)
        hi = _r(clip + tl.zeros_like(x0), ROUND, DT)
        x0 = tl.where(x0 < -clip, lo, tl.where(x0 > clip, hi, x0))
    if DDPM:
        second = x
    else:
        second = eps
    prev = _r(_r(a_coef * x0, ROUND, DT) + _r(b_coef * second, ROUND, DT), ROUND, DT)
    if HAS_NOISE:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ncoef = tl.load(row + C_N)
        with_noise = _r(prev + _r(ncoef * z, ROUND, DT), ROUND, DT)
        prev = tl.where(nmode == 1.0, with_noise, prev)
    # DDPM's final step adds the integer 0 (turns -0 into +0)
    prev = tl.where(nmode == 2.0, prev + 0.0, prev)
    if DT == tl.bfloat16:
        prev = _bf16_rne(prev)  # exact cast below, round-to-nearest-even in the interpreter too
    tl.store(out_ptr + offs, prev.to(DT), mask=mask)


def fused_step_triton(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    grad: torch.Tensor | None,
    noise: torch.Tensor | None,
    ratio: torch.Tensor | None,
    table: torch.Tensor,
    step: torch.Tensor,
    flags: int,
    scalars: list[float],
) -> torch.Tensor:
    """Launch the Triton step. Shapes and meaning as ``memcore.ops.step.fused_step_op``."""
    out = torch.empty_like(sample)
    n = sample.numel()
    if n == 0:
        return out
    if table.device != sample.device or step.device != sample.device:
        raise ValueError("triton fused step: table and step index must be on the tensors' device")
    chw = n // sample.shape[0]
    g, gr, clip = scalars
    if flags & F_PRED_V:
        pred = 2
    elif flags & F_PRED_SAMPLE:
        pred = 1
    else:
        pred = 0
    rounding = not (flags & F_FP32) and sample.dtype in (torch.float16, torch.bfloat16)
    dummy = sample  # never read when the matching flag is off
    grid = (triton.cdiv(n, _BLOCK),)
    _step_kernel[grid](
        sample,
        model_output,
        grad if grad is not None else dummy,
        noise if noise is not None else dummy,
        ratio if ratio is not None else table,
        out,
        table,
        step,
        n,
        chw,
        float(g),
        float(gr),
        1.0 - float(gr),
        float(clip),
        CFG=bool(flags & F_CFG),
        RESCALE=bool(flags & F_RESCALE),
        CLS=bool(flags & F_CLS),
        PRED=pred,
        CLIP=bool(flags & F_CLIP),
        DDPM=bool(flags & F_DDPM),
        ROUND=rounding,
        RECIP=bool(flags & F_RECIP),
        HAS_NOISE=noise is not None,
        NCOLS=NCOL,
        C_SA=COL_SA,
        C_SB=COL_SB,
        C_DIV=COL_DIV,
        C_RECIP=COL_RECIP,
        C_A=COL_A,
        C_B=COL_B,
        C_N=COL_N,
        C_NMODE=COL_NMODE,
        C_KC=COL_KC,
        BLOCK=_BLOCK,
        enable_fp_fusion=False,
    )
    return out
