"""Clique engine (memcore.graph) against networkx, on every CPU backend.

Oracle: networkx's enumeration of maximal cliques (memcore.reference.clique), which yields every maximum
clique and so the tie rule (lexicographically smallest sorted member list). Where enumeration is too slow
(dense G(500+, 0.3)), the planted-clique cases are verified by construction: a certificate that no clique
with a vertex outside the planted set S can reach |S| members.
"""

from __future__ import annotations

import threading
import time

import networkx as nx
import numpy as np
import pytest
import torch
from conftest import cpu_backends
from tolerances import tol

import memcore.graph as mg
from memcore.reference import clique as ref

BACKENDS = cpu_backends()
NATIVE = [b for b in BACKENDS if b != "reference"]


def gnp(n: int, p: float, plant: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G(n, p) with a clique planted on `plant` random vertices: (bool [n, n], planted indices [plant])."""
    g = torch.Generator().manual_seed(seed)
    a = torch.triu(torch.rand(n, n, generator=g) < p, 1)
    a = a | a.T
    s = torch.randperm(n, generator=g)[:plant]
    a[s.unsqueeze(1), s.unsqueeze(0)] = True
    a.fill_diagonal_(False)
    return a, s


def is_clique(dense: torch.Tensor, members: list[int]) -> bool:
    idx = torch.tensor(members, dtype=torch.int64)
    sub = dense[idx][:, idx]
    return bool((sub | torch.eye(len(members), dtype=torch.bool)).all())


def planted_is_unique_maximum(dense: torch.Tensor, s: torch.Tensor) -> bool:
    """Certificate: a clique holding a vertex v outside S has at most |N(v) ∩ S| + omega(G - S) members, and
    omega(G - S) <= the number of colours of a greedy colouring of G - S. If that is < |S| for every v, S is
    the unique maximum clique."""
    n = dense.shape[0]
    inside = torch.zeros(n, dtype=torch.bool)
    inside[s] = True
    out = torch.nonzero(~inside).flatten()
    if out.numel() == 0:
        return True
    g = nx.Graph()
    g.add_nodes_from(out.tolist())
    sub = dense[out][:, out]
    ii, jj = torch.nonzero(torch.triu(sub, 1), as_tuple=True)
    g.add_edges_from(zip(out[ii].tolist(), out[jj].tolist()))
    colours = max(nx.greedy_color(g, strategy="largest_first").values()) + 1
    to_s = dense[out][:, inside].sum(1)
    return bool((to_s + colours < s.numel()).all())


# The fuzz matrix of the issue: n x p x planted size. networkx enumerates all but dense n >= 500.
FUZZ = [
    (n, p, k)
    for n in (1, 2, 63, 64, 65, 500, 1000)
    for p in (0.0, 0.01, 0.1, 0.3)
    for k in (0, 10, 11, 64, 300)
    if k <= n
]


def _nx_affordable(n: int, p: float, k: int) -> bool:
    if n <= 65 or p <= 0.01:
        return True
    if p <= 0.1:
        return n == 500 or k in (0, 64)  # n = 1000 p = 0.1 takes 1-4 s per graph: two of the five
    return False


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize(("n", "p", "k"), FUZZ)
def test_fuzz_against_networkx(backend, n, p, k):
    dense, s = gnp(n, p, k, seed=1000 * n + int(100 * p) + k)
    bits = mg.to_bitset(dense)
    res = mg.max_clique(bits, backend=backend)
    members = res.members.tolist()
    assert res.exact and res.upper_bound == res.size
    assert members == sorted(members) and is_clique(dense, members)
    assert res.size >= max(k, 1)
    if _nx_affordable(n, p, k):
        oracle, *_ = ref.max_clique(bits)
        assert members == oracle  # same size and the same tie-broken clique
    elif k == 300:
        assert planted_is_unique_maximum(dense, s)
        assert members == sorted(s.tolist())
    else:  # dense G(n, 0.3) with a small plant: networkx decides these in the slow test below (minutes)
        assert mg.has_clique(bits, res.size + 1, backend=backend).decided_at_least is False
    # The decision path agrees with the exact path around the answer and at the flagging threshold.
    for q in {1, res.size - 1, res.size, res.size + 1, 10, n + 1} - {0}:
        d = mg.has_clique(bits, q, backend=backend)
        assert d.exact and d.decided_at_least == (res.size >= q)
        if d.decided_at_least:
            assert d.size >= q and is_clique(dense, d.members.tolist())
        else:
            assert d.size == 0 and d.upper_bound < q
    # min_size prunes without changing the answer
    for q in (10, res.size, res.size + 1):
        m = mg.max_clique(bits, min_size=q, backend=backend)
        assert m.exact
        assert m.members.tolist() == (members if res.size >= q else [])
        assert m.decided_at_least == (res.size >= q)


def _nx_max_clique_by_enumeration(dense: torch.Tensor) -> list[int]:
    """networkx's maximum clique with the tie rule: enumerate every maximal clique (Bron-Kerbosch with
    pivoting), keep the largest, and among those the lexicographically smallest sorted member list."""
    g = nx.from_numpy_array(dense.numpy().astype("uint8"))
    best: list[int] = []
    for c in nx.find_cliques(g):
        c = sorted(c)
        if len(c) > len(best) or (len(c) == len(best) and c < best):
            best = c
    return best


def _nx_has_clique(g: nx.Graph, nodes: list[int], q: int) -> bool:
    """Whether networkx finds a clique of ``q`` vertices among ``nodes``: a greedy colouring bound first,
    then its branch and bound (``max_weight_clique``)."""
    if q <= 1:
        return q <= 0 or bool(nodes)
    if len(nodes) < q:
        return False
    sub = g.subgraph(nodes)
    if max(nx.greedy_color(sub, strategy="largest_first").values()) + 1 < q:
        return False
    return nx.max_weight_clique(sub, weight=None)[1] >= q


def _nx_certifies_max_clique(dense: torch.Tensor, members: list[int]) -> bool:
    """networkx's certificate that ``members`` (sorted) is the maximum clique with the tie rule, without
    enumerating every maximal clique: its branch and bound finds no larger clique, and for each position i no
    clique of the same size agrees on the first i - 1 members and has a smaller i-th one (a vertex v between
    the (i-1)-th and the i-th member, adjacent to the first i - 1, plus ω - i larger common neighbours)."""
    g = nx.from_numpy_array(dense.numpy().astype("uint8"))
    omega = len(members)
    if nx.max_weight_clique(g, weight=None)[1] != omega or not is_clique(dense, members):
        return False
    common, prev = list(range(dense.shape[0])), -1
    for i, a in enumerate(members):
        for v in (u for u in common if prev < u < a):
            if _nx_has_clique(g, [u for u in common if u > v and bool(dense[v, u])], omega - i - 1):
                return False
        common = [u for u in common if bool(dense[a, u])]
        prev = a
    return True


DENSE_UNPLANTED = [(n, 0.3, k) for n in (500, 1000) for k in (0, 10, 11, 64)]


@pytest.mark.slow
@pytest.mark.parametrize(("n", "p", "k"), DENSE_UNPLANTED)
def test_dense_fuzz_against_networkx_enumeration(n, p, k):
    """The fuzz cases too dense for the fast test's oracle (G(n, 0.3) with small plants), size and tie rule
    both: networkx's full enumeration decides n = 500; for n = 1000 it took 2-3 minutes per graph on one core
    (10 of CI's minutes for four graphs), so its branch and bound certifies memcore's answer instead (3-130 s)."""
    dense, _ = gnp(n, p, k, seed=1000 * n + int(100 * p) + k)
    res = mg.max_clique(mg.to_bitset(dense))
    assert res.exact
    if n <= 500:
        assert res.members.tolist() == _nx_max_clique_by_enumeration(dense)
    else:
        assert _nx_certifies_max_clique(dense, res.members.tolist())


def test_nx_certificate_rejects_wrong_answers():
    """The certificate of the dense test fails a smaller clique, a non-clique, and a maximum clique that is
    not the lexicographically smallest."""
    dense, _ = gnp(60, 0.5, 0, seed=3)
    want = _nx_max_clique_by_enumeration(dense)
    assert _nx_certifies_max_clique(dense, want)
    assert not _nx_certifies_max_clique(dense, want[:-1])
    assert not _nx_certifies_max_clique(
        dense, sorted({*want[:-1], next(v for v in range(60) if v not in want)})
    )
    g = nx.from_numpy_array(dense.numpy().astype("uint8"))
    later = [sorted(c) for c in nx.find_cliques(g) if len(c) == len(want) and sorted(c) != want]
    assert later, "the test graph needs two maximum cliques"
    assert not _nx_certifies_max_clique(dense, later[0])


@pytest.mark.parametrize("seed", range(60))
def test_small_random_graphs_all_backends_agree(seed):
    """Dense and sparse small graphs (many ties): every backend returns networkx's tie-broken answer."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 48, (1,), generator=g))
    p = (0.0, 0.2, 0.5, 0.7, 0.9, 1.0)[seed % 6]
    dense, _ = gnp(n, p, int(torch.randint(0, n + 1, (1,), generator=g)) if seed % 3 == 0 else 0, seed)
    expected, *_ = ref.max_clique(ref.pack_bitset(dense))
    for backend in BACKENDS:
        assert mg.max_clique(dense, backend=backend).members.tolist() == expected


def test_tie_rule_complete_multipartite():
    """Complete multipartite graph with shuffled labels: every maximum clique takes one vertex per part, so
    the lexicographically smallest is the sorted list of the parts' minima."""
    g = torch.Generator().manual_seed(7)
    sizes = [3, 5, 2, 4, 6]
    n = sum(sizes)
    label = torch.randperm(n, generator=g)
    part = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[label.argsort()]
    dense = part.unsqueeze(0) != part.unsqueeze(1)
    expected = sorted(int(torch.nonzero(part == q).min()) for q in range(len(sizes)))
    assert ref.max_clique(ref.pack_bitset(dense))[0] == expected  # networkx's enumeration agrees
    for backend in BACKENDS:
        assert mg.max_clique(dense, backend=backend).members.tolist() == expected


def test_tie_rule_disjoint_cliques():
    # Three disjoint 5-cliques on interleaved labels: the one holding vertex 0 wins.
    n = 15
    part = torch.tensor([(7 * i) % 3 for i in range(n)])
    dense = (part.unsqueeze(0) == part.unsqueeze(1)) & ~torch.eye(n, dtype=torch.bool)
    expected = [i for i in range(n) if part[i] == part[0]]
    for backend in BACKENDS:
        assert mg.max_clique(dense, backend=backend).members.tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_single_complete(backend):
    empty = torch.zeros((0, 0), dtype=torch.uint64)
    r = mg.max_clique(empty, backend=backend)
    assert r.size == 0 and r.exact and r.upper_bound == 0
    assert mg.has_clique(empty, 1, backend=backend).decided_at_least is False
    one = torch.zeros((1, 1), dtype=torch.uint64)
    r = mg.max_clique(one, backend=backend)
    assert r.members.tolist() == [0] and r.exact
    assert mg.has_clique(one, 2, backend=backend).decided_at_least is False
    for n in (2, 64, 65, 130):
        full = ~torch.eye(n, dtype=torch.bool)
        r = mg.max_clique(full, backend=backend)
        assert r.members.tolist() == list(range(n)) and r.exact and r.upper_bound == n
        assert mg.has_clique(full, n, backend=backend).decided_at_least is True
        assert mg.has_clique(full, n + 1, backend=backend).decided_at_least is False
        edgeless = torch.zeros((n, n), dtype=torch.bool)
        r = mg.max_clique(edgeless, backend=backend)
        assert r.members.tolist() == [0] and r.exact
        r = mg.max_clique(edgeless, min_size=2, backend=backend)
        assert r.size == 0 and r.exact and r.upper_bound == 1 and r.decided_at_least is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_n(backend):
    dense, _ = gnp(20, 0.5, 5, 3)
    for k in (21, 100):
        d = mg.has_clique(dense, k, backend=backend)
        assert d.decided_at_least is False and d.exact and d.size == 0
        m = mg.max_clique(dense, min_size=k, backend=backend)
        assert m.size == 0 and m.exact and m.upper_bound < k


def test_bitset_layout_and_packing():
    dense, _ = gnp(130, 0.2, 0, 11)
    bits = mg.to_bitset(dense)
    assert bits.dtype == torch.uint64 and bits.shape == (130, 3)
    assert torch.equal(bits, ref.pack_bitset(dense))
    assert torch.equal(mg.to_dense(bits), dense)
    # bit j of row i lives in word j // 64 at position j % 64
    i, j = (int(x) for x in torch.nonzero(dense)[0])
    word = int(bits[i, j // 64].view(torch.int64))
    assert (word >> (j % 64)) & 1 == 1
    for backend in BACKENDS:
        assert torch.equal(mg.to_bitset(dense, backend=backend), bits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_errors(backend):
    dense, _ = gnp(70, 0.3, 0, 5)
    bits = mg.to_bitset(dense)
    asym = dense.clone()
    i, j = (int(x) for x in torch.nonzero(torch.triu(~dense, 1))[3])
    asym[i, j] = True
    with pytest.raises(ValueError, match="not symmetric"):
        mg.max_clique(asym, backend=backend)
    loop = dense.clone()
    loop[5, 5] = True
    with pytest.raises(ValueError, match="self loop at vertex 5"):
        mg.max_clique(loop, backend=backend)
    padded = bits.clone().view(torch.int64)
    padded[3, 1] |= 1 << 10  # column 74 of a 70-vertex graph
    with pytest.raises(ValueError, match="past the last vertex"):
        mg.max_clique(padded.view(torch.uint64), backend=backend)
    with pytest.raises(ValueError, match=r"ceil\(N/64\)"):
        mg.max_clique(torch.zeros((70, 1), dtype=torch.uint64), backend=backend)
    with pytest.raises(ValueError, match="square"):
        mg.max_clique(torch.zeros((4, 5), dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match="uint64 bitset or a bool"):
        mg.max_clique(dense.to(torch.int32), backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        mg.max_clique(torch.zeros(5, dtype=torch.uint64), backend=backend)
    # validate=False skips the check (the caller vouches for the graph)
    assert mg.max_clique(dense, validate=False, backend=backend).exact


def test_asymmetry_found_in_every_block():
    """The blockwise symmetry check (64 x 64 bit transposes) catches a single flipped bit anywhere."""
    dense, _ = gnp(200, 0.1, 0, 9)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        i, j = (int(x) for x in torch.randint(0, 200, (2,), generator=g))
        if i == j:
            continue
        bad = dense.clone()
        bad[i, j] = ~bad[i, j]
        with pytest.raises(ValueError, match="not symmetric"):
            mg.max_clique(bad)


def test_bad_arguments():
    dense, _ = gnp(10, 0.5, 0, 1)
    with pytest.raises(ValueError, match="min_size"):
        mg.max_clique(dense, min_size=-1)
    with pytest.raises(ValueError, match="min_size"):
        mg.has_clique(dense, 0)
    with pytest.raises(ValueError, match="node_budget"):
        mg.max_clique(dense, node_budget=-5)
    with pytest.raises(ValueError, match="time_limit"):
        mg.max_clique(dense, time_limit=0.0)
    with pytest.raises(ValueError, match="does not exist for cliques"):
        mg.max_clique(dense, backend="cuda")
    with pytest.raises(ValueError, match="threads"):
        mg.max_clique_batch([dense], threads=0)
    with pytest.raises(TypeError, match="sequence"):
        mg.max_clique_batch(dense)


@pytest.mark.parametrize("backend", NATIVE)
def test_budget_is_honest(backend):
    """A spent budget says so, keeps a valid clique and a valid upper bound, and never hangs."""
    dense, _ = gnp(90, 0.8, 0, 2)
    full = mg.max_clique(dense, node_budget=None, backend=backend)
    assert full.exact and full.upper_bound == full.size
    for budget in (0, 1, 10, 100):
        r = mg.max_clique(dense, node_budget=budget, backend=backend)
        assert r.nodes <= budget + 1
        assert r.upper_bound >= full.size
        if r.size:
            assert is_clique(dense, r.members.tolist())
        if r.exact:
            assert r.members.tolist() == full.members.tolist()
        else:
            assert r.size <= full.size
        # deterministic: the node budget, unlike a time limit, gives the same answer every time
        again = mg.max_clique(dense, node_budget=budget, backend=backend)
        assert again.members.tolist() == r.members.tolist() and again.nodes == r.nodes
    assert not mg.max_clique(dense, node_budget=3, backend=backend).exact
    # an adversarial dense graph under a wall-clock limit returns promptly
    hard, _ = gnp(300, 0.9, 0, 4)
    t0 = time.perf_counter()
    r = mg.max_clique(hard, node_budget=None, time_limit=0.2, backend=backend)
    assert time.perf_counter() - t0 < 5.0
    assert not r.exact and r.upper_bound >= r.size and is_clique(hard, r.members.tolist())
    assert r.decided_at_least in (True, None)
    d = mg.has_clique(hard, r.upper_bound + 1, backend=backend)  # beyond the proven bound: decided at once
    assert d.decided_at_least is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_matches_single_calls_at_every_thread_count(backend):
    graphs = []
    for seed in range(12):
        n = (5, 40, 64, 65, 100, 130)[seed % 6]
        dense, _ = gnp(n, (0.1, 0.3, 0.5)[seed % 3], (0, 10, 12)[seed % 3] if n > 12 else 0, seed)
        graphs.append(dense if seed % 2 else mg.to_bitset(dense))
    graphs.append(torch.zeros((0, 0), dtype=torch.uint64))
    single = [mg.max_clique(g, backend=backend) for g in graphs]
    for threads in (1, 2, 3, 8) if backend != "reference" else (1,):
        batch = mg.max_clique_batch(graphs, threads=threads, backend=backend)
        assert [r.members.tolist() for r in batch] == [r.members.tolist() for r in single]
        assert [(r.exact, r.upper_bound, r.nodes) for r in batch] == [
            (r.exact, r.upper_bound, r.nodes) for r in single
        ]
    dec = mg.max_clique_batch(graphs, min_size=10, decision=True, threads=2, backend=backend)
    assert [r.decided_at_least for r in dec] == [r.size >= 10 for r in single]


def test_batch_reports_the_bad_graph():
    good, _ = gnp(30, 0.3, 0, 1)
    bad = good.clone()
    bad[2, 2] = True
    with pytest.raises(ValueError, match=r"graph 1: .*self loop"):
        mg.max_clique_batch([good, bad, good], threads=2)


@pytest.mark.parametrize("backend", NATIVE)
def test_batch_releases_the_gil(backend):
    """While the core searches, another Python thread keeps running (GPU sampling would)."""
    hard, _ = gnp(200, 0.9, 0, 8)
    graphs = [hard] * 2
    ticks = 0
    done = threading.Event()

    def search():
        mg.max_clique_batch(graphs, node_budget=None, time_limit=0.3, threads=1, backend=backend)
        done.set()

    t = threading.Thread(target=search)
    t0 = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    assert time.perf_counter() - t0 >= 0.5
    assert ticks >= 20  # with the GIL held, this loop would not run at all during the search


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 64, 65, 130])
def test_threshold_graph(backend, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, 3, generator=g, dtype=torch.float64)
    dist = torch.cdist(x, x).to(dtype)
    dist = dist + 1e-3 * torch.rand(n, n, generator=g, dtype=torch.float64).to(dtype)  # slightly asymmetric
    alpha = 0.4
    bits = mg.threshold_graph(dist, alpha, backend=backend)
    e = (dist <= alpha) & (dist.T <= alpha)
    e.fill_diagonal_(False)
    assert torch.equal(mg.to_dense(bits), e)
    mg.max_clique(bits)  # symmetric, loop-free, zero-padded


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_graph_alpha_rounds_to_dtype(backend):
    # float32(0.1) > 0.1: a float32 distance equal to float32(0.1) is an edge, as `dist <= 0.1` says.
    d = torch.full((3, 3), 0.1, dtype=torch.float32)
    assert bool((d <= 0.1).all())
    assert mg.to_dense(mg.threshold_graph(d, 0.1, backend=backend)).sum() == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_graph_errors(backend):
    d = torch.zeros(4, 4)
    d[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\(1, 2\) is NaN"):
        mg.threshold_graph(d, 0.1, backend=backend)
    with pytest.raises(ValueError, match="square"):
        mg.threshold_graph(torch.zeros(3, 4), 0.1, backend=backend)
    with pytest.raises(TypeError, match="float32 or float64"):
        mg.threshold_graph(torch.zeros(3, 3, dtype=torch.float16), 0.1, backend=backend)
    with pytest.raises(ValueError, match="alpha"):
        mg.threshold_graph(torch.zeros(3, 3), float("nan"), backend=backend)


def test_clique_stats_against_reference():
    g = torch.Generator().manual_seed(3)
    for k in (1, 2, 5, 33):
        x = torch.rand(k, 4, generator=g, dtype=torch.float64)
        d = torch.cdist(x, x)
        s = mg.clique_stats(d)
        pos, mean = ref.clique_stats(d)
        assert s.medoid_position == pos and s.medoid == pos
        if k < 2:
            assert s.mean_distance != s.mean_distance  # NaN: no pairs
        else:
            torch.testing.assert_close(
                torch.tensor(s.mean_distance), torch.tensor(mean), **tol("clique", torch.float64)
            )
    # members index into a full matrix; float32 input is summed in float64
    x = torch.rand(20, 4, generator=g)
    full = torch.cdist(x, x)
    members = torch.tensor([3, 7, 8, 15])
    s = mg.clique_stats(full, members)
    pos, mean = ref.clique_stats(full[members][:, members])
    assert s.medoid_position == pos and s.medoid == int(members[pos])
    torch.testing.assert_close(
        torch.tensor(s.mean_distance), torch.tensor(mean), **tol("clique", torch.float32)
    )


def test_clique_stats_ties_and_errors():
    d = torch.ones(4, 4) - torch.eye(4)  # all sums equal: the first member is the medoid
    s = mg.clique_stats(d)
    assert s.medoid_position == 0 and s.mean_distance == 1.0
    big = torch.ones(10, 10) - torch.eye(10)
    s = mg.clique_stats(big, [9, 2, 5, 7])
    assert s.medoid_position == 0 and s.medoid == 9
    bad = d.clone()
    bad[0, 1] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        mg.clique_stats(bad)
    with pytest.raises(ValueError, match="distinct"):
        mg.clique_stats(d, [1, 1])
    with pytest.raises(ValueError, match="index"):
        mg.clique_stats(d, [0, 4])
    with pytest.raises(ValueError, match="at least one"):
        mg.clique_stats(d, [])
    with pytest.raises(ValueError, match="square"):
        mg.clique_stats(torch.zeros(2, 3))


@pytest.mark.cuda
def test_cuda_inputs_are_searched_on_the_host():
    dense, s = gnp(500, 0.1, 40, 21)
    bits = mg.to_bitset(dense)
    cpu = mg.max_clique(bits)
    gpu = mg.max_clique(bits.cuda())
    assert gpu.members.tolist() == cpu.members.tolist() == sorted(s.tolist())
    assert mg.max_clique(dense.cuda()).members.tolist() == cpu.members.tolist()
    x = torch.rand(300, 3, dtype=torch.float64)
    dist = torch.cdist(x, x).float()
    assert torch.equal(mg.threshold_graph(dist.cuda(), 0.3), mg.threshold_graph(dist, 0.3))
    batch = mg.max_clique_batch([bits.cuda(), dense], threads=2)
    assert [r.members.tolist() for r in batch] == [cpu.members.tolist()] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_clique_stats_pipeline(backend):
    """SPEC §2 steps 2-4 on tiny synthetic generations: 12 near-copies of one image among 48 distinct ones
    are found as the maximum clique, and the medoid / mean distance come from the members' distances."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(60, 3, 8, 8, generator=g, dtype=torch.float64)
    copies = torch.randperm(60, generator=g)[:12]
    x[copies] = (x[0] * 0 + 0.5 + 0.01 * torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64)).clamp(
        0, 1
    )
    t = x.reshape(60, 3, 2, 4, 2, 4).permute(2, 4, 0, 1, 3, 5).reshape(4, 60, -1)  # 2 x 2 grid of tiles
    dist = (torch.cdist(t, t) / t.shape[-1] ** 0.5).amax(0).float()  # tiled L2
    bits = mg.threshold_graph(dist, 0.1, backend=backend)
    res = mg.max_clique(bits, min_size=10, backend=backend)
    assert res.exact and res.members.tolist() == sorted(copies.tolist())
    stats = mg.clique_stats(dist, res.members)
    sub = dist.double()[res.members][:, res.members]
    assert stats.medoid == int(res.members[int(sub.sum(1).argmin())])
    assert 0 < stats.mean_distance <= 0.1
    flagged = mg.max_clique_batch([bits, bits[:0, :0]], min_size=10, decision=True, backend=backend)
    assert [r.decided_at_least for r in flagged] == [True, False]


def _same(a, b) -> bool:
    return (a.members.tolist(), a.exact, a.upper_bound, a.nodes) == (
        b.members.tolist(),
        b.exact,
        b.upper_bound,
        b.nodes,
    )


def _in_range(res, n: int, budget: int | None) -> None:
    m = res.members.tolist()
    assert m == sorted(set(m)) and all(0 <= v < n for v in m), m
    assert budget is None or res.nodes <= budget + 1, res.nodes


def _loops_and_padding_cases():
    # the audit's reproducers: a self loop on one vertex, padding bits (the sign bit; bits 20 and 21)
    yield torch.tensor([[1]], dtype=torch.int64).view(torch.uint64)
    b = torch.zeros(10, 1, dtype=torch.int64)
    b[5, 0] = -(1 << 63)
    yield b.view(torch.uint64)
    b = torch.zeros(10, 1, dtype=torch.int64)
    b[0, 0], b[1, 0] = 1 << 20, 1 << 21
    yield b.view(torch.uint64)
    rng = np.random.default_rng(0)
    for n in (2, 5, 63, 64, 65, 130):
        upper = np.triu(rng.random((n, n)) < 0.3, 1)
        arr = ref.pack_bitset(torch.from_numpy(upper | upper.T)).numpy().copy()
        loops = rng.choice(n, size=max(1, n // 4), replace=False)
        arr[loops, loops // 64] |= np.uint64(1) << (loops % 64).astype(np.uint64)
        if n % 64:
            pad = ~((np.uint64(1) << np.uint64(n % 64)) - np.uint64(1))
            arr[:, -1] |= rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) & pad
        yield torch.from_numpy(arr)


def _check_unvalidated_inputs(backend: str) -> None:
    limits = {"node_budget": 100, "time_limit": 1.0}
    for dirty in _loops_and_padding_cases():
        n = dirty.shape[0]
        before = dirty.clone()
        dense = ref.unpack_bitset(dirty)  # padding dropped
        dense.fill_diagonal_(False)
        clean = ref.pack_bitset(dense)
        with pytest.raises(ValueError, match=r"self loop|past the last vertex"):
            mg.max_clique(dirty, backend=backend)
        for kw in ({}, {"min_size": 2}, {"canonical": False}):
            got = mg.max_clique(dirty, validate=False, backend=backend, **kw, **limits)
            _in_range(got, n, 100)
            assert _same(got, mg.max_clique(clean, backend=backend, **kw, **limits))
        for k in (1, 2, 3):
            got = mg.has_clique(dirty, k, validate=False, backend=backend, **limits)
            assert _same(got, mg.has_clique(clean, k, backend=backend, **limits))
        batch = mg.max_clique_batch([dirty, dirty], validate=False, threads=2, backend=backend, **limits)
        assert all(_same(r, mg.max_clique(clean, backend=backend, **limits)) for r in batch)
        # the reference backend reads the same graph (networkx sees neither loops nor padding)
        exact = mg.max_clique(dirty, validate=False, node_budget=None, backend=backend)
        assert exact.exact and exact.members.tolist() == ref.max_clique(dirty)[0]
        assert torch.equal(dirty.view(torch.int64), before.view(torch.int64))  # the input is left alone
    # Asymmetric graphs (loops and padding too): the result is unspecified, but bounded and memory-safe.
    rng = np.random.default_rng(1)
    for trial in range(30):
        n = int(rng.integers(1, 140))
        arr = ref.pack_bitset(torch.from_numpy(rng.random((n, n)) < rng.random())).numpy().copy()
        if trial % 2:
            arr |= rng.integers(0, 2**63, size=arr.shape, dtype=np.uint64)
        dirty = torch.from_numpy(arr)
        for budget, kw in (
            (100, {"min_size": 1, **limits}),
            (100, {"min_size": 3, **limits}),
            (3000, {"node_budget": 3000}),  # room for the lexicographic pass
            (100, {"min_size": 2, "decision": True, **limits}),
        ):
            try:
                _in_range(mg.max_clique_batch([dirty], validate=False, backend=backend, **kw)[0], n, budget)
                _in_range(
                    mg.max_clique_batch([dirty] * 3, validate=False, threads=3, backend=backend, **kw)[2],
                    n,
                    budget,
                )
            except ValueError as e:
                assert "not symmetric" in str(e), e


@pytest.mark.parametrize("backend", NATIVE)
def test_unvalidated_loops_padding_and_asymmetry_never_hang_or_crash(backend):
    """validate=False skips only the symmetry check: self loops and bits past column N - 1 are ignored (the
    answer is the clean graph's), and an asymmetric graph gives an unspecified but bounded, in-range result
    or a ValueError naming the asymmetry. Budgets hold. Before the fix: an endless loop that ignored the
    budget (GIL released: no Ctrl-C), SIGSEGV, heap corruption; the worker thread turns a hang into a failure
    (a crash still aborts the run, loudly)."""
    box: dict[str, BaseException] = {}

    def work() -> None:
        try:
            _check_unvalidated_inputs(backend)
        except BaseException as e:  # re-raised in the test's thread below
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)  # daemon: a hung search cannot block the exit of pytest
    t.start()
    t.join(timeout=60)
    if t.is_alive():
        pytest.fail("the clique search hung on an unvalidated bitset (budget and time limit ignored)")
    if "error" in box:
        raise box["error"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_types_checked_alike_on_every_backend(backend):
    """Wrong types give a TypeError naming the parameter on every backend (not pybind11's "incompatible
    function arguments"); numpy integers and floats are accepted as memcore's other functions accept them."""
    dense, _ = gnp(12, 0.6, 5, 3)
    want = mg.max_clique(dense, backend=backend)
    for name in ("canonical", "validate"):
        with pytest.raises(TypeError, match=name):
            mg.max_clique(dense, backend=backend, **{name: "no"})
    with pytest.raises(TypeError, match="decision"):
        mg.max_clique_batch([dense], decision="yes", backend=backend)
    with pytest.raises(TypeError, match="decision"):
        mg.CliqueSearch(decision=1)
    with pytest.raises(TypeError, match="min_size"):
        mg.max_clique(dense, min_size=2.0, backend=backend)
    with pytest.raises(TypeError, match="min_size"):
        mg.has_clique(dense, True, backend=backend)
    with pytest.raises(TypeError, match="node_budget"):
        mg.max_clique(dense, node_budget="10", backend=backend)
    with pytest.raises(TypeError, match="time_limit"):
        mg.max_clique(dense, time_limit=True, backend=backend)
    with pytest.raises(TypeError, match="threads"):
        mg.max_clique_batch([dense], threads=2.0, backend=backend)
    numpy_args = {
        "min_size": np.int64(2),
        "node_budget": np.int32(10**6),
        "time_limit": np.float32(30),
        "canonical": np.bool_(True),
    }
    r = mg.max_clique(dense, backend=backend, **numpy_args)
    assert r.members.tolist() == want.members.tolist() and type(r.min_size) is int
    assert mg.has_clique(dense, np.int64(want.size), backend=backend).decided_at_least is True
    batch = mg.max_clique_batch([dense], threads=np.int64(2), backend=backend)
    assert batch[0].members.tolist() == want.members.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_limits_beyond_int64_mean_unlimited(backend):
    """A budget past int64, a huge time limit or thread count: the unbounded answer. min_size past N: none."""
    # 3270 nodes (more than the 256 between two looks at the clock); networkx needs minutes for it: 20 vertices
    dense, _ = gnp(90, 0.8, 0, 2) if backend != "reference" else gnp(20, 0.5, 0, 2)
    full = mg.max_clique(dense, node_budget=None, backend=backend)
    for kw in ({"node_budget": 2**70}, {"time_limit": 1e300}, {"time_limit": 1e10, "node_budget": None}):
        r = mg.max_clique(dense, backend=backend, **kw)
        assert (
            r.exact and r.members.tolist() == full.members.tolist()
        )  # 1e10 s overflowed the clock: 256 nodes
    r = mg.max_clique_batch([dense, dense], threads=2**40, backend=backend)
    assert [x.members.tolist() for x in r] == [full.members.tolist()] * 2
    for res in (
        mg.max_clique(dense, min_size=2**70, backend=backend),
        mg.has_clique(dense, 2**70, backend=backend),
    ):
        assert res.size == 0 and res.exact and res.decided_at_least is False and res.upper_bound < 2**70


@pytest.mark.parametrize("backend", BACKENDS)
def test_decided_at_least_is_set_whenever_exact(backend):
    """decided_at_least is None only when the budget ran out; min_size = 0 asks about the empty clique (True)."""
    empty = torch.zeros((0, 0), dtype=torch.uint64)
    r = mg.max_clique(empty, min_size=0, backend=backend)
    assert r.exact and r.size == 0 and r.decided_at_least is True
    dense, _ = gnp(20, 0.5, 6, 1)
    for g in (empty, dense, torch.zeros((3, 3), dtype=torch.bool)):
        for q in (0, 1, 2, 6, 21):
            r = mg.max_clique(g, min_size=q, backend=backend)
            assert r.exact and r.decided_at_least is (q == 0 or r.size >= q)


def test_threshold_graph_accepts_numpy_alpha():
    d = torch.rand(9, 9, generator=torch.Generator().manual_seed(0))
    for backend in BACKENDS:
        want = mg.threshold_graph(d, float(np.float32(0.3)), backend=backend)
        for alpha in (np.float32(0.3), np.float64(np.float32(0.3))):
            assert torch.equal(mg.threshold_graph(d, alpha, backend=backend), want)
        assert torch.equal(mg.threshold_graph(d, np.int64(1), backend=backend), mg.threshold_graph(d, 1.0))
        with pytest.raises(TypeError, match="alpha"):
            mg.threshold_graph(d, "0.3", backend=backend)
        with pytest.raises(TypeError, match="alpha"):
            mg.threshold_graph(d, True, backend=backend)


def test_clique_stats_members_must_be_integer_indices():
    """Floats were truncated to other vertices, a bool mask read as indices 0 and 1, 2-D silently flattened."""
    d = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="integer"):
        mg.clique_stats(d, [0.7, 2.9])
    with pytest.raises(TypeError, match="integer"):
        mg.clique_stats(d, torch.tensor([0.0, 2.0]))
    with pytest.raises(TypeError, match="bool"):
        mg.clique_stats(d, torch.tensor([True, False, True, False]))
    with pytest.raises(TypeError, match="bool"):
        mg.clique_stats(d, [True, False])
    with pytest.raises(ValueError, match="1-D"):
        mg.clique_stats(d, torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="1-D"):
        mg.clique_stats(d, 2)
    want = mg.clique_stats(d, torch.tensor([1, 3]))
    for members in ([1, 3], (np.int64(1), 3), np.array([1, 3]), torch.tensor([1, 3], dtype=torch.int32)):
        got = mg.clique_stats(d, members)
        assert (got.medoid, got.mean_distance) == (want.medoid, want.mean_distance)


def test_meta_tensors_are_a_clear_error():
    meta = torch.empty(3, 3, device="meta")
    with pytest.raises(ValueError, match="meta tensor"):
        mg.threshold_graph(meta, 0.1)
    with pytest.raises(ValueError, match="meta tensor"):
        mg.clique_stats(meta)
    with pytest.raises(ValueError, match="meta tensor"):
        mg.clique_stats(torch.zeros(3, 3), torch.tensor([0, 1], device="meta"))
    for adj in (
        torch.empty(3, 3, dtype=torch.bool, device="meta"),
        torch.empty(3, 1, dtype=torch.uint64, device="meta"),
    ):
        for call in (mg.max_clique, mg.to_bitset, mg.to_dense, lambda a: mg.max_clique_batch([a])):
            with pytest.raises(ValueError, match="meta tensor"):
                call(adj)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "alpha",
    [float("inf"), float("-inf"), np.float32("inf"), 10**400],
    ids=["inf", "-inf", "np.float32-inf", "int-past-float"],
)
def test_threshold_graph_refuses_non_finite_alpha(backend, alpha):
    # as memcore.distance.tiled_l2_graph does: inf made every pair an edge (inf distances too), and an int past
    # the float range escaped as an OverflowError
    d = torch.rand(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha must be finite"):
        mg.threshold_graph(d, alpha, backend=backend)


def test_clique_stats_medoid_tie_rule_is_exact():
    # Every row sums to 0.6 exactly, but float64 sums in row order round apart (0.1 + 0.2 + 0.3 > 0.2 + 0.3
    # + 0.1): the tie rule (first minimum) must give position 0, as the reference does.
    x = torch.tensor(
        [[0, 0.1, 0.2, 0.3], [0.1, 0, 0.3, 0.2], [0.2, 0.3, 0, 0.1], [0.3, 0.2, 0.1, 0]], dtype=torch.float64
    )
    want_pos, want_mean = ref.clique_stats(x)
    s = mg.clique_stats(x)
    assert s.medoid_position == want_pos == 0
    assert s.mean_distance == want_mean
    assert len(set(s.summed_distances.tolist())) == 1
    assert mg.clique_stats(x[[2, 1, 0, 3]][:, [2, 1, 0, 3]]).medoid_position == 0


def test_to_bitset_checks_the_backend_for_bitsets_too():
    bits = torch.zeros((3, 1), dtype=torch.uint64)
    with pytest.raises(ValueError, match="unknown backend 'bad'"):
        mg.to_bitset(bits, backend="bad")
    with pytest.raises(ValueError, match="does not exist for cliques"):
        mg.to_bitset(bits, backend="cuda")
