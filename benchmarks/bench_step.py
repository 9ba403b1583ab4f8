"""Benchmark: the fused sampler step and fused GroupNorm+SiLU against the reference paths, in GB/s.

    python benchmarks/bench_step.py            # GPU shapes (SD latents with CFG, CIFAR DDPM; UNet GN+SiLU)
    python benchmarks/bench_step.py --quick    # tiny CPU shapes, few repeats

Step: ``fused_step`` (auto backend: cuda on GPU, the C++ core on CPU; also triton on GPU) against
diffusers' ``DDIMScheduler.step`` / ``DDPMScheduler.step`` with the pipeline's CFG combine (the reference).
Bytes moved = what one fused pass must read and write (sample, model output(s), noise, prev_sample), so
GB/s is comparable across paths and against the device's ceiling (H100 ~3 TB/s).
GroupNorm+SiLU: the Triton kernel against ``F.group_norm`` -> ``F.silu`` (2 passes + statistics).
Every row is compared with the reference's output (``exact_vs_reference``, ``max_abs_diff_vs_reference``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import time_fn, write_csv

from memcore.ops.norm import groupnorm_silu
from memcore.ops.step import StepConfig, fused_step
from memcore.sampling.schedule import make_plan

# (name, scheduler kind, shape [B, C, H, W], dtype, CFG, eta)
STEP_GPU = [
    ("sd15-latent-cfg-b8", "ddim", (8, 4, 64, 64), torch.float16, True, 0.0),
    ("sd15-latent-cfg-b32", "ddim", (32, 4, 64, 64), torch.bfloat16, True, 0.0),
    ("cifar-ddpm-b256", "ddpm", (256, 3, 32, 32), torch.float32, False, 0.0),
    ("cifar-ddim-eta1-b1024", "ddim", (1024, 3, 32, 32), torch.float16, False, 1.0),
]
STEP_CPU = [
    ("tiny-ddim-cfg", "ddim", (2, 4, 16, 16), torch.float16, True, 0.0),
    ("tiny-ddpm", "ddpm", (4, 3, 32, 32), torch.float32, False, 0.0),
    ("sd-latent-cfg-b4-fp16", "ddim", (4, 4, 64, 64), torch.float16, True, 0.0),
    ("sd-latent-cfg-b4-fp32", "ddim", (4, 4, 64, 64), torch.float32, True, 0.0),
]
# (name, shape, groups, dtype, channels_last)
GN_GPU = [
    ("cifar-unet-128x32x32-b128", (128, 128, 32, 32), 32, torch.float16, True),
    ("cifar-unet-256x16x16-b128", (128, 256, 16, 16), 32, torch.float16, True),
    ("cifar-unet-128x32x32-b128-nchw", (128, 128, 32, 32), 32, torch.float16, False),
    ("sd15-320x64x64-b2", (2, 320, 64, 64), 32, torch.float16, True),
]
GN_CPU = [("tiny-32x8x8", (2, 32, 8, 8), 8, torch.float32, False)]


def bench_step(device: torch.device, cases, repeats: int) -> list[dict]:
    from diffusers import DDIMScheduler, DDPMScheduler

    rows = []
    for name, kind, shape, dtype, cfg, eta in cases:
        sched = DDIMScheduler() if kind == "ddim" else DDPMScheduler()
        plan = make_plan(sched, 50)
        config = StepConfig.from_scheduler(sched, eta=eta)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=g).to(device, dtype)
        mo_shape = (2 * shape[0], *shape[1:]) if cfg else shape
        mo = torch.randn(mo_shape, generator=g).to(device, dtype)
        noise = torch.randn(shape, generator=g).to(device, dtype)
        gs = 7.5 if cfg else None
        needs_noise = eta > 0 or kind == "ddpm"
        nbytes = (x.numel() * (2 + (2 if cfg else 1) + (1 if needs_noise else 0))) * x.element_size()
        backends = ["reference", "auto"] + (["triton"] if device.type == "cuda" else [])
        ref_t = ref_out = None
        for backend in backends:
            fn = functools.partial(
                fused_step, x, mo, plan, 10, config, guidance_scale=gs, noise=noise, backend=backend
            )
            # a fast wrong answer must not read as a speedup: parity mode is bit-identical to diffusers
            out = fn()
            ref_out = out if backend == "reference" else ref_out
            exact, diff = _compare(out, ref_out)
            t = time_fn(fn, device, repeats=repeats)
            ref_t = t["median"] if backend == "reference" else ref_t
            gbs = nbytes / t["median"] / 1e9
            speedup = ref_t / t["median"]
            print(
                f"step {name:26s} {backend:9s} {t['median'] * 1e6:10.1f} us  {gbs:8.2f} GB/s  x{speedup:6.2f}"
                + ("" if exact else f"  NOT EXACT (max |diff| {diff:.3g})")
            )
            rows.append(
                dict(
                    bench="step",
                    case=name,
                    backend=backend,
                    dtype=str(dtype).replace("torch.", ""),
                    shape="x".join(map(str, shape)),
                    median_s=t["median"],
                    min_s=t["min"],
                    gb_per_s=gbs,
                    speedup_vs_reference=speedup,
                    exact_vs_reference=exact,
                    max_abs_diff_vs_reference=diff,
                )
            )
    return rows


def _compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """(bit-identical, max |out - ref| in float64) of one backend's output against the reference's."""
    diff = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    return bool(torch.equal(out, ref)), diff


def bench_groupnorm(device: torch.device, cases, repeats: int) -> list[dict]:
    rows = []
    for name, shape, groups, dtype, cl in cases:
        x = torch.randn(shape, device=device, dtype=dtype)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        w = torch.randn(shape[1], device=device, dtype=dtype)
        b = torch.randn(shape[1], device=device, dtype=dtype)
        nbytes = 2 * x.numel() * x.element_size()  # one read, one write: the fused floor
        backends = ["reference"] + (["triton"] if device.type == "cuda" else [])
        ref_t = ref_out = None
        for backend in backends:
            fn = functools.partial(groupnorm_silu, x, groups, w, b, 1e-5, backend=backend)
            with torch.no_grad():
                out = fn()  # compared, not only timed (the kernel rounds differently: max |diff| recorded)
                ref_out = out if backend == "reference" else ref_out
                exact, diff = _compare(out, ref_out)
                t = time_fn(fn, device, repeats=repeats)
            ref_t = t["median"] if backend == "reference" else ref_t
            gbs = nbytes / t["median"] / 1e9
            speedup = ref_t / t["median"]
            print(
                f"gn+silu {name:30s} {backend:9s} {t['median'] * 1e6:10.1f} us  {gbs:8.2f} GB/s  x{speedup:6.2f}"
                f"  max |diff| {diff:.3g}"
            )
            rows.append(
                dict(
                    bench="groupnorm_silu",
                    case=name,
                    backend=backend,
                    dtype=str(dtype).replace("torch.", ""),
                    shape="x".join(map(str, shape)) + ("-cl" if cl else ""),
                    median_s=t["median"],
                    min_s=t["min"],
                    gb_per_s=gbs,
                    speedup_vs_reference=speedup,
                    exact_vs_reference=exact,
                    max_abs_diff_vs_reference=diff,
                )
            )
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU shapes, few repeats")
    ap.add_argument("--device", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    gpu = device.type == "cuda"
    repeats = 3 if args.quick else 10
    rows = bench_step(device, STEP_GPU if gpu else STEP_CPU, repeats)
    rows += bench_groupnorm(device, GN_GPU if gpu else GN_CPU, repeats)
    write_csv("bench_step", rows, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
