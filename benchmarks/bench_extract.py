"""End-to-end extraction: memcore against the reference path (diffusers loop + torch distances + networkx).

    python benchmarks/bench_extract.py [--quick] [--device cpu|cuda] [--cases demo,cifar,sd,memory]

Cases:
- ``demo``: the bundled class-conditional demo model (digits 0-9, verification against the 1,797 digits).
- ``cifar``: the google/ddpm-cifar10-32 UNet configuration with random weights (unconditional: generate-and-
  filter on one condition + NN extraction against a random 50,000-image training set on the GPU).
- ``sd``: a Stable-Diffusion-1.x-layout pipeline with random weights (SD-1.x UNet and VAE configurations, a
  CLIP-L-sized text encoder with a tiny offline tokenizer), text prompts with CFG 7.5, fp16 (GPU only).
- ``reuse``: a tool's many small extractions (one condition per call, unconditional CIFAR-layout UNet, the
  training set as an ``.npy`` file): the model and file given to every call against one
  ``memcore.extraction_sampler`` and one ``memcore.extraction_training_set`` built up front; seconds per call.
- ``memory``: peak host RSS and peak device memory of the unconditional NN extraction at 10^4, 10^5, 10^6
  candidates (``--quick`` and CPU: 10^3, 10^4, or ``--memory-sizes``) with a fixed training set, each in a
  fresh process; the target is flat memory (the model is a small 32x32 UNet run for one step: memory does not depend on the UNet).

For each e2e case: images/s of memcore and of the reference path, their ratio, and the share of wall time
outside sampling, ``(T_extract - T_sampling_only) / T_extract`` where ``T_sampling_only`` is memcore's
sampler alone streaming the same jobs (target < 0.1 % on the GPU). CSV: benchmarks/results/extract[_<cases>]_<device>.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # a source checkout, after an installed memcore
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import comma_list, write_csv

from memcore.attacks import carlini


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- models
def cifar_unet(small: bool = False):
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    if small:
        unet = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )  # fmt: skip
    else:  # google/ddpm-cifar10-32
        unet = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=32, attention_head_dim=None, dropout=0.1,
        )  # fmt: skip
    return unet.eval(), DDIMScheduler(num_train_timesteps=1000)


def sd_pipeline():
    """SD-1.x layout with random weights (FLOPs do not depend on weights)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )  # fmt: skip
    from memcore.models.offline import offline_clip_tokenizer

    tok = offline_clip_tokenizer(77)
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            num_hidden_layers=12, max_position_embeddings=77, bos_token_id=len(tok) - 2,
            eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1,
        )
    )  # fmt: skip
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- timing
def _best_of(fns: dict, device: torch.device) -> tuple[dict, dict]:
    """For each label -> fn: (least wall seconds of ``REPEATS`` synchronized calls, the last call's result).

    The minimum, because CPU timings on a shared machine are noisy; the calls are interleaved (a, b, a, b, ...)
    so that a slow spell of the machine falls on both sides of a ratio, not on one (run one after the other,
    the CPU demo case read 0.89x and then 1.21x)."""
    best = {k: float("inf") for k in fns}
    res: dict = {}
    for _ in range(REPEATS):
        for label, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            res[label] = fn()
            _sync(device)
            best[label] = min(best[label], time.perf_counter() - t0)
    return best, res


def sampling_only(model, conditions, config, device):
    """A function streaming the run's jobs through memcore's sampler alone (the UNet-bound floor).

    The model is loaded once, here, so that :func:`_best_of` can time the function interleaved with the
    extractions it is the floor of (timed apart, a slow spell of a shared machine on one side made the share
    outside sampling negative: -8.8 % for the CPU cifar-small case at cea0438). Each call makes a fresh
    sampler, as each extraction does: its set-up (text embeddings, CUDA graph capture on the first batch)
    counts as sampling on both sides, and a single timed call on the GPU is not flattered by a warm one."""
    m = carlini._load_model(model, config, device)
    conds = carlini._conditions_for(m, conditions)
    n = config.num_per_condition
    n_total = lambda g: max(n, config.nn_candidates or n) if m.kind == "unet" else n  # noqa: E731
    jobs = [
        (g, None if m.kind == "unet" else conds[g], config.seed_of(g, i)) for g in range(len(conds))
        for i in range(n_total(g))
    ]  # fmt: skip

    def run() -> None:
        sampler = carlini._make_sampler(m, config, device)
        last = None
        for imgs in sampler(iter(jobs)):
            last = imgs
        if last is not None:
            last.sum().item()

    return run


def _outcome(res) -> tuple:
    """What an extraction decided: per condition the flag, clique, medoid and nearest training image; the NN
    extraction's training images and seeds. Float distances are left out (the reference computes them in
    another order); the decisions must agree, or the two paths of a ratio did different work."""
    conds = tuple(
        (c.condition_id, c.flagged, c.clique_members, c.medoid_index, c.nearest_train_index)
        for c in res.conditions
    )
    nn = (res.nn.extracted_train_indices, res.nn.seeds) if res.nn is not None else None
    return conds, nn


def e2e(name, model, conditions, config, train, device, *, reference: bool) -> list[dict]:
    rows = []
    n_images = config.num_per_condition * (len(conditions) if conditions else 1)
    if conditions is None and train is not None and config.nn_candidates:
        n_images = max(config.num_per_condition, config.nn_candidates)
    paths = [("memcore", config)]
    if reference:
        paths.append(("reference", dataclasses.replace(config, sampler="reference", backend="reference")))
    for _label, cfg in paths:
        # warm-up (kernels, allocator, cuDNN, Triton's JIT and memcore's distance autotuning, which tunes
        # once per shape class): the whole run at its shapes (graph rows up to N, the NN k-NN blocks against
        # the training set), sampled with one step so that it costs little
        warm = dataclasses.replace(cfg, num_inference_steps=1)
        carlini.extract(
            model,
            conditions[:1] if conditions else None,
            config=warm,
            train=train,
            device=device,
            report=False,
        )
    fns = {
        label: lambda cfg=cfg: carlini.extract(
            model, conditions, config=cfg, train=train, device=device, report=False
        )
        for label, cfg in paths
    }
    fns["sampling_only"] = sampling_only(model, conditions, config, device)
    times, results = _best_of(fns, device)
    for label, cfg in paths:
        res = results[label]
        rows.append({
            "case": name, "path": label, "images": n_images, "seconds": round(times[label], 4),
            "images_per_s": round(n_images / times[label], 3), "flagged": res.summary["counts"]["flagged"],
            "steps": cfg.num_inference_steps, "batch_size": cfg.micro_batch,
        })  # fmt: skip
    if device.type == "cuda":
        # where the time outside sampling goes: one more run with the device synchronized around each stage
        prof = dataclasses.replace(config, sync_timing=True)
        res = carlini.extract(model, conditions, config=prof, train=train, device=device, report=False)
        stages = {k: round(v, 4) for k, v in res.summary["timings"].items()}
        rows[0]["stage_seconds_synced"] = json.dumps(stages, sort_keys=True)
        print(f"[{name}] stages (synchronized run): {stages}", flush=True)
    t_s = times["sampling_only"]
    outside = (times["memcore"] - t_s) / times["memcore"]
    rows[0]["sampling_only_s"] = round(t_s, 4)
    rows[0]["outside_sampling_share"] = round(outside, 6)
    # the least of a few runs each: a negative share is a difference inside the machine's timing noise
    noise = " (below timing noise)" if outside < 0 else ""
    msg = f"[{name}] memcore {rows[0]['images_per_s']} img/s, outside sampling {outside:.3%}{noise}"
    if reference:
        rows[0]["speedup_vs_reference"] = round(times["reference"] / times["memcore"], 3)
        same = _outcome(results["memcore"]) == _outcome(results["reference"])
        rows[0]["same_result_as_reference"] = same
        if not same:
            msg += "; RESULTS DIFFER FROM THE REFERENCE'S"
        msg += f"; reference {rows[1]['images_per_s']} img/s; ratio {rows[0]['speedup_vs_reference']}x"
    print(msg, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------- reuse
def reuse(name, model, calls, config, train_path, device) -> list[dict]:
    """Many small extractions, as a tool embedding memcore makes them (one call per condition list): each call
    given the model directory and the training file (``fresh``: the model loaded, the file read, the set
    uploaded and the CUDA graphs captured again every call) against one ``extraction_sampler`` and one
    ``extraction_training_set`` built up front (``reused``; their build time is counted). Both give the same
    records (checked)."""
    cfg = lambda i: dataclasses.replace(config, seed=config.seed + 1_000_003 * i)  # noqa: E731
    carlini.extract(model, calls[0], config=cfg(0), train=train_path, device=device, report=False)  # warm-up

    def fresh() -> list:
        return [
            carlini.extract(model, c, config=cfg(i), train=train_path, device=device, report=False)
            for i, c in enumerate(calls)
        ]

    def reused() -> list:
        sampler = carlini.extraction_sampler(model, config, device=device)
        train = carlini.extraction_training_set(train_path, config, device=device)
        return [
            carlini.extract(sampler, c, config=cfg(i), train=train, report=False) for i, c in enumerate(calls)
        ]

    times, out = _best_of({"fresh": fresh, "reused": reused}, device)
    records = [[r.to_record() for r in res.conditions] for res in out["fresh"]]
    assert records == [[r.to_record() for r in res.conditions] for res in out["reused"]], "records differ"
    n_images = sum(r.num_candidates for res in out["fresh"] for r in res.conditions)
    rows = [
        {
            "case": name, "path": label, "calls": len(calls), "seconds": round(times[label], 4),
            "seconds_per_call": round(times[label] / len(calls), 4), "steps": config.num_inference_steps,
            "batch_size": config.micro_batch, "images": n_images,
        }
        for label in ("fresh", "reused")
    ]  # fmt: skip
    rows[1]["speedup_vs_fresh"] = round(times["fresh"] / times["reused"], 3)
    saved = (times["fresh"] - times["reused"]) / len(calls)
    print(
        f"[{name}] {len(calls)} calls: fresh {times['fresh']:.3f}s, reused {times['reused']:.3f}s "
        f"({rows[1]['speedup_vs_fresh']}x; {saved * 1e3:.1f} ms saved per call)",
        flush=True,
    )
    return rows


# ---------------------------------------------------------------------------------------------------- memory
def memory_child(n_candidates: int, device: torch.device, quick: bool) -> dict:
    model = cifar_unet(small=True) if not quick else _tiny_uncond()
    shape = (3, 32, 32) if not quick else (1, 8, 8)
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (50_000 if not quick else 1_000, *shape), generator=g, dtype=torch.uint8)
    cfg = carlini.ExtractConfig(
        num_per_condition=64, nn_candidates=n_candidates, num_inference_steps=1, batch_size=512 if not quick else 256,
        grid=(4, 4) if not quick else (2, 2), save_images="none",
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    res = carlini.extract(model, None, config=cfg, train=train, device=device, report=False)
    _sync(device)
    return {
        "candidates": n_candidates,
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_device_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if device.type == "cuda"
        else 0,
        "nn_extracted": len(res.nn.extracted_train_indices) if res.nn else 0,
    }


def _tiny_uncond():
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    return unet.eval(), DDIMScheduler(num_train_timesteps=100)


def memory_case(device: torch.device, quick: bool, sizes: tuple[int, ...] | None = None) -> list[dict]:
    sizes = sizes or ((1_000, 10_000) if quick else (10_000, 100_000, 1_000_000))
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--child-memory", str(n), "--device", str(device)] + (
            ["--quick"] if quick else []
        )
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"memory child for {n} candidates failed")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        row["case"] = "memory"
        rows.append(row)
        print(
            f"[memory] {n:>9,} candidates: host {row['peak_host_rss_mb']} MB, device {row['peak_device_mb']} MB, "
            f"{row['seconds']} s",
            flush=True,
        )
    base = rows[0]
    for r in rows:
        r["host_vs_smallest"] = round(r["peak_host_rss_mb"] / base["peak_host_rss_mb"], 3)
        if base["peak_device_mb"]:
            r["device_vs_smallest"] = round(r["peak_device_mb"] / base["peak_device_mb"], 3)
    return rows


# ------------------------------------------------------------------------------------------------------ main
CASES = ("demo", "cifar", "sd", "memory", "reuse")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small CPU sizes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--cases", type=comma_list(CASES), default=None, help="comma list of demo,cifar,sd,memory,reuse"
    )
    ap.add_argument(
        "--memory-sizes",
        default=None,
        help="comma list of candidate counts for the memory case (e.g. 10000,100000,1000000 with the small "
        "CPU shapes); default 10^3,10^4 on CPU/--quick, 10^4..10^6 on the GPU",
    )
    ap.add_argument(
        "--tag",
        default=None,
        help="CSV name suffix: extract_<tag>_<device>.csv (default: the --cases list, so runs of different cases "
        "do not overwrite each other)",
    )
    ap.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    global REPEATS
    REPEATS = 1 if device.type == "cuda" else 2
    if args.child_memory is not None:
        print(json.dumps(memory_child(args.child_memory, device, args.quick)))
        return 0
    gpu = device.type == "cuda"
    cases = (
        args.cases.split(",")
        if args.cases
        else (["demo", "cifar", "sd", "memory", "reuse"] if gpu else ["demo", "cifar", "memory", "reuse"])
    )
    rows: list[dict] = []
    if "demo" in cases:
        try:
            from memcore.models.demo import demo_model_dir, demo_training_set

            model, train = demo_model_dir("cond"), demo_training_set("cond").images
        except (ImportError, FileNotFoundError) as exc:
            print(f"[demo] skipped: {exc}")
        else:
            n, steps = (20, 10) if args.quick else (100, 50)
            cfg = carlini.ExtractConfig(num_per_condition=n, num_inference_steps=steps, batch_size=n)
            rows += e2e("demo", model, list(range(10)), cfg, train, device, reference=True)
    if "cifar" in cases:
        small = args.quick or not gpu
        model = cifar_unet(small=small)
        n, nn, steps, ntrain = (32, 64, 5, 2_000) if small else (500, 2_000, 50, 50_000)
        train = torch.randint(
            0, 256, (ntrain, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
        )
        cfg = carlini.ExtractConfig(
            num_per_condition=n,
            nn_candidates=nn,
            num_inference_steps=steps,
            batch_size=min(n, 250),
            save_images="none",
        )
        rows += e2e("cifar" + ("-small" if small else ""), model, None, cfg, train, device, reference=True)
    if "sd" in cases:
        if not gpu:
            print("[sd] skipped: GPU only")
        else:
            pipe = sd_pipeline()
            cfg = carlini.ExtractConfig(
                num_per_condition=100,
                num_inference_steps=50,
                batch_size=50,
                dtype="float16",
                save_images="none",
            )
            rows += e2e("sd", pipe, ["a photo of a cat", "an astronaut"], cfg, None, device, reference=True)
    if "reuse" in cases:
        import tempfile

        import numpy as np

        small = args.quick or not gpu
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "cifar"
            unet, sched = cifar_unet(small=small)
            unet.save_pretrained(model)
            sched.save_pretrained(model)
            n, steps, ntrain, k = (16, 3, 2_000, 4) if small else (250, 50, 50_000, 8)
            train = np.random.default_rng(1).integers(0, 256, (ntrain, 3, 32, 32), dtype=np.uint8)
            np.save(Path(tmp) / "train.npy", train)
            cfg = carlini.ExtractConfig(
                num_per_condition=n, num_inference_steps=steps, batch_size=n, save_images="none"
            )
            rows += reuse(
                "reuse-cifar" + ("-small" if small else ""),
                model,
                [None] * k,
                cfg,
                Path(tmp) / "train.npy",
                device,
            )
    if "memory" in cases:
        sizes = tuple(int(x) for x in args.memory_sizes.split(",")) if args.memory_sizes else None
        rows += memory_case(device, args.quick or not gpu, sizes)
    if rows:
        tag = args.tag or (args.cases.replace(",", "-") if args.cases else None)
        write_csv("extract" + (f"_{tag}" if tag else ""), rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
