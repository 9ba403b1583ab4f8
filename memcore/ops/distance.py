"""Custom ops for the distance family and their backend dispatch.

Three ``torch.library`` custom ops (each with a fake implementation, so they trace under
``torch.compile(fullgraph=True)``) cover every public function of :mod:`memcore.distance`:

- ``memcore::distance_matrix(a, b?, grid_h, grid_w, scale, backend) -> [N, M] float32``
- ``memcore::distance_knn(queries, refs, k, grid_h, grid_w, scale, chunk, backend) -> ([N, k], [N, k])``
- ``memcore::distance_graph(a, b?, alpha, grid_h, grid_w, scale, backend) -> [N, ceil(M/64)] uint64``

Plain L2 is the 1×1 grid. ``b=None`` means pairwise within ``a`` (symmetric, zero diagonal / clear
diagonal bit). ``backend`` is already resolved (never "auto") and the inputs already validated by
:mod:`memcore.distance`; the checks here only guard the native calls (contiguity, dtype, device).

``backend="cublas"`` (uint8 only) runs :mod:`memcore.kernels.intmm.distance`: int8 GEMMs through
``torch._int_mm``, bit-identical to the other backends; its k-NN streams the references through the same
:func:`_knn_chunked` merge as the GPU backends, with the queries packed once.
"""

from __future__ import annotations

import math

import torch

from memcore.ops import _native
from memcore.reference import distance as ref
from memcore.utils.profiling import stage

#: dtypes the native and Triton backends take (float64 is the reference's oracle dtype only).
NATIVE_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)

#: References per streamed block in k-NN (memory O(N·chunk), independent of M).
DEFAULT_CHUNK = 4096
#: Most columns per kernel call of the cross matrix / graph: the CUDA and Triton kernels put column blocks of
#: 64 on a launch-grid axis limited to 65535 blocks. Longer ``b`` sets are split into calls of this many
#: columns (a multiple of 64, so bitset words never straddle two calls).
MAX_COLS = 65535 * 64


def _split_cols(fn, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """Run ``fn(a, b_part)`` over column blocks of at most :data:`MAX_COLS` and join the outputs along dim 1
    (bitset words join too: every block but the last fills whole words); None when no split is needed."""
    if b is None:
        if a.shape[0] > MAX_COLS:
            raise ValueError(
                f"pairwise distances among {a.shape[0]} images exceed one kernel call ({MAX_COLS} columns); "
                "compute them as cross blocks (b=...)"
            )
        return None
    if b.shape[0] <= MAX_COLS:
        return None
    parts = [fn(a, b[s : s + MAX_COLS]) for s in range(0, b.shape[0], MAX_COLS)]
    if parts[0].dtype == torch.uint64:  # few kernels for uint64: join the words as int64
        return torch.cat([p.view(torch.int64) for p in parts], 1).view(torch.uint64)
    return torch.cat(parts, 1)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _native_args(a: torch.Tensor, b: torch.Tensor) -> tuple:
    n, c, h, w = a.shape
    return (_native.ptr(a), n, _native.ptr(b), b.shape[0], c, h, w, _native.dtype_code(a))


def _check_native(a: torch.Tensor, backend: str) -> None:
    if a.dtype not in NATIVE_DTYPES:
        raise TypeError(f"backend {backend!r} takes uint8/float32/float16/bfloat16 images, got {a.dtype}")


# ---------------------------------------------------------------------------------------------- matrix


def _matrix_impl(
    a: torch.Tensor, b: torch.Tensor | None, grid_h: int, grid_w: int, scale: float, backend: str
) -> torch.Tensor:
    grid = (grid_h, grid_w)
    if backend == "reference":
        return ref.distance_matrix(a, b, grid, scale)
    if backend == "cublas":  # uint8 only (scale does not apply); its own TypeError names the dtype
        from memcore.kernels.intmm import distance as ik

        return ik.distance_matrix(a, b, grid)
    _check_native(a, backend)
    split = _split_cols(lambda x, y: _matrix_impl(x, y, grid_h, grid_w, scale, backend), a, b)
    if split is not None:
        return split
    a = a.contiguous()
    other = a if b is None else b.contiguous()
    if backend == "cpu":
        out = torch.empty((a.shape[0], other.shape[0]), dtype=torch.float32, device=a.device)
        _native.family("distance").matrix(
            *_native_args(a, other), grid_h, grid_w, float(scale), b is None, _native.ptr(out)
        )
        return out
    if backend == "cuda":
        out = torch.empty((a.shape[0], other.shape[0]), dtype=torch.float32, device=a.device)
        with torch.cuda.device(a.device):  # the core launches on the current device: make it the tensors'
            _native.family("distance").matrix_cuda(
                *_native_args(a, other), grid_h, grid_w, float(scale), b is None, _native.ptr(out), _stream(a)
            )
        return out
    if backend == "triton":
        from memcore.kernels.triton import distance as tk

        return tk.distance_matrix(a, b, grid, scale)
    raise ValueError(f"unknown backend {backend!r}")


def _stream(t: torch.Tensor) -> int:
    return _native.stream_of(t)


@torch.library.custom_op("memcore::distance_matrix", mutates_args=())
def distance_matrix(
    a: torch.Tensor, b: torch.Tensor | None, grid_h: int, grid_w: int, scale: float, backend: str
) -> torch.Tensor:
    """Tiled L2 matrix (1×1 grid: plain L2). a: [N, C, H, W]; b: [M, C, H, W] or None -> [N, M]."""
    with stage("distance:matrix"):
        return _matrix_impl(a, b, grid_h, grid_w, scale, backend)


@distance_matrix.register_fake
def _(a, b, grid_h, grid_w, scale, backend):
    m = a.shape[0] if b is None else b.shape[0]
    return a.new_empty((a.shape[0], m), dtype=_out_dtype(a))


# ---------------------------------------------------------------------------------------------- k-NN


def _knn_chunked(
    matrix_fn, queries: torch.Tensor, refs: torch.Tensor, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Streamed top-k over reference chunks in (distance, index) order; memory O(N·(k + chunk)).

    Distances are >= 0, so their float32 bit patterns order like integers: the int64 key
    ``bits(d) << 32 | index`` is unique per candidate and its order is (distance, then smaller index), which
    lets an (unstable) ``topk`` give exactly the stable-sort result.
    """
    n, m = queries.shape[0], refs.shape[0]
    best = queries.new_empty((n, 0), dtype=torch.int64)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        d = matrix_fn(refs[start:stop])
        idx = torch.arange(start, stop, device=queries.device, dtype=torch.int64)
        cat = torch.cat([best, _keys(d, idx)], 1)
        best = torch.topk(cat, min(k, cat.shape[1]), dim=1, largest=False, sorted=True).values
    return _unkey(best)


def _keys(d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by (distance, index): float32 distances >= 0 order like their bit patterns. ``abs``
    clears the sign of a NaN (x86 makes 0/0 with it set), which would otherwise sort first, not last."""
    return (d.abs().view(torch.int32).to(torch.int64) << 32) | idx


def _unkey(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (keys >> 32).to(torch.int32).view(torch.float32), keys & 0xFFFFFFFF


def _smallest(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest of [N, K] keys per row, decoded to (distances, indices)."""
    return _unkey(torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False, sorted=True).values)


def merge_topk(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two k-NN results ([N, ka] / [N, kb] float32 distances >= 0 and int64 indices < 2^32) into the
    ``k`` smallest in (distance, index) order, the order every k-NN backend returns."""
    return _smallest(torch.cat([_keys(*a), _keys(*b)], 1), k)


def _knn_impl(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    grid_h: int,
    grid_w: int,
    scale: float,
    chunk: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    grid = (grid_h, grid_w)
    if backend == "reference":
        return ref.knn(queries, refs, k, grid, scale, chunk)
    if backend == "cublas":
        from memcore.kernels.intmm import distance as ik

        ik.check_dtype(queries)
        packed = ik.pack(queries, grid)  # once, not per reference chunk
        return _knn_chunked(lambda r: ik.cross_distances(packed, r, grid), queries, refs, k, chunk)
    _check_native(queries, backend)
    queries = queries.contiguous()
    refs = refs.contiguous()
    if backend == "cpu":
        n = queries.shape[0]
        out_d = torch.empty((n, k), dtype=torch.float32)
        out_i = torch.empty((n, k), dtype=torch.int64)
        _native.family("distance").knn(
            *_native_args(queries, refs),
            grid_h,
            grid_w,
            float(scale),
            k,
            chunk,
            _native.ptr(out_d),
            _native.ptr(out_i),
        )
        return out_d, out_i
    if backend == "triton":
        from memcore.kernels.triton import distance as tk

        if 1 <= k <= tk.KNN_MAX_K:  # selection fused into the kernel; chunk is moot (memory O(N·k))
            return _smallest(tk.knn_keys(queries, refs, k, grid, scale), k)
    if backend in ("cuda", "triton"):
        return _knn_chunked(
            lambda r: _matrix_impl(queries, r, grid_h, grid_w, scale, backend), queries, refs, k, chunk
        )
    raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("memcore::distance_knn", mutates_args=())
def distance_knn(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    grid_h: int,
    grid_w: int,
    scale: float,
    chunk: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest refs per query, ascending, ties by smaller index. -> ([N, k] float32, [N, k] int64)."""
    with stage("distance:knn"):
        return _knn_impl(queries, refs, k, grid_h, grid_w, scale, chunk, backend)


@distance_knn.register_fake
def _(queries, refs, k, grid_h, grid_w, scale, chunk, backend):
    n = queries.shape[0]
    return (
        queries.new_empty((n, k), dtype=_out_dtype(queries)),
        queries.new_empty((n, k), dtype=torch.int64),
    )


# ---------------------------------------------------------------------------------------------- graph


def _graph_impl(
    a: torch.Tensor,
    b: torch.Tensor | None,
    alpha: float,
    grid_h: int,
    grid_w: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    grid = (grid_h, grid_w)
    if backend == "reference":
        return ref.graph(a, b, alpha, grid, scale)
    if backend == "cublas":
        from memcore.kernels.intmm import distance as ik

        return ik.distance_graph(a, b, alpha, grid)
    _check_native(a, backend)
    split = _split_cols(lambda x, y: _graph_impl(x, y, alpha, grid_h, grid_w, scale, backend), a, b)
    if split is not None:
        return split
    a = a.contiguous()
    other = a if b is None else b.contiguous()
    words = math.ceil(other.shape[0] / 64)
    if backend == "cpu":
        out = torch.empty((a.shape[0], words), dtype=torch.uint64)
        _native.family("distance").graph(
            *_native_args(a, other), grid_h, grid_w, float(scale), b is None, float(alpha), _native.ptr(out)
        )
        return out
    if backend == "cuda":
        out = torch.empty((a.shape[0], words), dtype=torch.uint64, device=a.device)
        with torch.cuda.device(a.device):  # the core launches on the current device: make it the tensors'
            _native.family("distance").graph_cuda(
                *_native_args(a, other),
                grid_h,
                grid_w,
                float(scale),
                b is None,
                float(alpha),
                _native.ptr(out),
                _stream(a),
            )
        return out
    if backend == "triton":
        from memcore.kernels.triton import distance as tk

        return tk.distance_graph(a, b, alpha, grid, scale)
    raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("memcore::distance_graph", mutates_args=())
def distance_graph(
    a: torch.Tensor,
    b: torch.Tensor | None,
    alpha: float,
    grid_h: int,
    grid_w: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Bitset of ``tiled_l2 <= alpha``: a [N, C, H, W], b [M, C, H, W] or None -> uint64 [N, ceil(M/64)]."""
    with stage("distance:graph"):
        return _graph_impl(a, b, alpha, grid_h, grid_w, scale, backend)


@distance_graph.register_fake
def _(a, b, alpha, grid_h, grid_w, scale, backend):
    m = a.shape[0] if b is None else b.shape[0]
    return a.new_empty((a.shape[0], (m + 63) // 64), dtype=torch.uint64)
