"""The ``cublas`` distance backend (int8 GEMMs through torch._int_mm) on CPU tensors: bit-identical to the
``cpu`` backend (and so to the reference) for matrices, k-NN (values, indices, tie order) and bitset graphs,
the padding and K-split paths, the integer graph threshold, and its dtype and backend-selection rules."""

from __future__ import annotations

import pytest
import torch
from test_distance import SHAPES as BASE_SHAPES

import memcore.distance as D
from memcore.kernels.intmm import distance as ik
from memcore.ops import _backend
from memcore.ops import distance as ops
from memcore.reference import distance as ref

HAVE_CPU = _backend.available("cpu", torch.device("cpu"))[0]


def expected_backend() -> str:
    """The backend every result is compared with: cpu when the core is built (the brief's oracle), else the
    reference, which the cpu backend matches bit for bit on uint8 (tests/test_distance.py)."""
    return "cpu" if HAVE_CPU else "reference"


def images(gen, n, c, h, w, lo=0, hi=256):
    return torch.randint(lo, hi, (n, c, h, w), generator=gen, dtype=torch.uint8)


# (N, C, H, W, grid): test_distance's shapes (N = 1, 7; non-square images; one-pixel-wide / one-row tiles;
# 1×1 grid; C = 1 and 3) plus one-pixel tiles, N = 127, and tile lengths that are and are not multiples of 8.
SHAPES = [*BASE_SHAPES, (3, 1, 4, 4, (4, 4)), (127, 3, 4, 8, (2, 2)), (30, 1, 16, 8, (1, 1))]


@pytest.mark.parametrize("shape", SHAPES)
def test_matrix_bit_identical(shape, rng):
    n, c, h, w, grid = shape
    a = images(rng, n, c, h, w)
    b = images(rng, 3, c, h, w)
    want_be = expected_backend()
    got = D.tiled_l2(a, grid=grid, backend="cublas")
    assert got.dtype == torch.float32 and got.shape == (n, n)
    assert torch.equal(got, D.tiled_l2(a, grid=grid, backend=want_be))
    assert torch.equal(got, got.T) and bool((got.diagonal() == 0).all())
    assert torch.equal(
        D.tiled_l2(a, b, grid=grid, backend="cublas"), D.tiled_l2(a, b, grid=grid, backend=want_be)
    )
    assert torch.equal(
        D.tiled_l2(b, a, grid=grid, backend="cublas"), D.tiled_l2(b, a, grid=grid, backend=want_be)
    )


def test_extreme_values_and_strided_input(rng):
    # All-0 and all-255 images hit the int8 extremes (-128, 127) in every product and norm.
    a = torch.cat(
        [torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)]
    )
    d = D.l2(a, backend="cublas")
    assert d[0, 2].item() == 1.0 and d[0, 1].item() == 0.0 and d[2, 3].item() == 0.0
    # channels_last (non-contiguous NCHW strides) gives the same numbers
    x = images(rng, 5, 3, 8, 8)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(
        D.tiled_l2(cl, grid=(2, 4), backend="cublas"), D.tiled_l2(x, grid=(2, 4), backend=expected_backend())
    )


def test_empty_sets(rng):
    e = torch.empty((0, 3, 4, 4), dtype=torch.uint8)
    a = images(rng, 3, 3, 4, 4)
    assert D.tiled_l2(e, grid=(2, 2), backend="cublas").shape == (0, 0)
    assert D.tiled_l2(a, e, grid=(2, 2), backend="cublas").shape == (3, 0)
    assert D.tiled_l2(e, a, grid=(2, 2), backend="cublas").shape == (0, 3)
    dd, ii = D.knn(e, a, 2, backend="cublas")
    assert dd.shape == (0, 2) and ii.shape == (0, 2) and ii.dtype == torch.int64
    dd, ii = D.knn(a, e, 0, backend="cublas")
    assert dd.shape == (3, 0) and ii.shape == (3, 0)
    dd, ii = D.knn(a, a, 0, backend="cublas")
    assert dd.shape == (3, 0)
    g = D.tiled_l2_graph(e, 0.1, grid=(2, 2), backend="cublas")
    assert g.shape == (0, 0) and g.dtype == torch.uint64
    g = D.tiled_l2_graph(a, 0.1, b=e, grid=(2, 2), backend="cublas")
    assert g.shape == (3, 0) and g.dtype == torch.uint64
    g = D.tiled_l2_graph(e, 0.1, b=a, grid=(2, 2), backend="cublas")
    assert g.shape == (0, 1)


# ---------------------------------------------------------------------------------------------- padding


def test_pack_pads_with_zeros_and_norms_ignore_padding(rng):
    x = images(rng, 5, 3, 6, 10, hi=256)  # tiles of 3·3·5 = 45 values: K padded to 48, rows to 24
    p = ik.pack(x, (2, 2))
    assert p.data.dtype == torch.int8 and p.data.shape == (4, 24, 48) and p.n == 5 and p.d == 45
    assert not bool(p.data[:, 5:].any()) and not bool(p.data[:, :, 45:].any())
    tiles = [
        x[:, :, rs, cs].reshape(5, -1).to(torch.int64) - 128 for rs, cs in ref.tile_slices(6, 10, (2, 2))
    ]
    for t, tile in enumerate(tiles):
        assert torch.equal(p.data[t, :5, :45].to(torch.int64), tile)
        assert torch.equal(p.norms[t], (tile * tile).sum(1))
    # the padded GEMM gives the unpadded S exactly
    s = ik.squared_tile_max(p, p)
    want = ref.squared_tile_max(x, x, (2, 2)).to(torch.int64)
    assert torch.equal(s.to(torch.int64), want)


def test_k_split_forced(monkeypatch, rng):
    # Tiles of 3·6·7 = 126 values (padded to 128) in chunks of 16 and of 48: many int32 GEMMs summed in int64.
    a = images(rng, 9, 3, 12, 14)
    b = images(rng, 20, 3, 12, 14)
    want_be = expected_backend()
    want_m = D.tiled_l2(a, b, grid=(2, 2), backend=want_be)
    want_p = D.tiled_l2(a, grid=(2, 2), backend=want_be)
    want_k = D.knn(a, b, 5, grid=(2, 2), backend=want_be, chunk=6)
    want_g = D.tiled_l2_graph(a, want_p.median().item(), grid=(2, 2), backend=want_be)
    for split in (16, 48):
        monkeypatch.setattr(ik, "K_SPLIT", split)
        assert torch.equal(D.tiled_l2(a, b, grid=(2, 2), backend="cublas"), want_m)
        assert torch.equal(D.tiled_l2(a, grid=(2, 2), backend="cublas"), want_p)
        k = D.knn(a, b, 5, grid=(2, 2), backend="cublas", chunk=6)
        assert torch.equal(k[0], want_k[0]) and torch.equal(k[1], want_k[1])
        g = D.tiled_l2_graph(a, want_p.median().item(), grid=(2, 2), backend="cublas")
        assert torch.equal(g, want_g)


def test_large_tile_int64_epilogue_and_real_split(rng):
    # One tile of 3·160·160 = 76800 values: beyond K_SPLIT (two int32 GEMMs) and beyond the int32 epilogue.
    x = images(rng, 4, 3, 160, 160)
    x[0] = 0
    x[1] = 255
    assert 3 * 160 * 160 > ik.K_SPLIT and ik._epilogue_dtype(3 * 160 * 160) == torch.int64
    got = D.l2(x, backend="cublas")
    assert got[0, 1].item() == 1.0
    assert torch.equal(got, D.l2(x, backend=expected_backend()))
    assert torch.equal(
        D.tiled_l2(x, grid=(2, 1), backend="cublas"), D.tiled_l2(x, grid=(2, 1), backend=expected_backend())
    )


# ---------------------------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("grid", [None, (2, 2)])
def test_knn_ties_bit_identical(grid, rng):
    # Few grey levels and duplicated references: many exactly equal distances, ties to the smaller index.
    q = images(rng, 7, 1, 4, 4, hi=3)
    base = images(rng, 6, 1, 4, 4, hi=3)
    refs = torch.cat([base, base[[2, 0, 5]], base, q[:2]])
    cross = D.tiled_l2(q, refs, grid=grid or (1, 1), backend="cublas")
    want = torch.sort(cross, dim=1, stable=True)
    for k in (1, 5, refs.shape[0]):
        for chunk in (1, 4, 4096):
            d, i = D.knn(q, refs, k, grid=grid, backend="cublas", chunk=chunk)
            assert torch.equal(d, want.values[:, :k]) and torch.equal(i, want.indices[:, :k])
            dc, ic = D.knn(q, refs, k, grid=grid, backend=expected_backend(), chunk=chunk)
            assert torch.equal(d, dc) and torch.equal(i, ic)


def test_knn_random_against_cpu(rng):
    q = images(rng, 33, 3, 8, 8)
    r = images(rng, 70, 3, 8, 8)
    for grid, chunk in ((None, 16), ((2, 2), 70), ((8, 8), 9)):
        got = D.knn(q, r, 10, grid=grid, backend="cublas", chunk=chunk)
        want = D.knn(q, r, 10, grid=grid, backend=expected_backend(), chunk=chunk)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------- graph


def _alphas(d: torch.Tensor) -> list[float]:
    """Fixed alphas plus the matrix's own values and their float32 neighbours (the exact boundary)."""
    vals = torch.unique(d.flatten())
    picks = [vals[0], vals[len(vals) // 2], vals[-1]] if vals.numel() else []
    out = [-0.5, 0.0, 0.01, 0.02, 0.05, 0.3, 1.0, 2.0]
    for v in picks:
        out += [
            v.item(),
            torch.nextafter(v, torch.tensor(-1.0)).item(),
            torch.nextafter(v, torch.tensor(2.0)).item(),
        ]
    # a float64 alpha between two float32 values: compared as float32(alpha), like every other backend
    if picks:
        out.append(picks[1].item() * (1 + 1e-9))
    return out


@pytest.mark.parametrize("n", [1, 7, 65, 127])
def test_graph_bit_identical(n, rng):
    a = images(rng, n, 3, 4, 4, hi=8)  # low contrast: many distances near each alpha
    b = images(rng, 66, 3, 4, 4, hi=8)
    want_be = expected_backend()
    d = D.tiled_l2(a, grid=(2, 2), backend=want_be)
    for alpha in _alphas(d):
        g = D.tiled_l2_graph(a, alpha, grid=(2, 2), backend="cublas")
        assert g.dtype == torch.uint64 and g.shape == (n, (n + 63) // 64)
        assert torch.equal(g, D.tiled_l2_graph(a, alpha, grid=(2, 2), backend=want_be))
        gc = D.tiled_l2_graph(a, alpha, b=b, grid=(2, 2), backend="cublas")
        assert torch.equal(gc, D.tiled_l2_graph(a, alpha, b=b, grid=(2, 2), backend=want_be))
    # the diagonal is clear even when alpha admits everything
    g = ref.unpack_bits(D.tiled_l2_graph(a, 2.0, grid=(2, 2), backend="cublas"), n)
    assert torch.equal(g, ~torch.eye(n, dtype=torch.bool))


@pytest.mark.parametrize("d", [1, 3, 8])
def test_int_threshold_is_the_exact_cut(d):
    # Every integer S a tile of d values can produce, against alphas at and around every reachable distance:
    # {S : finish(S) <= float32(alpha)} must be exactly {S <= int_threshold(alpha)}.
    s = torch.arange(0, 65025 * d + 1, dtype=torch.int64)
    dist = ik.finish(s[None], d)[0]
    vals = torch.unique(dist)
    idx = torch.linspace(0, len(vals) - 1, 40).round().long().unique()
    alphas = [-1.0, 0.0, 1.0, 1.5]
    for v in vals[idx]:
        alphas += [
            v.item(),
            torch.nextafter(v, torch.tensor(-1.0)).item(),
            torch.nextafter(v, torch.tensor(2.0)).item(),
        ]
    for alpha in alphas:
        cut = ik.int_threshold(alpha, d)
        want = dist <= torch.tensor(alpha, dtype=torch.float32)
        assert torch.equal(want, s <= cut), (d, alpha, cut)


# ---------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_uint8_is_a_clear_type_error(dtype, rng):
    a = (images(rng, 3, 3, 4, 4).to(torch.float32) / 255).to(dtype)
    for fn in (
        lambda: D.l2(a, backend="cublas"),
        lambda: D.tiled_l2(a, a, grid=(2, 2), backend="cublas"),
        lambda: D.knn(a, a, 1, backend="cublas"),
        lambda: D.tiled_l2_graph(a, 0.1, grid=(2, 2), backend="cublas"),
    ):
        with pytest.raises(TypeError, match="uint8"):
            fn()
    with pytest.raises(TypeError, match="float64"):
        D.l2(a.double(), backend="cublas")


def test_backend_selection():
    cpu = torch.device("cpu")
    # accepted by name for the distance family, never chosen by auto
    assert _backend.resolve("cublas", cpu, extra=("cublas",)) == "cublas"
    assert _backend.resolve("auto", cpu, extra=("cublas",)) in ("cpu", "reference")
    assert D._backend_for("auto", torch.zeros(1, 1, 1, 1, dtype=torch.uint8)) != "cublas"
    assert "cublas" not in D.CUDA_ORDER and "cublas" not in D.CUDA_ORDER_FLOAT
    # families that do not implement it keep rejecting it
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.resolve("cublas", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.resolve("cublas", cpu, extra=("nonsense",))


def test_opcheck(rng):
    a = images(rng, 5, 3, 4, 4)
    b = images(rng, 4, 3, 4, 4)
    torch.library.opcheck(ops.distance_matrix, (a, None, 2, 2, 1.0, "cublas"))
    torch.library.opcheck(ops.distance_matrix, (a, b, 1, 1, 1.0, "cublas"))
    torch.library.opcheck(ops.distance_knn, (a, b, 3, 2, 2, 1.0, 2, "cublas"))
    torch.library.opcheck(ops.distance_graph, (a, None, 0.3, 2, 2, 1.0, "cublas"))
    torch.library.opcheck(ops.distance_graph, (a, b, 0.3, 2, 2, 1.0, "cublas"))


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape",
    [*SHAPES, (33, 3, 128, 128, (4, 4)), (70, 3, 32, 32, (1, 1)), (3, 3, 160, 160, (1, 1))],
)
def test_cuda_cublas_bit_identical(shape, rng):
    # On the GPU torch._int_mm is cuBLAS(Lt): the padding to its shape rules (rows > 16, K and N multiples of
    # 8), the column-major second operand and the K split must all still give the exact integers.
    n, c, h, w, grid = shape
    a = images(rng, n, c, h, w)
    b = images(rng, 5, c, h, w)
    ac, bc = a.cuda(), b.cuda()
    for bb, bbc in ((None, None), (b, bc)):
        got = D.tiled_l2(ac, bbc, grid=grid, backend="cublas").cpu()
        assert torch.equal(got, ref.distance_matrix(a, bb, grid))
    d = ref.distance_matrix(a, None, grid)
    for alpha in (0.0, d.median().item(), 0.4, 1.0):
        assert torch.equal(
            D.tiled_l2_graph(ac, alpha, grid=grid, backend="cublas").cpu(), ref.graph(a, None, alpha, grid)
        )
        assert torch.equal(
            D.tiled_l2_graph(ac, alpha, b=bc, grid=grid, backend="cublas").cpu(), ref.graph(a, b, alpha, grid)
        )
    dk, ik_ = D.knn(ac, bc, 3, grid=grid, backend="cublas", chunk=2)
    rk = ref.knn(a, b, 3, grid)
    assert torch.equal(dk.cpu(), rk[0]) and torch.equal(ik_.cpu(), rk[1])
