"""Clique-family dispatch: the only module that touches ``memcore._C.clique``.

Backends: ``cpu`` (the C++ core: BBMC after k-core pruning, GIL released, batch on a thread pool) and
``reference`` (networkx, exact, no budget). There is no ``cuda``/``triton`` backend: the search is branchy
host work on a 31 KB bitset, and CUDA inputs are copied to the host (one small device-to-host copy, which
synchronises with the producing stream). The search is not a torch.library custom op: its output size is
data dependent and it never runs inside a compiled region; ``threshold_graph`` and ``to_bitset`` are plain
host functions for the same reason (the device-side graph comes from ``memcore.distance.tiled_l2_graph``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memcore.ops import _backend, _native
from memcore.reference import clique as _ref

CLIQUE_BACKENDS = ("auto", "cpu", "reference")

# (members [K] int64 sorted, exact, upper_bound, nodes)
Raw = tuple[torch.Tensor, bool, int, int]


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``cpu`` when the core is built, else ``reference``; a clear error for GPU backends."""
    if backend in ("cuda", "triton"):
        raise ValueError(
            f"backend {backend!r} does not exist for cliques: the search runs on the host (CUDA adjacency is "
            "copied to the host); use 'auto', 'cpu' or 'reference'"
        )
    if backend not in CLIQUE_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(CLIQUE_BACKENDS)}")
    return _backend.resolve(backend, torch.device("cpu"))


# The core takes int64 counts; Python ints are unbounded. A min_size or node budget past int64 is clamped to its
# maximum, which already means "more than any graph can hold" (no graph has 2^63 vertices or is searched for
# 2^63 nodes), so the answer is the one the unbounded value would give.
_INT64_MAX = 2**63 - 1


def _words(n: int) -> int:
    return (n + 63) // 64


def check_has_data(t: torch.Tensor, name: str) -> None:
    """Raise ValueError for a meta tensor: it has a shape but no values, and every clique-family function
    reads the values (its result is data dependent, so there is no shape-only answer to give)."""
    if t.device.type == "meta":
        raise ValueError(
            f"{name} is a meta tensor (shape only, no data); the graph functions need its values: pass a CPU "
            "or CUDA tensor"
        )


def to_bitset(adjacency: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """A uint64 bitset ``[N, ceil(N/64)]`` (returned as a contiguous CPU tensor) or a boolean ``[N, N]``
    matrix (packed) -> the contiguous CPU bitset. Shapes and dtypes are checked here; graph properties
    (symmetry, empty diagonal, zero padding) by :func:`validate`."""
    if not isinstance(adjacency, torch.Tensor):
        raise TypeError(f"adjacency must be a torch.Tensor, got {type(adjacency).__name__}")
    check_has_data(adjacency, "adjacency")
    # checked for every input, not only when a bool matrix is packed: a misspelt backend is an error
    name = resolve_backend(backend)
    if adjacency.dim() != 2:
        raise ValueError(
            f"adjacency must be 2-D ([N, ceil(N/64)] uint64 or [N, N] bool), got {adjacency.dim()}-D"
        )
    n = adjacency.shape[0]
    if adjacency.dtype == torch.bool:
        if adjacency.shape[1] != n:
            raise ValueError(f"a boolean adjacency must be square [N, N], got {tuple(adjacency.shape)}")
        dense = adjacency.detach().to("cpu").contiguous()
        if name == "reference":
            return _ref.pack_bitset(dense)
        out = torch.empty((n, _words(n)), dtype=torch.uint64)
        if n:
            _native.family("clique").pack_dense(_native.ptr(dense), n, _native.ptr(out))
        return out
    if adjacency.dtype == torch.uint64:
        if adjacency.shape[1] != _words(n):
            raise ValueError(
                f"a bitset adjacency of {n} vertices must be [N, ceil(N/64)] = [{n}, {_words(n)}], "
                f"got {tuple(adjacency.shape)}"
            )
        return adjacency.detach().to("cpu").contiguous()
    raise TypeError(f"adjacency must be a uint64 bitset or a bool matrix, got dtype {adjacency.dtype}")


def to_dense(adjacency: torch.Tensor) -> torch.Tensor:
    """uint64 bitset ``[N, ceil(N/64)]`` -> boolean ``[N, N]`` (CPU)."""
    return _ref.unpack_bitset(to_bitset(adjacency, backend="reference"))


def validate(bits: torch.Tensor, *, backend: str = "auto") -> None:
    """Raise ValueError unless the CPU bitset from :func:`to_bitset` is symmetric, loop-free, zero-padded."""
    n = bits.shape[0]
    if resolve_backend(backend) == "reference":
        _ref.validate(bits)
    elif n:
        _native.family("clique").validate(_native.ptr(bits), n, bits.shape[1])


def solve(
    bits: torch.Tensor,
    *,
    min_size: int,
    decision: bool,
    canonical: bool,
    node_budget: int,
    time_limit: float,
    check: bool,
    backend: str = "auto",
) -> Raw:
    """One graph (CPU bitset from :func:`to_bitset`). ``node_budget < 0`` / ``time_limit <= 0``: none.

    ``min_size`` and ``node_budget`` past int64 are clamped to its maximum (the same answer, see
    ``_INT64_MAX``). With ``check=False`` the core still ignores self loops and bits past column N - 1 (an
    O(N) scan), so only the symmetry check is skipped.
    """
    name = resolve_backend(backend)
    n = bits.shape[0]
    if name == "reference":
        if check:
            _ref.validate(bits)
        members, exact, ub, nodes = _ref.max_clique(bits, min_size=min_size)
        return torch.tensor(members, dtype=torch.int64), exact, ub, nodes
    out = torch.empty(n, dtype=torch.int64)
    size, exact, ub, nodes = _native.family("clique").solve(
        _native.ptr(bits),
        n,
        bits.shape[1],
        _native.ptr(out),
        min(min_size, _INT64_MAX),
        bool(decision),
        bool(canonical),
        min(node_budget, _INT64_MAX),
        float(time_limit),
        bool(check),
    )
    return out[:size].clone(), bool(exact), int(ub), int(nodes)


def solve_batch(
    graphs: Sequence[torch.Tensor],
    *,
    min_size: int,
    decision: bool,
    canonical: bool,
    node_budget: int,
    time_limit: float,
    threads: int,
    check: bool,
    backend: str = "auto",
) -> list[Raw]:
    """Many CPU bitsets on the core's thread pool (``threads <= 0``: all hardware threads; never more
    threads than graphs). Arguments are clamped as for :func:`solve`."""
    name = resolve_backend(backend)
    if name == "reference":
        return [
            solve(
                g,
                min_size=min_size,
                decision=decision,
                canonical=canonical,
                node_budget=node_budget,
                time_limit=time_limit,
                check=check,
                backend="reference",
            )
            for g in graphs
        ]
    outs = [torch.empty(g.shape[0], dtype=torch.int64) for g in graphs]
    refs = [(_native.ptr(g), g.shape[0], g.shape[1]) for g in graphs]
    stats = _native.family("clique").solve_batch(
        refs,
        [_native.ptr(o) for o in outs],
        min(min_size, _INT64_MAX),
        bool(decision),
        bool(canonical),
        min(node_budget, _INT64_MAX),
        float(time_limit),
        # the core starts at most one worker per graph anyway; clamping here keeps a huge count inside its int
        min(threads, max(len(graphs), 1)),
        bool(check),
    )
    return [
        (o[:size].clone(), bool(exact), int(ub), int(nodes))
        for o, (size, exact, ub, nodes) in zip(outs, stats, strict=True)
    ]


def threshold(dist: torch.Tensor, alpha: float, *, backend: str = "auto") -> torch.Tensor:
    """``[N, N]`` float32/float64 CPU contiguous distances -> uint64 bitset ``[N, ceil(N/64)]``."""
    if resolve_backend(backend) == "reference":
        return _ref.threshold_graph(dist, alpha)
    n = dist.shape[0]
    out = torch.empty((n, _words(n)), dtype=torch.uint64)
    if n:
        _native.family("clique").threshold(
            _native.ptr(dist), _native.dtype_code(dist), n, alpha, _native.ptr(out)
        )
    return out
