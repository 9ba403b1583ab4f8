"""Triton kernels for normalized / tiled L2 ([C23] §4.2): per-tile Gram products and a fused epilogue.

Both sets are packed tile-major, ``[T, N, D]`` (T = gh·gw tiles of D = C·th·tw values), by one PyTorch copy
that also shifts uint8 to int8 ``x − 128`` (differences are unchanged). Then two kernels:

1. ``_tile_sq_kernel``, one program per (row block, column block, tile): ``G = A_t B_tᵀ`` with ``tl.dot``,
   ``S_t = ‖a‖² + ‖b‖² − 2G`` (norms summed from the same loads) and ``atomic_max`` into ``smax [N, M]`` (the
   maximum over tiles at the same grid position). int8 ``tl.dot`` with int32 accumulation is
   exact; the K loop is split into segments of at most 2^17 products so
   int32 never overflows, and segments add up in int64). Floats are packed as float32 and multiplied with
   ``input_precision="tf32x3"`` (≈ fp32 accuracy) on the GPU. Pairwise calls skip blocks below the diagonal.
2. ``_finish_kernel``: ``d = sqrt(S / n)`` — for uint8 exactly ``float32(sqrt(float64(S) / (255²·n)))`` with
   IEEE division and square root, bit-identical to the reference — and either the float32 matrix or, for the
   graph, one uint64 word per (row, 64 columns): bit j set iff ``d <= float32(alpha)``. Pairwise results read
   S from the upper triangle, so they are exactly symmetric.

Masked K-tail lanes load 0, so they contribute nothing.
"""

from __future__ import annotations

import math
import weakref

import torch
import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 64
# int8 products are at most 128² = 2^14 in magnitude: 2^16 of them stay below 2^31 in an int32 accumulator.
INT_SEGMENT = 65536  # a multiple of BLOCK_K


@triton.jit
def _load_i8(ptrs, mask):
    """Packed int8 (x − 128, shifted by ``_pack``); masked lanes load 0, contributing nothing."""
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _tile_sq_kernel(
    a_ptr,  # [T, N, D] int8 (x − 128) or float32 (tile-major)
    b_ptr,  # [T, M, D]
    smax_ptr,  # [N, M] int64 / float32, zero-initialised; receives max over tiles of S
    N,
    M,
    D,
    IS_INT: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    SEGMENT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = tl.program_id(2)
    if SYMMETRIC and pid_n < pid_m:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    rmask = rows < N
    cmask = cols < M
    a_base = a_ptr + t.to(tl.int64) * N * D + rows.to(tl.int64)[:, None] * D
    b_base = b_ptr + t.to(tl.int64) * M * D + cols.to(tl.int64)[None, :] * D
    # The squared norms come from the same loads as the product (no extra pass over the images).
    if IS_INT:
        g = tl.zeros((BM, BN), dtype=tl.int64)
        na = tl.zeros((BM,), dtype=tl.int64)
        nb = tl.zeros((BN,), dtype=tl.int64)
        for s0 in range(0, D, SEGMENT):
            part = tl.zeros((BM, BN), dtype=tl.int32)
            pa = tl.zeros((BM,), dtype=tl.int32)
            pb = tl.zeros((BN,), dtype=tl.int32)
            for k0 in range(s0, tl.minimum(s0 + SEGMENT, D), BK):
                kin = (k0 + ks) < D
                a = _load_i8(a_base + (k0 + ks)[None, :], rmask[:, None] & kin[None, :])
                b = _load_i8(b_base + (k0 + ks)[:, None], cmask[None, :] & kin[:, None])
                part = tl.dot(a, b, part, out_dtype=tl.int32)
                a32 = a.to(tl.int32)
                b32 = b.to(tl.int32)
                pa += tl.sum(a32 * a32, axis=1)
                pb += tl.sum(b32 * b32, axis=0)
            g += part.to(tl.int64)
            na += pa.to(tl.int64)
            nb += pb.to(tl.int64)
        s = na[:, None] + nb[None, :] - 2 * g
    else:
        g = tl.zeros((BM, BN), dtype=tl.float32)
        na = tl.zeros((BM,), dtype=tl.float32)
        nb = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(0, D, BK):
            kin = (k0 + ks) < D
            a = tl.load(a_base + (k0 + ks)[None, :], mask=rmask[:, None] & kin[None, :], other=0.0)
            b = tl.load(b_base + (k0 + ks)[:, None], mask=cmask[None, :] & kin[:, None], other=0.0)
            g = tl.dot(a, b, g, input_precision=PRECISION)
            na += tl.sum(a * a, axis=1)
            nb += tl.sum(b * b, axis=0)
        s = tl.maximum(na[:, None] + nb[None, :] - 2.0 * g, 0.0)
    tl.atomic_max(
        smax_ptr + rows.to(tl.int64)[:, None] * M + cols[None, :], s, mask=rmask[:, None] & cmask[None, :]
    )


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
    smax_ptr,  # [N, M]
    out_ptr,  # [N, M] float32, or [N, ceil(M/64)] int64 words when GRAPH
    N,
    M,
    W,  # words per row
    n_tile,  # int: values per tile (float scalars would reach the GPU kernel as float32)
    scale,  # float32 factor on float distances
    alpha,  # float32 threshold
    IS_INT: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    GRAPH: tl.constexpr,
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
    s = tl.load(smax_ptr + lo.to(tl.int64) * M + hi, mask=valid, other=0)
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
    instructions per K step as the int8 ``tl.dot`` itself and kept operands out of the async-copy pipeline.
    The kernels mask the K tail, so no padding is needed."""
    n, c, h, w = x.shape
    gh, gw = grid
    th, tw = h // gh, w // gw
    if x.dtype != torch.uint8:
        x = x.to(torch.float32)
    # reshape may return a strided view (e.g. one-pixel-wide tiles); the kernel needs contiguous rows.
    p = x.reshape(n, c, gh, th, gw, tw).permute(2, 4, 0, 1, 3, 5).reshape(gh * gw, n, c * th * tw)
    if x.dtype == torch.uint8:
        # x − 128 as int8 is x's bit pattern with the top bit flipped (differences are unchanged)
        return torch.bitwise_xor(p.view(torch.int8), -128).contiguous()
    return p.contiguous()


def _smax(a: torch.Tensor, b: torch.Tensor | None, grid: tuple[int, int]) -> tuple[torch.Tensor, int]:
    n, c, h, w = a.shape
    other = a if b is None else b
    m = other.shape[0]
    d = c * (h // grid[0]) * (w // grid[1])
    is_int = a.dtype == torch.uint8
    pa = _pack(a, grid)
    pb = pa if b is None else _pack(b, grid)
    smax = torch.zeros((n, m), dtype=torch.int64 if is_int else torch.float32, device=a.device)
    if n and m:
        launch = (triton.cdiv(n, BLOCK_M), triton.cdiv(m, BLOCK_N), grid[0] * grid[1])
        _tile_sq_kernel[launch](
            pa,
            pb,
            smax,
            n,
            m,
            d,
            IS_INT=is_int,
            SYMMETRIC=b is None,
            SEGMENT=INT_SEGMENT,
            BM=BLOCK_M,
            BN=BLOCK_N,
            BK=BLOCK_K,
            PRECISION="tf32x3",
        )
    return smax, d


def _finish(smax, n, m, d, is_int, symmetric, graph, scale, alpha, device):
    words = math.ceil(m / 64)
    if graph:
        out = torch.zeros((n, words), dtype=torch.int64, device=device)
    else:
        out = torch.empty((n, m), dtype=torch.float32, device=device)
    if n and m:
        _finish_kernel[(triton.cdiv(n, BLOCK_M), words)](
            smax,
            out,
            n,
            m,
            words,
            d,
            scale,
            alpha,
            IS_INT=is_int,
            SYMMETRIC=symmetric,
            GRAPH=graph,
            BM=BLOCK_M,
        )
    return out.view(torch.uint64) if graph else out


def distance_matrix(
    a: torch.Tensor, b: torch.Tensor | None, grid: tuple[int, int], scale: float = 1.0
) -> torch.Tensor:
    """Tiled L2 matrix. a: [N, C, H, W]; b: [M, C, H, W] or None (pairwise) -> [N, M] float32."""
    smax, d = _smax(a, b, grid)
    m = a.shape[0] if b is None else b.shape[0]
    return _finish(smax, a.shape[0], m, d, a.dtype == torch.uint8, b is None, False, scale, 0.0, a.device)


def distance_graph(
    a: torch.Tensor, b: torch.Tensor | None, alpha: float, grid: tuple[int, int], scale: float = 1.0
) -> torch.Tensor:
    """Bitset of ``d <= alpha``. a: [N, C, H, W]; b: [M, C, H, W] or None -> uint64 [N, ceil(M/64)]."""
    smax, d = _smax(a, b, grid)
    m = a.shape[0] if b is None else b.shape[0]
    return _finish(smax, a.shape[0], m, d, a.dtype == torch.uint8, b is None, True, scale, alpha, a.device)


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
#    per-row buffer (an atomic per row and tile, positions from a prefix sum). The cut is the kk-th smallest
#    distance (kk >= k) to a strided sample of the references, found by the fused kernel: at least kk
#    references lie within it, so the k nearest are all appended — exact, whatever the data. About
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
    ks = tl.arange(0, BK)
    if IS_INT:
        if ACC32:
            s = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            s = tl.zeros((BM, BN), dtype=tl.int64)
    else:
        s = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, T):
        t64 = tl.zeros((), dtype=tl.int64) + t  # int64 offsets (a plain int in the interpreter)
        a_base = q_ptr + t64 * N * D + rows.to(tl.int64)[:, None] * D
        b_base = r_ptr + t64 * M * D + cols.to(tl.int64)[None, :] * D
        na = tl.load(qn_ptr + t64 * N + rows, mask=rmask, other=0)
        nb = tl.load(rn_ptr + t64 * M + cols, mask=cmask, other=0)
        if IS_INT and ACC32:
            g32 = tl.zeros((BM, BN), dtype=tl.int32)  # |g| <= D·2^14 < 2^29
            for k0 in range(0, D, BK):
                kin = (k0 + ks) < D
                a = _load_i8(a_base + (k0 + ks)[None, :], rmask[:, None] & kin[None, :])
                b = _load_i8(b_base + (k0 + ks)[:, None], cmask[None, :] & kin[:, None])
                g32 = tl.dot(a, b, g32, out_dtype=tl.int32)
            st = na.to(tl.int32)[:, None] + nb.to(tl.int32)[None, :] - 2 * g32
        elif IS_INT:
            g = tl.zeros((BM, BN), dtype=tl.int64)
            for s0 in range(0, D, SEGMENT):
                part = tl.zeros((BM, BN), dtype=tl.int32)
                for k0 in range(s0, tl.minimum(s0 + SEGMENT, D), BK):
                    kin = (k0 + ks) < D
                    a = _load_i8(a_base + (k0 + ks)[None, :], rmask[:, None] & kin[None, :])
                    b = _load_i8(b_base + (k0 + ks)[:, None], cmask[None, :] & kin[:, None])
                    part = tl.dot(a, b, part, out_dtype=tl.int32)
                g += part.to(tl.int64)
            st = na[:, None] + nb[None, :] - 2 * g
        else:
            g = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, D, BK):
                kin = (k0 + ks) < D
                a = tl.load(a_base + (k0 + ks)[None, :], mask=rmask[:, None] & kin[None, :], other=0.0)
                b = tl.load(b_base + (k0 + ks)[:, None], mask=cmask[None, :] & kin[:, None], other=0.0)
                g = tl.dot(a, b, g, input_precision=PRECISION)
            st = tl.maximum(na[:, None] + nb[None, :] - 2.0 * g, 0.0)
        s = tl.maximum(s, st)
    return s


@triton.jit
def _knn_kernel(
    q_ptr,  # [T, N, D] int8 (x − 128) or float32 (tile-major)
    r_ptr,  # [T, M, D]
    qn_ptr,  # [T, N] squared norms (int64 of x − 128 for uint8; float32 otherwise)
    rn_ptr,  # [T, M]
    flag_ptr,  # [N] int32: with USE_FLAGS, only row blocks with a flagged row compute (others write padding)
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
        flagged = tl.max(tl.load(flag_ptr + rows, mask=rmask, other=0))
        c_hi = tl.where(flagged > 0, c_hi, c_lo)
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
    ps = tl.arange(0, KP)
    tl.store(
        out_ptr + (rows.to(tl.int64)[:, None] * SPLITS + split) * KP + ps[None, :], best, mask=rmask[:, None]
    )


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
    # One axis (no 65535 limit); row blocks vary fastest, so programs in flight share a reference tile in L2.
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BM)
    pid_m = pid % row_blocks
    pid_n = pid // row_blocks
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    cmask = cols < M
    s = _tile_s(
        q_ptr, r_ptr, qn_ptr, rn_ptr, rows, cols, rmask, cmask, N, M, D, T,
        IS_INT, True, SEGMENT, BM, BN, BK, PRECISION,
    )  # fmt: skip
    if IS_INT:  # d is a non-decreasing function of the integer S: compare S, no float64 per element
        cut = tl.load(cut_ptr + rows, mask=rmask, other=-1)
        hit = s <= cut[:, None]
        val = s
    else:
        cut = tl.load(cut_ptr + rows, mask=rmask, other=-1.0)
        d = _distance(s, n_tile, scale, IS_INT)
        hit = d <= cut[:, None]
        val = d.to(tl.int32, bitcast=True)
    hit = hit & rmask[:, None] & cmask[None, :]
    h32 = hit.to(tl.int32)
    per_row = tl.sum(h32, axis=1)
    if tl.sum(per_row) > 0:
        base = tl.atomic_add(cnt_ptr + rows, per_row, mask=per_row > 0)
        pos = base[:, None] + tl.cumsum(h32, axis=1) - 1
        key = (val.to(tl.int64) << 32) | cols.to(tl.int64)[None, :]
        tl.store(buf_ptr + rows.to(tl.int64)[:, None] * CAP + pos, key, mask=hit & (pos < CAP))


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


def _tile_norms(p: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """[T, N, D] packed images -> [T, N] squared norms, as the kernels' products see them; in blocks of
    ``rows`` images, so the temporaries stay small whatever N."""
    out = torch.empty(p.shape[:2], dtype=torch.int64 if p.dtype == torch.int8 else p.dtype, device=p.device)
    for s in range(0, p.shape[1], rows):
        x = p[:, s : s + rows]
        if p.dtype == torch.int8:
            x = x.to(torch.int16)  # products <= 128² fit int16; the sum is taken in int64
            out[:, s : s + rows] = (x * x).sum(-1, dtype=torch.int64)
        else:
            out[:, s : s + rows] = (x * x).sum(-1)
    return out


def _knn_splits(n: int, m: int, kp: int, device: torch.device) -> int:
    """Reference splits: enough programs to fill the device (about 4 per SM), each with >= 8 tiles."""
    row_blocks = triton.cdiv(n, BLOCK_M)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, triton.cdiv(4 * sms, row_blocks))
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
        self.norms = _tile_norms(self.data)

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


def _filled(buf: torch.Tensor, counts: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """The candidate buffer [N, cap] with the unwritten slots (and the rows in ``drop``) set to padding."""
    keep = torch.arange(buf.shape[1], device=buf.device)[None, :] < counts[:, None]
    if drop is not None:
        keep &= ~drop[:, None]
    return torch.where(keep, buf, _KEY_PAD)


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
    marks: list | None = None,
) -> torch.Tensor:
    """The filter path for one block of queries -> [N, cap + fallback] candidate keys (see the module
    comment): cut from the sampled references, GEMM + append, overflowed rows recomputed by the fused kernel.
    ``marks`` (CUDA only) receives (stage, event) pairs recorded after each stage, for a time breakdown."""
    n = q.count
    dev = q.data.device

    def mark(name: str) -> None:
        if marks is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((name, ev))

    mark("start")
    kk = min(max(k, FILTER_MIN_KK), sample.count)
    near = _fused_keys(q, sample, kk, d, tiles, scale, is_int, None)
    kth = torch.topk(near, kk, dim=1, largest=False, sorted=True).values[:, kk - 1]
    d_cut = (kth >> 32).to(torch.int32).view(torch.float32).contiguous()
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
    mark("filter")
    overflow = counts > cap
    if is_int:  # S -> the float32 distance: the exact path's epilogue (IEEE div and sqrt), as ``_distance``
        from memcore.ops.distance import _keys
        from memcore.reference.distance import finish

        buf = _keys(finish((buf >> 32).to(torch.float64), torch.uint8, d, 1.0), buf & 0xFFFFFFFF)
    buf = _filled(buf, counts, overflow)
    # Overflowed rows: the fused kernel over all references (blocks without one write only padding; the
    # other rows of a block with one keep their buffer, so their fused keys are dropped: no key twice).
    fallback = _fused_keys(q, r, k, d, tiles, scale, is_int, None, flags=overflow.to(torch.int32))
    fallback = torch.where(overflow[:, None], fallback, _KEY_PAD)
    out = torch.cat([buf, fallback], 1)
    mark("finish")
    return out


#: Filter kernel configurations, name -> (BM queries, BN references, BK for int8, num_warps, num_stages); the
#: first is the default. For uint8 on CUDA the fastest is chosen on first use per image shape (every one gives
#: the same candidates: integer S, same cut); floats keep the first (BK 32), so their last bits never depend
#: on timings.
FILTER_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "128x128x128/w8s3": (128, 128, 128, 8, 3),
    "128x256x128/w8s3": (128, 256, 128, 8, 3),
    "256x128x128/w8s3": (256, 128, 128, 8, 3),
    "128x128x128/w4s4": (128, 128, 128, 4, 4),
    "128x128x64/w8s4": (128, 128, 64, 8, 4),
}
#: Device types whose uint8 filter launches are tuned among FILTER_CONFIGS (tests add "cpu").
FILTER_TUNE_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


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
    """The filter launch configuration: tuned once per (device, tile size, grid) for uint8 on CUDA with the
    same machinery as ``backend="auto"`` (``memcore.ops._tune``: each configuration must reproduce the first
    one's candidates exactly, the fastest is cached); otherwise the first of FILTER_CONFIGS."""
    from memcore.ops import _tune

    names = list(FILTER_CONFIGS)
    dev = q.data.device
    if not is_int or dev.type not in FILTER_TUNE_DEVICE_TYPES or not _tune.ENABLED:
        return names[0]
    if torch.compiler.is_compiling():
        return _tune.chosen(("knn_filter", str(dev), d, tiles)) or names[0]

    def run(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        counts, buf = _filter_pass(q, r, cut, d, tiles, scale, is_int, cap, name)
        # appends land in atomic order: compare the sorted candidates
        return counts, torch.sort(_filled(buf, counts), dim=1).values

    return _tune.pick(("knn_filter", str(dev), d, tiles), names, run, dev)


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
    keys = [_filter_keys(b, r, sample, k, d, tiles, scale, is_int, cap, marks) for b in blocks]
    if len(keys) == 1:
        return keys[0]
    # blocks differ in width (the fallback's splits depend on the block's rows): keep each row's k smallest
    return torch.cat([torch.topk(x, k, dim=1, largest=False, sorted=True).values for x in keys])
