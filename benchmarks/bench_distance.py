"""Distance benchmark: every available backend against the reference path in one run (ratios + CSV).

Cases (SPEC / issue 2):
- ``sd``: 500 Stable-Diffusion images, uint8 3×512×512, 4×4 grid: pairwise tiled L2 matrix and the bitset
  graph (alpha 0.1), the per-condition work of generate-and-filter extraction.
- ``cifar``: k = 50 nearest of 10,000 queries among 50,000 references, uint8 3×32×32, plain L2.
``--quick`` runs small versions of both (CPU). Backends: reference, cpu / cuda, triton, and cublas (the uint8
int8-GEMM path through ``torch._int_mm``, not yet picked by ``auto``); on CUDA, one row per Triton pairwise launch
configuration as well ("triton[name]", see ``memcore.kernels.triton.distance.PAIR_CONFIGS``). Throughput is reported as tera-ops/s of the equivalent dense
Gram product (2·N·M·D) in ``tops_dense_equiv``; the share of the dtype's tensor-core ceiling on GPU
(``pct_int8_peak``; uint8 runs int8 tensor cores: H100 SXM dense int8 ≈ 1979 TOPS) counts the work the op
needs: 2·N·M·D for k-NN, the symmetric half N·(N+1)·D for pairwise (what the pairwise kernels compute; the
dense count would read twice the tensor cores' real use).

    PYTHONPATH=$PWD python benchmarks/bench_distance.py --quick            # CPU, small shapes
    PYTHONPATH=$PWD python benchmarks/bench_distance.py --device cuda      # H100: full shapes
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, time_fn, write_csv

import memcore.distance as D
from memcore.ops import _backend

#: Dense int8 tensor-core ceilings (NVIDIA spec sheets, without sparsity), the most specific name first: the
#: PCIe and NVL boards run lower clocks/power than the SXM parts ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAK_TOPS = {"H100 PCIe": 1513.0, "H100 NVL": 1671.0, "H200 NVL": 1671.0, "H100": 1979.0, "H200": 1979.0}


def _peak(dev: str) -> float | None:
    for key, val in PEAK_TOPS.items():
        if key in dev:
            return val
    return None


def _backends(device: torch.device, wanted: list[str] | None) -> list[str]:
    # cublas (int8 GEMMs through torch._int_mm) runs on both devices; on CPU it is torch's slow int8 GEMM, so
    # its CPU numbers only show that it runs and is exact, the GPU run is the measurement.
    names = (
        ["reference", "cpu", "cublas"] if device.type == "cpu" else ["reference", "cuda", "triton", "cublas"]
    )
    out = [b for b in names if _backend.available(b, device)[0]]
    if wanted is not None:
        skipped = [b for b in wanted if b not in [*out, "auto"]]
        if skipped:
            print(f"skipped backends (unavailable on {device.type} or unknown): {skipped}")
    # "auto": what a user gets; on CUDA it is autotuned among the exact uint8 backends on first use (the
    # warm-up runs of the timing absorb the tuning), so its row shows the tuned choice's speed
    out.append("auto")
    # the reference always runs: every row's ratio and exactness are against it
    return [b for b in out if wanted is None or b in wanted or b == "reference"]


#: Forced Triton k-NN variants timed beside the backends on CUDA: the fused kernel alone, and the filter with
#: each way of finding its cut (``triton`` itself tunes the cut method and the filter launch).
KNN_VARIANTS = ("triton-fused", "triton[cut=fused]", "triton[cut=groupmin]")


def _knn(q: torch.Tensor, r: torch.Tensor, k: int, be: str) -> tuple[torch.Tensor, torch.Tensor]:
    if be in KNN_VARIANTS:
        from memcore.kernels.triton import distance as tk
        from memcore.ops.distance import _smallest

        if be == "triton-fused":
            return _smallest(tk.knn_keys(q, r, k, (1, 1), method="fused"), k)
        return _smallest(tk.knn_keys(q, r, k, (1, 1), method="filter", cut=be[len("triton[cut=") : -1]), k)
    return D.knn(q, r, k, backend=be, check_finite=False)


def _knn_breakdown(q: torch.Tensor, r: torch.Tensor, k: int, cut: str) -> dict[str, float]:
    """Milliseconds per stage of the Triton filter k-NN with one cut method, summed over query blocks (one
    warm call first): the sampled cut (fused kernel or group minima on the sample, kk-th, S cut), the
    filter GEMM pass, the candidate finishing (S -> distance keys, overflow fallback), and the final top-k
    of the ops layer."""
    from memcore.kernels.triton import distance as tk
    from memcore.ops.distance import _smallest

    out: dict[str, float] = {}
    for _ in range(2):  # the first call compiles and tunes; the second is measured
        marks: list = []
        keys = tk.knn_keys(q, r, k, (1, 1), method="filter", cut=cut, marks=marks)
        end = torch.cuda.Event(enable_timing=True)
        _smallest(keys, k)
        end.record()
        torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in itertools.pairwise(marks):
            if name != "start":
                out[name] = out.get(name, 0.0) + a.elapsed_time(b)
        out["topk"] = marks[-1][1].elapsed_time(end)
    return {name: round(ms, 3) for name, ms in out.items()}


def _tuned(op: str) -> str:
    """The latest tuned choice for shape classes of ``op`` ("" when nothing was tuned: CPU, floats,
    MEMCORE_AUTOTUNE=0, where static orders and first configurations decide). Ops: "matrix", "graph", "knn"
    (the backend of ``auto``); "pairwise" (the Triton launch configuration); "knn_cut" (the filter's cut)."""
    from memcore.ops import _tune

    picked = [v["chosen"] for k, v in _tune.choices().items() if k[0] == op]
    return picked[-1] if picked else ""


def _auto_choice(op: str, be: str) -> str:
    """For the "auto" rows: the backend autotuning chose."""
    return _tuned(op) if be == "auto" else ""


def _triton_choice(op: str, be: str) -> str:
    """For the rows that run the Triton backend ("triton", and "auto" where it picked it): its tuned choice."""
    return _tuned(op) if be in ("triton", "auto") else ""


def _pair_configs(x: torch.Tensor, grid: tuple[int, int]) -> list[str]:
    """The Triton pairwise launch configurations that can run the SD case."""
    from memcore.kernels.triton import distance as tk

    return tk._pair_configs(x, x.shape[0], grid)


def _sd_fn(x: torch.Tensor, grid: tuple[int, int], op: str, be: str):
    """The SD case's call for a backend, or for one forced Triton configuration ("triton[name]")."""
    if be.startswith("triton["):
        from memcore.kernels.triton import distance as tk

        name = be[len("triton[") : -1]
        if op == "matrix":
            return lambda: tk.distance_matrix(x, None, grid, config=name)
        return lambda: tk.distance_graph(x, None, 0.1, grid, config=name)
    if op == "matrix":
        return lambda: D.tiled_l2(x, grid=grid, backend=be, check_finite=False)
    return lambda: D.tiled_l2_graph(x, 0.1, grid=grid, backend=be, check_finite=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dev = device_name(device)
    peak = _peak(dev)
    gen = torch.Generator().manual_seed(0)
    if args.quick:
        sd = {"n": 64, "c": 3, "h": 64, "w": 64, "grid": (4, 4)}
        cf = {"n": 256, "m": 2048, "c": 3, "h": 32, "w": 32, "k": 50}
    else:
        sd = {"n": 500, "c": 3, "h": 512, "w": 512, "grid": (4, 4)}
        cf = {"n": 10000, "m": 50000, "c": 3, "h": 32, "w": 32, "k": 50}
    rows = []
    backends = _backends(device, args.backends)
    print(f"device: {dev}; backends: {backends}")

    # --- SD: pairwise tiled L2 among one condition's generations, matrix and bitset
    # Near-duplicate structure: a few base images plus noise, so the graph has edges at alpha = 0.1.
    base = torch.randint(0, 256, (8, sd["c"], sd["h"], sd["w"]), generator=gen, dtype=torch.uint8)
    pick = torch.randint(0, 8, (sd["n"],), generator=gen)
    noise = torch.randint(-12, 13, (sd["n"], sd["c"], sd["h"], sd["w"]), generator=gen, dtype=torch.int16)
    x = (base[pick].to(torch.int16) + noise).clamp(0, 255).to(torch.uint8).to(device)
    del noise
    d_total = sd["c"] * sd["h"] * sd["w"]
    ops = 2.0 * sd["n"] * sd["n"] * d_total
    ops_needed = 1.0 * sd["n"] * (sd["n"] + 1) * d_total  # the upper triangle with its diagonal (SYRK count)
    results = {}
    # On CUDA the Triton rows are followed by one row per pairwise launch configuration ("triton[name]",
    # forced), so the CSV shows what the tuning of "triton" chose among (its pick: the "config" column)
    sd_rows = backends + (
        [f"triton[{name}]" for name in _pair_configs(x, sd["grid"])] if "triton" in backends else []
    )
    for op in ("matrix", "graph"):
        for be in sd_rows:
            fn = _sd_fn(x, sd["grid"], op, be)
            out = fn()
            _sync(device)
            results[(op, be)] = out.cpu()
            t = time_fn(fn, device, repeats=args.repeats)
            rows.append(
                {
                    "case": f"sd_{op}",
                    "shape": f"{sd['n']}x{sd['c']}x{sd['h']}x{sd['w']} grid{sd['grid'][0]}x{sd['grid'][1]}",
                    "dtype": "uint8",
                    "backend": be,
                    "median_s": t["median"],
                    "min_s": t["min"],
                    "tops_dense_equiv": ops / t["median"] / 1e12,
                    "pct_int8_peak": (100 * ops_needed / t["median"] / 1e12 / peak) if peak else "",
                    "exact_vs_reference": bool(torch.equal(results[(op, be)], results[(op, "reference")])),
                    "auto_choice": _auto_choice(op, be),
                    "config": _triton_choice("pairwise", be),
                }
            )
    edges = int(torch.ops.aten.bitwise_and(results[("graph", "reference")].view(torch.int64), -1).ne(0).sum())
    print(f"sd graph: nonzero words {edges}")

    # --- CIFAR: streamed k-NN (memory independent of M)
    q = torch.randint(0, 256, (cf["n"], cf["c"], cf["h"], cf["w"]), generator=gen, dtype=torch.uint8).to(
        device
    )
    r = torch.randint(0, 256, (cf["m"], cf["c"], cf["h"], cf["w"]), generator=gen, dtype=torch.uint8).to(
        device
    )
    ops_knn = 2.0 * cf["n"] * cf["m"] * cf["c"] * cf["h"] * cf["w"]
    ref_knn = None
    # "triton-fused": the Triton k-NN forced to its fused kernel (selection in registers), beside "triton"
    # (which picks the sampled-cut filter for this M), so the CSV shows both methods
    knn_rows = backends + (list(KNN_VARIANTS) if "triton" in backends else [])
    for be in knn_rows:
        fn = lambda be=be, r=r: _knn(q, r, cf["k"], be)  # noqa: E731
        mem = {}
        if device.type == "cuda":
            for frac in (2, 1):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                fn(r=r[: cf["m"] // frac])
                torch.cuda.synchronize()
                mem[frac] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        out = fn()
        _sync(device)
        if ref_knn is None:
            ref_knn = (out[0].cpu(), out[1].cpu())
        t = time_fn(fn, device, repeats=max(1, args.repeats // 2))
        rows.append(
            {
                "case": "cifar_knn",
                "shape": f"{cf['n']}q x {cf['m']}r x{cf['c']}x{cf['h']}x{cf['w']} k{cf['k']}",
                "dtype": "uint8",
                "backend": be,
                "median_s": t["median"],
                "min_s": t["min"],
                "tops_dense_equiv": ops_knn / t["median"] / 1e12,
                "pct_int8_peak": (100 * ops_knn / t["median"] / 1e12 / peak) if peak else "",
                "exact_vs_reference": bool(
                    torch.equal(out[0].cpu(), ref_knn[0]) and torch.equal(out[1].cpu(), ref_knn[1])
                ),
                "auto_choice": _auto_choice("knn", be),
                "config": _triton_choice("knn_cut", be),
                "torch_peak_MiB_M_half": mem.get(2, ""),
                "torch_peak_MiB_M_full": mem.get(1, ""),
            }
        )

    if device.type == "cuda" and "triton" in backends:
        for cut in ("fused", "groupmin"):
            breakdown = _knn_breakdown(q, r, cf["k"], cut)
            print(f"cifar_knn triton filter, cut={cut}, ms per stage:", breakdown)
            for row in rows:
                if row["case"] == "cifar_knn" and row["backend"] == f"triton[cut={cut}]":
                    row["stage_ms"] = json.dumps(breakdown, sort_keys=True)

    ref_t = {row["case"]: row["median_s"] for row in rows if row["backend"] == "reference"}
    print(f"{'case':<12} {'backend':<10} {'median ms':>10} {'x ref':>7} {'TOPS':>8} {'%peak':>6} exact")
    for row in rows:
        row["speedup_vs_reference"] = ref_t[row["case"]] / row["median_s"]
        pct = f"{row['pct_int8_peak']:.1f}" if row["pct_int8_peak"] != "" else "-"
        print(
            f"{row['case']:<12} {row['backend']:<10} {1e3 * row['median_s']:>10.3f} "
            f"{row['speedup_vs_reference']:>7.2f} {row['tops_dense_equiv']:>8.3f} {pct:>6} "
            f"{row['exact_vs_reference']}"
            + (
                f"  torch peak MiB M/2={row['torch_peak_MiB_M_half']:.1f} M={row['torch_peak_MiB_M_full']:.1f}"
                if row.get("torch_peak_MiB_M_full", "") != ""
                else ""
            )
        )
    write_csv("distance" + ("_quick" if args.quick else ""), rows, device)
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per CPU measurement (k-NN: half)")
    ap.add_argument(
        "--backends",
        nargs="*",
        default=None,
        help="only these backends (reference, cpu, cuda, triton, cublas, auto; the reference always runs)",
    )
    return ap


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
