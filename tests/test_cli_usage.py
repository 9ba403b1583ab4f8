"""The ``memcore`` command line as a user meets it: usage errors, refused option combinations, --version."""

from __future__ import annotations

import pytest
import test_cli_extract as _cli

from memcore import __version__
from memcore.cli import main

model_dir = _cli.model_dir  # the tiny class-conditional model fixture


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "memcore: error: no command given; choose one of extract, demo, profile"),
        (["bogus"], "memcore: error: argument COMMAND: invalid choice: 'bogus'"),
        (["extract", "--model", "m", "--prompts", "p", "--classes", "0", "--out", "o"], "not allowed with"),
        (["extract", "--model", "m", "--unconditional", "--classes", "0", "--out", "o"], "not allowed with"),
        (
            ["extract", "--model", "m", "--classes", "0", "--grid", "4x", "--out", "o"],
            "grid must look like 4x4",
        ),
        (
            ["extract", "--model", "m", "--classes", "0", "--dtype", "foo", "--out", "o"],
            "invalid choice: 'foo'",
        ),
        (["extract", "--model", "m", "--classes", "0", "-n", "x", "--out", "o"], "invalid int value: 'x'"),
        (["merge"], "memcore merge: error: the following arguments are required: dir"),
        (["train-demo", "--variant", "x", "--out", "o"], "memcore train-demo: error: argument --variant"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, match):
    """argparse printed its whole usage (a dozen lines for extract) before the error; and with no command,
    it said only that 'cmd' was required."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and not err.startswith("usage"), err
    assert list(tmp_path.iterdir()) == []


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"memcore {__version__}\n"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--shard="], "--shard must look like i/n (e.g. 0/4), got ''"),  # was: the whole run, unsharded
        (["--column", "text"], "--column only applies to --prompts"),  # was: ignored
    ],
)
def test_options_that_were_ignored_silently_are_refused(model_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "o"
    assert main(_cli.args(model_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not out.exists()


def test_demo_help_states_its_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "(default ./memcore-demo)" in flat and "(default cpu)" in flat


def test_bench_out_keeps_the_committed_csvs(tmp_path, monkeypatch):
    # `memcore bench --quick` replaced the checkout's committed CSVs; --out puts them elsewhere
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    monkeypatch.delenv("MEMCORE_BENCH_RESULTS", raising=False)
    before = {p: p.stat().st_mtime_ns for p in (root / "benchmarks" / "results").iterdir()}
    assert main(["bench", "step", "--quick", "--out", str(tmp_path / "csv")]) == 0
    assert [p.name.startswith("bench_step_") for p in (tmp_path / "csv").iterdir()] == [True]
    assert {p: p.stat().st_mtime_ns for p in (root / "benchmarks" / "results").iterdir()} == before
