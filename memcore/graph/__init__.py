"""Threshold graphs and exact maximum cliques (SPEC §2 steps 2-4, §7 ``memcore.graph.max_clique``).

A condition's N generations form a graph (edge iff tiled L2 <= alpha); the condition is flagged as memorized
when the graph holds a clique of at least ``min_clique`` members (default 10), and the clique's medoid is its
representative. Graphs are uint64 bitsets ``[N, ceil(N/64)]`` (bit j of row i in word j // 64 at position
j % 64), as ``memcore.distance.tiled_l2_graph`` emits them, or boolean ``[N, N]`` matrices.

**Tie rule.** When several maximum cliques exist, :func:`max_clique` returns the one whose sorted member list
is lexicographically smallest, on every backend and at every thread count.

**Budget.** The search is exact unless its work budget (branch-and-bound nodes, deterministic; and an
optional wall-clock limit) runs out; then the result carries ``exact=False``, the best clique found and a
proven upper bound on the clique number. It never hangs, whatever the input (``validate=False`` included).

Example::

    bits = memcore.graph.threshold_graph(dist, alpha=0.1)          # [N, ceil(N/64)] uint64
    res = memcore.graph.max_clique(bits, min_size=10)              # members empty if omega < 10
    if res.size:
        stats = memcore.graph.clique_stats(dist, res.members)      # medoid + mean pairwise distance
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import os
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch

from memcore.ops import clique as _ops
from memcore.utils.checks import finite_real
from memcore.utils.profiling import stage

__all__ = [
    "DEFAULT_NODE_BUDGET",
    "CliqueResult",
    "CliqueSearch",
    "CliqueStats",
    "clique_stats",
    "has_clique",
    "max_clique",
    "max_clique_batch",
    "threshold_graph",
    "to_bitset",
    "to_dense",
]

# Branch-and-bound nodes per graph (both passes). Realistic threshold graphs at N = 500 need 0-1 nodes (k-core
# pruning and the greedy bound settle them); random G(1000, 0.3) needs ~10^6 with the tie rule. Nodes cost
# ~1 us (measured: 2M nodes in 1.4 s on G(1000, 0.5), 1.6 s on G(200, 0.9)), so an adversarial graph stops
# within seconds, never hours.
DEFAULT_NODE_BUDGET = 2_000_000


def _integer(value: object, name: str) -> int:
    """``value`` as a Python int: ints and numpy integers (``operator.index``, as knn's ``k``), never bools."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})") from None


def _flag(value: object, name: str) -> bool:
    """``value`` as a bool: Python or numpy bools only (a string such as "no" would be truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class CliqueSearch:
    """How to search one graph.

    Attributes:
        min_size: only cliques of at least this many members are of interest (k-core pruning with k =
            min_size). If the clique number is smaller, the result has no members. 1 = plain maximum clique;
            0 behaves as 1. An int or numpy integer >= 0; any size (beyond N the answer is "none").
        decision: stop at the first clique of >= min_size members (a witness, not necessarily maximum and not
            subject to the tie rule): the fast "is there a clique of size >= k?" path.
        canonical: apply the tie rule (a second, lexicographic search). False returns some maximum clique
            (deterministic for a backend, but the backends may differ); only for measuring its cost.
        node_budget: branch-and-bound nodes over both passes; None = unlimited (may take exponential time).
            An int or numpy integer >= 0; a budget past 2**63 - 1 is clamped to it (unlimited in practice).
        time_limit: seconds of wall clock per graph; None = none. Unlike the node budget it makes results
            depend on machine speed; use it only as a safety net. Limits past 1e9 s (~31 years) are capped
            there.
        validate: check symmetry, empty diagonal and zero padding first (~N^2/64 word operations). False
            skips only the symmetry check: self loops and bits past column N - 1 are ignored on every backend
            (an O(N) scan), so any bitset is safe to search. On an asymmetric graph the result is unspecified
            (the members may not form a clique, or a ValueError names the asymmetry), but the search is still
            bounded by the budget and memory-safe. For graphs the caller built symmetric itself.

    Bool fields take Python or numpy bools only; integers are normalised to ``int``, ``time_limit`` to
    ``float``. Raises TypeError for a wrong type and ValueError for an out-of-range value, naming the field.
    """

    min_size: int = 1
    decision: bool = False
    canonical: bool = True
    node_budget: int | None = DEFAULT_NODE_BUDGET
    time_limit: float | None = None
    validate: bool = True

    def __post_init__(self) -> None:
        # Normalised in place (a frozen dataclass: object.__setattr__) so that the native core, whose pybind11
        # signature takes only int / bool / float, never sees a numpy scalar.
        min_size = _integer(self.min_size, "min_size")
        if min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0, got {min_size}")
        object.__setattr__(self, "min_size", min_size)
        for name in ("decision", "canonical", "validate"):
            object.__setattr__(self, name, _flag(getattr(self, name), name))
        if self.decision and self.min_size < 1:
            raise ValueError("the decision path needs min_size (k) >= 1")
        if self.node_budget is not None:
            budget = _integer(self.node_budget, "node_budget")
            if budget < 0:
                raise ValueError(f"node_budget must be None or an integer >= 0, got {budget}")
            object.__setattr__(self, "node_budget", budget)
        if self.time_limit is not None:
            if isinstance(self.time_limit, (bool, np.bool_)) or not isinstance(self.time_limit, Real):
                raise TypeError(
                    f"time_limit must be None or a number of seconds, got {type(self.time_limit).__name__}"
                )
            limit = float(self.time_limit)
            if not (math.isfinite(limit) and limit > 0):
                raise ValueError(
                    f"time_limit must be None or a positive number of seconds, got {self.time_limit!r}"
                )
            object.__setattr__(self, "time_limit", limit)

    def _native_args(self) -> dict:
        return {
            "min_size": self.min_size,
            "decision": self.decision,
            "canonical": self.canonical,
            "node_budget": -1 if self.node_budget is None else self.node_budget,
            "time_limit": -1.0 if self.time_limit is None else float(self.time_limit),
            "check": self.validate,
        }


@dataclasses.dataclass(frozen=True)
class CliqueResult:
    """One graph's answer.

    Attributes:
        members: ``[K]`` int64, sorted vertex indices; empty, or at least ``min_size`` members.
        exact: the search finished. For the maximum-clique path: ``members`` is a maximum clique and the
            tie rule holds (or, if empty, the clique number is proven below ``min_size``). For the decision
            path: the question "clique of >= min_size members?" is answered (a witness, or proven no).
        upper_bound: proven upper bound on the clique number (on the maximum-clique path, equal to ``size``
            when exact and non-empty; a decision witness leaves it loose, e.g. N).
            ``exact=False`` with ``size == upper_bound`` means the size is proven maximum but the budget ran
            out before the tie rule was applied.
        nodes: branch-and-bound nodes explored (networkx backend: maximal cliques enumerated).
        min_size: the ``min_size`` searched with.
    """

    members: torch.Tensor
    exact: bool
    upper_bound: int
    nodes: int
    min_size: int

    @property
    def size(self) -> int:
        """Number of members (0 when no clique of >= min_size members was found)."""
        return int(self.members.numel())

    @property
    def decided_at_least(self) -> bool | None:
        """Is there a clique of >= ``min_size`` members? True (witness found), False (proven not), or None
        (the budget ran out first). Never None when ``exact``. For ``min_size = 0`` it is always True: the
        empty set is a clique of 0 members (even in the empty graph, whose ``members`` are then empty)."""
        if self.min_size <= 0 or self.size >= self.min_size:
            return True
        if self.upper_bound < self.min_size:
            return False
        return None


@dataclasses.dataclass(frozen=True)
class CliqueStats:
    """Statistics of a clique from the distances among its members (SPEC §2 step 4).

    Attributes:
        medoid_position: position (0..K-1) of the member with the least summed distance to the others; the
            first such position on ties.
        medoid: the medoid's vertex index (``members[medoid_position]``; the position itself when no member
            list was given).
        mean_distance: mean distance over ordered pairs i != j (the unordered-pair mean for a symmetric
            matrix): the ranking key, lower first. NaN for fewer than 2 members.
        summed_distances: ``[K]`` float64, each member's summed distance to the others.
    """

    medoid_position: int
    medoid: int
    mean_distance: float
    summed_distances: torch.Tensor


def _result(raw: _ops.Raw, min_size: int) -> CliqueResult:
    members, exact, ub, nodes = raw
    return CliqueResult(members=members, exact=exact, upper_bound=ub, nodes=nodes, min_size=min_size)


def _config(config: CliqueSearch | None, overrides: dict) -> CliqueSearch:
    base = config if config is not None else CliqueSearch()
    if config is not None and not isinstance(config, CliqueSearch):
        raise TypeError(f"config must be a CliqueSearch, got {type(config).__name__}")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not _UNSET})


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def to_bitset(adjacency: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Normalise an adjacency to the CPU bitset.

    Args:
        adjacency: uint64 ``[N, ceil(N/64)]`` bitset or bool ``[N, N]`` matrix, on any device (CUDA tensors are
            copied to the host, which waits for the producing stream).
        backend: ``auto``, ``cpu`` or ``reference`` (only matters for packing a bool matrix).

    Returns:
        ``[N, ceil(N/64)]`` uint64, contiguous, on the CPU. Not validated (see :func:`max_clique`).
    """
    return _ops.to_bitset(adjacency, backend=backend)


def to_dense(adjacency: torch.Tensor) -> torch.Tensor:
    """uint64 bitset ``[N, ceil(N/64)]`` (or bool ``[N, N]``) -> bool ``[N, N]`` on the CPU."""
    return _ops.to_dense(adjacency)


def max_clique(
    adjacency: torch.Tensor,
    *,
    min_size: int = _UNSET,  # type: ignore[assignment]
    node_budget: int | None = _UNSET,  # type: ignore[assignment]
    time_limit: float | None = _UNSET,  # type: ignore[assignment]
    canonical: bool = _UNSET,  # type: ignore[assignment]
    validate: bool = _UNSET,  # type: ignore[assignment]
    config: CliqueSearch | None = None,
    backend: str = "auto",
) -> CliqueResult:
    """Exact maximum clique (SPEC §7), the lexicographically smallest one on ties.

    Args:
        adjacency: uint64 bitset ``[N, ceil(N/64)]`` (bit j of row i in word j // 64 at position j % 64) or
            bool ``[N, N]``; symmetric with an empty diagonal (checked: ValueError naming the first bad entry).
        min_size: report only cliques of >= min_size members (default 1); a graph whose clique number is
            smaller returns no members. Setting it to the flagging threshold lets k-core pruning skip most
            graphs at once.
        node_budget: branch-and-bound node budget (default :data:`DEFAULT_NODE_BUDGET`; None = unlimited).
        time_limit: optional wall-clock limit in seconds.
        canonical: apply the tie rule (default True).
        validate: check the graph first (default True); False skips only the symmetry check (self loops
            and padding bits are still ignored; an asymmetric graph's result is unspecified, see
            :class:`CliqueSearch`).
        config: a :class:`CliqueSearch` to start from; keyword arguments override its fields.
        backend: ``auto`` (the C++ core when built), ``cpu`` or ``reference`` (networkx; exact, no budget).

    Returns:
        :class:`CliqueResult`; ``members`` is ``[K]`` int64 sorted.
    """
    cfg = _config(
        config,
        {
            "min_size": min_size,
            "node_budget": node_budget,
            "time_limit": time_limit,
            "canonical": canonical,
            "validate": validate,
            "decision": False,
        },
    )
    return _run_one(adjacency, cfg, backend)


def has_clique(
    adjacency: torch.Tensor,
    k: int,
    *,
    node_budget: int | None = _UNSET,  # type: ignore[assignment]
    time_limit: float | None = _UNSET,  # type: ignore[assignment]
    validate: bool = _UNSET,  # type: ignore[assignment]
    backend: str = "auto",
) -> CliqueResult:
    """Decision path: is there a clique of at least ``k`` members? Stops as soon as it knows.

    Args:
        adjacency: as for :func:`max_clique`.
        k: the clique size asked about (an int or numpy integer >= 1); k > N is answered False at once.

    Returns:
        :class:`CliqueResult` with ``min_size = k``: ``decided_at_least`` is the answer; on True ``members`` is
        a witness clique of >= k members (deterministic per backend; not necessarily maximum, no tie rule).
    """
    cfg = _config(
        None,
        {
            "min_size": k,
            "decision": True,
            "node_budget": node_budget,
            "time_limit": time_limit,
            "validate": validate,
        },
    )
    return _run_one(adjacency, cfg, backend)


def _run_one(adjacency: torch.Tensor, cfg: CliqueSearch, backend: str) -> CliqueResult:
    bits = _ops.to_bitset(adjacency, backend=backend)
    with stage("clique"):
        raw = _ops.solve(bits, backend=backend, **cfg._native_args())
    return _result(raw, cfg.min_size)


def max_clique_batch(
    adjacencies: Sequence[torch.Tensor],
    *,
    min_size: int = _UNSET,  # type: ignore[assignment]
    decision: bool = _UNSET,  # type: ignore[assignment]
    node_budget: int | None = _UNSET,  # type: ignore[assignment]
    time_limit: float | None = _UNSET,  # type: ignore[assignment]
    canonical: bool = _UNSET,  # type: ignore[assignment]
    validate: bool = _UNSET,  # type: ignore[assignment]
    config: CliqueSearch | None = None,
    threads: int | None = None,
    backend: str = "auto",
) -> list[CliqueResult]:
    """Many graphs (one per prompt) on a C++ thread pool with the GIL released.

    Results are identical to calling :func:`max_clique` (or :func:`has_clique` with ``decision=True``) on each
    graph, whatever ``threads`` is (a ``time_limit`` aside). Graphs may have different N.

    Args:
        adjacencies: sequence of bitsets / bool matrices, as for :func:`max_clique`.
        threads: worker threads, an int or numpy integer >= 1 (None: ``os.cpu_count()``); 1 runs on the
            calling thread (GIL released). At most one thread per graph is started, so any count is safe.
        Other arguments: as for :func:`max_clique`; ``decision=True`` asks "clique of >= min_size?" per graph.

    Returns:
        One :class:`CliqueResult` per graph, in order.
    """
    if isinstance(adjacencies, torch.Tensor):
        raise TypeError("max_clique_batch takes a sequence of adjacencies (one per graph), not one tensor")
    cfg = _config(
        config,
        {
            "min_size": min_size,
            "decision": decision,
            "node_budget": node_budget,
            "time_limit": time_limit,
            "canonical": canonical,
            "validate": validate,
        },
    )
    if threads is None:
        threads = os.cpu_count() or 1
    threads = _integer(threads, "threads")
    if threads < 1:
        raise ValueError(f"threads must be None or an integer >= 1, got {threads}")
    bits = [_ops.to_bitset(a, backend=backend) for a in adjacencies]
    with stage("clique"):
        raws = _ops.solve_batch(bits, threads=threads, backend=backend, **cfg._native_args())
    return [_result(r, cfg.min_size) for r in raws]


def threshold_graph(dist: torch.Tensor, alpha: float, *, backend: str = "auto") -> torch.Tensor:
    """Threshold graph of a distance matrix as a bitset (SPEC §2 step 2).

    Args:
        dist: ``[N, N]`` float32 or float64 distances (any device but meta; copied to the host). NaN is an
            error.
        alpha: edge threshold, a finite real number (int, float or numpy scalar; NaN and +-inf are a
            ValueError, as for ``memcore.distance.tiled_l2_graph``); compared in ``dist``'s dtype (alpha
            rounded to it), as ``dist <= alpha`` does.

    Returns:
        ``[N, ceil(N/64)]`` uint64 bitset on the CPU: bit j of row i set iff i != j, ``dist[i, j] <= alpha``
        and ``dist[j, i] <= alpha`` (both halves, so a float kernel's rounding asymmetry cannot break symmetry).
    """
    if not isinstance(dist, torch.Tensor):
        raise TypeError(f"dist must be a torch.Tensor, got {type(dist).__name__}")
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square [N, N] matrix, got shape {tuple(dist.shape)}")
    if dist.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dist must be float32 or float64, got {dist.dtype}")
    _ops.check_has_data(dist, "dist")
    # one rule with memcore.distance.tiled_l2_graph: numpy scalars too; NaN, inf and 10**400 refused
    a = finite_real(alpha, "alpha")
    d = dist.detach().to("cpu").contiguous()
    return _ops.threshold(d, a, backend=backend)


def _member_indices(members: object) -> torch.Tensor:
    """``members`` as a 1-D int64 CPU tensor. No casts: a float list would be truncated to other vertices and
    a bool mask read as the indices 0 and 1, both silently wrong."""
    if isinstance(members, torch.Tensor):
        _ops.check_has_data(members, "members")
        idx = members.detach()
    else:
        try:
            idx = torch.as_tensor(members)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"members must be a sequence of integer vertex indices: {e}") from None
        if idx.numel() == 0:
            idx = idx.to(torch.int64)  # [] comes out as float32: an empty list is a (rejected) empty clique
    if idx.dtype == torch.bool:
        raise TypeError(
            "members must be integer vertex indices, got a bool tensor; for a mask, pass "
            "torch.nonzero(mask).flatten()"
        )
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise TypeError(f"members must be integer vertex indices, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"members must be 1-D [K], got shape {tuple(idx.shape)}")
    return idx.to("cpu", torch.int64)


def clique_stats(distances: torch.Tensor, members: torch.Tensor | Sequence[int] | None = None) -> CliqueStats:
    """Medoid and mean pairwise distance of a clique (SPEC §2 step 4).

    Args:
        distances: ``[K, K]`` distances among the members, or ``[N, N]`` over all generations when ``members``
            is given. Finite values (NaN/Inf is an error); any float dtype, any device but meta. Sums are
            correctly rounded float64 (``math.fsum``), so equal sums tie exactly.
        members: ``[K]`` distinct integer vertex indices into ``distances`` (e.g. ``max_clique(...).members``;
            an integer tensor, numpy array or sequence of ints), or None. Floats and bool masks are a
            TypeError, anything but 1-D a ValueError.

    Returns:
        :class:`CliqueStats`.
    """
    if not isinstance(distances, torch.Tensor):
        raise TypeError(f"distances must be a torch.Tensor, got {type(distances).__name__}")
    if distances.dim() != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"distances must be a square matrix, got shape {tuple(distances.shape)}")
    if not distances.dtype.is_floating_point:
        raise TypeError(f"distances must be a float tensor, got {distances.dtype}")
    _ops.check_has_data(distances, "distances")
    d = distances.detach().to("cpu", torch.float64)
    idx = None
    if members is not None:
        idx = _member_indices(members)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d.shape[0]):
            raise ValueError(f"members must index 0..{d.shape[0] - 1}")
        if idx.unique().numel() != idx.numel():
            raise ValueError("members must be distinct")
        d = d[idx][:, idx]
    k = d.shape[0]
    if k == 0:
        raise ValueError("clique_stats needs at least one member")
    if not torch.isfinite(d).all():
        raise ValueError("distances among the members must be finite (found NaN or Inf)")
    off = d.clone()
    off.fill_diagonal_(0.0)
    # Correctly rounded sums (math.fsum), as memcore.reference.clique.clique_stats: mathematically equal row
    # sums then compare equal, so the tie rule (first minimum) holds. A float64 sum in some order does not:
    # rows 0.1 + 0.2 + 0.3 and 0.2 + 0.3 + 0.1 round apart, which moved the medoid off the first tied member.
    rows = off.tolist()
    sums = torch.tensor([math.fsum(r) for r in rows], dtype=torch.float64)
    pos = int(torch.argmin(sums))  # torch.argmin returns the first minimum: the documented tie rule
    mean = math.fsum(itertools.chain.from_iterable(rows)) / (k * (k - 1)) if k >= 2 else float("nan")
    medoid = int(idx[pos]) if idx is not None else pos
    return CliqueStats(medoid_position=pos, medoid=medoid, mean_distance=mean, summed_distances=sums)
