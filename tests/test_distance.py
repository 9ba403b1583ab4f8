"""memcore.distance on every CPU backend against the float64 reference, exact uint8 semantics, k-NN order,
bitset graphs, input errors, opcheck and torch.compile; CUDA tests run only with a GPU and the CUDA build."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cpu_backends
from tolerances import tol

import memcore.distance as D
from memcore.ops import distance as ops
from memcore.reference import distance as ref

DTYPES = [torch.uint8, torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W, grid): off tile multiples, non-square, one-pixel-wide / one-row tiles, 1×1 grid, C = 1 and 3.
SHAPES = [
    (1, 3, 8, 8, (2, 2)),
    (7, 1, 6, 10, (3, 5)),
    (5, 3, 4, 6, (1, 6)),
    (6, 3, 4, 6, (4, 1)),
    (9, 3, 5, 7, (1, 1)),
    (4, 1, 12, 4, (4, 4)),
]


def images(gen, n, c, h, w, dtype, lo=0, hi=256):
    x = torch.randint(lo, hi, (n, c, h, w), generator=gen, dtype=torch.uint8)
    return x if dtype == torch.uint8 else (x.to(torch.float32) / 255).to(dtype)


def oracle(a: torch.Tensor, b: torch.Tensor, grid) -> torch.Tensor:
    """Slow explicit per-tile loop in float64: max over grid positions of the RMS tile difference."""
    af = a.to(torch.float64) / 255 if a.dtype == torch.uint8 else a.to(torch.float64)
    bf = b.to(torch.float64) / 255 if b.dtype == torch.uint8 else b.to(torch.float64)
    gh, gw = grid
    th, tw = a.shape[2] // gh, a.shape[3] // gw
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            best = 0.0
            for r in range(gh):
                for q in range(gw):
                    ta = af[i, :, r * th : (r + 1) * th, q * tw : (q + 1) * tw]
                    tb = bf[j, :, r * th : (r + 1) * th, q * tw : (q + 1) * tw]
                    best = max(best, math.sqrt(((ta - tb) ** 2).mean().item()))
            out[i, j] = best
    return out


def strided_wrong(a: torch.Tensor, b: torch.Tensor, grid) -> float:
    """The known wrong 'tiled' L2: max over pixel offsets inside tiles (a strided subsample)."""
    af, bf = a.to(torch.float64) / 255, b.to(torch.float64) / 255
    th, tw = a.shape[1] // grid[0], a.shape[2] // grid[1]
    best = 0.0
    for dy in range(th):
        for dx in range(tw):
            diff = af[:, dy::th, dx::tw] - bf[:, dy::th, dx::tw]
            best = max(best, math.sqrt((diff**2).mean().item()))
    return best


# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matrices_against_float64(backend, dtype, shape, rng):
    n, c, h, w, grid = shape
    a = images(rng, n, c, h, w, dtype)
    b = images(rng, 3, c, h, w, dtype)
    for got, want_args in [
        (D.tiled_l2(a, grid=grid, backend=backend), (a, None)),
        (D.tiled_l2(a, b, grid=grid, backend=backend), (a, b)),
    ]:
        assert got.dtype == torch.float32
        if dtype == torch.uint8:
            # The exact integer path: bit-identical to the reference's integer S on every backend, and equal
            # to the float64 per-tile oracle rounded once to float32.
            exact = ref.distance_matrix(want_args[0], want_args[1], grid)
            torch.testing.assert_close(got, exact, **tol("distance", torch.uint8))
            other = want_args[0] if want_args[1] is None else want_args[1]
            torch.testing.assert_close(
                got, oracle(want_args[0], other, grid).to(torch.float32), rtol=0, atol=0
            )
        else:
            b64 = None if want_args[1] is None else want_args[1].to(torch.float64)
            want = D.tiled_l2(want_args[0].to(torch.float64), b64, grid=grid, backend="reference")
            torch.testing.assert_close(got.to(torch.float64), want, **tol("distance", dtype))


def test_float64_reference_matches_oracle(rng):
    a = images(rng, 5, 3, 6, 8, torch.float64)
    b = images(rng, 4, 3, 6, 8, torch.float64)
    got = D.tiled_l2(a, b, grid=(3, 2))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, oracle(a, b, (3, 2)), **tol("distance", torch.float64))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_float_duplicates_across_sets_are_at_distance_zero(backend, dtype, rng):
    if dtype == torch.float64 and backend != "reference":
        pytest.skip("float64 runs on the reference backend only")
    # the Gram trick alone left the float reference ~1e-8 from an exact duplicate in cross mode, so a graph
    # at alpha = 0 missed the pair that every other backend reports
    a = images(rng, 5, 3, 8, 8, dtype)
    b = torch.cat([a.flip(0), images(rng, 2, 3, 8, 8, dtype)])
    d = D.tiled_l2(a, b, grid=(2, 2), backend=backend)
    assert torch.equal(d[:, :5].flip(1).diagonal(), torch.zeros(5, dtype=d.dtype))
    near = a.clone()
    near[0, 0, 0, 0] += 1e-3  # a near-duplicate keeps its (small) distance
    want = oracle(a[:1], near[:1], (2, 2))
    torch.testing.assert_close(D.tiled_l2(a[:1], near[:1], grid=(2, 2), backend=backend).double(), want)
    bits = D.tiled_l2_graph(a, 0.0, b=b, grid=(2, 2), backend=backend)
    assert [int(w) for w in bits[:, 0]] == [1 << (4 - i) for i in range(5)]


@pytest.mark.parametrize("backend", cpu_backends())
def test_l2_is_one_tile(backend, rng):
    a = images(rng, 6, 3, 8, 4, torch.uint8)
    whole = ((a[:, None].double() - a[None].double()) / 255).pow(2).mean((2, 3, 4)).sqrt().float()
    torch.testing.assert_close(D.l2(a, backend=backend), whole, rtol=0, atol=0)
    torch.testing.assert_close(D.l2(a, backend=backend), D.tiled_l2(a, grid=(1, 1), backend=backend))


@pytest.mark.parametrize("backend", cpu_backends())
def test_single_tile_difference_separates_correct_from_strided(backend):
    # Two 1×8×8 images, 2×2 grid of 4×4 tiles, identical except for the top-left tile. The correct tiled L2 is
    # that tile's RMS difference; the strided-subsample variant sees the difference diluted over all tiles.
    a = torch.full((1, 1, 8, 8), 100, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, :4, :4] = 200
    got = D.tiled_l2(a, b, grid=(2, 2), backend=backend).item()
    correct = 100 / 255
    assert got == pytest.approx(correct, rel=1e-6)
    assert got == torch.tensor(oracle(a, b, (2, 2)).item(), dtype=torch.float32).item()
    wrong = strided_wrong(a[0], b[0], (2, 2))
    assert wrong == pytest.approx(correct / 2, rel=1e-6)
    assert abs(got - wrong) > 0.1
    # and plain L2 over the whole image is smaller still
    assert D.l2(a, b, backend=backend).item() == pytest.approx(correct / 2, rel=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_tiled_at_least_l2_symmetric_zero_diagonal(backend, dtype, rng):
    a = images(rng, 11, 3, 8, 8, dtype)
    t = D.tiled_l2(a, grid=(4, 2), backend=backend)
    p = D.l2(a, backend=backend)
    assert bool((t >= p).all())
    assert torch.equal(t, t.T) and torch.equal(p, p.T)
    assert bool((t.diagonal() == 0).all()) and bool((p.diagonal() == 0).all())
    assert bool((t.fill_diagonal_(1.0) > 0).all())


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_sets(backend, rng):
    e = torch.empty((0, 3, 4, 4), dtype=torch.uint8)
    a = images(rng, 3, 3, 4, 4, torch.uint8)
    assert D.tiled_l2(e, grid=(2, 2), backend=backend).shape == (0, 0)
    assert D.tiled_l2(a, e, grid=(2, 2), backend=backend).shape == (3, 0)
    assert D.tiled_l2(e, a, grid=(2, 2), backend=backend).shape == (0, 3)
    dd, ii = D.knn(e, a, 2, backend=backend)
    assert dd.shape == (0, 2) and ii.shape == (0, 2)
    dd, ii = D.knn(a, e, 0, backend=backend)
    assert dd.shape == (3, 0) and ii.shape == (3, 0)
    g = D.tiled_l2_graph(e, 0.1, grid=(2, 2), backend=backend)
    assert g.shape == (0, 0) and g.dtype == torch.uint64
    g = D.tiled_l2_graph(a, 0.1, b=e, grid=(2, 2), backend=backend)
    assert g.shape == (3, 0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_value_range_symmetric(backend, dtype, rng):
    a = images(rng, 5, 3, 4, 4, torch.float32)
    got = D.tiled_l2(a * 2 - 1, grid=(2, 2), backend=backend, value_range="symmetric")
    torch.testing.assert_close(got, D.tiled_l2(a, grid=(2, 2), backend=backend), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", [None, (2, 2)])
def test_knn_is_sorted_cross_matrix_with_ties(backend, dtype, grid, rng):
    # Few grey levels and duplicated references make many exactly equal distances: ties go to the smaller
    # index, i.e. the result is the stable ascending sort of the cross matrix row.
    q = images(rng, 7, 1, 4, 4, dtype, hi=3)
    base = images(rng, 6, 1, 4, 4, dtype, hi=3)
    refs = torch.cat([base, base[[2, 0, 5]], base, q[:2]])
    cross = D.tiled_l2(q, refs, grid=grid or (1, 1), backend=backend)
    want = torch.sort(cross, dim=1, stable=True)
    for k in (1, 5, refs.shape[0]):
        for chunk in (1, 4, 4096):
            d, i = D.knn(q, refs, k, grid=grid, backend=backend, chunk=chunk)
            torch.testing.assert_close(d, want.values[:, :k], rtol=0, atol=0)
            torch.testing.assert_close(i, want.indices[:, :k], rtol=0, atol=0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_knn_against_reference_float(backend, rng):
    q = images(rng, 9, 3, 8, 8, torch.float32)
    r = images(rng, 40, 3, 8, 8, torch.float32)
    d, i = D.knn(q, r, 6, grid=(2, 2), backend=backend, chunk=7)
    dr, ir = D.knn(q.double(), r.double(), 6, grid=(2, 2), backend="reference")
    torch.testing.assert_close(d.double(), dr, **tol("distance", torch.float32))
    assert torch.equal(i, ir)


# ---------------------------------------------------------------------------------------------- bitset


def _bits(words: torch.Tensor, m: int) -> torch.Tensor:
    return ref.unpack_bits(words, m)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("n", [1, 7, 64, 127])
def test_graph_is_thresholded_matrix(backend, n, rng):
    a = images(rng, n, 3, 4, 4, torch.uint8, hi=8)  # low contrast: many distances near each alpha
    d = D.tiled_l2(a, grid=(2, 2), backend=backend)
    vals = d[~torch.eye(n, dtype=torch.bool)]
    alphas = [0.0, 0.01, 0.02, 1.0] + ([vals.median().item(), vals.min().item()] if vals.numel() else [])
    for alpha in alphas:
        g = D.tiled_l2_graph(a, alpha, grid=(2, 2), backend=backend)
        assert g.dtype == torch.uint64 and g.shape == (n, (n + 63) // 64)
        want = (d <= alpha) & ~torch.eye(n, dtype=torch.bool)
        assert torch.equal(_bits(g, n), want)
        # padding bits beyond column n are clear
        assert torch.equal(ref.pack_bits(want), g)


@pytest.mark.parametrize("backend", cpu_backends())
def test_graph_cross_block(backend, rng):
    a = images(rng, 70, 1, 4, 4, torch.uint8, hi=6)
    b = images(rng, 65, 1, 4, 4, torch.uint8, hi=6)
    d = D.tiled_l2(a, b, grid=(2, 2), backend=backend)
    alpha = d.median().item()
    g = D.tiled_l2_graph(a, alpha, b=b, grid=(2, 2), backend=backend)
    assert g.shape == (70, 2)
    assert torch.equal(_bits(g, 65), d <= alpha)
    # the incremental build: [pairwise(b) | cross] blocks equal the graph of the concatenation
    full = D.tiled_l2_graph(torch.cat([b, a]), alpha, grid=(2, 2), backend=backend)
    rows = _bits(full, 135)[65:]
    assert torch.equal(rows[:, :65], _bits(g, 65))
    assert torch.equal(rows[:, 65:], _bits(D.tiled_l2_graph(a, alpha, grid=(2, 2), backend=backend), 70))


def test_pack_bits_layout():
    mask = torch.zeros(2, 130, dtype=torch.bool)
    mask[0, 0] = mask[0, 63] = mask[1, 64] = mask[1, 129] = True
    w = ref.pack_bits(mask).view(torch.int64)
    assert w.shape == (2, 3)
    assert w[0, 0].item() == 1 - 2**63 and w[1, 1].item() == 1 and w[1, 2].item() == 2
    assert torch.equal(ref.unpack_bits(ref.pack_bits(mask), 130), mask)


# ---------------------------------------------------------------------------------------------- errors


def test_errors(rng):
    a = images(rng, 3, 3, 8, 8, torch.uint8)
    with pytest.raises(ValueError, match="does not divide"):
        D.tiled_l2(a, grid=(3, 4))
    with pytest.raises(ValueError, match="same C, H, W"):
        D.tiled_l2(a, images(rng, 2, 1, 8, 8, torch.uint8))
    with pytest.raises(ValueError, match="same C, H, W"):
        D.knn(a, images(rng, 2, 3, 8, 4, torch.uint8), 1)
    with pytest.raises(TypeError, match="dtype"):
        D.tiled_l2(a.to(torch.int32))
    with pytest.raises(TypeError, match="share a dtype"):
        D.tiled_l2(a, a.float())
    with pytest.raises(ValueError, match="N, C, H, W"):
        D.l2(a[0])
    with pytest.raises(ValueError, match="k must be"):
        D.knn(a, a, 4)
    with pytest.raises(TypeError, match="grid"):
        D.tiled_l2(a, grid=4)
    with pytest.raises(ValueError, match="grid entries"):
        D.tiled_l2(a, grid=(0, 2))
    with pytest.raises(ValueError, match="value_range"):
        D.tiled_l2(a.float(), value_range="0-255")
    with pytest.raises(ValueError, match="unknown backend"):
        D.l2(a, backend="gpu")
    with pytest.raises(TypeError, match="float64"):
        D.l2(a.double(), backend="cpu") if "cpu" in cpu_backends() else D.l2(a.double(), backend="cuda")
    with pytest.raises(TypeError, match="images"):
        D.l2([1, 2, 3])
    with pytest.raises(ValueError, match="alpha"):
        D.tiled_l2_graph(a, float("nan"))
    with pytest.raises(TypeError, match="check_finite must be a bool, got 'no'"):
        D.tiled_l2(a.float(), check_finite="no")


def test_meta_tensors_give_shapes():
    # no values to check for NaN: the ops' fake implementations answer (shape inference, as under compile)
    a = torch.empty(5, 3, 8, 8, device="meta")
    assert D.tiled_l2(a).shape == (5, 5) and D.tiled_l2(a, a[:3]).device.type == "meta"
    d, i = D.knn(a, a, 2)
    assert d.shape == i.shape == (5, 2) and D.tiled_l2_graph(a, 0.1).shape == (5, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_inputs_raise(bad, dtype, rng):
    a = images(rng, 3, 3, 4, 4, dtype)
    a[1, 2, 3, 0] = bad
    for fn in (
        lambda: D.l2(a),
        lambda: D.tiled_l2(a[:1], a, grid=(2, 2)),
        lambda: D.knn(a, a[:1], 1),
        lambda: D.tiled_l2_graph(a, 0.1, grid=(2, 2)),
    ):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn()
    D.l2(a, check_finite=False)  # documented: no check, unspecified values, no error


# ---------------------------------------------------------------------------------------------- ops


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_opcheck(backend, dtype, rng):
    a = images(rng, 5, 3, 4, 4, dtype)
    b = images(rng, 4, 3, 4, 4, dtype)
    torch.library.opcheck(ops.distance_matrix, (a, None, 2, 2, 1.0, backend))
    torch.library.opcheck(ops.distance_matrix, (a, b, 1, 1, 1.0, backend))
    torch.library.opcheck(ops.distance_knn, (a, b, 3, 2, 2, 1.0, 2, backend))
    torch.library.opcheck(ops.distance_graph, (a, None, 0.3, 2, 2, 1.0, backend))
    torch.library.opcheck(ops.distance_graph, (a, b, 0.3, 2, 2, 1.0, backend))


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph(backend, rng):
    a = images(rng, 6, 3, 4, 4, torch.uint8)
    b = images(rng, 5, 3, 4, 4, torch.uint8)

    def pipeline(x, y):
        kw = {"backend": backend, "check_finite": False}
        return (
            D.l2(x, **kw),
            D.tiled_l2(x, y, grid=(2, 2), **kw),
            D.knn(x, y, 2, grid=(2, 2), **kw),
            D.tiled_l2_graph(x, 0.3, grid=(2, 2), **kw),
        )

    torch._dynamo.reset()
    got = torch.compile(pipeline, fullgraph=True)(a, b)
    want = pipeline(a, b)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (127, 3, 16, 16, (4, 4)), (70, 3, 64, 64, (1, 1))])
def test_cuda_against_reference(dtype, shape, rng):
    n, c, h, w, grid = shape
    a = images(rng, n, c, h, w, dtype)
    b = images(rng, 5, c, h, w, dtype)
    for bb in (None, b):
        got = D.tiled_l2(a.cuda(), None if bb is None else bb.cuda(), grid=grid, backend="cuda").cpu()
        if dtype == torch.uint8:
            assert torch.equal(got, ref.distance_matrix(a, bb, grid))
        else:
            want = ref.distance_matrix(a.double(), None if bb is None else bb.double(), grid)
            torch.testing.assert_close(got.double(), want, **tol("distance_triton", dtype))
    if dtype == torch.uint8:
        d = ref.distance_matrix(a, None, grid)
        for alpha in (0.0, d.median().item(), 0.4, 1.0):
            g = D.tiled_l2_graph(a.cuda(), alpha, grid=grid, backend="cuda").cpu()
            assert torch.equal(g, ref.graph(a, None, alpha, grid))
            g = D.tiled_l2_graph(a.cuda(), alpha, b=b.cuda(), grid=grid, backend="cuda").cpu()
            assert torch.equal(g, ref.graph(a, b, alpha, grid))
        dk, ik = D.knn(a.cuda(), b.cuda(), 3, grid=grid, backend="cuda", chunk=2)
        rk = ref.knn(a, b, 3, grid)
        assert torch.equal(dk.cpu(), rk[0]) and torch.equal(ik.cpu(), rk[1])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("negative", [False, True])
def test_cuda_nan_input_never_reads_as_a_match(dtype, negative):
    # check_finite=False on the CUDA kernel (not yet run on a GPU): a NaN image, its NaN with or without the
    # sign bit (x86's 0/0), is NaN from every other image, and every NaN written is the positive one the
    # kernel's integer atomicMax and the k-NN keys order last
    a = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    nan = torch.tensor(float("nan"))
    a[1, 2, 3, 1] = nan.neg() if negative else nan
    a = a.to(dtype).cuda()
    d = D.tiled_l2(a, grid=(2, 2), backend="cuda", check_finite=False).cpu()
    off = ~torch.eye(5, dtype=torch.bool)
    assert bool(d[1][off[1]].isnan().all()) and bool(d[:, 1][off[:, 1]].isnan().all())
    assert not bool(d[[0, 2, 3, 4]][:, [0, 2, 3, 4]].isnan().any())
    assert bool((d.view(torch.int32)[d.isnan()] > 0).all())
    bits = D.tiled_l2_graph(a, 1.0, grid=(2, 2), backend="cuda", check_finite=False).cpu()
    assert bits.view(torch.int64)[:, 0].tolist() == [0b11100, 0, 0b11001, 0b10101, 0b01101]
    _, idx = D.knn(a, a, 5, grid=(2, 2), backend="cuda", check_finite=False, chunk=2)
    assert idx.cpu()[1].tolist() == [0, 1, 2, 3, 4] and bool((idx.cpu()[[0, 2, 3, 4], -1] == 1).all())


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_ops_on_a_device_that_is_not_current():
    # the core launches on the current device: the ops make it the tensors' (extract --device cuda:1)
    torch.cuda.set_device(0)
    a = torch.randint(0, 256, (70, 3, 16, 16), dtype=torch.uint8)
    got = D.tiled_l2(a.to("cuda:1"), grid=(2, 2), backend="cuda")
    assert got.device == torch.device("cuda:1")
    assert torch.equal(got.cpu(), D.tiled_l2(a, grid=(2, 2), backend="cpu"))
    bits = D.tiled_l2_graph(a.to("cuda:1"), 0.3, grid=(2, 2), backend="cuda").cpu()
    assert torch.equal(bits, D.tiled_l2_graph(a, 0.3, grid=(2, 2), backend="cpu"))


@pytest.mark.cuda
def test_cuda_large_tile_int64_and_auto(rng):
    # A whole 3×256×256 image as one tile: S exceeds int32, the kernel must split the reduction.
    a = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    a[1] = 255
    got = D.l2(a.cuda(), backend="cuda").cpu()
    assert got[0, 1].item() == 1.0
    x = images(rng, 33, 3, 128, 128, torch.uint8)
    assert torch.equal(D.tiled_l2(x.cuda(), grid=(4, 4)).cpu(), ref.distance_matrix(x, None, (4, 4)))


def test_long_cross_sets_are_split_across_kernel_calls(monkeypatch):
    """Cross matrices / graphs with more columns than one CUDA/Triton launch grid holds are computed in
    column blocks (multiples of 64 columns, so bitset words join exactly); pairwise sets that large are a
    clear error."""
    from memcore.ops import distance as ops

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (300, 1, 4, 4), dtype=torch.uint8, generator=g)
    want_m = D.tiled_l2(a, b, grid=(2, 2), backend="cpu")
    want_g = D.tiled_l2_graph(a, 0.3, b=b, grid=(2, 2), backend="cpu")
    monkeypatch.setattr(ops, "MAX_COLS", 128)
    assert torch.equal(D.tiled_l2(a, b, grid=(2, 2), backend="cpu"), want_m)
    got = D.tiled_l2_graph(a, 0.3, b=b, grid=(2, 2), backend="cpu")
    assert torch.equal(got.view(torch.int64), want_g.view(torch.int64))
    with pytest.raises(ValueError, match="pairwise"):
        D.tiled_l2(b, grid=(2, 2), backend="cpu")


def test_knn_refs_none_is_a_type_error():
    q = torch.rand(2, 3, 4, 4)
    with pytest.raises(TypeError, match=r"refs must be a torch\.Tensor"):
        D.knn(q, None, 1)


@pytest.mark.parametrize(
    "fn", [D.l2, lambda x: D.knn(x, x, 1), lambda x: D.tiled_l2_graph(x, 0.1, grid=(1, 1))]
)
def test_sparse_images_are_a_type_error(fn):
    x = torch.rand(2, 3, 4, 4).to_sparse()
    with pytest.raises(TypeError, match="dense"):
        fn(x)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_input_never_reads_as_a_match(backend):
    # check_finite=False: a NaN image must not come out at distance 0 from everything (a false match): every
    # backend gives NaN for its pairs, as the reference does, so it gets no graph edge and sorts last in k-NN.
    a = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a[1, 2, 3, 1] = float("nan")
    d = D.tiled_l2(a, grid=(2, 2), backend=backend, check_finite=False)
    off = ~torch.eye(5, dtype=torch.bool)
    assert bool(d[1][off[1]].isnan().all()) and bool(d[:, 1][off[:, 1]].isnan().all())
    assert not bool(d[[0, 2, 3, 4]][:, [0, 2, 3, 4]].isnan().any())

    bits = D.tiled_l2_graph(a, 1.0, grid=(2, 2), backend=backend, check_finite=False).view(torch.int64)[:, 0]
    assert bits.tolist() == [0b11100, 0, 0b11001, 0b10101, 0b01101]

    dist, idx = D.knn(a, a, 5, grid=(2, 2), backend=backend, check_finite=False, chunk=2)
    want_d, want_i = D.knn(a, a, 5, grid=(2, 2), backend="reference", check_finite=False, chunk=2)
    assert torch.equal(idx, want_i)
    assert idx[1].tolist() == [0, 1, 2, 3, 4]  # all NaN: ties by index
    assert bool((idx[[0, 2, 3, 4], -1] == 1).all())  # NaN sorts last
    torch.testing.assert_close(dist, want_d, equal_nan=True, **tol("distance", torch.float32))


@pytest.mark.parametrize("alpha", [float("inf"), float("-inf"), float("nan"), 10**400])
def test_graph_alpha_must_be_finite(alpha):
    # 10**400 escaped as an OverflowError from float(); the rule is memcore.graph.threshold_graph's too
    with pytest.raises(ValueError, match="alpha must be finite"):
        D.tiled_l2_graph(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), alpha)


def test_knn_chunk_errors():
    q = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    for bad in (2.5, True, "8"):  # a wrong type is a TypeError, as for k (it was a ValueError)
        with pytest.raises(TypeError, match="chunk must be an int"):
            D.knn(q, q, 1, chunk=bad)
    with pytest.raises(ValueError, match="chunk must be a positive int, got 0"):
        D.knn(q, q, 1, chunk=0)


def test_merged_knn_keys_put_a_sign_bit_nan_last():
    # x86 makes 0/0 as a NaN with its sign bit set: as an int32 bit pattern it is negative, so the (distance,
    # index) keys of merge_topk (NN blocks) and the chunked GPU k-NN sorted it first instead of last
    nan = -torch.tensor([float("nan")])
    assert nan.view(torch.int32).item() < 0
    d = torch.tensor([[nan.item(), 0.5]])
    d[0, 0] = nan[0]
    dist, idx = ops.merge_topk((d, torch.tensor([[0, 1]])), (torch.tensor([[0.3]]), torch.tensor([[2]])), 3)
    assert idx.tolist() == [[2, 1, 0]] and bool(dist[0, 2].isnan())
