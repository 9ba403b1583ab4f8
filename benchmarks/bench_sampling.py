"""Sampling throughput: memcore's engine against the stock diffusers pipeline (same dtype, same batch).

    python benchmarks/bench_sampling.py                 # GPU: cifar10, celeba64, sd15 (random weights)
    python benchmarks/bench_sampling.py --quick         # CPU: scaled-down configurations, few steps
    python benchmarks/bench_sampling.py --compile       # the engine with torch.compile'd UNet (own CSV)
    python benchmarks/bench_sampling.py --attention cudnn   # the engine's UNet attention on cuDNN first

Configurations (random weights; FLOPs and speed do not depend on the weights):

- ``cifar10``: the ``google/ddpm-cifar10-32`` UNet2DModel configuration (35.7 M parameters, 32x32), DDIM.
- ``celeba64``: the DDIM paper's CelebA 64x64 UNet (channels 128, multipliers 1-2-2-4, attention at 16x16, two
  res blocks per level), as a UNet2DModel, DDIM.
- ``sd15``: the SD-1.x UNet2DConditionModel (64x64 latent, CLIP ViT-L text encoder, SD VAE), CFG 7.5 (the UNet
  runs at 2B), VAE decode at 512x512.

Reference: ``DDIMPipeline`` / ``StableDiffusionPipeline`` with per-seed generators, ``output_type="pt"``.
memcore: ``Sampler`` (fused step; on CUDA one CUDA graph for UNet + step, channels_last, SDPA) producing uint8
images. Both at ``--steps`` steps. Model FLOPs are counted with ``torch.utils.flop_counter`` (UNet forwards at
the run's batch x steps + VAE decode); MFU = FLOPs / time / the device's dense peak in the dtype (``--peak-tflops``,
default an H100 SXM's spec-sheet figure: 989.4 bf16/fp16, 494.7 TF32; this machine measured ~800 bf16 on a large GEMM).
Timing: wall clock around whole runs, synchronised, median of ``--repeats`` after one warm-up run. The warm-up
runs' images are compared (``max_abs_diff_u8`` / ``mean_abs_diff_u8``: memcore's uint8 against the reference's
rounded as diffusers does). A configuration that fails is a row with ``error`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # a source checkout, after an installed memcore

from _common import comma_list, device_name, time_fn, write_csv

from memcore.sampling import Sampler, SamplerConfig
from memcore.sampling.engine import ATTENTION_BACKENDS, to_uint8

CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    attention_head_dim=None,
)
CELEBA64 = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
)
QUICK_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(fa, fb, device: torch.device, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median/min seconds of ``fa`` and ``fb``, run alternately (after their warm-ups)."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fa, ta), (fb, tb)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - t0)
    return (
        {"median": statistics.median(ta), "min": min(ta)},
        {"median": statistics.median(tb), "min": min(tb)},
    )


def _offline_tokenizer(max_len: int):
    """A byte-level CLIP tokenizer built offline (no vocabulary download); token ids < 517."""
    from memcore.models.offline import offline_clip_tokenizer

    return offline_clip_tokenizer(max_len)


def build_unet_pipeline(cfg: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DModel(**cfg)
    unet = unet.to(dtype).eval().requires_grad_(False)
    return DDIMPipeline(unet, DDPMScheduler())


def build_sd_pipeline(device: torch.device, dtype: torch.dtype, quick: bool):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if quick:
        unet_kw = dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
            attention_head_dim=8,
        )
        vae_kw = dict(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
            sample_size=32,
        )
        te_cfg = CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=517
        )
        max_len = 16
        te_cfg.max_position_embeddings = max_len
    else:
        unet_kw = dict(
            cross_attention_dim=768, sample_size=64
        )  # diffusers' defaults are the SD-1.x UNet otherwise;
        # sample_size must be set: the stock pipeline derives the image size from it (None crashed the H100 run)
        vae_kw = dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
        te_cfg = CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12
        )
        max_len = 77
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_kw)
        vae = AutoencoderKL(latent_channels=4, **vae_kw)
        te = CLIPTextModel(te_cfg)
    mods = [m.to(dtype).eval().requires_grad_(False) for m in (unet, vae, te)]
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=mods[0],
        vae=mods[1],
        text_encoder=mods[2],
        tokenizer=_offline_tokenizer(max_len),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def count_flops(sampler: Sampler, seeds: list[int], conds, steps: int) -> float:
    """Model FLOPs of one run of ``len(seeds)`` images: UNet forward at the run's batch x steps + VAE decode."""
    from torch.utils.flop_counter import FlopCounterMode

    lm = sampler.model
    b = sampler.config.batch_size
    x = torch.randn((b, *lm.sample_shape), device=sampler.device, dtype=lm.unet.dtype)
    kwargs = sampler._unet_kwargs(list(conds) if conds is not None else [None] * b)
    x2 = torch.cat([x] * 2) if sampler.cfg_scale is not None else x
    # The eager module, not sampler.unet_fn: with --compile that would compile under the counting mode.
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        sampler.unet(x2, sampler.t_device[0], return_dict=False, **kwargs)
    total = fc.get_total_flops() * steps
    if lm.latent:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            lm.vae.decode(x / lm.vae_scaling_factor, return_dict=False)
        total += fc.get_total_flops()
    return float(total)


CONFIGS = ("cifar10", "celeba64", "sd15")


def _batch_arg(raw: str) -> dict[str, int]:
    """``--batch cifar10=256,sd15=8`` -> {config: batch}."""
    out = {}
    for item in (x for x in raw.split(",") if x):
        key, _, val = item.partition("=")
        if key not in CONFIGS or not val.isdigit() or int(val) < 1:
            raise argparse.ArgumentTypeError(f"expected config=batch with config in {CONFIGS}, got {item!r}")
        out[key] = int(val)
    return out


def _inductor_arg(raw: str) -> dict[str, object]:
    """``--inductor key=value,...`` -> ``torch._inductor.config`` settings (ints and true/false; an unknown
    key is an error, so a typo cannot silently measure the defaults)."""
    import torch._inductor.config as ic

    out: dict[str, object] = {}
    for item in (x for x in raw.split(",") if x):
        key, _, val = item.partition("=")
        if not hasattr(ic, key):
            raise argparse.ArgumentTypeError(f"torch._inductor.config has no {key!r}")
        low = val.strip().lower()
        value: object = (
            low in ("1", "true", "yes") if low in ("0", "1", "true", "false", "yes", "no") else val
        )
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        out[key] = value
    return out


def _peak_tflops(args, dtype: torch.dtype) -> float:
    """The MFU denominator: ``--peak-tflops``, else the H100 SXM dense peak of the dtype (memcore's cost model's
    figures; float32 convolutions and matmuls run as TF32 with PyTorch's CUDA defaults for cuDNN)."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    from memcore.attacks.cost import H100_BF16_TFLOPS, H100_TF32_TFLOPS

    return H100_BF16_TFLOPS if dtype in (torch.bfloat16, torch.float16) else H100_TF32_TFLOPS


def run_config(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    b, steps = args.batch.get(name, args.default_batch), args.steps
    seeds = list(range(b))
    quick = args.quick
    if name == "sd15":
        pipe = build_sd_pipeline(device, dtype, quick)
        prompts = ["an astronaut riding a horse" if not quick else "a horse"] * b
    else:
        cfg = {"cifar10": CIFAR10, "celeba64": CELEBA64}[name]
        pipe = build_unet_pipeline(QUICK_UNET if quick else cfg, device, dtype)
        prompts = None
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in pipe.unet.parameters())

    def reference() -> torch.Tensor:
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        with torch.no_grad():
            if prompts is None:
                out = pipe(batch_size=b, generator=gens, num_inference_steps=steps, output_type="pt")
            else:
                out = pipe(
                    prompts[0],
                    num_images_per_prompt=b,
                    generator=gens,
                    num_inference_steps=steps,
                    output_type="pt",
                )
        return out.images

    ref_images = reference()  # warm-up
    fast = device.type == "cuda"
    cfg = SamplerConfig(
        num_inference_steps=steps,
        batch_size=b,
        mode=args.mode,
        cuda_graphs=fast and not args.no_graphs,
        channels_last=fast,
        compile=args.compile,
        compile_mode=args.compile_mode,
        fuse_norm=args.fuse_norm,
        # fused Q/K/V projections: the text-to-image UNet only (the pixel-space UNets have no such method)
        fuse_qkv=args.fuse_qkv and name.startswith("sd"),
        attention=args.attention,
    )
    # The engine gets its own copy: its options (channels_last, fused norms) change a UNet in place, and the
    # reference must stay the stock pipeline.
    sampler = Sampler(copy.deepcopy(pipe), cfg, device=device)

    def memcore_run() -> torch.Tensor:
        return sampler.sample(seeds, prompts)

    flops = count_flops(sampler, seeds, prompts, steps)
    _sync(device)
    t0 = time.perf_counter()
    # warm-up: CUDA graph capture, caches, the one-time torch.compile with --compile
    mc_images = memcore_run()
    _sync(device)
    t_warm = time.perf_counter() - t0
    # The same images, or the speedup is of different work: memcore's uint8 against the reference's [0, 1]
    # images rounded as diffusers' numpy_to_pil (parity mode on the CPU: 0; a float16 pipeline's float16
    # rounding can move a pixel by 1; compile, bf16 kernels and the fp32 step mode drift further)
    diff = (mc_images.int() - to_uint8(ref_images.float()).int()).abs()
    u8_diff = {"max_abs_diff_u8": int(diff.max()), "mean_abs_diff_u8": round(float(diff.float().mean()), 4)}
    del ref_images, mc_images, diff
    # Alternate the two so that load from other processes (shared CPUs) hits both alike.
    t_ref, t_mc = _time_pair(reference, memcore_run, device, args.repeats)
    row = {
        "config": name + ("-quick" if quick else ""),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": b,
        "steps": steps,
        "unet_params_M": round(params / 1e6, 2),
        "step_backend": sampler.step_backend,
        "kernel_backend": sampler.kernel_backend,
        "cuda_graphs": sampler.use_graphs,
        "compile": cfg.compile,
        "compile_mode": cfg.compile_mode if cfg.compile else "",
        "fuse_norm": cfg.fuse_norm,
        "fuse_qkv": cfg.fuse_qkv,
        "attention": cfg.attention,
        "inductor": ",".join(f"{k}={v}" for k, v in args.inductor.items()),
        "memcore_first_run_s": round(t_warm, 3),  # includes the compile with --compile
        "model_tflop_per_image": round(flops / b / 1e12, 4),
        "ref_s": round(t_ref["median"], 4),
        "memcore_s": round(t_mc["median"], 4),
        "ref_images_per_s": round(b / t_ref["median"], 3),
        "memcore_images_per_s": round(b / t_mc["median"], 3),
        "speedup": round(t_ref["median"] / t_mc["median"], 3),
        **u8_diff,
    }
    if sampler.model.latent:
        # the VAE decode's share of memcore's time (one micro-batch of latents, as the engine decodes them)
        lat = torch.randn((b, *sampler.model.sample_shape), device=device, dtype=sampler.model.unet.dtype)
        t_dec = time_fn(lambda: sampler.decode(lat), device, repeats=args.repeats)
        row["memcore_decode_s"] = round(t_dec["median"], 4)
        row["decode_share"] = round(t_dec["median"] / t_mc["median"], 4)
    if device.type == "cuda":
        row["peak_tflops"] = _peak_tflops(args, dtype)
        peak = row["peak_tflops"] * 1e12
        row["ref_mfu"] = round(flops / t_ref["median"] / peak, 4)
        row["memcore_mfu"] = round(flops / t_mc["median"] / peak, 4)
    else:
        row["ref_gflop_per_s"] = round(flops / t_ref["median"] / 1e9, 2)
        row["memcore_gflop_per_s"] = round(flops / t_mc["median"] / 1e9, 2)
    print(json.dumps(row), flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke: scaled-down models, few steps")
    ap.add_argument("--device", default=None)
    ap.add_argument("--configs", type=comma_list(CONFIGS), default=",".join(CONFIGS))
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default), float16, float32 (CPU default)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=_batch_arg, default={}, help="per-config batch, e.g. cifar10=256,sd15=8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", default="parity", choices=["parity", "fp32"])
    ap.add_argument(
        "--compile", action="store_true", help="SamplerConfig(compile=True): torch.compile the UNet"
    )
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"],
        help="torch.compile mode (the last two need --no-graphs on CUDA)",
    )
    ap.add_argument(
        "--inductor",
        type=_inductor_arg,
        default={},
        help="torch._inductor.config settings for --compile, e.g. conv_1x1_as_mm=1,coordinate_descent_tuning=1",
    )
    ap.add_argument("--fuse-norm", action="store_true")
    ap.add_argument("--fuse-qkv", action="store_true", help="fused Q/K/V projections (SD configuration)")
    ap.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="SDPA kernel memcore's UNet tries first (the reference keeps PyTorch's choice)",
    )
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak for MFU (default: an H100 SXM's in the dtype, 989.4 for bfloat16/float16, "
        "494.7 TF32 for float32; the CSV's peak_tflops column says which)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: OpenMP spin-waits on shared cores skew timings)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.inductor:
        import torch._inductor.config as ic

        for key, value in args.inductor.items():
            setattr(ic, key, value)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        device = torch.device(args.device or "cpu")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    args.steps = args.steps or (10 if args.quick else 50)
    defaults = (
        {"cifar10": 256, "celeba64": 64, "sd15": 8}
        if not args.quick
        else {"cifar10": 4, "celeba64": 4, "sd15": 2}
    )
    args.default_batch = 4
    batch_spec = args.batch
    args.batch = {**defaults, **batch_spec}
    all_configs = args.configs == ",".join(CONFIGS)  # before --quick drops one: the CSV name
    if args.quick:
        args.configs = ",".join(
            c for c in args.configs.split(",") if c != "celeba64"
        )  # one pixel UNet is enough
    torch.backends.cudnn.benchmark = False
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"device {device_name(device)}, dtype {dtype}, steps {args.steps}", flush=True)
    rows = []
    failed = []
    for name in args.configs.split(","):
        try:
            rows.append(run_config(name, args, device, dtype))
        except Exception as exc:  # report and go on with the next configuration
            traceback.print_exc()
            # a row that says so (not a CSV silently short of a configuration), and a failing exit status
            failed.append(name)
            rows.append({"config": name + ("-quick" if args.quick else ""), "error": repr(exc)[:500]})
    for r in rows:
        if "error" in r:
            print(f"{r['config']:>14}: FAILED {r['error']}")
            continue
        print(
            f"{r['config']:>14}: memcore {r['memcore_images_per_s']:9.3f} img/s, reference {r['ref_images_per_s']:9.3f} img/s, x{r['speedup']:.2f}"
        )
    # one CSV per variant, so the runs of one GPU session do not overwrite each other
    tag = (
        ("_quick" if args.quick else "")
        + ("" if all_configs else "_" + args.configs.replace(",", "-"))
        + ("_fp32" if args.mode == "fp32" else "")
        + ("_fusenorm" if args.fuse_norm else "")
        + ("_fuseqkv" if args.fuse_qkv else "")
        + ("" if args.attention == "auto" else "_attn-" + args.attention)
        + ("_inductor" if args.inductor else "")
        + ("_compile" if args.compile else "")
        + ("" if args.compile_mode == "default" else "-" + args.compile_mode)
        + ("_b" + "-".join(str(v) for v in batch_spec.values()) if batch_spec else "")
    )
    write_csv("bench_sampling" + tag, rows, device)
    if failed:
        print(f"bench_sampling: failed configurations: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
