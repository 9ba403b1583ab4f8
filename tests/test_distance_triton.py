"""Triton distance kernels against the float64 reference: interpreter lane (TRITON_INTERPRET=1, tiny shapes)
or a GPU. uint8 must be bit-identical (int8 tl.dot with int32 accumulation is exact); floats use the
``distance_triton`` tolerances (tf32x3 products on the GPU)."""

from __future__ import annotations

import pytest
import torch
from tolerances import tol

import memcore.distance as D
from memcore.reference import distance as ref

pytestmark = pytest.mark.triton

SHAPES = [
    (1, 3, 8, 8, (2, 2)),
    (7, 1, 6, 10, (3, 5)),
    (5, 3, 4, 6, (1, 6)),
    (70, 3, 4, 4, (1, 1)),
]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def tuning(monkeypatch):
    """Launch tuning of the Triton kernels switched on for this test's device (the CPU too), with a clean
    cache before and after; yields the Triton distance module."""
    from memcore.kernels.triton import distance as tk
    from memcore.ops import _tune

    monkeypatch.setattr(tk, "TUNE_DEVICE_TYPES", (_device(),))
    monkeypatch.setattr(_tune, "ENABLED", True)
    _tune.reset()
    yield tk
    _tune.reset()


def images(gen, n, c, h, w, dtype, hi=256):
    x = torch.randint(0, hi, (n, c, h, w), generator=gen, dtype=torch.uint8)
    return x if dtype == torch.uint8 else (x.to(torch.float32) / 255).to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matrices(dtype, shape, rng):
    n, c, h, w, grid = shape
    a = images(rng, n, c, h, w, dtype)
    b = images(rng, 3, c, h, w, dtype)
    dev = _device()
    for bb in (None, b):
        got = D.tiled_l2(a.to(dev), None if bb is None else bb.to(dev), grid=grid, backend="triton").cpu()
        if dtype == torch.uint8:
            assert torch.equal(got, ref.distance_matrix(a, bb, grid))
        else:
            want = ref.distance_matrix(a.double(), None if bb is None else bb.double(), grid)
            torch.testing.assert_close(got.double(), want, **tol("distance_triton", dtype))
        if bb is None:
            assert torch.equal(got, got.T) and bool((got.diagonal() == 0).all())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_triton_smax_wide_offsets(dtype, rng, monkeypatch):
    """The smax epilogue's int64 offsets (outputs with BM·M >= 2^31, here forced) give the same matrices."""
    from memcore.kernels.triton import distance as tk

    monkeypatch.setattr(tk, "INT32_OFFSETS", 0)
    a = images(rng, 70, 3, 4, 6, dtype)
    b = images(rng, 9, 3, 4, 6, dtype)
    dev = _device()
    for bb in (None, b):
        got = tk.distance_matrix(
            a.to(dev), None if bb is None else bb.to(dev), (2, 3), 1.0, "packed/64x64x64/w4s3"
        )
        if dtype == torch.uint8:
            assert torch.equal(got.cpu(), ref.distance_matrix(a, bb, (2, 3)))
        else:
            want = ref.distance_matrix(a.double(), None if bb is None else bb.double(), (2, 3))
            torch.testing.assert_close(got.cpu().double(), want, **tol("distance_triton", dtype))


@pytest.mark.parametrize("n", [1, 7, 65])
def test_triton_graph_exact(n, rng):
    a = images(rng, n, 3, 4, 4, torch.uint8, hi=8)
    b = images(rng, 66, 3, 4, 4, torch.uint8, hi=8)
    dev = _device()
    d = ref.distance_matrix(a, None, (2, 2))
    for alpha in (0.0, 0.01, d.median().item(), 1.0):
        g = D.tiled_l2_graph(a.to(dev), alpha, grid=(2, 2), backend="triton").cpu()
        assert torch.equal(g, ref.graph(a, None, alpha, (2, 2)))
        g = D.tiled_l2_graph(a.to(dev), alpha, b=b.to(dev), grid=(2, 2), backend="triton").cpu()
        assert torch.equal(g, ref.graph(a, b, alpha, (2, 2)))


def test_triton_knn_and_empty(rng):
    dev = _device()
    q = images(rng, 5, 1, 4, 4, torch.uint8, hi=3)
    r = torch.cat([images(rng, 6, 1, 4, 4, torch.uint8, hi=3)] * 2)
    d, i = D.knn(q.to(dev), r.to(dev), 4, grid=(2, 2), backend="triton", chunk=5)
    want = torch.sort(ref.distance_matrix(q, r, (2, 2)), dim=1, stable=True)
    assert torch.equal(d.cpu(), want.values[:, :4]) and torch.equal(i.cpu(), want.indices[:, :4])
    e = torch.empty((0, 1, 4, 4), dtype=torch.uint8, device=dev)
    assert D.tiled_l2(e, grid=(2, 2), backend="triton").shape == (0, 0)
    assert D.tiled_l2_graph(q.to(dev), 0.1, b=e, grid=(2, 2), backend="triton").shape == (5, 0)


def test_triton_nan_input_never_reads_as_a_match():
    """check_finite=False: a NaN image is NaN from every other image, as on the reference backend (the float
    kernels' maximum dropped a NaN tile, and the image matched its neighbours on the others)."""
    dev = _device()
    a = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a[1, 2, 3, 1] = float("nan")
    d = D.tiled_l2(a.to(dev), grid=(2, 2), backend="triton", check_finite=False).cpu()
    want = D.tiled_l2(a, grid=(2, 2), backend="reference", check_finite=False)
    torch.testing.assert_close(d, want, equal_nan=True, **tol("distance_triton", torch.float32))
    assert bool(d[1, [0, 2, 3, 4]].isnan().all())
    g = D.tiled_l2_graph(a.to(dev), 1.0, grid=(2, 2), backend="triton", check_finite=False).cpu()
    assert g.view(torch.int64)[:, 0].tolist() == [0b11100, 0, 0b11001, 0b10101, 0b01101]
    dist, idx = D.knn(a.to(dev), a.to(dev), 5, grid=(2, 2), backend="triton", check_finite=False)
    assert bool(dist[1].cpu().isnan().all()) and bool((idx[[0, 2, 3, 4], -1].cpu() == 1).all())


def test_triton_value_range_symmetric(rng):
    dev = _device()
    a = images(rng, 4, 3, 4, 4, torch.float32).to(dev)
    got = D.tiled_l2(a * 2 - 1, grid=(2, 2), backend="triton", value_range="symmetric")
    want = D.tiled_l2(a, grid=(2, 2), backend="triton")
    torch.testing.assert_close(got, want, **tol("distance_triton", torch.float32))


@pytest.mark.parametrize(
    "n,m,k,grid,hi,splits,acc32",
    [
        (5, 12, 4, (2, 2), 3, None, True),  # many exact ties: the (distance, index) order decides
        (70, 90, 17, (1, 1), 256, 3, True),  # two row blocks, three splits, k not a power of 2
        (3, 40, 40, (2, 1), 256, None, False),  # k = M; the int64 accumulation path
        (66, 64, 1, (1, 1), 2, 2, False),
    ],
)
def test_triton_fused_knn_exact(n, m, k, grid, hi, splits, acc32, rng, monkeypatch):
    """The fused k-NN (selection inside the kernel) equals the stable sort of the reference matrix."""
    from memcore.kernels.triton import distance as tk
    from memcore.ops.distance import _smallest

    if not acc32:
        monkeypatch.setattr(tk, "ACC32_MAX_D", 0)
    dev = _device()
    q = images(rng, n, 1, 4, 4, torch.uint8, hi=hi)
    r = images(rng, m, 1, 4, 4, torch.uint8, hi=hi)
    d, i = _smallest(tk.knn_keys(q.to(dev), r.to(dev), k, grid, splits=splits), k)
    want = torch.sort(ref.distance_matrix(q, r, grid), dim=1, stable=True)
    assert torch.equal(d.cpu(), want.values[:, :k]) and torch.equal(i.cpu(), want.indices[:, :k])
    if splits is None:  # the public path dispatches to the fused kernel
        d2, i2 = D.knn(q.to(dev), r.to(dev), k, grid=grid, backend="triton")
        assert torch.equal(d2, d) and torch.equal(i2, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_knn_float(dtype, rng):
    dev = _device()
    q = images(rng, 9, 3, 4, 4, dtype)
    r = images(rng, 33, 3, 4, 4, dtype)
    d, i = D.knn(q.to(dev), r.to(dev), 5, grid=(2, 2), backend="triton")
    want = ref.distance_matrix(q.double(), r.double(), (2, 2))
    # indices may differ only between (nearly) tied references: compare the distances they point to
    torch.testing.assert_close(d.double().cpu(), want.sort(1).values[:, :5], **tol("distance_triton", dtype))
    torch.testing.assert_close(
        want.gather(1, i.cpu()), want.sort(1).values[:, :5], **tol("distance_triton", dtype)
    )


def test_triton_knn_edge_sizes(rng):
    """k = 0, empty queries, and k above the fused kernel's limit (the chunked path) all work."""
    dev = _device()
    q = images(rng, 3, 1, 4, 4, torch.uint8).to(dev)
    r = images(rng, 130, 1, 4, 4, torch.uint8)
    d, i = D.knn(q, r.to(dev), 0, backend="triton")
    assert d.shape == (3, 0) and i.shape == (3, 0)
    d, i = D.knn(q[:0], r.to(dev), 5, backend="triton")
    assert d.shape == (0, 5)
    d, i = D.knn(q, r.to(dev), 130, backend="triton")  # k > 128: streamed chunks + topk
    want = torch.sort(ref.distance_matrix(q.cpu(), r, (1, 1)), dim=1, stable=True)
    assert torch.equal(d.cpu(), want.values) and torch.equal(i.cpu(), want.indices)


@pytest.mark.parametrize(
    "n,m,k,grid,hi,stride,cap",
    [
        (70, 200, 5, (2, 2), 256, 4, 64),  # cut from every 4th reference; nothing overflows
        (9, 150, 16, (1, 1), 3, 3, 32),  # few distinct distances: rows overflow 32 slots -> fused fallback
        (3, 40, 40, (2, 1), 256, 1, 64),  # k = M: the sample is every reference
        (130, 97, 1, (1, 1), 256, 7, 16),  # three row blocks of the fallback, k = 1
    ],
)
@pytest.mark.parametrize("cut", ["fused", "groupmin"])
def test_triton_filter_knn_exact(n, m, k, grid, hi, stride, cap, cut, rng, monkeypatch):
    """The filter k-NN (sampled cut, GEMM + append, overflow recomputed) equals the stable sort of the
    reference matrix, ties included, for uint8, with either cut method (group minima over pairs here)."""
    from memcore.kernels.triton import distance as tk
    from memcore.ops.distance import _smallest

    monkeypatch.setattr(tk, "CUT_MIN_GROUPS", 16)
    dev = _device()
    q = images(rng, n, 1, 4, 4, torch.uint8, hi=hi)
    r = images(rng, m, 1, 4, 4, torch.uint8, hi=hi)
    keys = tk.knn_keys(q.to(dev), r.to(dev), k, grid, method="filter", stride=stride, cap=cap, cut=cut)
    d, i = _smallest(keys, k)
    want = torch.sort(ref.distance_matrix(q, r, grid), dim=1, stable=True)
    assert torch.equal(d.cpu(), want.values[:, :k]) and torch.equal(i.cpu(), want.indices[:, :k])
    assert len(set(i[0].tolist())) == k  # no reference twice (an overflowed row drops its partial buffer)


@pytest.mark.parametrize("cut", ["fused", "groupmin"])
def test_triton_filter_knn_overflow_and_duplicates(cut, rng):
    """A training set holding many copies of one image: every copy ties at the cut, the row overflows, and
    the fallback still returns the copies in index order."""
    from memcore.kernels.triton import distance as tk
    from memcore.ops.distance import _smallest

    dev = _device()
    base = images(rng, 1, 3, 4, 4, torch.uint8)
    r = torch.cat(
        [
            images(rng, 40, 3, 4, 4, torch.uint8),
            base.expand(60, -1, -1, -1),
            images(rng, 40, 3, 4, 4, torch.uint8),
        ]
    )
    q = torch.cat([base, images(rng, 4, 3, 4, 4, torch.uint8)])
    keys = tk.knn_keys(q.to(dev), r.to(dev), 8, (2, 2), method="filter", stride=5, cap=16, cut=cut)
    d, i = _smallest(keys, 8)
    want = torch.sort(ref.distance_matrix(q, r, (2, 2)), dim=1, stable=True)
    assert torch.equal(d.cpu(), want.values[:, :8]) and torch.equal(i.cpu(), want.indices[:, :8])
    assert i[0].tolist() == list(range(40, 48)) and bool((d[0] == 0).all())


@pytest.mark.parametrize("dtype,cut", [(torch.float32, "fused"), (torch.float16, "groupmin")])
def test_triton_filter_knn_float(dtype, cut, rng):
    """Floats compare the float32 distance against the cut (widened by a few ulps): the fused kernel's
    neighbours up to the last bits."""
    from memcore.kernels.triton import distance as tk
    from memcore.ops.distance import _smallest

    dev = _device()
    q = images(rng, 6, 3, 4, 4, dtype).to(dev)
    r = images(rng, 120, 3, 4, 4, dtype).to(dev)
    got = _smallest(tk.knn_keys(q, r, 7, (2, 2), method="filter", stride=4, cap=64, cut=cut), 7)
    fused = _smallest(tk.knn_keys(q, r, 7, (2, 2), method="fused"), 7)
    t = tol("distance_triton", dtype)
    torch.testing.assert_close(got[0], fused[0], **t)  # two kernels: last bits may differ on a GPU
    want = ref.distance_matrix(q.cpu().double(), r.cpu().double(), (2, 2))
    torch.testing.assert_close(got[0].double().cpu(), want.sort(1).values[:, :7], **t)
    # indices may differ only between (nearly) tied references: compare the distances they point to
    torch.testing.assert_close(want.gather(1, got[1].cpu()), want.sort(1).values[:, :7], **t)


def test_triton_knn_method_choice_and_errors(rng, monkeypatch):
    """``auto`` filters large reference sets only; bad methods, too-large tiles and too-sparse samples are
    clear errors."""
    from memcore.kernels.triton import distance as tk

    dev = _device()
    q = images(rng, 4, 1, 4, 4, torch.uint8).to(dev)
    r = images(rng, 64, 1, 4, 4, torch.uint8).to(dev)
    calls = []
    orig = tk._filter_keys
    monkeypatch.setattr(tk, "_filter_keys", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    tk.knn_keys(q, r, 3, (1, 1))
    assert not calls  # 64 references: fused
    monkeypatch.setattr(tk, "FILTER_MIN_REFS_PER_CAP", 0)
    monkeypatch.setattr(tk, "FILTER_TARGET", 32)  # stride 2, cap 128
    monkeypatch.setattr(tk, "FILTER_MIN_STRIDE", 1)
    d, i = D.knn(q, r, 3, backend="triton")
    assert calls
    want = torch.sort(ref.distance_matrix(q.cpu(), r.cpu(), (1, 1)), dim=1, stable=True)
    assert torch.equal(d.cpu(), want.values[:, :3]) and torch.equal(i.cpu(), want.indices[:, :3])
    with pytest.raises(ValueError, match="method"):
        tk.knn_keys(q, r, 3, (1, 1), method="bogus")
    with pytest.raises(ValueError, match="fewer than k"):
        tk.knn_keys(q, r, 10, (1, 1), method="filter", stride=16)
    monkeypatch.setattr(tk, "ACC32_MAX_D", 8)
    with pytest.raises(ValueError, match="at most 8 values"):
        tk.knn_keys(q, r, 3, (1, 1), method="filter")


def test_triton_knn_reuses_packed_refs_until_they_change(rng):
    """The reference set is packed once across k-NN calls (NN extraction's batches), repacked after an
    in-place change, and the packed copy is freed with the tensor."""
    from memcore.kernels.triton import distance as tk

    dev = _device()
    q = images(rng, 3, 1, 4, 4, torch.uint8).to(dev)
    r = images(rng, 20, 1, 4, 4, torch.uint8).to(dev)
    tk.knn_keys(q, r, 2, (1, 1))
    first = tk._PACK_CACHE["refs"][2]
    tk.knn_keys(q[:2], r, 2, (1, 1))
    assert tk._PACK_CACHE["refs"][2] is first
    r[0] = q[0]  # in place: the version counter moves
    d, i = D.knn(q, r, 2, backend="triton")
    assert tk._PACK_CACHE["refs"][2] is not first
    assert int(i[0, 0]) == 0 and float(d[0, 0]) == 0.0
    del r
    assert "refs" not in tk._PACK_CACHE


def test_triton_filter_configs_are_tuned_and_agree(rng, tuning, monkeypatch):
    """uint8 filter launches are tuned among FILTER_CONFIGS (here on the CPU too): every configuration must
    give the first one's candidates (a disagreement would warn, an error here), the choice is cached and the
    result stays exact."""
    import warnings

    from memcore.ops import _tune
    from memcore.ops.distance import _smallest

    tk = tuning
    dev = _device()
    monkeypatch.setattr(tk, "CUT_METHODS", ("fused",))  # the cut method's tuning has its own test
    q = images(rng, 130, 1, 4, 4, torch.uint8, hi=6).to(dev)
    r = images(rng, 300, 1, 4, 4, torch.uint8, hi=6).to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d, i = _smallest(tk.knn_keys(q, r, 9, (2, 2), method="filter", stride=5, cap=256), 9)
    key = ("knn_filter", str(q.device), 4, 4)
    got = _tune.choices()[key]
    assert set(got["seconds"]) == set(tk.FILTER_CONFIGS) and got["chosen"] in tk.FILTER_CONFIGS
    want = torch.sort(ref.distance_matrix(q.cpu(), r.cpu(), (2, 2)), dim=1, stable=True)
    assert torch.equal(d.cpu(), want.values[:, :9]) and torch.equal(i.cpu(), want.indices[:, :9])


# Small launch configurations covering every layout and epilogue of the pairwise kernel: BM != BN both ways
# (the lower-triangle skip), one K split and several (partial Gram planes summed by the epilogue).
SMALL_PAIR_CONFIGS = {
    "packed/16x32x32": ("packed", 16, 32, 32, 4, 2, 0),
    "packed-gram/32x16x32": ("packed-gram", 32, 16, 32, 4, 2, 4),
    "nchw/16x32x32": ("nchw", 16, 32, 32, 4, 2, 4),
    "nchw/32x16x32/one-split": ("nchw", 32, 16, 32, 4, 2, 0),
    "nchw-i8/16x16x32": ("nchw-i8", 16, 16, 32, 4, 2, 4),
}


def _check_pair_config(tk, name, a, b, grid, alphas):
    for bb in (None, b):
        want = ref.distance_matrix(a.cpu(), None if bb is None else bb.cpu(), grid)
        got = tk.distance_matrix(a, bb, grid, config=name).cpu()
        assert torch.equal(got, want), (name, bb is None)
        for alpha in alphas:
            g = tk.distance_graph(a, bb, alpha, grid, config=name).cpu()
            assert torch.equal(g, ref.graph(a.cpu(), None if bb is None else bb.cpu(), alpha, grid)), name


def test_triton_pair_configs_exact(rng, monkeypatch):
    """Every pairwise layout (packed smax, packed gram, raw uint8 with the shift in registers, int8 copy) and
    K split count (several, one, or as many as the buffer budget allows) gives the reference's matrix and
    graph bit for bit, pairwise and cross."""
    from memcore.kernels.triton import distance as tk

    monkeypatch.setattr(tk, "PAIR_CONFIGS", SMALL_PAIR_CONFIGS)
    dev = _device()
    # 3×8×64 with a 1×2 grid: tiles of 3×8×32 (tw = 32 = BK, the smallest int8 K step on a GPU), 24 K steps
    a = images(rng, 37, 3, 8, 64, torch.uint8).to(dev)
    a[0] = 0
    a[1] = 255  # extremes of the shift
    a[5] = a[4]  # an exact duplicate: distance 0 off the diagonal
    b = images(rng, 21, 3, 8, 64, torch.uint8).to(dev)
    assert tk._pair_configs(a, 37, (1, 2)) == list(SMALL_PAIR_CONFIGS)
    d = ref.distance_matrix(a.cpu(), None, (1, 2))
    alphas = (0.0, float(d[d > 0].median()))
    for name in SMALL_PAIR_CONFIGS:
        _check_pair_config(tk, name, a, b, (1, 2), alphas)
    s, norms, _ = tk._pair_s(a, None, (1, 2), "nchw/16x32x32")
    assert s.shape[1:] == (2, 37, 37) and s.shape[0] > 1 and norms is not None  # gram, with K splits
    monkeypatch.setattr(tk, "GRAM_MAX_BYTES", 2 * 37 * 37 * 4)  # room for one split only
    s, norms, _ = tk._pair_s(a, None, (1, 2), "nchw/16x32x32")
    assert s.shape[0] == 1
    _check_pair_config(tk, "nchw/16x32x32", a, b, (1, 2), alphas)
    assert tk._gram_splits(2 * tk._block_pairs(3, 2, 16, 32, True), 24, 4, a.device) > 1


def test_triton_pair_production_configs_exact(rng):
    """The shipped PAIR_CONFIGS (128-wide blocks, BK 64 / 128) on rows of 128-pixel tiles, where all run."""
    from memcore.kernels.triton import distance as tk

    dev = _device()
    a = images(rng, 130, 1, 2, 256, torch.uint8).to(dev)
    b = images(rng, 9, 1, 2, 256, torch.uint8).to(dev)
    assert tk._pair_configs(a, 130, (1, 2)) == list(tk.PAIR_CONFIGS)
    d = ref.distance_matrix(a.cpu(), None, (1, 2))
    for name in tk.PAIR_CONFIGS:
        _check_pair_config(tk, name, a, b, (1, 2), (float(d[d > 0].median()),))


def test_triton_pair_config_eligibility(monkeypatch):
    """Raw-image layouts need BK to divide the tile width; gram epilogues need uint8, tiles of at most 2^16
    values and a bounded [T, N, M] buffer; floats and everything else run the first ("packed")."""
    from memcore.kernels.triton import distance as tk

    monkeypatch.setattr(tk, "PAIR_CONFIGS", SMALL_PAIR_CONFIGS)
    x = torch.zeros((4, 3, 8, 64), dtype=torch.uint8)
    assert tk._pair_configs(x, 4, (1, 2)) == list(SMALL_PAIR_CONFIGS)
    assert tk._pair_configs(x, 4, (1, 4)) == ["packed/16x32x32", "packed-gram/32x16x32"]  # tw = 16
    assert tk._pair_configs(x.float(), 4, (1, 2)) == ["packed/16x32x32"]
    big = torch.zeros((2, 1, 256, 512), dtype=torch.uint8)  # one tile of 2^17 values
    assert tk._pair_configs(big, 2, (1, 1)) == ["packed/16x32x32"]
    monkeypatch.setattr(tk, "GRAM_MAX_BYTES", 2 * 4 * 4 * 4 - 1)
    assert tk._pair_configs(x, 4, (1, 2)) == ["packed/16x32x32"]


def test_triton_pair_configs_are_tuned(rng, tuning, monkeypatch):
    """uint8 pairwise launches are tuned among the eligible configurations (here on the CPU too): all agree
    (a disagreement would warn, an error here), the choice is cached per shape class, results stay exact."""
    import warnings

    from memcore.ops import _tune

    dev = _device()
    monkeypatch.setattr(tuning, "PAIR_CONFIGS", SMALL_PAIR_CONFIGS)
    a = images(rng, 20, 3, 8, 64, torch.uint8).to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = D.tiled_l2_graph(a, 0.4, grid=(1, 2), backend="triton").cpu()
    key = ("pairwise", str(a.device), True, (3, 8, 64), (1, 2), 32, 32)
    got = _tune.choices()[key]
    assert set(got["seconds"]) == set(SMALL_PAIR_CONFIGS) and got["chosen"] in SMALL_PAIR_CONFIGS
    assert torch.equal(g, ref.graph(a.cpu(), None, 0.4, (1, 2)))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_triton_groupmin_cut_bounds_the_kth_distance(dtype, rng, monkeypatch):
    """The group-minimum cut has at least kk sampled references within it (so the k nearest of all pass the
    filter) and is never below the exact kk-th distance; groups of 1 give exactly the kk-th."""
    from memcore.kernels.triton import distance as tk

    dev = _device()
    q = images(rng, 9, 3, 4, 4, dtype).to(dev)
    s = images(rng, 300, 3, 4, 4, dtype).to(dev)
    qp, sp = tk._Packed(q, (2, 2)), tk._Packed(s, (2, 2))
    want = ref.distance_matrix(q.cpu(), s.cpu(), (2, 2)).double()
    exact = want.sort(1).values[:, 19]
    is_int = dtype == torch.uint8
    # at least 16 groups (and kk = 20): groups of 8 references (38 of them); or one reference each
    for groups, gs in ((16, 8), (300, 1)):
        monkeypatch.setattr(tk, "CUT_MIN_GROUPS", groups)
        cut = tk._cut_distance(qp, sp, 20, 12, 4, 1.0, is_int, "groupmin").double().cpu()
        slack = 0 if is_int else 1e-6
        assert bool(((want <= cut[:, None] + slack).sum(1) >= 20).all()), gs
        assert bool((cut >= exact - slack).all()), gs
        if gs == 1 and is_int:
            assert torch.equal(cut, exact)
    with pytest.raises(ValueError, match="cut must be"):
        tk._cut_distance(qp, sp, 20, 12, 4, 1.0, is_int, "bogus")
    with pytest.raises(ValueError, match="cut must be"):
        tk.knn_keys(q, s, 3, (2, 2), method="filter", cut="bogus")


def test_triton_cut_method_is_tuned(rng, tuning, monkeypatch):
    """For uint8 the cut method is tuned (here on the CPU too): both methods must give the same k nearest
    (a disagreement would warn, an error here), and the choice is cached."""
    import warnings

    from memcore.ops import _tune
    from memcore.ops.distance import _smallest

    tk = tuning
    dev = _device()
    monkeypatch.setattr(tk, "FILTER_CONFIGS", dict(list(tk.FILTER_CONFIGS.items())[:1]))
    monkeypatch.setattr(tk, "CUT_MIN_GROUPS", 8)
    q = images(rng, 20, 1, 4, 4, torch.uint8, hi=6).to(dev)
    r = images(rng, 200, 1, 4, 4, torch.uint8, hi=6).to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d, i = _smallest(tk.knn_keys(q, r, 5, (2, 2), method="filter", stride=4, cap=128), 5)
    got = [v for k, v in _tune.choices().items() if k[0] == "knn_cut"]
    assert len(got) == 1 and set(got[0]["seconds"]) == set(tk.CUT_METHODS)
    want = torch.sort(ref.distance_matrix(q.cpu(), r.cpu(), (2, 2)), dim=1, stable=True)
    assert torch.equal(d.cpu(), want.values[:, :5]) and torch.equal(i.cpu(), want.indices[:, :5])


def test_triton_filter_knn_float_near_duplicates_are_never_padding(rng):
    """Float near duplicates (noise of 1e-3 on [0, 1] images, the memorization case): the cut comes from the
    fused kernel, whose S = ‖a‖² + ‖b‖² − 2ab for such a pair differs from the filter pass's by far more than
    the cut's few ulps (cancellation), so fewer than k references could pass: such a row must be recomputed,
    never answered with padding keys (index 2^32 − 1)."""
    from memcore.kernels.triton import distance as tk
    from memcore.ops.distance import _smallest

    dev = _device()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        q = torch.rand(4, 3, 4, 4, generator=g)
        owner = torch.arange(80) % 4  # 20 near copies of each query among 80 references
        r = q[owner] + torch.randn(80, 3, 4, 4, generator=g) * 1e-3
        keys = tk.knn_keys(q.to(dev), r.to(dev), 16, (1, 1), method="filter", stride=1, cap=64, cut="fused")
        d, i = _smallest(keys, 16)
        i = i.cpu()
        assert bool((i < 80).all()), "padding keys in the k nearest"
        for row in range(4):
            assert len(set(i[row].tolist())) == 16
            assert bool((owner[i[row]] == row).all())  # all among the query's own near copies
        assert bool(d.isfinite().all())


@pytest.mark.parametrize("cut", ["fused", "groupmin"])
def test_triton_filter_knn_nan_query(cut):
    """check_finite=False: a NaN query's cut is NaN, which no reference passes; the row must still get k
    references (NaN distances, in index order, as the fused kernel and the reference give), not padding."""
    from memcore.kernels.triton import distance as tk
    from memcore.ops.distance import _smallest

    dev = _device()
    g = torch.Generator().manual_seed(0)
    q = torch.rand(3, 1, 4, 4, generator=g)
    r = torch.rand(40, 1, 4, 4, generator=g)
    q[1, 0, 0, 0] = float("nan")
    d, i = _smallest(
        tk.knn_keys(q.to(dev), r.to(dev), 3, (1, 1), method="filter", stride=2, cap=16, cut=cut), 3
    )
    _, want_i = D.knn(q, r, 3, backend="reference", check_finite=False)
    assert bool(d[1].isnan().all()) and i[1].tolist() == want_i[1].tolist() == [0, 1, 2]
    assert torch.equal(i[[0, 2]].cpu(), want_i[[0, 2]])


def test_triton_float_inf_or_negative_nan_input_is_never_a_match():
    """check_finite=False: an image with an infinite pixel (‖a‖² − 2ab is inf − inf: a NaN that x86 and the
    interpreter make with its sign bit set) or a NaN pixel with the sign bit set is never a graph edge and is
    last in every k-NN (a sign-bit NaN was dropped by the float atomic_max — Triton's emulation sends it to
    an unsigned min — and ordered first as a k-NN key)."""
    dev = _device()
    for bad in (float("inf"), -float("nan")):
        a = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        a[1, 2, 3, 1] = bad
        for grid in ((1, 1), (2, 2)):
            g = D.tiled_l2_graph(a.to(dev), 10.0, grid=grid, backend="triton", check_finite=False).cpu()
            assert g.view(torch.int64)[:, 0].tolist() == [0b11100, 0, 0b11001, 0b10101, 0b01101], (bad, grid)
            m = D.tiled_l2(a.to(dev), grid=grid, backend="triton", check_finite=False).cpu()
            assert not bool(m[1, [0, 2, 3, 4]].isfinite().any()), (bad, grid)
            for method in ("fused", "filter"):
                from memcore.kernels.triton import distance as tk
                from memcore.ops.distance import _smallest

                kw = {"stride": 1, "cap": 16} if method == "filter" else {}
                _, i = _smallest(tk.knn_keys(a.to(dev), a.to(dev), 5, grid, method=method, **kw), 5)
                assert bool((i[[0, 2, 3, 4], -1].cpu() == 1).all()), (bad, grid, method)
