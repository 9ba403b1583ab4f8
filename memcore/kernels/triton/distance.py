"""Triton kernels for normalized / tiled L2 ([C23] §4.2): per-tile Gram products and a fused epilogue.

Every kernel multiplies one grid tile of two image sets with ``tl.dot`` (``_gram``), reading the tile in one
of two layouts (``_tile_base`` / ``_k_offset``; both walk a tile's D = C·th·tw values in (c, y, x) order):

- **packed**: ``[T, N, D]`` tile-major, made by one PyTorch copy (``_pack``) that also shifts uint8 to int8
  ``x − 128`` (differences are unchanged; int8 ``tl.dot`` with int32 accumulation is exact). The k-NN
  kernels and the general pairwise path use it; floats are packed as float32 and multiplied with
  ``input_precision="tf32x3"`` (≈ fp32 accuracy) on the GPU.
- **nchw**: the caller's ``[N, C, H, W]`` uint8 images read in place (no copy): a K step of BK values never
  straddles a tile row (BK divides tw), so one scalar offset addresses it, and the shift to int8 is an XOR
  on the loaded registers (or on a one-pass int8 copy: the "nchw-i8" configurations).

Pairwise and cross matrices (``_pair_kernel``, one program per (row block, column block, tile, K split)) have
two epilogues:

1. **smax** (any dtype): ``S_t = ‖a_t‖² + ‖b_t‖² − 2 G_t`` from precomputed per-tile squared norms, then
   ``atomic_max`` into ``smax [N, M]`` (the maximum over tiles at the same grid position; one K split).
   uint8 sums are split into segments of at most 2^16 products (int32 never overflows) added in int64.
2. **gram** (uint8, D <= 2^16, a bounded buffer): each K split stores its int32 partial Gram block into
   ``G [splits, T, N, M]`` (plain stores: no atomics, no zero fill), so a pairwise call on a few hundred
   large images still fills the device; the epilogue sums the splits exactly. Pairwise norms are G's
   diagonal.

Pairwise calls skip blocks below the diagonal. ``_finish_kernel`` then turns S (read from smax, or from G and
the norms, maximised over tiles) into ``d = sqrt(S / n)`` — for uint8 exactly
``float32(sqrt(float64(S) / (255²·n)))`` with IEEE division and square root, bit-identical to the reference
— and writes either the float32 matrix or, for the graph, one uint64 word per (row, 64 columns): bit j set
iff ``d <= float32(alpha)``. Pairwise results read S from the upper triangle, so they are exactly symmetric.

Which layout, epilogue and block shape runs is a launch configuration (``PAIR_CONFIGS``): every one computes
the same integers for uint8, so on CUDA the fastest is picked on first use per shape class by
``memcore.ops._tune`` (as ``backend="auto"`` picks backends); floats always run the first.
"""

from __future__ import annotations

import math
import weakref

import torch
import triton
import triton.language as tl

# Rows per program of the finishing kernel and of the fused k-NN; K step of the fused k-NN and the group
# minima (the pairwise and filter kernels take theirs from PAIR_CONFIGS / FILTER_CONFIGS).
BLOCK_M = 64
BLOCK_K = 64
# int8 products are at most 128² = 2^14 in magnitude: 2^16 of them stay below 2^31 in an int32 accumulator.
INT_SEGMENT = 65536  # a multiple of BLOCK_K


# --------------------------------------------------------------------------------------- tile addressing


@triton.jit
def _tile_base(ptr, idx, count, t, D, H, W, TH, TW, GW, PACKED: tl.constexpr):
    """Pointers to value 0 of tile ``t`` of the images ``idx`` (of ``count``): packed ``[T, count, D]``, or
    ``[count, C, H, W]`` (an image is T·D values; tile t = (t // GW, t % GW) starts at row gy·TH, col gx·TW)."""
    t64 = tl.zeros((), dtype=tl.int64) + t  # int64 offsets (a plain int in the interpreter)
    if PACKED:
        return ptr + t64 * count * D + idx.to(tl.int64) * D
    gy = t64 // GW
    return ptr + idx.to(tl.int64) * (D * (H // TH) * (W // TW)) + gy * TH * W + (t64 - gy * GW) * TW


@triton.jit
def _k_offset(k0, H, W, TH, TW, PACKED: tl.constexpr):
    """Offset of tile value ``k0`` (the start of a K step) from the tile's value 0. nchw: k0 = (c·TH + y)·TW
    + x with the whole step inside row (c, y) (BK divides TW), so the step's values are contiguous."""
    if PACKED:
        return k0
    r = k0 // TW
    c = r // TH
    return c * H * W + (r - c * TH) * W + (k0 - r * TW)


@triton.jit
def _load_i8(ptrs, mask, SHIFT: tl.constexpr):
    """int8 operands ``x − 128``: packed data is stored shifted; raw uint8 (SHIFT) flips the top bit here.
    Masked lanes contribute nothing to products only when they load 0 (packed K tails); nchw steps are never
    masked along K, and masked rows / columns are never stored."""
    if SHIFT:
        v = tl.load(ptrs, mask=mask, other=0x80)
        v = (v ^ 0x80).to(tl.uint8).to(tl.int8, bitcast=True)
    else:
        v = tl.load(ptrs, mask=mask, other=0)
    return v


@triton.jit
def _gram(
    a_base,  # [BM] pointers to value 0 of the tile (``_tile_base``)
    b_base,  # [BN]
    rmask,
    cmask,
    k_lo,
    k_hi,  # values [k_lo, k_hi) of the tile; nchw: row-aligned multiples of BK
    H,
    W,
    TH,
    TW,
    IS_INT: tl.constexpr,
    SHIFT: tl.constexpr,
    PACKED: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial Gram block ``A_t[:, k_lo:k_hi] B_t[:, k_lo:k_hi]ᵀ`` -> [BM, BN] int32 (uint8; exact while
    k_hi − k_lo <= INT_SEGMENT) or float32."""
    ks = tl.arange(0, BK)
    if IS_INT:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        off = _k_offset(k0, H, W, TH, TW, PACKED) + ks
        if PACKED:
            kin = (k0 + ks) < k_hi
        else:
            kin = ks < BK
        am = rmask[:, None] & kin[None, :]
        bm = cmask[None, :] & kin[:, None]
        if IS_INT:
            a = _load_i8(a_base[:, None] + off[None, :], am, SHIFT)
            b = _load_i8(b_base[None, :] + off[:, None], bm, SHIFT)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            a = tl.load(a_base[:, None] + off[None, :], mask=am, other=0.0)
            b = tl.load(b_base[None, :] + off[:, None], mask=bm, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _norms_kernel(
    x_ptr,  # packed [T, N, D] or [N, C, H, W]
    out_ptr,  # [T, N] int64 (uint8: of x − 128) / float32
    N,
    D,
    H,
    W,
    TH,
    TW,
    GW,
    IS_INT: tl.constexpr,
    SHIFT: tl.constexpr,
    PACKED: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Per-tile squared norms, as ``_gram`` sees the values (one program per BN images and tile)."""
    idx = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.program_id(1)
    m = idx < N
    base = _tile_base(x_ptr, idx, N, t, D, H, W, TH, TW, GW, PACKED)
    ks = tl.arange(0, BK)
    if IS_INT:
        acc = tl.zeros((BN, BK), dtype=tl.int64)
    else:
        acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, D, BK):
        off = _k_offset(k0, H, W, TH, TW, PACKED) + ks
        mask = m[:, None] & ((k0 + ks) < D)[None, :]
        if IS_INT:
            v = _load_i8(base[:, None] + off[None, :], mask, SHIFT).to(tl.int64)
            acc += tl.where(mask, v * v, 0)
        else:
            v = tl.load(base[:, None] + off[None, :], mask=mask, other=0.0)
            acc += v * v
    t64 = tl.zeros((), dtype=tl.int64) + t
    tl.store(out_ptr + t64 * N + idx, tl.sum(acc, axis=1), mask=m)


def _norms(
    x: torch.Tensor, d: int, grid: tuple[int, int], packed: bool, shift: bool, bk: int
) -> torch.Tensor:
    """[T, N] per-tile squared norms of packed ``x`` ([T, N, D]) or of raw images (``[N, C, H, W]``, BK
    dividing the tile width)."""
    t = grid[0] * grid[1]
    n = x.shape[1] if packed else x.shape[0]
    is_int = x.dtype in (torch.int8, torch.uint8)
    out = torch.empty((t, n), dtype=torch.int64 if is_int else torch.float32, device=x.device)
    h, w = (1, 1) if packed else x.shape[2:]
    if n and t:
        _norms_kernel[(triton.cdiv(n, 32), t)](
            x, out, n, d, h, w, h // grid[0], w // grid[1], grid[1],
            IS_INT=is_int, SHIFT=shift, PACKED=packed, BN=32, BK=bk,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------- pairwise and cross


@triton.jit
def _pair_kernel(
    a_ptr,  # packed [T, N, D] (int8 / float32) or [N, C, H, W] (uint8 raw, or int8 x − 128)
    b_ptr,  # same layout, M images
    an_ptr,  # [T, N] squared norms (smax epilogue only)
    bn_ptr,  # [T, M]
    out_ptr,  # smax: [N, M] int64 / float32, zero-initialised; gram: [splits, T, N, M] int32
    N,
    M,
    D,
    T,
    H,
    W,
    TH,
    TW,
    GW,
    per_split,  # tile values per K split (gram; the whole tile for smax)
    IS_INT: tl.constexpr,
    SHIFT: tl.constexpr,
    PACKED: tl.constexpr,
    GRAM: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    SEGMENT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,  # smax: BM·M >= 2^31, so the output's offsets need int64
):
    # One axis (no 65535 limit): row blocks fastest, then column blocks, tiles, K splits, so the programs in
    # flight read the same K range of the same tile of every image (a few MB, L2-resident).
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BM)
    col_blocks = tl.cdiv(M, BN)
    pid_m = pid % row_blocks
    rest = pid // row_blocks
    pid_n = rest % col_blocks
    rest = rest // col_blocks
    t = rest % T
    split = rest // T
    # Blocks with every column below every row (lower triangle) compute nothing and store nothing: an empty
    # K range and no rows, rather than an early return, which held 255 registers (and spills) against 165 for
    # the same kernel without it (nchw 128x128, sm_90).
    if SYMMETRIC:
        live = (pid_n + 1) * BN > pid_m * BM
    else:
        live = pid_n >= 0  # a scalar tensor either way (the interpreter masks with it)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < tl.where(live, N, 0)
    cmask = cols < M
    omask = rmask[:, None] & cmask[None, :]
    d_live = tl.where(live, D, 0)
    a_base = _tile_base(a_ptr, rows, N, t, D, H, W, TH, TW, GW, PACKED)
    b_base = _tile_base(b_ptr, cols, M, t, D, H, W, TH, TW, GW, PACKED)
    t64 = tl.zeros((), dtype=tl.int64) + t
    if GRAM:
        k_lo = split * per_split
        k_hi = tl.minimum(d_live, k_lo + per_split)
        g = _gram(a_base, b_base, rmask, cmask, k_lo, k_hi, H, W, TH, TW,
                  IS_INT, SHIFT, PACKED, BM, BN, BK, PRECISION)  # fmt: skip
        # int32 offsets (the buffer holds at most GRAM_MAX_BYTES / 4 < 2^31 values): int64 ones made this
        # [BM, BN] store the kernel's register peak (254 registers and spills for 128x128 on sm_90; 119 now)
        plane = split * T + t
        tl.store(out_ptr + ((plane * N + rows[:, None]) * M + cols[None, :]), g, mask=omask)
    else:
        na = tl.load(an_ptr + t64 * N + rows, mask=rmask, other=0)
        nb = tl.load(bn_ptr + t64 * M + cols, mask=cmask, other=0)
        if IS_INT:
            g64 = tl.zeros((BM, BN), dtype=tl.int64)
            for s0 in range(0, d_live, SEGMENT):
                part = _gram(a_base, b_base, rmask, cmask, s0, tl.minimum(s0 + SEGMENT, D), H, W, TH, TW,
                             IS_INT, SHIFT, PACKED, BM, BN, BK, PRECISION)  # fmt: skip
                g64 += part.to(tl.int64)
            s = na[:, None] + nb[None, :] - 2 * g64
        else:
            g = _gram(a_base, b_base, rmask, cmask, 0, d_live, H, W, TH, TW,
                      IS_INT, SHIFT, PACKED, BM, BN, BK, PRECISION)  # fmt: skip
            # NaN propagates (a NaN input is NaN, never a match, as on every backend): the default drops it.
            # abs clears a NaN's sign bit (inf − inf and sign-bit NaN inputs make one on x86 / the
            # interpreter): the float atomic_max sends sign-bit values to an unsigned min, which drops them.
            s = tl.abs(
                tl.maximum(na[:, None] + nb[None, :] - 2.0 * g, 0.0, propagate_nan=tl.PropagateNan.ALL)
            )
        # int32 offsets from the block's first row unless BM·M >= 2^31 (WIDE): [BM, BN] int64 addresses made
        # this the register peak (255 registers and 128 B of spills for 64x64 at Triton 3.6)
        blk = out_ptr + (pid_m * BM).to(tl.int64) * M
        local = rows - pid_m * BM
        if WIDE:
            local = local.to(tl.int64)
        tl.atomic_max(blk + (local[:, None] * M + cols[None, :]), s, mask=omask)


@triton.jit
def _distance(s, n_tile, scale, IS_INT: tl.constexpr):
    """S (max over tiles of the summed squared differences) -> the float32 normalized distance.

    uint8: exact, ``float32(sqrt(float64(S) / (255²·n)))`` — S is an integer below 2^53, one IEEE division and
    one IEEE square root in float64 (div.rn.f64, sqrt.rn.f64 in PTX), bit-identical to the reference.
    """
    if IS_INT:
        d = tl.sqrt(s.to(tl.float64) / (n_tile.to(tl.float64) * 65025.0)).to(tl.float32)
    else:
        d = tl.sqrt_rn(tl.div_rn(s, n_tile.to(tl.float32))) * scale
    return d


@triton.jit
def _finish_kernel(
    s_ptr,  # smax [N, M]; or, with GRAM, G [SPLITS, T, N, M] int32 partial Gram products
    an_ptr,  # GRAM: [T, N] squared norms (int64 or int32)
    bn_ptr,  # GRAM: [T, M]
    out_ptr,  # [N, M] float32, or [N, ceil(M/64)] int64 words when GRAPH
    N,
    M,
    W,  # words per row
    T,
    SPLITS,  # GRAM: K splits to sum
    n_tile,  # int: values per tile (float scalars would reach the GPU kernel as float32)
    scale,  # float32 factor on float distances
    alpha,  # float32 threshold
    IS_INT: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    GRAPH: tl.constexpr,
    GRAM: tl.constexpr,
    BM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * 64 + tl.arange(0, 64)
    rmask = rows < N
    cmask = cols < M
    valid = rmask[:, None] & cmask[None, :]
    r2 = rows[:, None] + 0 * cols[None, :]
    c2 = cols[None, :] + 0 * rows[:, None]
    if SYMMETRIC:
        lo = tl.minimum(r2, c2)
        hi = tl.maximum(r2, c2)
    else:
        lo = r2
        hi = c2
    if GRAM:  # S = max over tiles of ‖a_t‖² + ‖b_t‖² − 2 G_t, in int64 (S reaches 255²·D)
        # G_t and every partial sum of its splits stay within 2^14·D <= 2^30: int32. Offsets are int32 too (G
        # holds at most GRAM_MAX_BYTES / 4 < 2^31 values): with int64 ones this loop spilled 560 B per thread.
        s = tl.zeros((BM, 64), dtype=tl.int64)
        for t in range(0, T):
            g = tl.zeros((BM, 64), dtype=tl.int32)
            for sp in range(0, SPLITS):
                g += tl.load(s_ptr + (((sp * T + t) * N + lo) * M + hi), mask=valid, other=0)
            na = tl.load(an_ptr + (t * N + lo), mask=valid, other=0).to(tl.int64)
            nb = tl.load(bn_ptr + (t * M + hi), mask=valid, other=0).to(tl.int64)
            s = tl.maximum(s, na + nb - 2 * g.to(tl.int64))
    else:
        s = tl.load(s_ptr + lo.to(tl.int64) * M + hi, mask=valid, other=0)
    d = _distance(s, n_tile, scale, IS_INT)
    if SYMMETRIC:
        d = tl.where(r2 == c2, 0.0, d)
    if GRAPH:
        hit = (d <= alpha) & valid
        if SYMMETRIC:
            hit = hit & (r2 != c2)
        shifts = tl.arange(0, 64).to(tl.int64)
        # Distinct powers of two: the sum is the bitwise OR of the row's 64 bits (bit 63 is the sign bit).
        word = tl.sum(hit.to(tl.int64) << shifts[None, :], axis=1)
        tl.store(out_ptr + rows.to(tl.int64) * W + pid_n, word, mask=rmask)
    else:
        tl.store(out_ptr + r2.to(tl.int64) * M + c2, d, mask=valid)


def _pack(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[N, C, H, W] -> [T, N, D] tile-major; uint8 -> int8 ``x − 128``, floats -> float32.

    The shift happens here, once per image, not in the kernels' inner loops: there it cost as many
    instructions per K step as the int8 ``tl.dot`` itself on 64×64 blocks and kept operands out of the
    async-copy pipeline. One pass: the shift (or the float32 conversion) writes straight into the tile-major
    output. The kernels mask the K tail, so no padding is needed."""
    n, c, h, w = x.shape
    gh, gw = grid
    th, tw = h // gh, w // gw
    is_int = x.dtype == torch.uint8
    src = (x.view(torch.int8) if is_int else x).reshape(n, c, gh, th, gw, tw).permute(2, 4, 0, 1, 3, 5)
    out = torch.empty((gh, gw, n, c, th, tw), dtype=torch.int8 if is_int else torch.float32, device=x.device)
    if is_int:
        # x − 128 as int8 is x's bit pattern with the top bit flipped (differences are unchanged)
        torch.bitwise_xor(src, -128, out=out)
    else:
        out.copy_(src)
    return out.view(gh * gw, n, c * th * tw)


#: Pairwise / cross launch configurations, name -> (layout, BM, BN, BK, num_warps, num_stages, waves):
#: - "packed": smax epilogue over ``_pack``ed tiles, one program per (block pair, tile) — any dtype, any grid
#:   (the first, the default; floats always run it);
#: - "packed-gram", "nchw", "nchw-i8": gram epilogue with K splits, enough for ``waves`` programs per SM —
#:   over packed tiles, the raw uint8 images (top bit flipped in registers), or a one-pass int8 copy of them.
#: uint8 on CUDA picks the fastest eligible one per shape class (they all compute the same integers). None
#: spills on sm_90 (Triton 3.6 or 3.9); packed-gram 128x128x128 and nchw-i8 (112-120 registers) fit two CTAs
#: per SM, which is what overlaps one CTA's int8 MMAs (never asynchronous in Triton) with the other's loads;
#: BK 256 instead halves the MMA waits.
PAIR_CONFIGS: dict[str, tuple[str, int, int, int, int, int, int]] = {
    "packed/64x64x64/w4s3": ("packed", 64, 64, 64, 4, 3, 0),
    "packed-gram/128x128x128/w8s3": ("packed-gram", 128, 128, 128, 8, 3, 4),
    "packed-gram/128x128x256/w8s2": ("packed-gram", 128, 128, 256, 8, 2, 4),
    "nchw/128x128x128/w8s3": ("nchw", 128, 128, 128, 8, 3, 4),
    "nchw/128x128x64/w4s4": ("nchw", 128, 128, 64, 4, 4, 4),
    "nchw/128x256x128/w8s3": ("nchw", 128, 256, 128, 8, 3, 4),
    "nchw-i8/128x128x128/w8s3": ("nchw-i8", 128, 128, 128, 8, 3, 4),
}
#: The smax epilogue addresses its output with int32 offsets from a block's first row while BM·M is below this.
INT32_OFFSETS = 2**31
#: Largest gram buffer [splits, T, N, M] int32, bytes: it caps the K splits, and calls that do not fit one
#: split run "packed" (whose buffer is N·M·8 bytes). Below 2^33, so the kernel's int32 offsets into it hold.
GRAM_MAX_BYTES = 256 << 20
#: Device types whose uint8 launches are tuned among the configurations (tests add "cpu").
TUNE_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def _sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (4 stand-ins for the interpreter's CPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _pair_configs(a: torch.Tensor, m: int, grid: tuple[int, int]) -> list[str]:
    """The configurations that can run this call, in PAIR_CONFIGS order (the first always can)."""
    n, c, h, w = a.shape
    tw = w // grid[1]
    d = c * (h // grid[0]) * tw
    gram_ok = a.dtype == torch.uint8 and d <= INT_SEGMENT and grid[0] * grid[1] * n * m * 4 <= GRAM_MAX_BYTES
    out = []
    for name, (layout, _bm, _bn, bk, *_rest) in PAIR_CONFIGS.items():
        if layout == "packed" or (gram_ok and (layout == "packed-gram" or tw % bk == 0)):
            out.append(name)
    return out


def _block_pairs(row_blocks: int, col_blocks: int, bm: int, bn: int, symmetric: bool) -> int:
    """Block pairs ``_pair_kernel`` computes (pairwise calls skip the blocks below the diagonal)."""
    if not symmetric:
        return row_blocks * col_blocks
    return sum(max(0, col_blocks - (pm * bm) // bn) for pm in range(row_blocks))


def _pair_s(
    a: torch.Tensor, b: torch.Tensor | None, grid: tuple[int, int], config: str
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, int]:
    """Run ``_pair_kernel`` with one configuration -> (smax [N, M], None, D) or (G [splits, T, N, M] int32,
    (norms of a [T, N], norms of b [T, M]), D)."""
    layout, blk_m, blk_n, bk, warps, stages, waves = PAIR_CONFIGS[config]
    n, c, h, w = a.shape
    m = n if b is None else b.shape[0]
    gh, gw = grid
    th, tw = h // gh, w // gw
    d = c * th * tw
    tiles = gh * gw
    is_int = a.dtype == torch.uint8
    gram = layout != "packed"
    packed = layout.startswith("packed")
    shift = layout == "nchw"
    dev = a.device
    if packed:
        xa = _pack(a, grid)
        xb = xa if b is None else _pack(b, grid)
    elif layout == "nchw-i8":  # the shift as one elementwise pass: the kernel's loads feed tl.dot as they are
        xa = torch.bitwise_xor(a.view(torch.int8), -128)
        xb = xa if b is None else torch.bitwise_xor(b.view(torch.int8), -128)
    else:
        xa, xb = a, (a if b is None else b)
    norms = None
    if not gram or b is not None:  # pairwise gram reads its norms from G's diagonal instead
        nbk = 64 if packed else bk  # raw images: K steps that divide the tile width, as the product's
        na = _norms(xa, d, grid, packed, shift, nbk)
        norms = (na, na if b is None else _norms(xb, d, grid, packed, shift, nbk))
    row_blocks, col_blocks = triton.cdiv(n, blk_m), triton.cdiv(m, blk_n)
    if gram:
        pairs = tiles * _block_pairs(row_blocks, col_blocks, blk_m, blk_n, b is None)
        splits = _gram_splits(pairs, triton.cdiv(d, bk), waves, dev)
        splits = max(1, min(splits, GRAM_MAX_BYTES // (tiles * n * m * 4)))
        if packed:
            per_split = triton.cdiv(triton.cdiv(d, splits), bk) * bk
        else:  # whole tile rows, so no K step straddles two rows
            per_split = triton.cdiv(d // tw, splits) * tw
        splits = triton.cdiv(d, per_split)
        # every block a split computes is stored; the blocks it skips (below the diagonal) are never read
        out = torch.empty((splits, tiles, n, m), dtype=torch.int32, device=dev)
    else:
        splits, per_split = 1, d
        out = torch.zeros((n, m), dtype=torch.int64 if is_int else torch.float32, device=dev)
    if n and m:
        geo = (1, 1, 1, 1, 1) if packed else (h, w, th, tw, gw)  # H, W, TH, TW, GW (unused when packed)
        _pair_kernel[(row_blocks * col_blocks * tiles * splits,)](
            xa, xb,
            xa if norms is None else norms[0],  # unread by the gram epilogue
            xb if norms is None else norms[1],
            out, n, m, d, tiles, *geo, per_split,
            IS_INT=is_int, SHIFT=shift, PACKED=packed, GRAM=gram, SYMMETRIC=b is None,
            SEGMENT=INT_SEGMENT, BM=blk_m, BN=blk_n, BK=bk, PRECISION="tf32x3", WIDE=blk_m * m >= INT32_OFFSETS,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    if not gram:
        return out, None, d
    if b is None:
        diag = out.diagonal(dim1=2, dim2=3).sum(0, dtype=torch.int64)
        norms = (diag, diag)
    return out, norms, d


def _gram_splits(pairs: int, k_steps: int, waves: int, device: torch.device) -> int:
    """K splits per (block pair, tile): about ``waves`` programs per SM, at least 8 K steps each."""
    want = triton.cdiv(waves * _sms(device), max(1, pairs))
    return max(1, min(want, k_steps // 8))


def _pairwise(
    a: torch.Tensor,
    b: torch.Tensor | None,
    grid: tuple[int, int],
    scale: float,
    alpha: float | None,
    config: str | None = None,
) -> torch.Tensor:
    """The matrix (alpha None) or the graph of ``a`` against ``b`` (None: pairwise) with one configuration
    (None: the tuned / default one)."""
    n = a.shape[0]
    m = n if b is None else b.shape[0]
    config = config or _pair_config(a, b, grid, scale, alpha)
    s, norms, d = _pair_s(a, b, grid, config)
    graph = alpha is not None
    words = math.ceil(m / 64)
    if graph:
        out = torch.zeros((n, words), dtype=torch.int64, device=a.device)
    else:
        out = torch.empty((n, m), dtype=torch.float32, device=a.device)
    if n and m:
        _finish_kernel[(triton.cdiv(n, BLOCK_M), words)](
            s,
            s if norms is None else norms[0],  # unread without GRAM
            s if norms is None else norms[1],
            out,
            n,
            m,
            words,
            grid[0] * grid[1],
            s.shape[0] if norms is not None else 1,
            d,
            scale,
            0.0 if alpha is None else alpha,
            IS_INT=a.dtype == torch.uint8,
            SYMMETRIC=b is None,
            GRAPH=graph,
            GRAM=norms is not None,
            BM=BLOCK_M,
        )
    return out.view(torch.uint64) if graph else out


def _choose(key: tuple, names: list[str], run, device: torch.device, exact: bool) -> str:
    """One of ``names`` for a launch: for exact (uint8) work on a TUNE_DEVICE_TYPES device, the fastest per
    shape class ``key``, tuned on first use by ``memcore.ops._tune`` (each candidate's ``run(name)`` must
    reproduce the first one's exactly; under ``torch.compile`` tracing the cached choice or the first);
    otherwise — floats, whose last bits must not depend on timings, or tuning off — the first."""
    from memcore.ops import _tune

    if not exact or device.type not in TUNE_DEVICE_TYPES or not _tune.ENABLED:
        return names[0]
    if torch.compiler.is_compiling():
        return _tune.chosen(key, names) or names[0]
    return _tune.pick(key, names, run, device)


def _pair_config(
    a: torch.Tensor, b: torch.Tensor | None, grid: tuple[int, int], scale: float, alpha: float | None
) -> str:
    """The pairwise launch configuration (``_choose`` among the eligible PAIR_CONFIGS; each must give the
    first one's output)."""
    from memcore.ops._tune import bucket

    m = a.shape[0] if b is None else b.shape[0]
    key = ("pairwise", str(a.device), b is None, tuple(a.shape[1:]), grid, bucket(a.shape[0]), bucket(m))
    run = lambda name: _pairwise(a, b, grid, scale, alpha, name)  # noqa: E731
    return _choose(key, _pair_configs(a, m, grid), run, a.device, a.dtype == torch.uint8)


def distance_matrix(
    a: torch.Tensor,
    b: torch.Tensor | None,
    grid: tuple[int, int],
    scale: float = 1.0,
    config: str | None = None,
) -> torch.Tensor:
    """Tiled L2 matrix. a: [N, C, H, W]; b: [M, C, H, W] or None (pairwise) -> [N, M] float32. ``config``
    forces one of PAIR_CONFIGS (None: the tuned / default one)."""
    return _pairwise(a, b, grid, scale, None, config)


def distance_graph(
    a: torch.Tensor,
    b: torch.Tensor | None,
    alpha: float,
    grid: tuple[int, int],
    scale: float = 1.0,
    config: str | None = None,
) -> torch.Tensor:
    """Bitset of ``d <= alpha``. a: [N, C, H, W]; b: [M, C, H, W] or None -> uint64 [N, ceil(M/64)]."""
    return _pairwise(a, b, grid, scale, float(alpha), config)


# ------------------------------------------------------------------------------------------------ k-NN
# Two exact k-NN kernels share ``_tile_s`` (the tiled S of a [BM, BN] block: max over the grid tiles) and
# ``_distance``, and so compute every distance exactly as ``_finish_kernel`` does. Candidates are int64 keys
# ``bits(d) << 32 | index``: distances >= 0 order like their bits, so keys order by (distance, index), the
# tie rule of every k-NN backend.
#
# 1. Fused (``_knn_kernel``): one program owns BM queries and a contiguous range of references (a "split") and
#    keeps each row's KP smallest keys in registers, merging a reference tile in (one bitonic sort of 2·KP
#    keys per row) when some key of the tile beats some row's current KP-th key. Each split writes its KP keys
#    per row. Early in a split nearly every tile improves some row of the block, so the sorts, not the
#    products, set its speed (2.5x the reference on the CIFAR case, H100).
# 2. Filter (``_knn_filter_kernel``, the default for large M): a cut per query bounds its k-th distance from
#    above, and the kernel is a plain GEMM whose epilogue appends the rare references within the cut to a
#    per-row buffer (an atomic per row and tile, positions from a prefix sum). The cut is a distance within
#    which at least kk (>= k) references of a strided sample lie, so the k nearest are all appended — exact,
#    whatever the data: either the sample's exact kk-th distance (the fused kernel, which sorts) or the kk-th
#    smallest of the sample's group minima (``_group_min_kernel``: a GEMM with a min epilogue, no sorting;
#    kk distinct groups hold a reference within it). For uint8 on CUDA the faster is tuned. About
#    kk·M/sample = target references pass per row; a row that overflows its 4·target slots (e.g. many
#    duplicates of one training image at the same distance) is recomputed by the fused kernel, flagged on the
#    device (no host sync). uint8 compares the integer S against the largest S whose distance is within the
#    cut (found once per row by ``_s_cut_kernel``), so the float64 division and square root run only on the
#    appended candidates, afterwards.
# Either way one ``topk`` over the candidate keys finishes (``memcore.ops.distance._smallest``).
KNN_MAX_K = 128
# uint8 tiles of at most this many values keep S and its partial sums in int32 (|S| <= D·2^15 < 2^31)
ACC32_MAX_D = 32768
_KEY_MAX: tl.constexpr = tl.constexpr(0x7FFFFFFFFFFFFFFF)
#: Expected references within the cut per query, at least (the sample is kk·M / target references).
FILTER_TARGET = 512
#: The sample is at most 1/FILTER_MIN_STRIDE of the references (target >= FILTER_MIN_STRIDE·kk).
FILTER_MIN_STRIDE = 8
#: The cut is the kk-th sample distance, kk = max(k, FILTER_MIN_KK): steadier than the k-th for small k.
FILTER_MIN_KK = 16
#: ``method="auto"`` filters when M >= this many times the candidate slots (4·target); else fused.
FILTER_MIN_REFS_PER_CAP = 8
#: Queries per filter launch: the candidate buffer is QUERY_BLOCK·cap·8 bytes (128 MiB for k <= 64).
FILTER_QUERY_BLOCK = 8192


@triton.jit
def _tile_s(
    q_ptr,
    r_ptr,
    qn_ptr,
    rn_ptr,
    rows,
    cols,
    rmask,
    cmask,
    N,
    M,
    D,
    T,
    IS_INT: tl.constexpr,
    ACC32: tl.constexpr,
    SEGMENT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """S of rows × cols: the maximum over the T grid tiles of ``‖q_t‖² + ‖r_t‖² − 2 q_t·r_t`` -> [BM, BN]
    (int32 when ACC32, int64 for other uint8 tiles, float32 for floats)."""
    if IS_INT:
        if ACC32:
            s = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            s = tl.zeros((BM, BN), dtype=tl.int64)
    else:
        s = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, T):
        t64 = tl.zeros((), dtype=tl.int64) + t  # int64 offsets (a plain int in the interpreter)
        a_base = _tile_base(q_ptr, rows, N, t, D, 1, 1, 1, 1, 1, True)
        b_base = _tile_base(r_ptr, cols, M, t, D, 1, 1, 1, 1, 1, True)
        na = tl.load(qn_ptr + t64 * N + rows, mask=rmask, other=0)
        nb = tl.load(rn_ptr + t64 * M + cols, mask=cmask, other=0)
        if IS_INT and ACC32:  # |g| <= D·2^14 < 2^29
            g32 = _gram(a_base, b_base, rmask, cmask, 0, D, 1, 1, 1, 1,
                        IS_INT, False, True, BM, BN, BK, PRECISION)  # fmt: skip
            st = na.to(tl.int32)[:, None] + nb.to(tl.int32)[None, :] - 2 * g32
        elif IS_INT:
            g = tl.zeros((BM, BN), dtype=tl.int64)
            for s0 in range(0, D, SEGMENT):
                part = _gram(a_base, b_base, rmask, cmask, s0, tl.minimum(s0 + SEGMENT, D), 1, 1, 1, 1,
                             IS_INT, False, True, BM, BN, BK, PRECISION)  # fmt: skip
                g += part.to(tl.int64)
            st = na[:, None] + nb[None, :] - 2 * g
        else:
            g = _gram(a_base, b_base, rmask, cmask, 0, D, 1, 1, 1, 1,
                      IS_INT, False, True, BM, BN, BK, PRECISION)  # fmt: skip
            # NaN propagates through the clamp and the maximum over tiles, its sign bit cleared (a key with
            # it set would order first): see _pair_kernel
            st = tl.abs(
                tl.maximum(na[:, None] + nb[None, :] - 2.0 * g, 0.0, propagate_nan=tl.PropagateNan.ALL)
            )
        s = tl.maximum(s, st, propagate_nan=tl.PropagateNan.ALL)
    return s


@triton.jit
def _knn_kernel(
    q_ptr,  # [T, N, D] int8 (x − 128) or float32 (tile-major)
    r_ptr,  # [T, M, D]
    qn_ptr,  # [T, N] squared norms (int64 of x − 128 for uint8; float32 otherwise)
    rn_ptr,  # [T, M]
    flag_ptr,  # [N] int32: with USE_FLAGS, only row blocks with a flagged row compute, only flagged rows
    #            write keys (every other row writes padding)
    out_ptr,  # [N, SPLITS, KP] int64 keys
    N,
    M,
    D,
    T,
    per_split,  # references per split (a multiple of KP)
    n_tile,  # int: values per tile
    scale,  # float32 factor on float distances
    SPLITS,
    IS_INT: tl.constexpr,
    ACC32: tl.constexpr,  # uint8 with D <= 2^15: S and every partial sum fit int32 (fewer registers)
    USE_FLAGS: tl.constexpr,
    SEGMENT: tl.constexpr,
    BM: tl.constexpr,
    KP: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    best = tl.full((BM, KP), _KEY_MAX, dtype=tl.int64)
    thr = tl.full((BM,), _KEY_MAX, dtype=tl.int64)  # each row's current KP-th smallest key
    c_lo = split * per_split
    c_hi = tl.minimum(M, c_lo + per_split)
    if USE_FLAGS:  # an empty range for unflagged blocks: the loop below does nothing, padding is written
        row_flags = tl.load(flag_ptr + rows, mask=rmask, other=0)
        c_hi = tl.where(tl.max(row_flags) > 0, c_hi, c_lo)
    for c0 in range(c_lo, c_hi, KP):
        cols = c0 + tl.arange(0, KP)
        cmask = cols < c_hi
        s = _tile_s(
            q_ptr, r_ptr, qn_ptr, rn_ptr, rows, cols, rmask, cmask, N, M, D, T,
            IS_INT, ACC32, SEGMENT, BM, KP, BK, PRECISION,
        )  # fmt: skip
        d = _distance(s, n_tile, scale, IS_INT)
        key = (d.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols.to(tl.int64)[None, :]
        key = tl.where(rmask[:, None] & cmask[None, :], key, _KEY_MAX)
        if tl.sum((key < thr[:, None]).to(tl.int32)) > 0:
            both = tl.reshape(tl.join(best, key), (BM, 2 * KP))
            both = tl.sort(both, dim=1)
            lo, _hi = tl.split(tl.permute(tl.reshape(both, (BM, 2, KP)), (0, 2, 1)))
            best = lo
            thr = tl.max(best, axis=1)
    if USE_FLAGS:
        best = tl.where(row_flags[:, None] > 0, best, _KEY_MAX)
    ps = tl.arange(0, KP)
    tl.store(
        out_ptr + (rows.to(tl.int64)[:, None] * SPLITS + split) * KP + ps[None, :], best, mask=rmask[:, None]
    )


@triton.jit
def _block_s(
    q_ptr, r_ptr, qn_ptr, rn_ptr, N, M, D, T,
    IS_INT: tl.constexpr, SEGMENT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """The [BM, BN] block of this program (one launch axis, no 65535 limit; row blocks vary fastest, so the
    programs in flight share a reference tile in L2) -> (rows, cols, row mask, column mask, S as ``_tile_s``
    with int32 accumulators for uint8)."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BM)
    rows = (pid % row_blocks) * BM + tl.arange(0, BM)
    cols = (pid // row_blocks) * BN + tl.arange(0, BN)
    rmask = rows < N
    cmask = cols < M
    s = _tile_s(
        q_ptr, r_ptr, qn_ptr, rn_ptr, rows, cols, rmask, cmask, N, M, D, T,
        IS_INT, True, SEGMENT, BM, BN, BK, PRECISION,
    )  # fmt: skip
    return rows, cols, rmask, cmask, s


@triton.jit
def _knn_filter_kernel(
    q_ptr,  # [T, N, D] int8 (x − 128) or float32 (tile-major)
    r_ptr,  # [T, M, D]
    qn_ptr,  # [T, N] squared norms
    rn_ptr,  # [T, M]
    cut_ptr,  # [N] int32 S cut (uint8) or float32 distance cut (floats)
    cnt_ptr,  # [N] int32, zero-initialised: candidates appended per row (may exceed CAP: overflow)
    buf_ptr,  # [N, CAP] int64: uint8 ``S << 32 | index``, floats ``bits(d) << 32 | index``
    N,
    M,
    D,
    T,
    n_tile,
    scale,
    CAP,
    IS_INT: tl.constexpr,
    SEGMENT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, cols, rmask, _cmask, s = _block_s(
        q_ptr, r_ptr, qn_ptr, rn_ptr, N, M, D, T, IS_INT, SEGMENT, BM, BN, BK, PRECISION
    )
    if IS_INT:
        cut = tl.load(cut_ptr + rows, mask=rmask, other=-1)
    else:
        cut = tl.load(cut_ptr + rows, mask=rmask, other=-1.0)
    # The append epilogue runs on the even and the odd columns one after the other, each half with its own
    # slots (their order within a row does not matter: the keys are sorted at the end). On the whole block its
    # [BM, BN] temporaries (above all the 64-bit store addresses) took 255 registers and spilled 56-144 B per
    # thread on sm_90 (Triton 3.6); on halves no configuration spills. The split is free: the MMA layout gives
    # each thread column pairs.
    s0, s1 = tl.split(tl.reshape(s, (BM, BN // 2, 2)))
    c0, c1 = tl.split(tl.reshape(cols, (BN // 2, 2)))
    _append(s0, c0, rows, rmask, cut, cnt_ptr, buf_ptr, M, n_tile, scale, CAP, IS_INT, BM, BN // 2)
    _append(s1, c1, rows, rmask, cut, cnt_ptr, buf_ptr, M, n_tile, scale, CAP, IS_INT, BM, BN // 2)


@triton.jit
def _append(
    s, cols, rows, rmask, cut, cnt_ptr, buf_ptr, M, n_tile, scale, CAP,
    IS_INT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Append the references of ``cols`` [BN] (any subset of the block's columns, ascending) within each
    row's cut to the row's candidates: ``s`` [BM, BN] is S; slots come from one atomic add per row."""
    WB: tl.constexpr = BN if BN < 32 else 32  # bits per hit word (int32)
    if IS_INT:  # d is a non-decreasing function of the integer S: compare S, no float64 per element
        hit = s <= cut[:, None]
        val = s
    else:
        d = _distance(s, n_tile, scale, IS_INT)
        hit = d <= cut[:, None]
        val = d.to(tl.int32, bitcast=True)
    hit = hit & rmask[:, None] & (cols < M)[None, :]
    h32 = hit.to(tl.int32)
    per_row = tl.sum(h32, axis=1)
    if tl.sum(per_row) > 0:
        base = tl.atomic_add(cnt_ptr + rows, per_row, mask=per_row > 0)
        # Slot of each hit in its row: hits before it in the row, from bit words and popcounts. A row-wise
        # tl.cumsum over the block did the same but took 255 registers and spilled 0.5-3.7 KB per thread
        # (sm_90), on nearly every block (a query's ~1 % of references within the cut hit most blocks).
        lane = tl.arange(0, BN) % WB
        bits = tl.reshape(h32 << lane[None, :], (BM, BN // WB, WB))
        words = tl.sum(bits, axis=2)  # [BM, BN // WB]: distinct bits, so the sum is their or
        ones = _popc(words)
        before = tl.cumsum(ones, axis=1) - ones  # hits in the row's earlier words
        before = tl.reshape(tl.broadcast_to(before[:, :, None], (BM, BN // WB, WB)), (BM, BN))
        words = tl.reshape(tl.broadcast_to(words[:, :, None], (BM, BN // WB, WB)), (BM, BN))
        pos = base[:, None] + before + _popc(words & ((1 << lane) - 1)[None, :])
        # The key ``val << 32 | index`` (both >= 0) as its two little-endian int32 words: no [BM, BN] int64
        # tensor, and int32 offsets (the buffer holds FILTER_QUERY_BLOCK·cap < 2^31 keys).
        ok = hit & (pos < CAP)
        word = (rows[:, None] * CAP + pos) * 2
        buf32 = buf_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        tl.store(buf32 + word, cols[None, :] + 0 * pos, mask=ok)
        tl.store(buf32 + word + 1, val, mask=ok)


@triton.jit
def _popc(x):
    """Set bits of each int32 (SWAR popcount on the uint32 bit pattern)."""
    u = x.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _group_min_kernel(
    q_ptr,  # [T, N, D] packed queries
    r_ptr,  # [T, M, D] packed (sampled) references
    qn_ptr,  # [T, N]
    rn_ptr,  # [T, M]
    out_ptr,  # [N, G]: per query, the minimum over each group of GS consecutive references (uint8: S int32;
    #           floats: the float32 distance)
    N,
    M,
    D,
    T,
    n_tile,
    scale,
    G,  # groups per row: cdiv(M, GS)
    IS_INT: tl.constexpr,
    SEGMENT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GS: tl.constexpr,  # a power of two dividing BN
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, cols, rmask, cmask, s = _block_s(
        q_ptr, r_ptr, qn_ptr, rn_ptr, N, M, D, T, IS_INT, SEGMENT, BM, BN, BK, PRECISION
    )
    if IS_INT:  # S, not the distance: d is non-decreasing in S, so the group minima are the same references
        v = tl.where(cmask[None, :], s, 0x7FFFFFFF)
    else:
        v = tl.where(cmask[None, :], _distance(s, n_tile, scale, IS_INT), float("inf"))
    gmin = tl.min(tl.reshape(v, (BM, BN // GS, GS)), axis=2)
    groups = tl.min(cols, axis=0) // GS + tl.arange(0, BN // GS)  # the block's first column starts a group
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * G + groups[None, :],
        gmin,
        mask=rmask[:, None] & (groups < G)[None, :],
    )


@triton.jit
def _candidates_kernel(
    buf_ptr,  # [N, CAP] int64 appended candidates, rewritten in place as distance keys
    cnt_ptr,  # [N] int32 appended per row (> CAP: the row overflowed)
    N,
    CAP,
    n_tile,
    IS_INT: tl.constexpr,
    BM: tl.constexpr,
    BC: tl.constexpr,
):
    """The filter's buffer -> keys ``bits(d) << 32 | index`` in one pass: uint8 ``S << 32 | index`` becomes
    the distance key (``_distance``: the exact epilogue, IEEE float64 division and square root); unwritten
    slots and overflowed rows (recomputed by the fused kernel) become padding."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    slots = tl.program_id(1) * BC + tl.arange(0, BC)
    rmask = rows < N
    count = tl.load(cnt_ptr + rows, mask=rmask, other=0)
    inside = rmask[:, None] & (slots < CAP)[None, :]
    ptrs = buf_ptr + rows.to(tl.int64)[:, None] * CAP + slots[None, :]
    key = tl.load(ptrs, mask=inside, other=0)
    keep = (slots[None, :] < count[:, None]) & (count <= CAP)[:, None]
    if IS_INT:  # unwritten slots hold garbage: their S is replaced by 0 before the square root
        d = _distance(tl.where(keep, key >> 32, 0), n_tile, 1.0, True)
        key = (d.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (key & 0xFFFFFFFF)
    tl.store(ptrs, tl.where(keep, key, _KEY_MAX), mask=inside)


@triton.jit
def _s_cut_kernel(d_ptr, cut_ptr, N, n_tile, BLOCK: tl.constexpr):
    """uint8: per row, the largest integer S < 2^31 whose distance (``_distance``) is <= the float32 cut
    (binary search; the distance is non-decreasing in S)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    dc = tl.load(d_ptr + i, mask=mask, other=0.0)
    lo = tl.zeros((BLOCK,), dtype=tl.int64)  # distance(0) = 0 <= cut
    hi = tl.full((BLOCK,), 1 << 31, dtype=tl.int64)  # the answer is below hi
    for _ in range(31):
        mid = (lo + hi) >> 1
        ok = _distance(mid, n_tile, 1.0, True) <= dc
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    tl.store(cut_ptr + i, lo.to(tl.int32), mask=mask)


def _knn_splits(n: int, m: int, kp: int, device: torch.device) -> int:
    """Reference splits: enough programs to fill the device (about 4 per SM), each with >= 8 tiles."""
    row_blocks = triton.cdiv(n, BLOCK_M)
    want = max(1, triton.cdiv(4 * _sms(device), row_blocks))
    return max(1, min(want, triton.cdiv(m, 8 * kp)))


#: The last reference set packed by ``knn_keys`` (one entry; dropped with its tensor: see ``_Packed.cached``).
_PACK_CACHE: dict[str, tuple] = {}


def _drop_packed(ref: weakref.ref) -> None:
    """The cached reference set's tensor died: free its packed copy too."""
    hit = _PACK_CACHE.get("refs")
    if hit is not None and hit[1] is ref:
        del _PACK_CACHE["refs"]


class _Packed:
    """One image set packed for the k-NN kernels: tile-major data and per-tile squared norms."""

    def __init__(self, x: torch.Tensor, grid: tuple[int, int]) -> None:
        self.data = _pack(x, grid)
        self.norms = _norms(self.data, self.data.shape[2], grid, packed=True, shift=False, bk=64)

    @classmethod
    def cached(cls, x: torch.Tensor, grid: tuple[int, int]) -> _Packed:
        """``_Packed(x, grid)``, reusing the last one while ``x`` is the same unmodified tensor: NN extraction
        searches one training set with batch after batch of candidates, and packing it (a copy of the set
        and its norms) would otherwise be repeated per batch."""
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version, grid)
        hit = _PACK_CACHE.get("refs")
        if hit is not None and hit[0] == key and hit[1]() is x:
            return hit[2]
        packed = cls(x, grid)
        _PACK_CACHE["refs"] = (key, weakref.ref(x, _drop_packed), packed)
        return packed

    def rows(self, sl: slice) -> _Packed:
        """A subset of the images (a strided or contiguous slice), repacked contiguously."""
        out = _Packed.__new__(_Packed)
        out.data = self.data[:, sl].contiguous()
        out.norms = self.norms[:, sl].contiguous()
        return out

    def sample(self, stride: int) -> _Packed:
        """Every ``stride``-th image (the filter's sample), kept with this set: a cached training set is
        sampled once, not on every k-NN call."""
        memo = self.__dict__.setdefault("_samples", {})
        if stride not in memo:
            memo[stride] = self.rows(slice(None, None, stride))
        return memo[stride]

    @property
    def count(self) -> int:
        return self.data.shape[1]


def _fused_keys(
    q: _Packed,
    r: _Packed,
    k: int,
    d: int,
    tiles: int,
    scale: float,
    is_int: bool,
    splits: int | None,
    flags: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused kernel -> [N, splits·KP] keys (KP = power of two >= k; padding is int64 max)."""
    n, m = q.count, r.count
    kp = max(16, triton.next_power_of_2(k))  # tl.dot needs tiles of at least 16
    splits = splits or _knn_splits(n, m, kp, q.data.device)
    per_split = triton.cdiv(triton.cdiv(m, splits), kp) * kp
    splits = triton.cdiv(m, per_split)
    keys = torch.empty((n, splits, kp), dtype=torch.int64, device=q.data.device)
    _knn_kernel[(triton.cdiv(n, BLOCK_M), splits)](
        q.data,
        r.data,
        q.norms,
        r.norms,
        q.norms if flags is None else flags,  # unread without USE_FLAGS
        keys,
        n,
        m,
        d,
        tiles,
        per_split,
        d,
        scale,
        splits,
        IS_INT=is_int,
        ACC32=is_int and d <= ACC32_MAX_D,
        USE_FLAGS=flags is not None,
        SEGMENT=INT_SEGMENT,
        BM=BLOCK_M,
        KP=kp,
        BK=BLOCK_K,
        PRECISION="tf32x3",
        # 8 warps hold the [BM, 2·KP] int64 sort in registers for KP <= 64 (ptxas, sm_90: 40 B of stack with
        # int32 accumulators, 480 B with int64; 4 warps spill 1-2 KB)
        num_warps=8 if kp <= 64 else 16,
    )
    return keys.reshape(n, splits * kp)


#: Padding key (int64 max) on the host side, as ``_KEY_MAX`` in the kernels.
_KEY_PAD = torch.iinfo(torch.int64).max


def _filled(buf: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The raw candidate buffer [N, cap] with its unwritten slots set to padding (comparable across runs)."""
    keep = torch.arange(buf.shape[1], device=buf.device)[None, :] < counts[:, None]
    return torch.where(keep, buf, _KEY_PAD)


#: How the filter's cut is found on the sample (both exact; see ``_cut_distance``). The first is the
#: default; for uint8 on CUDA the faster is chosen per shape class (their k-NN results must agree exactly).
CUT_METHODS = ("fused", "groupmin")
#: The group-minimum cut keeps at least this many groups per query (fewer, larger groups loosen it).
CUT_MIN_GROUPS = 1024
#: Group-minimum kernel blocks: BM queries × BN sampled references.
CUT_BM, CUT_BN = 128, 128


def _cut_distance(
    q: _Packed, sample: _Packed, kk: int, d: int, tiles: int, scale: float, is_int: bool, method: str
) -> torch.Tensor:
    """Per query, a float32 distance within which at least kk sampled references lie -> [N].

    "fused": the exact kk-th smallest distance to the sample (the fused kernel's sorted top-kk).
    "groupmin": split the sample into groups of GS consecutive references, take each group's minimum (a GEMM
    with a min epilogue, no sorting), then the kk-th smallest of those minima: kk distinct groups each hold a
    reference at or below it, so at least kk references lie within — as exact a bound, and nearly as tight
    (with G groups of the s sampled references it passes about (kk/s)·(1 + kk/(2G)) of all references
    against kk/s for the exact kk-th; G >= CUT_MIN_GROUPS)."""
    n = q.count
    if method == "fused":
        near = _fused_keys(q, sample, kk, d, tiles, scale, is_int, None)
        kth = torch.topk(near, kk, dim=1, largest=False, sorted=True).values[:, kk - 1]
        return (kth >> 32).to(torch.int32).view(torch.float32).contiguous()
    if method != "groupmin":
        raise ValueError(f"cut must be one of {CUT_METHODS}, got {method!r}")
    m = sample.count
    gs = 1
    while gs < CUT_BN and triton.cdiv(m, 2 * gs) >= max(CUT_MIN_GROUPS, kk):
        gs *= 2
    groups = triton.cdiv(m, gs)
    mins = torch.empty((n, groups), dtype=torch.int32 if is_int else torch.float32, device=q.data.device)
    _group_min_kernel[(triton.cdiv(n, CUT_BM) * triton.cdiv(m, CUT_BN),)](
        q.data, sample.data, q.norms, sample.norms, mins, n, m, d, tiles, d, scale, groups,
        IS_INT=is_int, SEGMENT=INT_SEGMENT, BM=CUT_BM, BN=CUT_BN, GS=gs, BK=BLOCK_K if is_int else 32,
        PRECISION="tf32x3", num_warps=8, num_stages=3,
    )  # fmt: skip
    kth = torch.topk(mins, kk, dim=1, largest=False, sorted=True).values[:, kk - 1]
    if not is_int:
        return kth.contiguous()
    from memcore.reference.distance import finish  # S -> distance, exactly as ``_distance``

    return finish(kth.to(torch.float64), torch.uint8, d, 1.0).contiguous()


def _cut_choice(
    q: _Packed, r: _Packed, sample: _Packed, k: int, d: int, tiles: int, scale: float, is_int: bool, cap: int
) -> str:
    """The cut method (``_choose`` among CUT_METHODS; both must give the same k nearest)."""
    from memcore.ops._tune import bucket

    dev = q.data.device
    key = ("knn_cut", str(dev), d, tiles, k, bucket(q.count), bucket(r.count))

    def run(name: str) -> torch.Tensor:
        keys = _filter_keys(q, r, sample, k, d, tiles, scale, is_int, cap, name)
        return torch.topk(keys, k, dim=1, largest=False, sorted=True).values

    return _choose(key, list(CUT_METHODS), run, dev, is_int)


def _filter_keys(
    q: _Packed,
    r: _Packed,
    sample: _Packed,
    k: int,
    d: int,
    tiles: int,
    scale: float,
    is_int: bool,
    cap: int,
    cut: str,
    marks: list | None = None,
) -> torch.Tensor:
    """The filter path for one block of queries -> [N, cap + fallback] candidate keys (see the module
    comment): cut from the sampled references (``cut``: one of CUT_METHODS), GEMM + append, overflowed rows
    recomputed by the fused kernel. ``marks`` (CUDA only) receives (stage, event) pairs recorded after each
    stage, for a time breakdown."""
    n = q.count
    dev = q.data.device

    def mark(name: str) -> None:
        if marks is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((name, ev))

    mark("start")
    kk = min(max(k, FILTER_MIN_KK), sample.count)
    d_cut = _cut_distance(q, sample, kk, d, tiles, scale, is_int, cut)
    if is_int:
        cut = torch.empty(n, dtype=torch.int32, device=dev)
        _s_cut_kernel[(triton.cdiv(n, 1024),)](d_cut, cut, n, d, BLOCK=1024)
    else:
        # float distances of one pair may differ in their last bits between the fused kernel (which set the
        # cut) and the filter pass (other tile shapes): a few ulps of room keep every reference the filter
        # itself places within the k-th distance (a looser cut only adds candidates)
        cut = d_cut * (1.0 + 2.0**-19)
    mark("cut")
    config = _filter_config(q, r, cut, d, tiles, scale, is_int, cap)
    counts, buf = _filter_pass(q, r, cut, d, tiles, scale, is_int, cap, config)
    if not is_int:
        # Fewer than k candidates: the cut's float distances come from another kernel (other tile shapes),
        # and for near duplicates S = ‖a‖² + ‖b‖² − 2ab differs between the two by far more than the cut's
        # few ulps (cancellation); a NaN query's cut is NaN and passes nothing. Recompute such a row like an
        # overflowed one. With at least k candidates, every unappended reference lies beyond the cut, so the
        # k smallest (by this pass's distances) were appended. uint8 always has kk >= k (exact integer S).
        counts = torch.where(counts < k, cap + 1, counts)
    mark("filter")
    _candidates_kernel[(triton.cdiv(n, 32), triton.cdiv(cap, 128))](
        buf, counts, n, cap, d, IS_INT=is_int, BM=32, BC=128
    )
    # Overflowed rows: the fused kernel over all references; every other row writes padding (it keeps its
    # buffer, so no key appears twice), and blocks without an overflowed row skip the work.
    fallback = _fused_keys(q, r, k, d, tiles, scale, is_int, None, flags=(counts > cap).to(torch.int32))
    out = torch.cat([buf, fallback], 1)
    mark("finish")
    return out


#: Filter kernel configurations, name -> (BM queries, BN references, BK for int8, num_warps, num_stages); the
#: first is the default. For uint8 on CUDA the fastest is chosen on first use per image shape (every one gives
#: the same candidates: integer S, same cut); floats keep the first (BK 32), so their last bits never depend
#: on timings.
#: None spills registers on sm_90 with Triton 3.6 (the lent H100's) or 3.9 (CI's), checked by
#: tests/test_triton_sm90_compile.py. int8 wgmma is not pipelined by Triton (it keeps only fp32 accumulators in
#: flight), so several CTAs per SM is the way to overlap one CTA's MMAs with another's loads and epilogue:
#: "128x64x128/w8s3" (116-126 registers, 74 KB: two per SM) and "64x64x128/w4s3" (122-126 registers, 49 KB:
#: four). BK 256 halves the MMA waits per reference (one per 8 wgmma per warpgroup instead of 4). With the
#: append epilogue on the whole block every 128-wide configuration took 255 registers and spilled 56-144 B
#: per thread under Triton 3.6; 128x256 and 256x128 blocks spill even on halves.
FILTER_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "128x128x128/w8s3": (128, 128, 128, 8, 3),
    "128x128x64/w8s4": (128, 128, 64, 8, 4),
    "128x64x128/w8s3": (128, 64, 128, 8, 3),
    "128x64x128/w4s3": (128, 64, 128, 4, 3),
    "64x128x128/w4s3": (64, 128, 128, 4, 3),
    "64x64x128/w4s3": (64, 64, 128, 4, 3),
    "128x128x128/w16s3": (128, 128, 128, 16, 3),
    "128x128x256/w8s2": (128, 128, 256, 8, 2),
}


def _filter_pass(
    q: _Packed,
    r: _Packed,
    cut: torch.Tensor,
    d: int,
    tiles: int,
    scale: float,
    is_int: bool,
    cap: int,
    config: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of the filter kernel -> (counts [N] int32, candidate buffer [N, cap] int64)."""
    n, m = q.count, r.count
    dev = q.data.device
    bm, bn, bk, warps, stages = FILTER_CONFIGS[config]
    counts = torch.zeros(n, dtype=torch.int32, device=dev)
    buf = torch.empty((n, cap), dtype=torch.int64, device=dev)
    _knn_filter_kernel[(triton.cdiv(n, bm) * triton.cdiv(m, bn),)](
        q.data,
        r.data,
        q.norms,
        r.norms,
        cut,
        counts,
        buf,
        n,
        m,
        d,
        tiles,
        d,
        scale,
        cap,
        IS_INT=is_int,
        SEGMENT=INT_SEGMENT,
        BM=bm,
        BN=bn,
        BK=bk if is_int else 32,
        PRECISION="tf32x3",
        num_warps=warps,
        num_stages=stages,
    )
    return counts, buf


def _filter_config(
    q: _Packed, r: _Packed, cut: torch.Tensor, d: int, tiles: int, scale: float, is_int: bool, cap: int
) -> str:
    """The filter launch configuration (``_choose`` among FILTER_CONFIGS per device, tile size and grid;
    each must give the first one's candidates)."""

    def run(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        counts, buf = _filter_pass(q, r, cut, d, tiles, scale, is_int, cap, name)
        # appends land in atomic order: compare the sorted candidates
        return counts, torch.sort(_filled(buf, counts), dim=1).values

    dev = q.data.device
    return _choose(("knn_filter", str(dev), d, tiles), list(FILTER_CONFIGS), run, dev, is_int)


def knn_keys(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    grid: tuple[int, int],
    scale: float = 1.0,
    *,
    splits: int | None = None,
    method: str = "auto",
    stride: int | None = None,
    cap: int | None = None,
    cut: str | None = None,
    marks: list | None = None,
) -> torch.Tensor:
    """Exact k-NN candidates from the Triton kernels (memory independent of M; never an [N, M] matrix).

    Args:
        queries: [N, C, H, W] uint8 or float.
        refs: [M, C, H, W], same dtype, M >= k.
        k: neighbours, 1 <= k <= KNN_MAX_K.
        splits: reference ranges run in parallel per row block by the fused kernel (None: fill the device).
        method: "fused", "filter", or "auto" (the filter when M >= 8·cap and, for uint8, tiles have at most
            ACC32_MAX_D values).
        stride: the filter's sample stride (None: target // max(k, 16), target = max(512, 8·max(k, 16))).
        cap: the filter's candidate slots per query (None: 4·target).
        cut: how the filter finds its cut, one of CUT_METHODS (None: tuned for uint8 on CUDA, else the first).
        marks: CUDA only: a list that receives (stage, ``torch.cuda.Event``) pairs per query block of the
            filter ("start", "cut", "filter", "finish"), for ``benchmarks/bench_distance.py``'s breakdown.

    Returns:
        [N, K] int64 keys ``bits(d) << 32 | index`` (padding keys are int64 max) whose k smallest are the k
        nearest references, ties to the smaller index (``memcore.ops.distance`` finishes with one ``topk``
        and decodes them).
    """
    if not 1 <= k <= KNN_MAX_K:
        raise ValueError(f"the Triton k-NN takes 1 <= k <= {KNN_MAX_K}, got {k}")
    if method not in ("auto", "fused", "filter"):
        raise ValueError(f"method must be 'auto', 'fused' or 'filter', got {method!r}")
    n, c, h, w = queries.shape
    m = refs.shape[0]
    if n == 0:
        return torch.empty((0, k), dtype=torch.int64, device=queries.device)
    d = c * (h // grid[0]) * (w // grid[1])
    tiles = grid[0] * grid[1]
    is_int = queries.dtype == torch.uint8
    # kk·M/target references are sampled, so about `target` pass the cut per query; cap leaves 4x room.
    kk = max(k, FILTER_MIN_KK)
    target = max(FILTER_TARGET, FILTER_MIN_STRIDE * kk)
    stride = stride or target // kk
    cap = cap or 4 * target
    filter_ok = not is_int or d <= ACC32_MAX_D
    if method == "filter":
        if not filter_ok:
            raise ValueError(f"the filter k-NN takes uint8 tiles of at most {ACC32_MAX_D} values, got {d}")
        if triton.cdiv(m, stride) < k:
            raise ValueError(f"a sample stride of {stride} leaves fewer than k = {k} of {m} references")
    use_filter = method == "filter" or (method == "auto" and filter_ok and m >= FILTER_MIN_REFS_PER_CAP * cap)
    q, r = _Packed(queries, grid), _Packed.cached(refs, grid)
    if not use_filter:
        return _fused_keys(q, r, k, d, tiles, scale, is_int, splits)
    sample = r.sample(stride)
    blocks = (
        [q]
        if n <= FILTER_QUERY_BLOCK
        else [q.rows(slice(s, s + FILTER_QUERY_BLOCK)) for s in range(0, n, FILTER_QUERY_BLOCK)]
    )
    if cut is not None and cut not in CUT_METHODS:
        raise ValueError(f"cut must be one of {CUT_METHODS}, got {cut!r}")
    keys = [
        _filter_keys(
            b, r, sample, k, d, tiles, scale, is_int, cap,
            cut or _cut_choice(b, r, sample, k, d, tiles, scale, is_int, cap), marks,
        )
        for b in blocks
    ]  # fmt: skip
    if len(keys) == 1:
        return keys[0]
    # blocks differ in width (the fallback's splits depend on the block's rows): keep each row's k smallest
    return torch.cat([torch.topk(x, k, dim=1, largest=False, sorted=True).values for x in keys])
