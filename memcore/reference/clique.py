"""Reference clique path on networkx: the exact oracle for tests and the benchmark baseline.

Everything here is deliberately plain: bitsets are unpacked with numpy, the graph is handed to networkx, and
the maximum clique is read off ``nx.find_cliques`` (every maximum clique is maximal, so enumerating the
maximal cliques yields all maximum ones, and with them the tie rule: the lexicographically smallest sorted
member list). It has no work budget: it is always exact and can take minutes on dense graphs.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

if sys.byteorder != "little":  # pragma: no cover - the bitset layout is defined on little-endian words
    raise ImportError("memcore.reference.clique assumes a little-endian host")


def words_for(n: int) -> int:
    """Words per bitset row for ``n`` vertices: ceil(n / 64)."""
    return (n + 63) // 64


def pack_bitset(dense: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N, N]`` -> uint64 bitset ``[N, ceil(N/64)]`` (bit j of row i: word j // 64, bit j % 64)."""
    n = dense.shape[0]
    w = words_for(n)
    arr = np.zeros((n, w * 64), dtype=np.uint8)
    arr[:, :n] = dense.detach().cpu().numpy().astype(np.uint8)
    packed = np.packbits(arr, axis=1, bitorder="little")  # [N, 8 W] bytes, little-endian words
    return torch.from_numpy(packed.view(np.uint64).reshape(n, w).copy())


def unpack_bitset(adj: torch.Tensor) -> torch.Tensor:
    """uint64 bitset ``[N, ceil(N/64)]`` -> boolean ``[N, N]`` (the inverse of :func:`pack_bitset`)."""
    n = adj.shape[0]
    if n == 0:
        return torch.zeros((0, 0), dtype=torch.bool)
    raw = adj.detach().cpu().contiguous().numpy().view(np.uint8).reshape(n, -1)
    bits = np.unpackbits(raw, axis=1, bitorder="little")
    return torch.from_numpy(bits[:, :n].astype(bool))


def validate(adj: torch.Tensor) -> None:
    """Raise ValueError unless the bitset is square, symmetric, loop-free and zero-padded."""
    n = adj.shape[0]
    if n == 0:
        return
    raw = adj.detach().cpu().contiguous().numpy().view(np.uint8).reshape(n, -1)
    bits = np.unpackbits(raw, axis=1, bitorder="little").astype(bool)
    if bits[:, n:].any():
        i, j = np.argwhere(bits[:, n:])[0]
        raise ValueError(f"adjacency row {i} has bit {n + j} set, past the last vertex {n - 1}")
    dense = bits[:, :n]
    if dense.diagonal().any():
        raise ValueError(f"adjacency has a self loop at vertex {int(np.argmax(dense.diagonal()))}")
    bad = np.argwhere(dense != dense.T)
    if len(bad):
        i, j = (int(x) for x in bad[0])
        raise ValueError(f"adjacency is not symmetric: ({i}, {j}) differs from ({j}, {i})")


def threshold_graph(dist: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[N, N]`` distances -> bitset; edge iff i != j and ``dist[i, j] <= alpha`` and ``dist[j, i] <= alpha``,
    compared in the distances' dtype (``alpha`` rounded to it, as ``tensor <= float`` does)."""
    if torch.isnan(dist).any():
        i, j = (int(x) for x in torch.nonzero(torch.isnan(dist))[0])
        raise ValueError(f"threshold_graph: distance ({i}, {j}) is NaN")
    e = (dist <= alpha) & (dist.T <= alpha)
    e.fill_diagonal_(False)
    return pack_bitset(e)


def to_networkx(adj: torch.Tensor):
    """The graph of a bitset as a networkx graph on vertices 0..N-1."""
    import networkx as nx  # imported here: `import memcore.graph` should not pay for networkx

    dense = unpack_bitset(adj).numpy()
    g = nx.Graph()
    g.add_nodes_from(range(dense.shape[0]))
    ii, jj = np.nonzero(np.triu(dense, 1))
    g.add_edges_from(zip(ii.tolist(), jj.tolist()))
    return g


def max_clique(adj: torch.Tensor, *, min_size: int = 1) -> tuple[list[int], bool, int, int]:
    """Lexicographically smallest maximum clique by enumeration of maximal cliques.

    Args:
        adj: ``[N, ceil(N/64)]`` uint64 bitset.
        min_size: cliques below this size are of no interest: if the clique number is smaller, no members.

    Returns:
        ``(members, exact, upper_bound, nodes)``: sorted members (empty if the clique number is below
        ``min_size``), always exact, the proven upper bound (the clique number, or ``min_size - 1`` when that
        is smaller) and the number of maximal cliques enumerated (networkx's unit of work).
    """
    n = adj.shape[0]
    if n == 0:
        return [], True, 0, 0
    import networkx as nx

    best: list[int] = []
    count = 0
    for c in nx.find_cliques(to_networkx(adj)):
        count += 1
        s = sorted(c)
        if len(s) > len(best) or (len(s) == len(best) and s < best):
            best = s
    if len(best) < max(min_size, 1):
        return [], True, max(min_size - 1, 0), count
    return best, True, len(best), count


def max_weight_clique(adj: torch.Tensor) -> list[int]:
    """networkx's ``max_weight_clique`` (unit weights): one maximum clique, no tie rule (a baseline only)."""
    import networkx as nx

    members, _ = nx.max_weight_clique(to_networkx(adj), weight=None)
    return sorted(members)


def clique_stats(distances: torch.Tensor) -> tuple[int, float]:
    """``[K, K]`` member distances -> (medoid position, mean pairwise distance), by explicit float64 loops.

    The medoid is the member with the least summed distance to the others (row sums; the first on ties); the
    mean is over the K (K - 1) ordered pairs i != j (the unordered-pair mean for a symmetric matrix), NaN for
    K < 2.
    """
    d = distances.detach().cpu().to(torch.float64).tolist()
    k = len(d)
    sums = [math.fsum(d[i][j] for j in range(k) if j != i) for i in range(k)]
    medoid = min(range(k), key=lambda i: (sums[i], i))
    pairs = [d[i][j] for i in range(k) for j in range(k) if i != j]
    mean = math.fsum(pairs) / len(pairs) if pairs else float("nan")
    return medoid, mean
