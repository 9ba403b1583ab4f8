"""The ``cublas`` distance backend: exact uint8 tiled L2 ([C23] §4.2) from int8 GEMMs (``torch._int_mm``).

Why here: like ``kernels/triton/``, this is a private compute path with a launcher per op that only
``memcore/ops/distance.py`` calls (ops keeps the custom-op registration and the dispatch); unlike the native
core it never touches ``memcore._C``, and unlike ``reference/`` it is not an oracle but a fast path. On CUDA,
``torch._int_mm`` is cuBLAS(Lt) int8 × int8 → int32 on the int8 tensor cores; on CPU it is torch's CPU int8
GEMM, which is slow but lets the very same code (padding included) run in the CPU test lane.

Formula (uint8 images only; the float dtypes have no exact GEMM path and stay on the other backends). For the
tile vectors of one grid position, shifted to int8 (``a' = a − 128``, ``b' = b − 128``, D values per tile):

    S_t(a, b) = Σ (a − b)² = ‖a'‖² + ‖b'‖² − 2 a'·b'            (shifting leaves differences unchanged)
    d(a, b)   = float32(sqrt(float64(max_t S_t) / (255² · D)))    (the exact path's epilogue, reference.finish)

- ``a'·b'``: every int8 product is at most 2^14 in magnitude, so an int32 GEMM over fewer than 2^17 values is
  exact; longer tiles split K into :data:`K_SPLIT` chunks whose int32 results add up in int64.
- Norms are summed in int64 from the same padded int8 rows the GEMM reads.
- Padding (cuBLAS wants K and the column count multiples of 8 and more than 16 rows) appends int8 zeros,
  i.e. the value 128 on both sides: a zero adds 0 to ``a'·b'`` and 0 to both norms, so padded and unpadded
  vectors give the same S. Rows are padded the same way on CPU so that the CPU tests run the GPU code path.
- S is the same integer every other backend computes, and the epilogue is the same two IEEE operations, so
  results are bit-identical to the ``cpu``, ``cuda``, ``triton`` and ``reference`` backends. Pairwise S is
  exactly symmetric with a zero diagonal by construction (integer arithmetic, one shared packed operand).
- The graph compares S with an integer threshold instead of forming float distances: ``d(S)`` is a
  non-decreasing function of S (every step is a correctly rounded monotone operation), so
  ``{S : d(S) <= float32(alpha)}`` is ``{S <= S*}``, and :func:`int_threshold` finds ``S*`` by bisection on
  the very formula above; the bitset equals thresholding the float32 matrix bit for bit.

On the H100 it was the slowest exact backend (10.6 ms SD pairwise, 51 ms CIFAR k-NN; c020035), so the
static ``auto`` order never names it; ``auto``'s autotuning on CUDA
(:mod:`memcore.ops._tune`) may pick it once it reproduced the static choice's result bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from memcore.reference import distance as ref

#: Most values per int32 GEMM: 2^16 products of magnitude <= 2^14 stay below 2^31 (K < 2^17 would still
#: be exact; a power of two keeps the chunks aligned; keep it a multiple of 16). Tests lower it to force the
#: K-split path.
K_SPLIT = 65536
#: torch._int_mm on CUDA needs K and N multiples of 8 and M > 16. Rows are padded to multiples of 8 (at least
#: 24, so the pairwise case can use one padded operand as both sides); K to multiples of 16, so every row of
#: both operands starts 16-byte aligned for cuBLASLt's vectorised int8 loads (no cost on real image sizes).
_ROW_ALIGN = 8
_K_ALIGN = 16
_MIN_ROWS = 24


def check_dtype(x: torch.Tensor) -> None:
    """The cublas backend is the exact uint8 path only: a clear TypeError for anything else."""
    if x.dtype != torch.uint8:
        raise TypeError(
            f"backend 'cublas' takes uint8 images only (the exact int8 GEMM path), got {x.dtype}; "
            "use backend 'cpu', 'cuda' or 'triton' for float images"
        )


def _round_up(v: int, mult: int) -> int:
    return -(-v // mult) * mult


class Packed(NamedTuple):
    """One image set, shifted to int8 and packed tile-major for the GEMMs.

    Attributes:
        data: [T, R, K] int8, T = gh·gw tiles, R >= n rows (padded), K >= d values (padded); row i of tile t
            holds image i's tile t (all channels) minus 128, zeros beyond n rows and d values.
        norms: [T, n] int64, ``‖a'‖²`` per image and tile.
        n: number of images.
        d: values per tile, C·th·tw (the unpadded length; the epilogue's n).
    """

    data: torch.Tensor
    norms: torch.Tensor
    n: int
    d: int


def pack(x: torch.Tensor, grid: tuple[int, int]) -> Packed:
    """Shift, pack and pad an image set.

    Args:
        x: [N, C, H, W] uint8 (any strides).
        grid: (gh, gw), dividing H and W.

    Returns:
        :class:`Packed` with ``data`` [gh·gw, max(24, ceil8(N)), ceil16(C·th·tw)] int8.
    """
    n, c, h, w = x.shape
    gh, gw = grid
    th, tw = h // gh, w // gw
    d = c * th * tw
    rows, k = max(_MIN_ROWS, _round_up(n, _ROW_ALIGN)), _round_up(d, _K_ALIGN)
    # x ^ 0x80 reinterpreted as int8 is x − 128 (0 -> -128, 128 -> 0, 255 -> 127) in one uint8 pass.
    shifted = (x ^ 128).view(torch.int8)
    tiles = shifted.reshape(n, c, gh, th, gw, tw).permute(2, 4, 0, 1, 3, 5).reshape(gh * gw, n, d)
    data = torch.zeros((gh * gw, rows, k), dtype=torch.int8, device=x.device)
    data[:, :n, :d] = tiles
    return Packed(data, _sq_norms(data[:, :n]), n, d)


def _sq_norms(data: torch.Tensor) -> torch.Tensor:
    """[T, n, K] int8 -> [T, n] int64 row sums of squares; int16 squares (<= 2^14) in row blocks, so the
    temporary stays small whatever the image size."""
    t, n, k = data.shape
    out = torch.empty((t, n), dtype=torch.int64, device=data.device)
    block = max(1, (1 << 24) // max(1, t * k))
    for i0 in range(0, n, block):
        part = data[:, i0 : i0 + block].to(torch.int16)
        out[:, i0 : i0 + block] = part.mul_(part).sum(-1, dtype=torch.int64)
    return out


def _epilogue_dtype(d: int) -> torch.dtype:
    # |−2G| <= 2^15·d and S <= 255²·d < 2^16·d: int32 holds every intermediate below 2^16·d <= 2^31.
    return torch.int32 if (d << 16) < 2**31 else torch.int64


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ bᵀ`` exactly. a: [R, K] int8, b: [Q, K] int8 -> [R, Q] int32 (int64 when K is split).

    ``b.t()`` is a column-major view: cuBLAS's preferred int8 ("TN") layout, and on CPU the fast one too.
    """
    k = a.shape[1]
    if k <= K_SPLIT:
        return torch._int_mm(a, b.t())
    acc = None
    for k0 in range(0, k, K_SPLIT):
        part = torch._int_mm(a[:, k0 : k0 + K_SPLIT], b[:, k0 : k0 + K_SPLIT].t()).to(torch.int64)
        acc = part if acc is None else acc.add_(part)
    return acc


def squared_tile_max(pa: Packed, pb: Packed) -> torch.Tensor:
    """``max_t S_t(a_i, b_j)`` for all pairs, exact.

    Args:
        pa: packed [N] set.
        pb: packed [M] set (``pa`` itself for pairwise: packed once; S is symmetric exactly either way).

    Returns:
        [N, M] int32 (int64 for tiles of 32768 values or more).
    """
    n, m, d = pa.n, pb.n, pa.d
    sdt = _epilogue_dtype(d)
    smax = None
    for t in range(pa.data.shape[0]):
        g = _dot(pa.data[t], pb.data[t])[:n, :m]
        if g.dtype == torch.int64 and sdt == torch.int32:  # split K sums of a short tile (tests force it)
            g = g.to(sdt)
        # S = ‖a'‖² − 2 a'·b' + ‖b'‖²: two elementwise passes, the first one dropping the padding and (for long
        # tiles) widening the int32 GEMM output to int64 by type promotion.
        s = torch.add(pa.norms[t].to(sdt)[:, None], g, alpha=-2).add_(pb.norms[t].to(sdt)[None, :])
        smax = s if smax is None else torch.maximum(smax, s, out=smax)
    if smax is None:  # impossible with a valid grid
        raise ValueError("grid has no tiles")
    return smax


def finish(smax: torch.Tensor, d: int) -> torch.Tensor:
    """Integer S [N, M] -> float32 distances: the exact path's epilogue (``reference.finish``), one IEEE
    division and one IEEE square root in float64 (S < 2^53 converts exactly), one rounding to float32."""
    return ref.finish(smax.to(torch.float64), torch.uint8, d, 1.0)


def int_threshold(alpha: float, d: int) -> int:
    """The largest integer S with ``finish(S, d) <= float32(alpha)``, or -1 when there is none.

    ``finish`` is non-decreasing in S, so bisection over [0, 255²·d] on the host (about 40 scalar evaluations
    of the same formula) gives the exact cut; comparing ``S <= S*`` then equals comparing the float32
    distance with ``float32(alpha)`` as the exact path's bitset epilogue does.
    """
    thr = torch.tensor(alpha, dtype=torch.float32)

    def ok(s: int) -> bool:
        return bool(finish(torch.tensor([s], dtype=torch.int64), d)[0] <= thr)

    lo, hi = -1, 65025 * d  # invariant: ok(lo) or lo == -1; S > hi never occurs
    if ok(hi):
        return hi
    while hi - lo > 1:  # invariant: not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _check_pair(a: torch.Tensor, b: torch.Tensor | None) -> None:
    check_dtype(a)
    if b is not None:
        check_dtype(b)


def distance_matrix(a: torch.Tensor, b: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
    """Tiled L2 matrix (1×1 grid: plain L2), exact.

    Args:
        a: [N, C, H, W] uint8.
        b: [M, C, H, W] uint8, or None for pairwise within ``a`` (symmetric, zero diagonal).
        grid: (gh, gw), dividing H and W.

    Returns:
        [N, M] float32 ([N, N] for ``b=None``), bit-identical to every other backend.
    """
    _check_pair(a, b)
    m = a.shape[0] if b is None else b.shape[0]
    if a.shape[0] == 0 or m == 0:
        return torch.empty((a.shape[0], m), dtype=torch.float32, device=a.device)
    pa = pack(a, grid)
    pb = pa if b is None else pack(b, grid)
    return finish(squared_tile_max(pa, pb), pa.d)


def cross_distances(pq: Packed, refs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Distances from pre-packed queries to one block of references (the k-NN's per-chunk matrix).

    Args:
        pq: queries packed once by :func:`pack` (N images).
        refs: [M, C, H, W] uint8 block.
        grid: the grid ``pq`` was packed with.

    Returns:
        [N, M] float32.
    """
    check_dtype(refs)
    if pq.n == 0 or refs.shape[0] == 0:
        return torch.empty((pq.n, refs.shape[0]), dtype=torch.float32, device=refs.device)
    return finish(squared_tile_max(pq, pack(refs, grid)), pq.d)


def distance_graph(
    a: torch.Tensor, b: torch.Tensor | None, alpha: float, grid: tuple[int, int]
) -> torch.Tensor:
    """Bitset of ``d <= float32(alpha)`` from the integer S (no float matrix).

    Args:
        a: [N, C, H, W] uint8.
        b: [M, C, H, W] uint8, or None for the graph among ``a`` (diagonal clear).
        alpha: threshold on the [0, 1] scale.
        grid: (gh, gw).

    Returns:
        uint64 [N, ceil(M/64)], bit j of row i in word j // 64 at position j % 64.
    """
    _check_pair(a, b)
    n = a.shape[0]
    m = n if b is None else b.shape[0]
    if n == 0 or m == 0:
        return torch.zeros((n, -(-m // 64)), dtype=torch.uint64, device=a.device)
    pa = pack(a, grid)
    pb = pa if b is None else pack(b, grid)
    mask = squared_tile_max(pa, pb) <= int_threshold(alpha, pa.d)
    if b is None:
        mask.fill_diagonal_(False)
    return ref.pack_bits(mask)
