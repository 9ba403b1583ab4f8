"""Developer build: compile memcore._C in place (build/dev) without installing the package.

    python tools/dev_build.py [--cuda AUTO|ON|OFF] [--jobs N]

Then run with ``PYTHONPATH=$PWD``. CI and users install with ``pip install .`` instead.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", default=os.environ.get("MEMCORE_CUDA", "OFF"), choices=["AUTO", "ON", "OFF"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--build-dir", default=None)
    args = ap.parse_args()
    import pybind11

    build = Path(args.build_dir or ROOT / "build" / f"dev-cuda-{args.cuda.lower()}")
    build.mkdir(parents=True, exist_ok=True)
    cfg = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build),
        "-G",
        "Ninja",
        f"-DMEMCORE_CUDA={args.cuda}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    subprocess.run(cfg, check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(args.jobs)], check=True)
    built = glob.glob(str(build / "_C*.so"))
    if not built:
        print("no _C*.so produced", file=sys.stderr)
        return 1
    for old in glob.glob(str(ROOT / "memcore" / "_C*.so")):
        os.remove(old)
    shutil.copy2(built[0], ROOT / "memcore")
    print(f"built {Path(built[0]).name} -> memcore/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
