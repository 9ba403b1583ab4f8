"""Audit of the benchmark measurements: what a CSV row claims must be what was measured (commit of the code
that ran, the reference really compared, the same input on both sides of a ratio, a failed case visible)."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def test_commit_marks_a_dirty_tree_but_not_fresh_results(load_bench, tmp_path):
    common = load_bench("benchmarks/_common.py")

    def git(*argv):
        subprocess.run(["git", *argv], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "old.csv").write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    clean = common.commit(tmp_path)
    assert clean and "+" not in clean and clean != "unknown"
    # a CSV written by an earlier script of the same session is not a change of the measured code
    (tmp_path / "benchmarks" / "results" / "old.csv").write_text("b\n")
    assert common.commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.commit(tmp_path) == clean + "+dirty"


def _results_to(mod, monkeypatch, tmp_path):
    monkeypatch.setitem(mod.write_csv.__globals__, "RESULTS", tmp_path)


def test_distance_without_reference_in_backends_still_has_its_ratio(load_bench, monkeypatch, tmp_path):
    """``--backends cpu`` was a KeyError after every timing (the ratios and exactness read the reference's row);
    the share of peak counted the dense 2·N²·D for pairwise calls that compute the symmetric half."""
    mod = load_bench("benchmarks/bench_distance.py")
    _results_to(mod, monkeypatch, tmp_path)
    monkeypatch.setattr(mod, "_peak", lambda dev: 1.0)
    rows = mod.run(
        mod.build_parser().parse_args(["--quick", "--device", "cpu", "--backends", "cpu", "--repeats", "1"])
    )
    assert {r["backend"] for r in rows} == {"reference", "cpu"}
    assert all(r["exact_vs_reference"] for r in rows)
    n, d = 64, 3 * 64 * 64
    for r in rows:
        if r["case"].startswith("sd_"):
            assert r["pct_int8_peak"] == pytest.approx(100 * n * (n + 1) * d / r["median_s"] / 1e12)
        else:
            assert r["pct_int8_peak"] == pytest.approx(100 * r["tops_dense_equiv"])


def test_distance_peak_of_the_pcie_and_nvl_boards(load_bench):
    peak = load_bench("benchmarks/bench_distance.py")._peak
    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == 1979.0
    assert peak("NVIDIA H100 PCIe") == 1513.0 and peak("NVIDIA H100 NVL") == 1671.0


def test_step_rows_say_whether_the_kernel_matched_the_reference(load_bench, monkeypatch):
    """The step/GroupNorm rows were timings only: a backend returning a wrong tensor read as a speedup."""
    mod = load_bench("benchmarks/bench_step.py")
    real = mod.fused_step

    def wrong_when_fast(*a, backend="auto", **kw):
        out = real(*a, backend=backend, **kw)
        return out if backend == "reference" else out + 1

    case = [("tiny", "ddim", (1, 4, 8, 8), mod.torch.float32, True, 0.0)]
    rows = mod.bench_step(mod.torch.device("cpu"), case, 1)
    assert [r["exact_vs_reference"] for r in rows] == [True, True]
    monkeypatch.setattr(mod, "fused_step", wrong_when_fast)
    rows = mod.bench_step(mod.torch.device("cpu"), case, 1)
    assert [r["exact_vs_reference"] for r in rows] == [True, False]
    assert rows[1]["max_abs_diff_vs_reference"] == pytest.approx(1.0)


def test_sampling_failed_configuration_is_a_row_and_an_exit_status(load_bench, monkeypatch, tmp_path):
    """A configuration that raised was printed as a traceback only: the CSV silently lacked it and the script
    (hence ``memcore bench`` and gpu_run.sh's log) reported success."""
    mod = load_bench("benchmarks/bench_sampling.py")
    _results_to(mod, monkeypatch, tmp_path)

    def run_config(name, args, device, dtype):
        if name == "sd15":
            raise RuntimeError("CUDA out of memory")
        return {
            "config": name + "-quick",
            "memcore_images_per_s": 2.0,
            "ref_images_per_s": 1.0,
            "speedup": 2.0,
        }

    monkeypatch.setattr(mod, "run_config", run_config)
    assert mod.main(["--quick", "--device", "cpu"]) == 1
    # the default --quick run keeps its CSV name (celeba64, dropped by --quick, did not rename it)
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("bench_sampling_quick_cpu")
    rows = list(csv.DictReader(path.open()))
    assert [r["config"] for r in rows] == ["cifar10-quick", "sd15-quick"]
    assert rows[0]["error"] == "" and "out of memory" in rows[1]["error"] and rows[1]["speedup"] == ""


def test_clique_ratio_to_networkx_is_on_the_graph_networkx_ran(load_bench, monkeypatch, tmp_path):
    """networkx runs on a case's first graph only; memcore's median over all graphs of the case was divided
    into it (different inputs on the two sides of the ratio)."""
    mod = load_bench("benchmarks/bench_clique.py")
    monkeypatch.setattr(mod._common, "RESULTS", tmp_path)
    g0 = mod.gnp(500, 0.1, 10, 0)
    real = mod.times_of

    def times_of(fn, reps):  # memcore: 1 ms on the first graph, 100 ms on the others
        d = getattr(fn, "__defaults__", None) or ()
        if len(d) == 2 and isinstance(d[0], mod.torch.Tensor):
            return [1e-3 if mod.torch.equal(d[0], g0) else 1e-1] * reps
        return real(fn, reps)

    monkeypatch.setattr(mod, "times_of", times_of)
    monkeypatch.setattr(mod, "networkx_time", lambda method, bits, timeout: (1e-2, None))
    monkeypatch.setattr(mod, "generations", lambda kind, seed, n=500: g0)  # not the timed case: skip its cost
    assert mod.main(["--quick", "--only", "gnp-500-0.1-plant10"]) == 0
    rows = [r for r in csv.DictReader(next(tmp_path.iterdir()).open()) if r["method"].startswith("memcore")]
    assert len(rows) == 4 and all(float(r["speedup_vs_networkx"]) == 10.0 for r in rows)


def test_extract_e2e_row_says_whether_memcore_and_reference_agree(load_bench, monkeypatch):
    """The end-to-end ratio compared timings only: the two paths' extractions were never compared."""
    import dataclasses

    import torch

    mod = load_bench("benchmarks/bench_extract.py")
    monkeypatch.setattr(mod, "REPEATS", 1, raising=False)
    model = mod._tiny_uncond()
    train = torch.randint(
        0, 256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    cfg = mod.carlini.ExtractConfig(
        num_per_condition=8,
        nn_candidates=16,
        num_inference_steps=2,
        batch_size=8,
        grid=(2, 2),
        save_images="none",
    )
    cpu = torch.device("cpu")
    rows = mod.e2e("tiny", model, None, cfg, train, cpu, reference=True)
    assert rows[0]["same_result_as_reference"] is True
    real = mod.carlini.extract

    def extract(*a, config, **kw):  # a reference path that extracts nothing
        res = real(*a, config=config, **kw)
        return dataclasses.replace(res, nn=None) if config.sampler == "reference" else res

    monkeypatch.setattr(mod.carlini, "extract", extract)
    rows = mod.e2e("tiny", model, None, cfg, train, cpu, reference=True)
    assert rows[0]["same_result_as_reference"] is False


def test_sampling_mfu_peak_follows_the_dtype(load_bench):
    # MFU divided float32 runs by the bf16 peak (989): float32 runs TF32 at half of it
    import torch

    mod = load_bench("benchmarks/bench_sampling.py")
    args = mod.build_parser().parse_args([])
    assert mod._peak_tflops(args, torch.bfloat16) == mod._peak_tflops(args, torch.float16) == 989.4
    assert mod._peak_tflops(args, torch.float32) == 494.7
    assert mod._peak_tflops(mod.build_parser().parse_args(["--peak-tflops", "756"]), torch.float32) == 756
