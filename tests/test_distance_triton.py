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
