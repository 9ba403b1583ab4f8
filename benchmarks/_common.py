"""Shared benchmark helpers: timing (do_bench on GPU, min/median of repeats on CPU) and CSV rows that carry
device, commit and date. Every benchmark prints ratios against the reference path and writes a CSV under
benchmarks/results/."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Where CSVs go (``MEMCORE_BENCH_RESULTS`` overrides it: the smoke tests write to a temporary directory).
RESULTS = Path(os.environ.get("MEMCORE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def comma_list(allowed: tuple[str, ...]):
    """An argparse ``type`` for a comma list of ``allowed`` names (a typo fails at parse time, before any
    device time is spent)."""
    import argparse

    def parse(raw: str) -> str:
        names = [x for x in raw.split(",") if x]
        bad = [x for x in names if x not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}; got {raw!r}")
        return ",".join(names)

    return parse


def commit(root: Path | None = None) -> str:
    """Short commit hash of the checkout, with ``+dirty`` when tracked files differ from it (a measurement of
    uncommitted code must not read as the commit's); changes under ``benchmarks/results/`` do not count, or
    every script after the first of one session would mark its CSV dirty. ``MEMCORE_COMMIT`` where there is
    no git checkout (a copied tree on a GPU machine)."""
    root = root or Path(__file__).resolve().parents[1]
    try:

        def git(*argv: str) -> str:
            return subprocess.run(
                ["git", *argv], capture_output=True, text=True, check=True, cwd=root
            ).stdout.strip()

        head = git("rev-parse", "--short", "HEAD")
        dirty = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"
        )
        return head + ("+dirty" if dirty else "")
    except Exception:
        return os.environ.get("MEMCORE_COMMIT", "unknown")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}x{os.cpu_count()}"


def time_fn(
    fn: Callable[[], Any], device: torch.device | str, *, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Seconds per call: {"median": s, "min": s}. GPU: triton.testing.do_bench (median, events);
    CPU: ``repeats`` wall-clock runs after ``warmup``."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        med = do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        mn = do_bench(fn, warmup=5, rep=50, return_mode="min") / 1e3
        return {"median": med, "min": mn}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times)}


def write_csv(name: str, rows: list[dict[str, Any]], device: torch.device | str) -> Path:
    """Append-free write of ``benchmarks/results/<name>_<device-slug>.csv``; each row gets device/commit/date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    dev = device_name(device)
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    path = RESULTS / f"{name}_{slug}.csv"
    stamp = {
        "device": dev,
        "commit": commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    full = [{**stamp, **r} for r in rows]
    keys: list[str] = []
    for r in full:
        for k in r:
            if k not in keys:
                keys.append(k)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(full)
    print(f"wrote {path}")
    return path
