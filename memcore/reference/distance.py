"""Pure-PyTorch reference for normalized and tiled L2 ([C23] §4.2): the oracle and the benchmark baseline.

Definitions (images on the [0, 1] pixel scale, shape ``[C, H, W]``, the grid splits H×W into ``gh × gw``
non-overlapping tiles of ``th × tw`` pixels, ``n = C·th·tw`` values per tile):

    S_t(a, b)   = Σ_{tile t} (a − b)²                      (per-tile squared difference)
    tiled_l2    = max_t sqrt(S_t / n) = sqrt(max_t S_t / n)  (maximum over tiles at the same grid position)
    l2          = tiled_l2 with a 1×1 grid                     (= sqrt(mean((a − b)²)))

Exactness contract for uint8 images (values 0..255, the scale is 1/255):
    S is an integer, computed exactly (float64 GEMM of ``x − 128``: every product is at most 2^14 in
    magnitude and every partial sum stays far below 2^53, so the GEMM is exact in any summation order);
    ``d = float32(sqrt(float64(S) / (255² · n)))`` with IEEE division and square root. Every backend computes
    the same integer and the same two correctly rounded operations, so uint8 results are bit-identical across
    backends, and the bitset (``d <= float32(alpha)``) agrees bit for bit with thresholding the matrix.

Float inputs are upcast to float64 and computed with the Gram trick ``S = ‖a‖² + ‖b‖² − 2 a·b`` (clamped
at 0), then rounded once to float32 (float64 inputs, the test oracle, give float64 distances). ``scale``
multiplies float distances (0.5 maps [-1, 1] model outputs to [0, 1]).
"""

from __future__ import annotations

import math

import torch

#: 255², the squared uint8 pixel scale.
U8_SCALE2 = 65025.0


def tile_slices(h: int, w: int, grid: tuple[int, int]) -> list[tuple[slice, slice]]:
    """The ``gh·gw`` tiles of an ``h × w`` image in row-major grid order (ValueError unless the grid divides)."""
    gh, gw = grid
    if gh < 1 or gw < 1 or h % gh or w % gw:
        raise ValueError(f"grid {gh}x{gw} does not divide the image size {h}x{w}")
    th, tw = h // gh, w // gw
    return [(slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw)) for r in range(gh) for c in range(gw)]


def _work(x: torch.Tensor) -> torch.Tensor:
    """Working representation, always float64: uint8 shifted by -128 (then every GEMM is exact), floats upcast.

    Floats are computed in float64 too: a float32 Gram product loses the small distances of near-duplicates
    to cancellation (an exact duplicate comes out near 2e-6 instead of 0). In float64 a duplicate still comes
    out near 1e-8, so pairs within the Gram product's rounding of zero are summed again directly
    (:func:`_refine_near_zero`).
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float64) - 128.0
    return x.to(torch.float64)


def squared_tile_max(a: torch.Tensor, b: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``max_t S_t(a_i, b_j)`` for all pairs.

    Args:
        a: [N, C, H, W] images (uint8, float).
        b: [M, C, H, W] images, same dtype and C/H/W as ``a``.
        grid: (gh, gw), dividing H and W.

    Returns:
        [N, M] float64 (exact integers for uint8).
    """
    n_img, m_img = a.shape[0], b.shape[0]
    c, h, w = a.shape[1], a.shape[2], a.shape[3]
    tile = c * (h // grid[0]) * (w // grid[1])
    wa, wb = _work(a), _work(b)
    best = None
    # One tile at a time keeps the working set at one tile of each set (SD: 500 × 49152 values), not 16.
    for rs, cs in tile_slices(h, w, grid):
        ta = wa[:, :, rs, cs].reshape(n_img, tile)
        tb = wb[:, :, rs, cs].reshape(m_img, tile)
        na, nb = (ta * ta).sum(1), (tb * tb).sum(1)
        s = na[:, None] + nb[None, :] - 2.0 * (ta @ tb.T)
        if a.dtype != torch.uint8:
            _refine_near_zero(s, ta, tb, na, nb)
        best = s if best is None else torch.maximum(best, s)
    if best is None:  # impossible with a valid grid; keeps type checkers honest
        raise ValueError("grid has no tiles")
    return best.clamp_min_(0.0)


def _refine_near_zero(
    s: torch.Tensor, ta: torch.Tensor, tb: torch.Tensor, na: torch.Tensor, nb: torch.Tensor
) -> None:
    """Replace, in place, the Gram-trick sums ``s`` [N, M] that lie within its rounding error of zero by
    ``Σ (a − b)²`` summed directly (float64 tiles ``ta`` [N, n], ``tb`` [M, n], squared norms ``na``, ``nb``).

    ``‖a‖² + ‖b‖² − 2 a·b`` cancels: an exact duplicate comes out as a few ulps of ``‖a‖²`` (distance ~1e-8)
    rather than 0, and a threshold graph at alpha = 0 would miss it. The bound is the worst-case rounding of
    an n-term float64 dot product, ``n · eps · (‖a‖² + ‖b‖²)``: only pairs that are duplicates to ~1e-6 are
    summed again, so the reference keeps its GEMM speed on real data.
    """
    n = ta.shape[1]
    bound = n * torch.finfo(torch.float64).eps * (na[:, None] + nb[None, :])
    pairs = (s <= bound).nonzero()
    step = max(1, (8 << 20) // max(n, 1))  # pairs per chunk: 64 MiB of float64 differences
    for k in range(0, pairs.shape[0], step):
        i, j = pairs[k : k + step].unbind(1)
        s[i, j] = (ta[i] - tb[j]).square().sum(1)


def finish(s: torch.Tensor, dtype: torch.dtype, n: int, scale: float) -> torch.Tensor:
    """Squared tile maximum -> distance on the [0, 1] scale (float32; float64 for float64 inputs)."""
    if dtype == torch.uint8:
        # float64 S is an exact integer; one IEEE division and one IEEE sqrt, then one rounding to float32.
        return torch.sqrt(s / (U8_SCALE2 * n)).to(torch.float32)
    d = torch.sqrt(s / n)
    if scale != 1.0:
        d = d * scale
    return d if dtype == torch.float64 else d.to(torch.float32)


def _tile_size(x: torch.Tensor, grid: tuple[int, int]) -> int:
    return x.shape[1] * (x.shape[2] // grid[0]) * (x.shape[3] // grid[1])


def distance_matrix(
    a: torch.Tensor, b: torch.Tensor | None, grid: tuple[int, int], scale: float = 1.0
) -> torch.Tensor:
    """Tiled L2 between all pairs (``grid=(1, 1)``: plain normalized L2).

    Args:
        a: [N, C, H, W].
        b: [M, C, H, W] or None for pairwise within ``a`` (then symmetric with an exact zero diagonal).
        grid: (gh, gw).
        scale: factor on float distances (ignored for uint8).

    Returns:
        [N, M] (or [N, N]) float32 distances (float64 for float64 inputs).
    """
    pairwise = b is None
    other = a if b is None else b
    s = squared_tile_max(a, other, grid)
    d = finish(s, a.dtype, _tile_size(a, grid), scale)
    if pairwise:
        # Mirror the upper triangle so the matrix is exactly symmetric whatever the GEMM's rounding.
        upper = torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)
        d = torch.where(upper, d, d.T)
        d.fill_diagonal_(0.0)
    return d


def knn(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    grid: tuple[int, int],
    scale: float = 1.0,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest references of every query, streamed over ``refs`` in chunks of ``chunk``.

    Ties are broken by the smaller reference index, so the result equals a stable ascending sort of the
    cross distance matrix row. Memory is O(N·(k + chunk)), independent of M.

    Args:
        queries: [N, C, H, W].
        refs: [M, C, H, W].
        k: 0 <= k <= M.
        grid: (gh, gw); (1, 1) is plain L2.
        scale: factor on float distances.
        chunk: references per streamed block.

    Returns:
        (distances [N, k] float32 ascending, indices [N, k] int64).
    """
    n, m = queries.shape[0], refs.shape[0]
    out_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    best_d = queries.new_empty((n, 0), dtype=out_dtype)
    best_i = queries.new_empty((n, 0), dtype=torch.int64)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        d = distance_matrix(queries, refs[start:stop], grid, scale)
        idx = torch.arange(start, stop, device=queries.device).expand(n, -1)
        # The running best (sorted by (d, index), all indices < start) comes first, the chunk follows in
        # index order: a stable sort by distance therefore orders ties by index.
        cat_d = torch.cat([best_d, d], 1)
        cat_i = torch.cat([best_i, idx], 1)
        order = torch.sort(cat_d, dim=1, stable=True).indices[:, :k]
        best_d = torch.gather(cat_d, 1, order)
        best_i = torch.gather(cat_i, 1, order)
    return best_d, best_i


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Boolean [N, M] -> uint64 bitset [N, ceil(M/64)]; bit j of row i is word j // 64, position j % 64."""
    n, m = mask.shape
    words = math.ceil(m / 64)
    padded = torch.zeros((n, words * 64), dtype=torch.int64, device=mask.device)
    padded[:, :m] = mask.to(torch.int64)
    weights = torch.ones(64, dtype=torch.int64, device=mask.device) << torch.arange(
        64, dtype=torch.int64, device=mask.device
    )
    # Distinct powers of two: the sum is the bitwise OR (bit 63 is int64's sign bit; the sum cannot overflow).
    packed = (padded.view(n, words, 64) * weights).sum(-1)
    return packed.view(torch.uint64)


def unpack_bits(words: torch.Tensor, m: int) -> torch.Tensor:
    """uint64 bitset [N, W] -> boolean [N, m] (the inverse of :func:`pack_bits`)."""
    n = words.shape[0]
    w = words.view(torch.int64)
    shifts = torch.arange(64, dtype=torch.int64, device=words.device)
    bits = (w[:, :, None] >> shifts) & 1
    return bits.reshape(n, -1)[:, :m].to(torch.bool)


def graph(
    a: torch.Tensor, b: torch.Tensor | None, alpha: float, grid: tuple[int, int], scale: float = 1.0
) -> torch.Tensor:
    """Thresholded graph as a bitset: bit j of row i set iff ``d(a_i, b_j) <= float32(alpha)``.

    With ``b=None`` the graph is among ``a`` and the diagonal is clear.

    Args:
        a: [N, C, H, W].
        b: [M, C, H, W] or None.
        alpha: threshold on the [0, 1] distance scale.
        grid: (gh, gw).
        scale: factor on float distances.

    Returns:
        uint64 [N, ceil(M/64)] (M = N when ``b`` is None).
    """
    d = distance_matrix(a, b, grid, scale)
    # Compare in the distance's own dtype with alpha rounded to it: exactly what `d <= alpha` does on a tensor.
    mask = d <= torch.tensor(alpha, dtype=d.dtype, device=d.device)
    if b is None:
        mask.fill_diagonal_(False)
    return pack_bits(mask)
