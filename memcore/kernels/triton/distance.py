"""Triton kernels for normalized / tiled L2 ([C23] §4.2): per-tile Gram products and a fused epilogue.

Both sets are packed tile-major, ``[T, N, D]`` (T = gh·gw tiles of D = C·th·tw values), by one PyTorch copy
(a free view for the 1×1 grid). Then two kernels:

1. ``_tile_sq_kernel``, one program per (row block, column block, tile): ``G = A_t B_tᵀ`` with ``tl.dot``,
   ``S_t = ‖a‖² + ‖b‖² − 2G`` (norms summed from the same loads) and ``atomic_max`` into ``smax [N, M]`` (the
   maximum over tiles at the same grid position). uint8 images are shifted to int8 in registers
   (``x − 128``: differences are unchanged, and int8
   ``tl.dot`` with int32 accumulation is exact; the K loop is split into segments of at most 2^17 products so
   int32 never overflows, and segments add up in int64). Floats are packed as float32 and multiplied with
   ``input_precision="tf32x3"`` (≈ fp32 accuracy) on the GPU. Pairwise calls skip blocks below the diagonal.
2. ``_finish_kernel``: ``d = sqrt(S / n)`` — for uint8 exactly ``float32(sqrt(float64(S) / (255²·n)))`` with
   IEEE division and square root, bit-identical to the reference — and either the float32 matrix or, for the
   graph, one uint64 word per (row, 64 columns): bit j set iff ``d <= float32(alpha)``. Pairwise results read
   S from the upper triangle, so they are exactly symmetric.

Masked K-tail lanes load 128 (uint8, shifted to 0) or 0.0, so they contribute nothing.
"""

from __future__ import annotations

import math

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
    """uint8 -> int8 (x − 128) in registers; masked lanes load 128 -> 0, contributing nothing."""
    return (tl.load(ptrs, mask=mask, other=128).to(tl.int16) - 128).to(tl.int8)


@triton.jit
def _tile_sq_kernel(
    a_ptr,  # [T, N, D] uint8 or float32 (tile-major)
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
    """[N, C, H, W] -> [T, N, D] tile-major (one copy; free for a 1×1 grid); uint8 stays uint8, floats ->
    float32 (the kernel shifts uint8 to int8 and masks the K tail, so no padding is needed)."""
    n, c, h, w = x.shape
    gh, gw = grid
    th, tw = h // gh, w // gw
    if x.dtype != torch.uint8:
        x = x.to(torch.float32)
    # reshape may return a strided view (e.g. one-pixel-wide tiles); the kernel needs contiguous rows.
    return (
        x.reshape(n, c, gh, th, gw, tw)
        .permute(2, 4, 0, 1, 3, 5)
        .reshape(gh * gw, n, c * th * tw)
        .contiguous()
    )


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


# ------------------------------------------------------------------------------------------- fused k-NN
# k-NN with the selection inside the kernel: the [N, M] distances never reach memory. One program owns BM
# queries and a contiguous range of references (a "split"); per reference tile it computes the tiled S (max
# over grid tiles), the float32 distance exactly as ``_finish_kernel`` does, and the int64 key
# ``bits(d) << 32 | index`` (distances >= 0 order like their bits, so keys order by (distance, index): the
# tie rule of every k-NN backend). It keeps each row's KP smallest keys in registers, merging a tile in (one
# bitonic sort of 2·KP keys per row) only when some key of the tile beats some row's current KP-th key.
# Each split writes its KP keys per row; one ``topk`` over splits·KP keys per row finishes. KP = BN is the
# power of two >= k (k <= KNN_MAX_K).
KNN_MAX_K = 128
# uint8 tiles of at most this many values keep S and its partial sums in int32 (|S| <= D·2^15 < 2^31)
ACC32_MAX_D = 32768
_KEY_MAX: tl.constexpr = tl.constexpr(0x7FFFFFFFFFFFFFFF)


@triton.jit
def _knn_kernel(
    q_ptr,  # [T, N, D] uint8 or float32 (tile-major)
    r_ptr,  # [T, M, D]
    qn_ptr,  # [T, N] squared norms (int64 of x − 128 for uint8; float32 otherwise)
    rn_ptr,  # [T, M]
    out_ptr,  # [N, SPLITS, KP] int64 keys
    N,
    M,
    D,
    T,
    per_split,  # references per split (a multiple of BN)
    n_tile,  # int: values per tile
    scale,  # float32 factor on float distances
    SPLITS,
    IS_INT: tl.constexpr,
    ACC32: tl.constexpr,  # uint8 with D <= 2^15: S and every partial sum fit int32 (fewer registers)
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
    ks = tl.arange(0, BK)
    best = tl.full((BM, KP), _KEY_MAX, dtype=tl.int64)
    thr = tl.full((BM,), _KEY_MAX, dtype=tl.int64)  # each row's current KP-th smallest key
    c_lo = split * per_split
    c_hi = tl.minimum(M, c_lo + per_split)
    for c0 in range(c_lo, c_hi, KP):
        cols = c0 + tl.arange(0, KP)
        cmask = cols < c_hi
        if IS_INT:
            if ACC32:
                s = tl.zeros((BM, KP), dtype=tl.int32)
            else:
                s = tl.zeros((BM, KP), dtype=tl.int64)
        else:
            s = tl.zeros((BM, KP), dtype=tl.float32)
        for t in range(0, T):
            t64 = tl.zeros((), dtype=tl.int64) + t  # int64 offsets (a plain int in the interpreter)
            a_base = q_ptr + t64 * N * D + rows.to(tl.int64)[:, None] * D
            b_base = r_ptr + t64 * M * D + cols.to(tl.int64)[None, :] * D
            na = tl.load(qn_ptr + t64 * N + rows, mask=rmask, other=0)
            nb = tl.load(rn_ptr + t64 * M + cols, mask=cmask, other=0)
            if IS_INT and ACC32:
                g32 = tl.zeros((BM, KP), dtype=tl.int32)  # |g| <= D·2^14 < 2^29
                for k0 in range(0, D, BK):
                    kin = (k0 + ks) < D
                    a = _load_i8(a_base + (k0 + ks)[None, :], rmask[:, None] & kin[None, :])
                    b = _load_i8(b_base + (k0 + ks)[:, None], cmask[None, :] & kin[:, None])
                    g32 = tl.dot(a, b, g32, out_dtype=tl.int32)
                st = na.to(tl.int32)[:, None] + nb.to(tl.int32)[None, :] - 2 * g32
            elif IS_INT:
                g = tl.zeros((BM, KP), dtype=tl.int64)
                for s0 in range(0, D, SEGMENT):
                    part = tl.zeros((BM, KP), dtype=tl.int32)
                    for k0 in range(s0, tl.minimum(s0 + SEGMENT, D), BK):
                        kin = (k0 + ks) < D
                        a = _load_i8(a_base + (k0 + ks)[None, :], rmask[:, None] & kin[None, :])
                        b = _load_i8(b_base + (k0 + ks)[:, None], cmask[None, :] & kin[:, None])
                        part = tl.dot(a, b, part, out_dtype=tl.int32)
                    g += part.to(tl.int64)
                st = na[:, None] + nb[None, :] - 2 * g
            else:
                g = tl.zeros((BM, KP), dtype=tl.float32)
                for k0 in range(0, D, BK):
                    kin = (k0 + ks) < D
                    a = tl.load(a_base + (k0 + ks)[None, :], mask=rmask[:, None] & kin[None, :], other=0.0)
                    b = tl.load(b_base + (k0 + ks)[:, None], mask=cmask[None, :] & kin[:, None], other=0.0)
                    g = tl.dot(a, b, g, input_precision=PRECISION)
                st = tl.maximum(na[:, None] + nb[None, :] - 2.0 * g, 0.0)
            s = tl.maximum(s, st)
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


def _tile_norms(p: torch.Tensor) -> torch.Tensor:
    """[T, N, D] packed images -> [T, N] squared norms, as the kernel's products see them (uint8: x − 128)."""
    if p.dtype == torch.uint8:
        x = p.to(torch.int32) - 128
        return (x * x).sum(-1, dtype=torch.int64)
    return (p * p).sum(-1)


def _knn_splits(n: int, m: int, kp: int, device: torch.device) -> int:
    """Reference splits: enough programs to fill the device (about 4 per SM), each with >= 8 tiles."""
    row_blocks = triton.cdiv(n, BLOCK_M)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, triton.cdiv(4 * sms, row_blocks))
    return max(1, min(want, triton.cdiv(m, 8 * kp)))


def knn_keys(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    grid: tuple[int, int],
    scale: float = 1.0,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """Fused k-NN (selection in the kernel; memory O(N·splits·k), never [N, M]).

    Args:
        queries: [N, C, H, W] uint8 or float.
        refs: [M, C, H, W], same dtype, M >= k.
        k: neighbours, 1 <= k <= KNN_MAX_K.
        splits: reference ranges run in parallel per row block (None: enough to fill the device).

    Returns:
        [N, splits·KP] int64 keys ``bits(d) << 32 | index``, each split's KP smallest (padding keys are
        int64 max): the k smallest keys are the k nearest references, ties to the smaller index
        (``memcore.ops.distance`` finishes with one ``topk`` and decodes them).
    """
    if not 1 <= k <= KNN_MAX_K:
        raise ValueError(f"the fused Triton k-NN takes 1 <= k <= {KNN_MAX_K}, got {k}")
    n, c, h, w = queries.shape
    m = refs.shape[0]
    if n == 0:
        return torch.empty((0, k), dtype=torch.int64, device=queries.device)
    d = c * (h // grid[0]) * (w // grid[1])
    is_int = queries.dtype == torch.uint8
    kp = max(16, triton.next_power_of_2(k))  # tl.dot needs tiles of at least 16
    pq, pr = _pack(queries, grid), _pack(refs, grid)
    splits = splits or _knn_splits(n, m, kp, queries.device)
    per_split = triton.cdiv(triton.cdiv(m, splits), kp) * kp
    splits = triton.cdiv(m, per_split)
    keys = torch.empty((n, splits, kp), dtype=torch.int64, device=queries.device)
    _knn_kernel[(triton.cdiv(n, BLOCK_M), splits)](
        pq,
        pr,
        _tile_norms(pq),
        _tile_norms(pr),
        keys,
        n,
        m,
        d,
        grid[0] * grid[1],
        per_split,
        d,
        scale,
        splits,
        IS_INT=is_int,
        ACC32=is_int and d <= ACC32_MAX_D,
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
