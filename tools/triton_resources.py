"""Registers, spills, shared memory and CTAs per SM of every Triton GEMM launch configuration (pairwise,
k-NN filter, group-minimum cut, fused k-NN), compiled for sm_90 with the installed Triton on any machine: no
GPU needed. The launches are the ones ``tests/test_triton_sm90_compile.py`` checks (benchmark shapes).

    PYTHONPATH=. python tools/triton_resources.py
    # the lent H100's Triton: pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36:. python tools/triton_resources.py
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import triton
from test_triton_sm90_compile import _compile, _ctas_per_sm, knn_launches, pair_launches


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90")
    print(f"{'launch':48s} {'regs':>5s} {'stack B':>8s} {'smem KB':>8s} {'CTAs/SM':>8s}")
    for label, _name, fn, args, consts, warps, stages, _max_stack in [*pair_launches(), *knn_launches()]:
        st = _compile(fn, args, consts, warps, stages)
        regs = st.get("regs", "?")
        ctas = _ctas_per_sm(st, warps) if "regs" in st else "?"
        print(f"{label:48s} {regs:>5} {st.get('stack', '?'):>8} {st['smem'] / 1024:8.0f} {ctas:>8}")


if __name__ == "__main__":
    main()
