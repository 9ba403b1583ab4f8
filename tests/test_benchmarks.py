"""The benchmark scripts stay runnable between GPU sessions: every command ``tools/gpu_run.sh`` runs by
default parses (a bad flag would otherwise surface only on a lent GPU, after its device time is spent), bad
values fail at parse time, and the quick CPU variants run to their CSV."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _gpu_run_commands() -> list[list[str]]:
    text = (ROOT / "tools" / "gpu_run.sh").read_text()
    block = text.split('default_cmds="', 1)[1].split('"', 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_gpu_run_default_commands_parse(load_bench):
    cmds = _gpu_run_commands()
    assert len(cmds) >= 5 and {c[0] for c in cmds} >= {
        "benchmarks/bench_distance.py",
        "benchmarks/bench_extract.py",
        "benchmarks/bench_sampling.py",
    }
    for argv in cmds:
        args = load_bench(argv[0]).build_parser().parse_args(argv[1:])
        assert args.device == "cuda", argv


@pytest.mark.parametrize(
    "argv",
    [
        ["--configs", "sd51"],
        ["--batch", "sd15=x"],
        ["--batch", "sd16=8"],
        ["--inductor", "no_such_option=1"],
        ["--attention", "flash3"],
    ],
)
def test_bad_sampling_arguments_fail_at_parse_time(load_bench, argv, capsys):
    parser = load_bench("benchmarks/bench_sampling.py").build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_bad_extract_cases_fail_at_parse_time(load_bench):
    with pytest.raises(SystemExit):
        load_bench("benchmarks/bench_extract.py").build_parser().parse_args(["--cases", "cifar,sdxl"])


@pytest.mark.parametrize(
    "argv, csv_name",
    [
        (
            "bench_sampling.py --quick --configs cifar10 --steps 2 --repeats 1 --batch cifar10=2 --attention math".split(),
            "bench_sampling_quick_cifar10_attn-math_b2_",
        ),
        ("bench_distance.py --quick --repeats 1".split(), "distance_quick_"),
        ("bench_step.py --quick".split(), "bench_step_"),
    ],
)
def test_quick_benchmarks_write_their_csv(tmp_path, argv, csv_name):
    env = {**os.environ, "MEMCORE_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files = [p for p in tmp_path.iterdir() if p.name.startswith(csv_name)]
    assert len(files) == 1, [p.name for p in tmp_path.iterdir()]
    rows = list(csv.DictReader(files[0].open()))
    assert rows and all(r["device"] and r["commit"] and r["date"] for r in rows)
    if argv[0] == "bench_sampling.py":
        assert rows[0]["attention"] == "math" and rows[0]["batch"] == "2"
        # the same images on both sides of the ratio (parity mode on the CPU: bit-identical)
        assert rows[0]["max_abs_diff_u8"] == "0"
    if argv[0] == "bench_step.py":
        assert all(r["exact_vs_reference"] == "True" for r in rows if r["bench"] == "step")
