"""The ``memcore`` CLI: extract (SPEC §7 contract), resume after kill -9, refusals, dry-run, merge, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memcore.cli import main
from memcore.io import results as R

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_extract import tiny_unet

    unet, sched = tiny_unet(10)
    d = tmp_path_factory.mktemp("model")
    unet.save_pretrained(d)
    sched.save_pretrained(d)
    return d


def args(model_dir, out, *extra):
    return [
        "extract", "--model", str(model_dir), "--classes", "0-2", "-n", "12", "--steps", "3", "--alpha", "0.02",
        "--grid", "2x2", "--min-clique", "4", "--batch-size", "5", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_extract_contract_and_rerun_is_a_noop(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(model_dir, out)) == 0
    recs = R.load_results(out)
    assert [r["condition"] for r in recs] == [0, 1, 2]
    for k in ("condition", "flagged", "clique_size", "medoid_seed", "mean_clique_distance"):
        assert all(k in r for r in recs)
    s = json.loads((out / "summary.json").read_text())
    assert s["params"]["num_per_condition"] == 12 and s["params"]["grid"] == [2, 2]
    assert s["counts"]["conditions_done"] == 3 and "timings" in s
    assert (out / "report.html").is_file()
    before = (out / "results.jsonl").read_bytes()
    assert main(args(model_dir, out)) == 0  # resume: everything finished, nothing appended
    assert (out / "results.jsonl").read_bytes() == before
    assert "3/3 conditions" in capsys.readouterr().out


def test_changed_parameter_refused_in_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(model_dir, out)) == 0
    capsys.readouterr()
    assert main(args(model_dir, out, "--delta", "0.2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "delta: directory has 0.15, this run has 0.2" in err
    # options added after the first results format enter the parameters only when not at their default, so
    # directories started before them still resume; another attention kernel (other last bits) is refused
    assert "attention" not in json.loads((out / "params.json").read_text())["params"]
    assert main(args(model_dir, out, "--attention", "math")) == 2
    assert 'attention: directory has no value, this run has "math"' in capsys.readouterr().err


def test_unused_or_default_spelled_options_resume(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    a = args(model_dir, out)
    del a[a.index("--batch-size") : a.index("--batch-size") + 2]  # the default: min(N, 64) = 12
    assert main(a) == 0
    before = (out / "results.jsonl").read_bytes()
    capsys.readouterr()
    # a class-conditional run never reads the NN extraction's options; 12 is the batch it ran at
    assert main([*a, "--batch-size", "12", "--nn-k", "3", "--nn-alpha", "0.9", "--nn-candidates", "40"]) == 0
    assert (out / "results.jsonl").read_bytes() == before and "3/3 conditions" in capsys.readouterr().out
    assert main([*a, "--batch-size", "6"]) == 2
    assert "batch_size: directory has 12, this run has 6" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--grid", "3x3"], "does not divide"),
        (["--classes", "0,12"], "out of range"),
        (["--eta", "1.5"], "eta must be in [0, 1]"),
        (["--backend", "cuda", "--device", "cpu"], "backend 'cuda' needs CUDA tensors"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--steps", "101"], "num_inference_steps (101) cannot exceed the model's num_train_timesteps (100"),
        (["--steps", "101", "--sampler", "reference"], "cannot exceed the model's num_train_timesteps (100"),
    ],
)
def test_bad_input_one_line_nothing_written(model_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "o"
    a = args(model_dir, out)
    i = a.index("--classes")
    a[i + 1] = "0-2"
    a += extra
    assert main(a) == 2
    err = capsys.readouterr().err
    assert match in err and err.strip().count("\n") == 0
    assert not out.exists()


def test_missing_and_bad_files(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["extract", "--model", str(tmp_path / "nope"), "--classes", "0", "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "p.txt"
    empty.write_text("\n\n")
    a = args(model_dir, out)
    a[a.index("--classes") : a.index("--classes") + 2] = ["--prompts", str(empty)]
    assert main(a) == 2
    assert "memcore: error:" in capsys.readouterr().err
    bad = tmp_path / "t.npy"
    import numpy as np

    np.save(bad, np.zeros((4, 1, 4, 4), dtype=np.uint8))
    assert main(args(model_dir, out, "--train", str(bad))) == 2
    assert "memcore: error:" in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_prints_cost_and_writes_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(model_dir, out, "--dry-run", "--throughput", "100")) == 0
    text = capsys.readouterr().out
    assert "candidates            36" in text and "UNet FLOPs / forward" in text and "100 images/s" in text
    assert "images sampled        40 (micro-batch 5; 4 padding rows)" in text  # the last batch is padded
    assert not out.exists()
    assert main(args(model_dir, out, "--dry-run", "--shard", "1/2")) == 0
    assert "(the whole run: all 2 parts; part 1 runs about 1/2 of it)" in capsys.readouterr().out
    # what the run would refuse at once, the dry run refuses too
    for extra, match in (
        (["--grid", "3x3"], "grid 3x3 does not divide the model's image size 8x8"),
        (["--shard", "5/2"], "shard index must be in [0, 2), got 5"),
        (["--steps", "101"], "cannot exceed the model's num_train_timesteps (100"),
    ):
        assert main(args(model_dir, out, "--dry-run", *extra)) == 2
        assert match in capsys.readouterr().err


def test_dry_run_on_another_device_peak(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(model_dir, out, "--dry-run", "--peak-tflops", "312", "--utilisation", "0.4")) == 0
    text = capsys.readouterr().out
    assert "assumed 40% of 312 TFLOP/s, the given peak" in text
    hours = float(text.split("projected GPU-hours")[1].split()[0])
    total = float(text.split("total FLOPs")[1].split()[0])
    assert hours == pytest.approx(total / (312e12 * 0.4) / 3600, rel=1e-3)
    for extra, match in (
        (["--peak-tflops", "312"], "--peak-tflops only applies to --dry-run"),  # a run measures its own cost
        (
            ["--throughput", "5", "--utilisation", "0.3"],
            "--throughput and --utilisation only apply to --dry-run",
        ),
        (["--dry-run", "--throughput", "5", "--peak-tflops", "312"], "--throughput replaces them: give one"),
        (["--dry-run", "--utilisation", "1.5"], "utilisation must be in (0, 1], got 1.5"),
        (["--dry-run", "--peak-tflops", "nan"], "peak_tflops must be a finite number > 0, got nan"),
    ):
        assert main(args(model_dir, out, *extra)) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
    assert not out.exists()


def test_output_folders_that_cannot_be_one_are_refused_before_any_work(model_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (args(model_dir, ""), "--out is empty"),  # it wrote into the working directory
        (args(model_dir, afile), f"--out {afile} exists and is not a directory"),
        (args(model_dir, afile / "sub"), f"--out {afile / 'sub'}: {afile} is a file, not a directory"),
        (args(model_dir, afile / "sub", "--dry-run"), "is a file, not a directory"),
        (["profile", "--model", str(model_dir), "--classes", "0", "--out", str(afile)], "is not a directory"),
        (["demo", "--out", str(afile / "d")], "is a file, not a directory"),
        (["train-demo", "--out", str(afile / "d")], "is a file, not a directory"),
    ]
    for argv, match in cases:
        t0 = time.perf_counter()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and err.strip().count("\n") == 0, err
        assert time.perf_counter() - t0 < 30  # refused up front, not after a calibration or training
    assert afile.read_text() == "x"


def test_os_errors_are_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(model_dir, out)) == 0
    (out / "results.jsonl").unlink()
    (out / "results.jsonl").mkdir()  # a directory where the records file belongs
    capsys.readouterr()
    assert main(args(model_dir, out)) == 2
    assert capsys.readouterr().err == f"memcore: error: Is a directory: {out / 'results.jsonl'}\n"


def test_shard_and_merge(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    for i in range(2):
        assert main(args(model_dir, out, "--shard", f"{i}/2", "--no-report")) == 0
    assert main(["merge", str(out)]) == 0
    assert [r["condition_id"] for r in R.load_results(out)] == [0, 1, 2]
    assert (out / "results.jsonl").read_text().count("\n") == 3
    assert (out / "report.html").is_file()


def test_torchrun_env_picks_rank_part(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args(model_dir, out, "--no-report")) == 0
    part = R.read_records(out / "parts" / "results.part1-of-2.jsonl").records
    assert [r["condition_id"] for r in part] == [1]


def test_kill9_then_resume_equals_uninterrupted(model_dir, tmp_path):
    """kill -9 a running `memcore extract`, resume it: exactly the records of an uninterrupted run."""
    a_full = args(model_dir, tmp_path / "full")
    a_full[a_full.index("0-2")] = "0-8"  # nine conditions: long enough to be killed mid-run
    a_cut = [x if x != str(tmp_path / "full") else str(tmp_path / "cut") for x in a_full]
    assert main(a_full) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "memcore", *a_cut],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    res = tmp_path / "cut" / "results.jsonl"
    t0 = time.time()
    while time.time() - t0 < 120 and p.poll() is None:
        if res.exists() and res.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_cut = len(R.load_results(tmp_path / "cut"))
    assert main(a_cut) == 0
    assert R.load_results(tmp_path / "cut") == R.load_results(tmp_path / "full")
    assert len(R.load_results(tmp_path / "full")) == 9
    if p.returncode != -signal.SIGKILL:  # the run finished before the kill landed: still checked above
        pytest.skip(f"the run ended before SIGKILL ({n_cut} records); resume equality was still checked")


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--num-per-condition",
        "--alpha",
        "--min-clique",
        "--delta",
        "--nn-k",
        "--nn-alpha",
        "--grid",
        "--steps",
        "--guidance-scale",
        "--shard",
        "--dry-run",
    ):
        assert flag in text
    assert "0.15" in text and "500" in text
    # each default said once, and no "(default: None)" for options whose help explains their absence
    flat = " ".join(text.split())
    assert "(default: 500)" in flat and "(default: 0.0)" in flat and "(default: auto)" in flat
    assert "(default: None)" not in flat and "(default: False)" not in flat
    for option in flat.split(" --")[1:]:
        assert option.count("(default") <= 1, option


def test_torch_threads_untouched():
    assert torch.get_num_threads() >= 1


def test_profile_writes_stage_costs(model_dir, tmp_path, capsys, monkeypatch):
    from memcore.models import loading

    loads = []
    real = loading.load_model

    def counted(obj, *a, **k):  # a LoadedModel handed on is returned as is: only reads from disk count
        loads.extend([] if isinstance(obj, loading.LoadedModel) else [1])
        return real(obj, *a, **k)

    monkeypatch.setattr(loading, "load_model", counted)
    a = args(model_dir, tmp_path / "p")
    a[0] = "profile"
    a = [x for x in a if x != "--no-progress"] + ["--calib-conditions", "1", "--calib-n", "6"]
    assert main(a) == 0
    assert loads == [1]  # calibration and FLOP count share one loaded model
    prof = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert prof["calibration"]["conditions"] == 1 and prof["throughput_images_per_s"] > 0
    assert "sample" in prof["shares"] and 0 <= prof["outside_sampling_share"] < 1
    assert prof["projection"]["candidates"] == 36 and "measured" in prof["projection"]["basis"]
    assert "projected GPU-hours" in capsys.readouterr().out
    # the reference sampler's model is loaded once too
    from memcore.attacks import reference

    ref_loads = []
    real_ref = reference.load_reference_model

    def counted_ref(obj, *a, **k):
        ref_loads.extend([] if isinstance(obj, reference.ReferenceModel) else [1])
        return real_ref(obj, *a, **k)

    monkeypatch.setattr(reference, "load_reference_model", counted_ref)
    a[a.index("--out") + 1] = str(tmp_path / "r")
    assert main([*a, "--sampler", "reference"]) == 0
    assert ref_loads == [1] and loads == [1]
    prof_ref = json.loads((tmp_path / "r" / "profile.json").read_text())
    assert prof_ref["flops"] == prof["flops"] and prof_ref["throughput_images_per_s"] > 0


def test_a_moved_model_resumes_with_a_one_line_notice(model_dir, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    out = tmp_path / "o"
    assert main(args(moved, out, "--classes", "0")) == 0
    first = (out / "results.jsonl").read_text()
    moved.rename(tmp_path / "elsewhere")
    with pytest.warns(UserWarning) as seen:
        assert main(args(tmp_path / "elsewhere", out, "--classes", "0")) == 0
    assert (out / "results.jsonl").read_text() == first
    # as the CLI prints it (pytest captures warnings before they reach stderr): one line, paths whole
    from memcore.cli import _format_warning

    w = seen[0]
    line = _format_warning(w.message, w.category, w.filename, w.lineno)
    assert line == (
        f'memcore: warning: resuming {out}: model: this run has "{tmp_path / "elsewhere"}", the directory '
        f'"{moved}" (same model_sha256)\n'
    )


def test_report_and_bench_commands(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(model_dir, out, "--no-report")) == 0
    assert not (out / "report.html").exists()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such results directory" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert main(["merge", str(tmp_path / "f")]) == 2
    assert "is a file, not a results directory" in capsys.readouterr().err
    assert main(["bench", "no_such_bench"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    # a corrupt JSON file is named (a bare decoding error named none)
    (out / "summary.json").write_text("{bad")
    assert main(["report", str(out)]) == 2
    assert f"{out / 'summary.json'} is corrupt (Expecting property name" in capsys.readouterr().err
    (out / "params.json").write_text("[]")
    assert main(["merge", str(out)]) == 2
    assert f"{out / 'params.json'} is corrupt (no params object)" in capsys.readouterr().err
    assert main(args(model_dir, tmp_path / "e", "--classes", "")) == 2
    assert "empty class list" in capsys.readouterr().err


def test_non_utf8_prompts_and_corrupt_train(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"a prompt\n\xff\xfe not utf-8\n")
    a = args(model_dir, out)
    a[a.index("--classes") : a.index("--classes") + 2] = ["--prompts", str(bad)]
    assert main(a) == 2
    err = capsys.readouterr().err
    assert "memcore: error:" in err and err.strip().count("\n") == 0
    corrupt = tmp_path / "t.npy"
    corrupt.write_bytes(b"\x93NUMPY garbage")
    assert main(args(model_dir, out, "--train", str(corrupt))) == 2
    assert "memcore: error:" in capsys.readouterr().err
    assert not out.exists()


def test_train_demo_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "td"
    assert main(["train-demo", "--out", str(out), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memcore: error: steps must be an int >= 1") and err.strip().count("\n") == 0
    assert main(["train-demo", "--out", str(out), "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    assert not out.exists()


def test_out_of_memory_is_one_line_and_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    from memcore.attacks import carlini

    def alloc(*a, **k):  # what -n 3000000 gave: its N x N graph wants 1.1 TB
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(carlini, "_Slot", alloc)
    out = tmp_path / "o"
    assert main(args(model_dir, out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("memcore: error: out of memory (") and "lower --num-per-condition" in err
    assert err.count("\n") == 1 and not out.exists()  # a corrected command is not refused by a leftover
    monkeypatch.setattr(carlini, "_Slot", lambda *a, **k: 1 / 0)  # any other error keeps its traceback
    with pytest.raises(ZeroDivisionError):
        main(args(model_dir, out))
