"""The Triton distance kernels compile for an H100 (sm_90) on any machine: Triton's compiler and its bundled
ptxas need no GPU. The interpreter lane runs the kernels' arithmetic but not their compilation, so an error
that only the compiler sees (e.g. branches of a ``constexpr`` switch returning different types) would
otherwise surface only on a lent GPU. Each launch configuration is compiled with the specialisations the JIT
would give the benchmark shapes (pointers and integers divisible by 16 get the divisibility hint, integers
equal to 1 become constants), and the GEMM kernels must use Hopper's wgmma with cp.async pipelining and no
local-memory spills.

CPU lane (Triton's JIT, not the interpreter); skipped where Triton or its NVIDIA backend is missing.
"""

from __future__ import annotations

import os
import re

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="needs Triton's compiler (JIT mode)"
)


def _compile(fn, args: dict, consts: dict, warps: int, stages: int) -> dict:
    """Compile ``fn`` for sm_90. args: name -> (type, value or None); returns PTX statistics."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(consts)
    for name, (_ty, val) in list(args.items()):
        if val == 1:  # the JIT turns integer arguments equal to 1 into constants
            consts[name] = 1
            del args[name]
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        ty, val = args[name]
        sig[name] = ty
        if ty.startswith("*") or (isinstance(val, int) and val % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    try:
        k = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
        )
    except (ImportError, FileNotFoundError, RuntimeError) as exc:  # no NVIDIA backend / ptxas in this install
        if "ptxas" in str(exc) or "nvidia" in str(exc).lower():
            pytest.skip(f"Triton's NVIDIA toolchain is unavailable: {exc}")
        raise
    ptx = k.asm["ptx"]
    return {
        "smem": k.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)),
        "local": len(re.findall(r"(?:ld|st)\.local", ptx)),
        **_resources(k.asm["cubin"]),
    }


def _resources(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (ptxas's register spills, which the PTX does not show) of a cubin,
    from the cuobjdump Triton bundles; {} where it is missing."""
    import pathlib
    import shutil
    import subprocess
    import tempfile

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    exe = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if exe is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([exe, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


# The benchmark shapes (benchmarks/bench_distance.py): SD 500 × 3×512×512 with a 4×4 grid; CIFAR 3×32×32.
SD = {"N": 500, "D": 3 * 128 * 128, "T": 16, "H": 512, "W": 512, "TH": 128, "TW": 128, "GW": 4}
H100_SMEM = 227 * 1024


def _spilled(st: dict) -> int:
    """Bytes of register spills per thread: PTX local memory counts as a lot, else ptxas's stack."""
    return 1 << 20 if st["local"] else st.get("stack", 0)


def _gemm_ok(name: str, st: dict, max_stack: int = 0) -> None:
    """wgmma, cp.async, shared memory within the H100's, and register spills of at most ``max_stack`` bytes
    per thread."""
    assert st["wgmma"] > 0, f"{name}: no wgmma"
    assert st["cp_async"] > 0, f"{name}: loads are not pipelined (no cp.async)"
    assert _spilled(st) <= max_stack, (
        f"{name}: spills ({st.get('regs')} registers, {st.get('stack')} B stack)"
    )
    assert st["smem"] <= H100_SMEM, f"{name}: {st['smem']} B of shared memory"


def _ctas_per_sm(st: dict, warps: int) -> int:
    """CTAs of one configuration an H100 SM holds at once, by registers (64K per SM, allocated per warp in
    units of 8 per thread) and shared memory."""
    regs = -(-st["regs"] // 8) * 8
    return min(65536 // (regs * 32 * warps), H100_SMEM // max(1, st["smem"]))


# Configurations built to run two CTAs per SM (Triton does not pipeline int8 wgmma: only another CTA overlaps
# one's MMAs with its loads and epilogue); the early return of the pairwise kernel's lower-triangle blocks cost
# the symmetric variants ~90 registers and thereby this.
TWO_PER_SM = {"packed-gram/128x128x128/w8s3", "nchw-i8/128x128x128/w8s3", "128x64x128/w8s3", "64x64x128/w4s3"}


def _check_launches(launches) -> None:
    """Compile each launch (``pair_launches`` / ``knn_launches`` tuples): wgmma, cp.async, no spills beyond its
    allowance, and two CTAs per SM for the TWO_PER_SM configurations."""
    for label, name, fn, args, consts, warps, stages, max_stack in launches:
        st = _compile(fn, args, consts, warps, stages)
        _gemm_ok(label, st, max_stack)
        if name in TWO_PER_SM and "regs" in st:
            assert _ctas_per_sm(st, warps) >= 2, (label, st)


def pair_launches():
    """Every uint8 pairwise launch configuration at the SD benchmark shapes, pairwise and cross: tuples (label,
    PAIR_CONFIGS name, kernel, args, constexprs, num_warps, num_stages, allowed stack bytes)."""
    from memcore.kernels.triton import distance as tk

    for name, (layout, bm, bn, bk, warps, stages, _waves) in tk.PAIR_CONFIGS.items():
        packed = layout.startswith("packed")
        elem = "*i8" if packed or layout == "nchw-i8" else "*u8"
        for sym in (True, False):
            args = {
                "a_ptr": (elem, None),
                "b_ptr": (elem, None),
                "an_ptr": ("*i64", None),
                "bn_ptr": ("*i64", None),
                "out_ptr": ("*i64" if layout == "packed" else "*i32", None),
                "N": ("i32", SD["N"]),
                "M": ("i32", SD["N"]),
                "D": ("i32", SD["D"]),
                "T": ("i32", SD["T"]),
                "per_split": ("i32", SD["D"] // 4),
                **{k: ("i32", 1 if packed else SD[k]) for k in ("H", "W", "TH", "TW", "GW")},
            }
            consts = {
                "IS_INT": True,
                "SHIFT": layout == "nchw",
                "PACKED": packed,
                "GRAM": layout != "packed",
                "SYMMETRIC": sym,
                "SEGMENT": tk.INT_SEGMENT,
                "BM": bm,
                "BN": bn,
                "BK": bk,
                "PRECISION": "tf32x3",
                "WIDE": False,
            }
            label = f"pair {name} {'pairwise' if sym else 'cross'}"
            yield label, name, tk._pair_kernel, args, consts, warps, stages, 0


def test_pair_configs_compile_for_sm90():
    from memcore.kernels.triton import distance as tk

    _check_launches(pair_launches())
    # floats run the first configuration, packed float32 with tf32x3 products
    _layout, bm, bn, bk, warps, stages, _ = next(iter(tk.PAIR_CONFIGS.values()))
    args = {
        "a_ptr": ("*fp32", None),
        "b_ptr": ("*fp32", None),
        "an_ptr": ("*fp32", None),
        "bn_ptr": ("*fp32", None),
        "out_ptr": ("*fp32", None),
        **{
            k: ("i32", v)
            for k, v in (("N", 200), ("M", 200), ("D", SD["D"]), ("T", 16), ("per_split", SD["D"]))
        },
        **{k: ("i32", 1) for k in ("H", "W", "TH", "TW", "GW")},
    }
    consts = {
        "IS_INT": False,
        "SHIFT": False,
        "PACKED": True,
        "GRAM": False,
        "SYMMETRIC": True,
        "SEGMENT": tk.INT_SEGMENT,
        "BM": bm,
        "BN": bn,
        "BK": bk,
        "PRECISION": "tf32x3",
        "WIDE": False,
    }
    st = _compile(tk._pair_kernel, args, consts, warps, stages)
    assert st["local"] == 0 and st["smem"] <= H100_SMEM


def _knn_args(m: int = 50000, **extra) -> dict:
    """The k-NN kernels' shared arguments at the CIFAR shapes (packed int8 operands, one 1×1 tile), plus
    ``extra`` (name -> (type, value))."""
    ints = {"N": 8192, "M": m, "D": 3072, "T": 1, "n_tile": 3072}
    ptrs = {"q_ptr": "*i8", "r_ptr": "*i8", "qn_ptr": "*i64", "rn_ptr": "*i64"}
    return {
        **{k: (t, None) for k, t in ptrs.items()},
        **{k: ("i32", v) for k, v in ints.items()},
        "scale": ("fp32", None),
        **extra,
    }


def knn_launches():
    """Every k-NN GEMM launch at the CIFAR shapes: each filter configuration, the group-minimum cut, the fused
    kernel. Tuples as ``pair_launches``."""
    from memcore.kernels.triton import distance as tk

    common = {"IS_INT": True, "SEGMENT": tk.INT_SEGMENT, "PRECISION": "tf32x3"}
    for name, (bm, bn, bk, warps, stages) in tk.FILTER_CONFIGS.items():
        out = {"cut_ptr": ("*i32", None), "cnt_ptr": ("*i32", None), "buf_ptr": ("*i64", None)}
        args = _knn_args(**out, CAP=("i32", 2048))
        consts = {**common, "BM": bm, "BN": bn, "BK": bk}
        # the append epilogue on the whole block spilled 56-144 B per thread at Triton 3.6 (a row-wise
        # tl.cumsum there spilled 0.5-3.7 KB); on halves none does
        yield f"filter {name}", name, tk._knn_filter_kernel, args, consts, warps, stages, 0
    for gs in (1, 4, 128):  # the group-minimum cut over the CIFAR sample (5,000 references: groups of 4)
        args = _knn_args(5000, out_ptr=("*i32", None), G=("i32", 1250))
        consts = {**common, "BM": tk.CUT_BM, "BN": tk.CUT_BN, "GS": gs, "BK": tk.BLOCK_K}
        yield f"group-min GS={gs}", f"GS={gs}", tk._group_min_kernel, args, consts, 8, 3, 0
    # the fused kernel keeps a bitonic sort in registers (199-210 registers, no stack at Triton 3.6 and 3.9)
    args = _knn_args(
        flag_ptr=("*i32", None), out_ptr=("*i64", None), per_split=("i32", 1024), SPLITS=("i32", 7)
    )
    consts = {**common, "ACC32": True, "USE_FLAGS": False, "BM": tk.BLOCK_M, "KP": 64, "BK": tk.BLOCK_K}
    yield "fused k-NN", "fused", tk._knn_kernel, args, consts, 8, 3, 64


def test_knn_kernels_compile_for_sm90():
    _check_launches(knn_launches())


def test_epilogue_kernels_compile_for_sm90():
    from memcore.kernels.triton import distance as tk

    for gram in (False, True):
        args = {
            "s_ptr": ("*i32" if gram else "*i64", None),
            "an_ptr": ("*i64", None),
            "bn_ptr": ("*i64", None),
            "out_ptr": ("*i64", None),
            "N": ("i32", 500),
            "M": ("i32", 500),
            "W": ("i32", 8),
            "T": ("i32", 16),
            "SPLITS": ("i32", 4),
            "n_tile": ("i32", SD["D"]),
            "scale": ("fp32", None),
            "alpha": ("fp32", None),
        }
        consts = {"IS_INT": True, "SYMMETRIC": True, "GRAPH": True, "GRAM": gram, "BM": tk.BLOCK_M}
        # (the gram variant spilled 560 B per thread with int64 offsets and sums)
        assert _spilled(_compile(tk._finish_kernel, args, consts, 4, 3)) == 0
    for is_int in (True, False):
        args = {
            "buf_ptr": ("*i64", None),
            "cnt_ptr": ("*i32", None),
            "N": ("i32", 8192),
            "CAP": ("i32", 2048),
        }
        args["n_tile"] = ("i32", 3072)
        consts = {"IS_INT": is_int, "BM": 32, "BC": 128}
        assert _spilled(_compile(tk._candidates_kernel, args, consts, 4, 3)) == 0
    for packed, shift in ((True, False), (False, True)):
        args = {
            "x_ptr": ("*i8" if packed else "*u8", None),
            "out_ptr": ("*i64", None),
            "N": ("i32", 500),
            "D": ("i32", SD["D"]),
            **{k: ("i32", 1 if packed else SD[k]) for k in ("H", "W", "TH", "TW", "GW")},
        }
        consts = {"IS_INT": True, "SHIFT": shift, "PACKED": packed, "BN": 32, "BK": 128}
        assert _spilled(_compile(tk._norms_kernel, args, consts, 4, 3)) == 0


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_groupnorm_silu_kernels_compile_for_sm90(dtype):
    """The fused GroupNorm+SiLU kernels (NCHW, and NHWC's partial / stats / apply), at the launchers' own block
    sizes for UNet shapes from CIFAR's (128 channels, 32x32) to SD's (1280 channels, 8x8): no spills."""
    from memcore.kernels.triton import groupnorm_silu as gk

    x = f"*{dtype}"
    for c, g, hw in ((128, 32, 1024), (256, 32, 256), (1280, 32, 64), (320, 32, 4096)):
        cpg = c // g
        bhw, bc, warps = gk.nchw_blocks(hw, cpg)
        args = {
            "x_ptr": (x, None), "w_ptr": (x, None), "b_ptr": (x, None), "out_ptr": (x, None),
            "HW": ("i32", hw), "C": ("i32", c), "CPG": ("i32", cpg), "G": ("i32", g),
            "stride_n": ("i32", c * hw), "stride_c": ("i32", hw), "stride_hw": ("i32", 1), "eps": ("fp32", None),
        }  # fmt: skip
        consts = {"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_HW": bhw, "BLOCK_C": bc}
        assert _spilled(_compile(gk._groupnorm_silu_kernel, args, consts, warps, 3)) == 0, (c, hw, "nchw")
        bhw, bc, warps, bt = gk.nhwc_blocks(hw, c, cpg)
        n_tiles = -(-hw // bhw)
        args = {
            "x_ptr": (x, None), "pmean_ptr": ("*fp32", None), "pm2_ptr": ("*fp32", None), "HW": ("i32", hw),
            "C": ("i32", c), "CPG": ("i32", cpg), "n_tiles": ("i32", n_tiles),
        }  # fmt: skip
        consts = {"BLOCK_HW": bhw, "BLOCK_C": bc}
        assert _spilled(_compile(gk._nhwc_partial_kernel, args, consts, warps, 3)) == 0, (c, hw, "partial")
        args = {
            "pmean_ptr": ("*fp32", None), "pm2_ptr": ("*fp32", None), "mean_ptr": ("*fp32", None),
            "rstd_ptr": ("*fp32", None), "HW": ("i32", hw), "C": ("i32", c), "CPG": ("i32", cpg),
            "G": ("i32", g), "n_tiles": ("i32", n_tiles), "eps": ("fp32", None),
        }  # fmt: skip
        consts = {"TILE_HW": bhw, "BLOCK_T": bt, "BLOCK_CPG": 1 << (cpg - 1).bit_length()}
        assert _spilled(_compile(gk._nhwc_stats_kernel, args, consts, 4, 3)) == 0, (c, hw, "stats")
        args = {
            "x_ptr": (x, None), "w_ptr": (x, None), "b_ptr": (x, None), "mean_ptr": ("*fp32", None),
            "rstd_ptr": ("*fp32", None), "out_ptr": (x, None), "HW": ("i32", hw), "C": ("i32", c),
            "CPG": ("i32", cpg), "G": ("i32", g),
        }  # fmt: skip
        consts = {"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_HW": bhw, "BLOCK_C": bc}
        assert _spilled(_compile(gk._nhwc_apply_kernel, args, consts, warps, 3)) == 0, (c, hw, "apply")
