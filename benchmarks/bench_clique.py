"""Clique engine benchmark: memcore.graph against networkx (find_cliques, max_weight_clique) and igraph.

    python benchmarks/bench_clique.py [--quick] [--slow-baselines] [--nx-timeout S]

Cases: G(n, p) with planted cliques (the test matrix), real threshold graphs of 500 generations of the bundled
demo model (a digit with a memorized training image, and one without), and realistic threshold graphs at N = 500: tiled-L2
(4 x 4 grid) graphs, alpha = 0.1, of synthetic "generations" - a prompt whose samples are all different
(templates with large variation, so the graph holds many small near-cliques), a memorized prompt (300 noisy
copies of one image among them: a planted 300-clique) and a partly memorized one (a 12-copy cluster).
Times are per graph on one thread (the public Python call, validation included); p99 is over all graphs and
repeats of a case; the ratio to networkx is on the first graph of a case, the only one networkx runs on
(``first_graph_median_ms``). The batch section measures graphs/s on all cores. Baselines that are known to take
minutes (networkx on dense or planted-300 graphs) run in a child process killed after --nx-timeout seconds.
CSV: benchmarks/results/clique_<device>.csv.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import networkx as nx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import memcore.graph as mg
from memcore.reference import clique as ref

try:
    import igraph
except ImportError:  # optional baseline
    igraph = None

ALPHA = 0.1
K = 10  # min_clique of SPEC §2


# ------------------------------------------------------------------------------------------------ graphs
def gnp(n: int, p: float, plant: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.triu(torch.rand(n, n, generator=g) < p, 1)
    a = a | a.T
    s = torch.randperm(n, generator=g)[:plant]
    a[s.unsqueeze(1), s.unsqueeze(0)] = True
    a.fill_diagonal_(False)
    return mg.to_bitset(a)


def tiled_l2(x: torch.Tensor, grid: tuple[int, int] = (4, 4)) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] -> [N, N] tiled L2 (max over grid tiles of the per-tile RMS difference)."""
    n, c, h, w = x.shape
    gh, gw = grid
    t = x.reshape(n, c, gh, h // gh, gw, w // gw).permute(2, 4, 0, 1, 3, 5).reshape(gh * gw, n, -1)
    d = torch.cdist(t, t) / (t.shape[-1] ** 0.5)  # [T, N, N]
    return d.amax(0)


def smooth(g: torch.Generator, n: int, size: int = 32) -> torch.Tensor:
    """Smooth random images [n, 3, size, size] (upsampled 4 x 4 noise): natural-image-like low frequencies."""
    low = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def generations(kind: str, seed: int, n: int = 500) -> torch.Tensor:
    """Synthetic generations of one prompt -> its threshold graph (bitset)."""
    g = torch.Generator().manual_seed(seed)
    templates = smooth(g, 100)
    pick = torch.randint(0, 100, (n,), generator=g)
    # per-sample variation sigma = 0.065: two samples of one template differ by ~0.09 RMS, their tiled L2
    # straddles alpha, so each template yields a random graph of near-duplicates (cliques of a few members)
    x = templates[pick] + 0.065 * torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    if kind == "memorized":
        base = smooth(g, 1)
        x[:300] = base + 0.03 * torch.randn(300, 3, 32, 32, generator=g, dtype=torch.float64)
    elif kind == "partial":
        base = smooth(g, 1)
        x[:12] = base + 0.03 * torch.randn(12, 3, 32, 32, generator=g, dtype=torch.float64)
    elif kind != "clean":
        raise ValueError(kind)
    x = x[torch.randperm(n, generator=g)].clamp(0, 1)
    return mg.threshold_graph(tiled_l2(x).float(), ALPHA)


def demo_generations(digit: int, n: int) -> torch.Tensor:
    """Threshold graph of ``n`` real generations of the bundled demo model for one digit (DDIM 50 steps):
    digit 0 has a planted, memorized training image (a large clique), digit 1 none."""
    import memcore
    from memcore.models.demo import demo_model_dir

    imgs = memcore.sample(
        str(demo_model_dir("cond")),
        seeds=list(range(n)),
        conditions=[digit] * n,
        batch_size=100,
        device="cpu",
    )
    return memcore.distance.tiled_l2_graph(imgs, ALPHA, grid=(4, 4))


# ------------------------------------------------------------------------------------------------ timing
def times_of(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(ts: list[float]) -> dict[str, float]:
    s = sorted(ts)
    p99 = s[min(len(s) - 1, int(0.99 * len(s)))]
    return {"median_ms": 1e3 * statistics.median(s), "min_ms": 1e3 * s[0], "p99_ms": 1e3 * p99}


def _child(q, method: str, bits: torch.Tensor) -> None:
    g = ref.to_networkx(bits)
    t0 = time.perf_counter()
    if method == "nx_find_cliques":
        size = max((len(c) for c in nx.find_cliques(g)), default=0)
    else:
        size = len(nx.max_weight_clique(g, weight=None)[0])
    q.put((time.perf_counter() - t0, size))


def networkx_time(method: str, bits: torch.Tensor, timeout: float) -> tuple[float | None, int | None]:
    """Seconds of one networkx run in a child process (None when killed at `timeout`)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, method, bits))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return None, None
    return q.get()


def to_igraph(bits: torch.Tensor):
    dense = mg.to_dense(bits)
    ii, jj = torch.nonzero(torch.triu(dense, 1), as_tuple=True)
    return igraph.Graph(n=dense.shape[0], edges=list(zip(ii.tolist(), jj.tolist())))


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few graphs and repeats, no slow baselines")
    ap.add_argument("--slow-baselines", action="store_true", help="also run networkx where it takes minutes")
    ap.add_argument("--nx-timeout", type=float, default=120.0)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this (no batch)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    graphs_per_case = 4 if args.quick else 20
    reps = 3 if args.quick else 10
    rows: list[dict] = []

    cases: list[tuple[str, list[torch.Tensor]]] = []
    for kind in ("clean", "partial", "memorized"):
        cases.append((f"realistic-{kind}-500", [generations(kind, s) for s in range(graphs_per_case)]))
    if args.only is None or "demo" in args.only:
        # real threshold graphs: generations of the bundled demo model (one graph per digit; ~20 s each on CPU)
        for digit, what in ((0, "memorized"), (1, "clean")):
            cases.append((f"demo-{what}-digit{digit}-500", [demo_generations(digit, 500)]))
    synth = [(500, 0.01, 300), (500, 0.1, 10), (500, 0.1, 300), (500, 0.3, 0), (500, 0.3, 300)]
    if not args.quick:
        synth += [(1000, 0.1, 64), (1000, 0.3, 300), (1000, 0.3, 10)]
    for n, p, k in synth:
        cases.append((f"gnp-{n}-{p}-plant{k}", [gnp(n, p, k, s) for s in range(2 if n == 1000 else 3)]))

    if args.only:
        cases = [c for c in cases if args.only in c[0]]
    print(f"{'case':28s} {'method':22s} {'median ms':>10s} {'p99 ms':>9s} {'size':>5s}  vs networkx")
    for name, graphs in cases:
        n = graphs[0].shape[0]
        res = [mg.max_clique(g) for g in graphs]
        sizes = sorted({r.size for r in res})
        dens = float(sum(mg.to_dense(g).float().mean() for g in graphs) / len(graphs))
        ours: dict[str, dict] = {}
        first: dict[str, float] = {}  # median ms on graphs[0]: the one graph networkx is timed on
        for method, fn in (
            ("memcore_decide_k10", lambda g: mg.has_clique(g, K)),
            ("memcore_members", lambda g: mg.max_clique(g)),
            ("memcore_members_nolex", lambda g: mg.max_clique(g, canonical=False)),
            ("memcore_members_min10", lambda g: mg.max_clique(g, min_size=K)),
        ):
            r = max(1, reps if n <= 500 else reps // 3)
            per_graph = [times_of(lambda g=g, fn=fn: fn(g), r) for g in graphs]
            ours[method] = summary([t for ts in per_graph for t in ts])
            first[method] = 1e3 * statistics.median(per_graph[0])
        base: dict[str, float | None] = {}
        slow_nx = (
            (n >= 500 and ("0.3" in name)) or "plant300" in name or "memorized" in name or "1000-0.1" in name
        )
        for method in ("nx_find_cliques", "nx_max_weight_clique"):
            if args.quick and slow_nx:
                continue
            if method == "nx_max_weight_clique" and slow_nx and not args.slow_baselines:
                continue
            if (
                method == "nx_find_cliques"
                and slow_nx
                and not args.slow_baselines
                and "memorized" not in name
            ):
                continue
            secs, size = networkx_time(method, graphs[0], args.nx_timeout)
            base[method] = secs
            if size is not None:
                assert size == res[0].size, (name, method, size, res[0].size)
        if igraph is not None and not (n > 500 and "plant300" not in name and "0.3" in name):
            ig = to_igraph(graphs[0])
            base["igraph_clique_number"] = statistics.median(times_of(ig.clique_number, 3))
            base["igraph_largest_cliques"] = statistics.median(times_of(ig.largest_cliques, 1))
            assert ig.clique_number() == res[0].size
        nx_ref = next((v for k_, v in base.items() if k_.startswith("nx") and v is not None), None)
        for method, s in ours.items():
            # the same graph on both sides: networkx runs once, on graphs[0] (the median over all graphs of
            # a case against it compared different inputs: G(n, p) seeds differ several-fold in cost)
            ratio = (nx_ref * 1e3 / first[method]) if nx_ref else None
            print(
                f"{name:28s} {method:22s} {s['median_ms']:10.3f} {s['p99_ms']:9.3f} {sizes[-1]:5d}  "
                + (f"{ratio:9.1f}x" if ratio else "      -")
            )
            rows.append(
                {
                    "case": name,
                    "n": n,
                    "density": round(dens, 4),
                    "graphs": len(graphs),
                    "method": method,
                    **{k_: round(v, 4) for k_, v in s.items()},
                    "first_graph_median_ms": round(first[method], 4),
                    "clique_sizes": "/".join(map(str, sizes)),
                    "exact": all(r.exact for r in res),
                    "nodes_max": max(r.nodes for r in res),
                    "speedup_vs_networkx": round(ratio, 1) if ratio else "",
                }
            )
        for method, secs in base.items():
            label = f"{secs * 1e3:10.3f}" if secs is not None else f">{args.nx_timeout:.0f}s timeout"
            print(f"{name:28s} {method:22s} {label}  (first graph)")
            rows.append(
                {
                    "case": name,
                    "n": n,
                    "density": round(dens, 4),
                    "graphs": 1,
                    "method": method,
                    "median_ms": round(secs * 1e3, 4) if secs is not None else "",
                    "timeout_s": "" if secs is not None else args.nx_timeout,
                    "clique_sizes": res[0].size,
                }
            )

    if args.only:
        _common.write_csv(f"clique_only-{args.only}", rows, "cpu")
        return 0
    # Batch: one prompt's graph each, as the pipeline calls it; graphs/s on 1 thread and on all cores.
    mix = [
        generations(("clean", "partial", "memorized")[i % 3], 100 + i)
        for i in range(12 if args.quick else 48)
    ]
    mix = mix * (2 if args.quick else 4)
    for threads in sorted({1, os.cpu_count() or 1}):
        for label, kw in (("decide_k10", {"min_size": K, "decision": True}), ("members", {})):
            ts = times_of(lambda kw=kw, threads=threads: mg.max_clique_batch(mix, threads=threads, **kw), 3)
            gps = len(mix) / statistics.median(ts)
            print(
                f"batch {label:12s} threads={threads:3d}: {gps:10.0f} graphs/s ({len(mix)} graphs of N = 500)"
            )
            rows.append(
                {
                    "case": "batch-realistic-500",
                    "method": f"batch_{label}",
                    "threads": threads,
                    "graphs_per_s": gps,
                }
            )

    # Would GPU k-core pruning pay? On the host it is the whole decision cost of a clean graph; compare with
    # the device-to-host copy of the 31 KB bitset that any GPU path still needs to report a result.
    clean = generations("clean", 7)
    t_host = summary(times_of(lambda: mg.has_clique(clean, K, validate=False), 50))["median_ms"]
    rows.append({"case": "kcore-host", "method": "has_clique_clean_novalidate", "median_ms": t_host})
    print(f"host decision on a clean N = 500 graph (k-core prune + greedy): {t_host * 1e3:.1f} us")
    if torch.cuda.is_available():
        dev = clean.cuda()
        torch.cuda.synchronize()
        t_copy = summary(times_of(lambda: dev.cpu(), 50))["median_ms"]
        rows.append({"case": "kcore-host", "method": "d2h_copy_bitset_500", "median_ms": t_copy})
        print(f"device-to-host copy of the bitset: {t_copy * 1e3:.1f} us")

    _common.write_csv("clique", rows, "cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
