"""Train (``train_demo``) and check (``validate_demo``) the bundled demo models.

``train_demo`` reproduces ``memcore/models/demo_weights/{cond,uncond}`` from scikit-learn's ``load_digits``
(recipe in :mod:`memcore.models.demo`): DDPM training with epsilon prediction, 1,000 linear-beta steps
(1e-4 to 0.02, diffusers' defaults), AdamW with a short warm-up and a cosine decay, and an exponential moving
average of the weights, which is what gets saved (float16). It runs on a CPU or a GPU. The defaults (2,000
steps of 64 images, a 0.64 M-parameter UNet) cost ~0.19 s of CPU time per step on one core of this project's
build machine, ~6.5 minutes per variant on an idle core; the bundled weights took 19.4 minutes of wall time
per variant with both variants training at once on a 2-core machine shared with other jobs.
``main(argv)`` is the ``memcore train-demo`` command line. Training on a CPU with one thread (the default of
both, ``threads=1`` / ``--threads 1``, as the bundled weights were trained) is deterministic: a second run of
``train_demo(out, variant="cond")`` (9.6 minutes, same machine) reproduced the bundled ``cond`` weights bit for
bit. Another thread count sums in another order and gives other weights (40 steps of the ``cond`` model: one
and two threads give safetensors files with different digests, each the same run to run); so may another CPU
type, torch version or a GPU, where only the memorization (``validate_demo``), not the bits, is to be
expected. The logged loss is the mean over the last ``log_every`` steps.

``validate_demo`` measures memorization with a plain diffusers DDIM loop and a few lines of torch (no memcore
kernels, so it also checks them from outside): per class the fraction of samples near the planted image, the
largest clique of near-identical samples (tiled L2 ≤ alpha on a 4×4 grid, networkx), whether its medoid is
the planted image; for the unconditional model the nearest-neighbour ratio test of SPEC §3.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memcore.models.demo import (
    IMAGE_SIZE,
    NUM_CLASSES,
    RECIPE_FILE,
    VARIANTS,
    DemoRecipe,
    DemoTrainingSet,
    build_training_set,
    demo_training_set,
    load_demo,
)
from memcore.utils.device import resolve_device

# The defaults that produced the bundled weights.
DEFAULT_STEPS = 2000
DEFAULT_BATCH = 64
DEFAULT_LR = 1e-3
DEFAULT_CHANNELS = (16, 32, 64)
EMA_DECAY = 0.995
# validate_demo's report of the weights beside it (``--validate`` writes it; training removes a stale one)
VALIDATION_FILE = "validation.json"
WARMUP = 100
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


@dataclass(frozen=True)
class TrainResult:
    """What ``train_demo`` did.

    Attributes:
        out_dir: the model directory written (diffusers layout + ``recipe.json`` + ``train_info.json``).
        variant: ``"cond"`` or ``"uncond"``.
        steps: optimizer steps run.
        seconds: wall time of the training loop.
        final_loss: mean training loss over the last 100 steps (or fewer).
        training_set_sha256: hash of the training set (:meth:`DemoTrainingSet.sha256`).
    """

    out_dir: Path
    variant: str
    steps: int
    seconds: float
    final_loss: float
    training_set_sha256: str


def unet_config(variant: str, block_out_channels: Sequence[int] = DEFAULT_CHANNELS) -> dict:
    """The diffusers ``UNet2DModel`` config of the demo: 16×16, one channel, no attention, one ResNet per level.

    Args:
        variant: ``"cond"`` adds a class embedding (``num_class_embeds=10``) to the time embedding.
        block_out_channels: channels per resolution level (16, 8, 4, ...); each a multiple of 8.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    ch = tuple(int(c) for c in block_out_channels)
    if not ch or any(c <= 0 or c % 8 for c in ch):
        raise ValueError(f"block_out_channels must be positive multiples of 8, got {block_out_channels}")
    if IMAGE_SIZE % (2 ** (len(ch) - 1)):
        raise ValueError(f"{len(ch)} levels do not fit a {IMAGE_SIZE}x{IMAGE_SIZE} image")
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": ch,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D",) * len(ch),
        "up_block_types": ("UpBlock2D",) * len(ch),
        "norm_num_groups": 8,
        "num_class_embeds": NUM_CLASSES if variant == "cond" else None,
    }


def make_scheduler():
    """The DDIM scheduler saved with the weights; its betas are the training betas."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
    )


def train_demo(
    out_dir: str | Path,
    *,
    variant: str = "cond",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    block_out_channels: Sequence[int] = DEFAULT_CHANNELS,
    recipe: DemoRecipe | None = None,
    log_every: int = 100,
    threads: int | None = 1,
) -> TrainResult:
    """Train one demo model on the duplicated ``load_digits`` set and save it in diffusers' layout.

    Args:
        out_dir: the directory to write (created; existing files in it are overwritten).
        variant: ``"cond"`` (class-conditional) or ``"uncond"``.
        steps: optimizer steps.
        seed: seeds the model initialisation, the batches, timesteps and noise.
        device: ``"cpu"`` or a CUDA device.
        batch_size: images per step.
        lr: peak AdamW learning rate (warm-up over 100 steps, cosine decay to 0).
        block_out_channels: UNet width per level (smaller for tests).
        recipe: the data recipe; ``None``: :class:`DemoRecipe` defaults (the bundled weights' recipe).
        log_every: print the loss every this many steps (0: silent).
        threads: torch's CPU threads during the training (restored afterwards); ``None`` leaves torch's
            setting. The bundled weights were trained with 1: another count sums in another order and gives
            other weights.

    Returns:
        A :class:`TrainResult`.
    """
    from memcore.io.results import check_out_dir

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    # before the training, not after it: a folder that cannot be written would cost the whole run
    check_out_dir(out_dir, flag="output folder")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(
            Path(out_dir), variant, steps, seed, device, batch_size, lr, block_out_channels, recipe, log_every
        )
    finally:
        torch.set_num_threads(before)


def _train(
    out: Path,
    variant: str,
    steps: int,
    seed: int,
    device: str | torch.device,
    batch_size: int,
    lr: float,
    block_out_channels: Sequence[int],
    recipe: DemoRecipe | None,
    log_every: int,
) -> TrainResult:
    """The body of :func:`train_demo` (which see), run with its thread count."""
    from diffusers import DDPMScheduler, UNet2DModel

    device = resolve_device(device)
    config = unet_config(variant, block_out_channels)
    recipe = recipe or DemoRecipe()
    ts = build_training_set(recipe)
    recipe = DemoRecipe(**{**recipe.to_json(), "planted_indices": ts.planted})  # type: ignore[arg-type]

    torch.manual_seed(seed)
    unet = UNet2DModel(**config).to(device).train()
    ema = [p.detach().clone() for p in unet.parameters()]
    ddpm = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
    )
    alphas_cumprod = ddpm.alphas_cumprod.to(device=device, dtype=torch.float32)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return lr * (step + 1) / WARMUP
        return lr * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))

    x_all = (ts.training_images().to(torch.float32) / 127.5 - 1.0).to(
        device
    )  # [N_train, 1, 16, 16] in [-1, 1]
    y_all = ts.training_labels().to(device)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        # Draw on the CPU generator so a run is the same sequence of batches on any device.
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (batch_size,), generator=gen)
        noise = torch.randn((batch_size, 1, IMAGE_SIZE, IMAGE_SIZE), generator=gen).to(device)
        idx, t = idx.to(device), t.to(device)
        x0 = x_all[idx]
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        labels = y_all[idx] if variant == "cond" else None
        pred = unet(xt, t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping keeps the short, high-learning-rate schedule stable (diffusers' training scripts do the same).
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.detach())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            el = time.perf_counter() - t0
            recent = float(torch.stack(losses[-log_every:]).mean())
            print(
                f"[train-demo {variant}] step {step + 1}/{steps} loss {recent:.4f} "
                f"{el:.0f}s elapsed, {el / (step + 1) * (steps - step - 1):.0f}s left",
                flush=True,
            )
    seconds = time.perf_counter() - t0

    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    final_loss = float(torch.stack(losses[-100:]).mean())
    info = {
        "variant": variant,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": EMA_DECAY,
        "block_out_channels": list(config["block_out_channels"]),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "final_loss": final_loss,
        "training_set_sha256": ts.sha256(),
        "num_train_images": len(ts.train_index),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    _save(out, unet, recipe, info)
    return TrainResult(out, variant, steps, seconds, final_loss, ts.sha256())


# ------------------------------------------------------------------------------------------- validation


def _save(out: Path, unet: torch.nn.Module, recipe: DemoRecipe, info: dict) -> None:
    """Write a trained model into ``out`` so that an interrupted save never looks like a finished one.

    Every file is written into a staging folder inside ``out`` first, then moved into place. ``recipe.json``,
    which :func:`~memcore.models.demo.load_recipe` requires of a demo folder, is removed before the first move
    and moved in last: a save stopped half way (a kill, a full disk) leaves a folder that loading refuses,
    not new weights beside the old recipe or scheduler.
    """
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".train-demo-", dir=out))
    try:
        # float16 halves the bundled size; load_demo reads it back as float32.
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # diffusers warns about casting with .to(); no module here needs float32
        try:
            unet.to("cpu", torch.float16).save_pretrained(stage, safe_serialization=True)
        finally:
            dlog.set_verbosity(level)
        make_scheduler().save_pretrained(stage)
        (stage / "train_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (stage / RECIPE_FILE).write_text(json.dumps(recipe.to_json(), indent=2) + "\n", encoding="utf-8")
        for f in stage.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        (out / RECIPE_FILE).unlink(missing_ok=True)
        # a validation of the weights the folder held before (the bundled folder copied, an earlier training)
        # does not describe these: `--validate` writes a new one
        (out / VALIDATION_FILE).unlink(missing_ok=True)
        names = [*sorted(f.name for f in stage.iterdir() if f.name != RECIPE_FILE), RECIPE_FILE]
        for name in names:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def ddim_sample(
    unet, scheduler, n: int, *, class_label: int | None, steps: int = 50, seed: int = 0, batch_size: int = 250
) -> torch.Tensor:
    """Plain diffusers DDIM (eta = 0) sampling: the independent check the validation relies on.

    Returns:
        float32 images ``[n, 1, 16, 16]`` in [0, 1] on the CPU.
    """
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        x = torch.randn((b, 1, IMAGE_SIZE, IMAGE_SIZE), generator=gen).to(device)
        labels = (
            None if class_label is None else torch.full((b,), class_label, dtype=torch.long, device=device)
        )
        scheduler.set_timesteps(steps)
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = unet(x, t, class_labels=labels).sample
                x = scheduler.step(eps, t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) / 2).float().cpu())
    return torch.cat(out)


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalized L2 (RMS difference), ``[N, M]``, for images ``a [N, ...]``, ``b [M, ...]`` in [0, 1]."""
    a2, b2 = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    return torch.cdist(a2, b2) / a2.shape[1] ** 0.5


def _tiled_l2(a: torch.Tensor, grid: tuple[int, int] = (4, 4)) -> torch.Tensor:
    """Pairwise tiled L2 [C23 §4.2] of ``a [N, C, H, W]``: the max over grid tiles of the per-tile L2."""
    n, c, h, w = a.shape
    gh, gw = grid
    tiles = a.double().reshape(n, c, gh, h // gh, gw, w // gw).permute(2, 4, 0, 1, 3, 5)
    tiles = tiles.reshape(gh * gw, n, -1)
    return (torch.cdist(tiles, tiles) / tiles.shape[-1] ** 0.5).amax(dim=0)


def _max_clique(adj: torch.Tensor) -> list[int]:
    """Largest clique of a boolean ``[N, N]`` adjacency (networkx Bron–Kerbosch after 1-core pruning)."""
    import networkx as nx

    g = nx.Graph()
    a = adj.clone()
    a.fill_diagonal_(False)
    g.add_nodes_from(range(len(a)))
    g.add_edges_from(torch.nonzero(torch.triu(a, 1)).tolist())
    best: list[int] = []
    for cl in nx.find_cliques(g):
        if len(cl) > len(best):
            best = cl
    return sorted(best)


@dataclass(frozen=True)
class ClassReport:
    """Memorization numbers of one condition (class id, or ``None`` for the unconditional model)."""

    condition: int | None
    planted_index: int | None
    frac_near_planted: float | None  # fraction of samples with l2 <= delta to the planted image
    max_clique: int
    flagged: bool  # max_clique >= min_clique
    medoid_nearest_index: int | None
    medoid_nearest_l2: float | None
    medoid_is_planted: bool  # within delta of this class's planted image (any planted image: unconditional)


@dataclass(frozen=True)
class ValidationReport:
    """``validate_demo``'s numbers. ``recall`` = planted classes flagged with the planted image as the medoid's
    nearest training image within delta, over all planted classes; ``false_positives`` = unplanted classes
    flagged. For ``uncond``: ``nn_extracted`` maps training index -> number of samples that pass the ratio
    test for it."""

    variant: str
    num_samples: int
    seconds: float
    classes: list[ClassReport] = field(default_factory=list)
    recall: float | None = None
    false_positives: int | None = None
    nn_extracted: dict[int, int] = field(default_factory=dict)
    nn_planted_found: list[int] = field(default_factory=list)
    frac_near_any_planted: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _class_report(x, cond, ts: DemoTrainingSet, alpha, delta, min_clique, grid) -> ClassReport:
    planted = ts.planted_of_class(cond) if cond is not None else None
    frac = None
    if planted is not None:
        ref = ts.images[planted : planted + 1].float() / 255
        frac = float((_l2(x, ref)[:, 0] <= delta).float().mean())
    t = _tiled_l2(x, grid)
    clique = _max_clique(t <= alpha)
    flagged = len(clique) >= min_clique
    near_idx = near_l2 = None
    is_planted = False
    if len(clique) >= 2:
        sub = t[clique][:, clique]
        medoid = clique[int(sub.sum(1).argmin())]
        d = _l2(x[medoid : medoid + 1], ts.images.float() / 255)[0]
        near_idx, near_l2 = int(d.argmin()), float(d.min())
        # a class's clique counts only on its own planted image (a class-0 clique on class 2's planted digit is
        # no hit for class 0); the unconditional model has no class, so any planted image is
        want = ts.planted if cond is None else (planted,)
        is_planted = near_idx in want and near_l2 <= delta
    return ClassReport(cond, planted, frac, len(clique), flagged, near_idx, near_l2, is_planted)


def validate_demo(
    variant: str = "cond",
    *,
    model_dir: str | Path | None = None,
    num_per_class: int = 100,
    num_uncond: int = 500,
    steps: int = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
    alpha: float = 0.1,
    delta: float = 0.15,
    min_clique: int = 10,
    grid: tuple[int, int] = (4, 4),
) -> ValidationReport:
    """Sample a demo model with diffusers' DDIM and measure how it regurgitates the planted images.

    Args:
        variant: ``"cond"`` or ``"uncond"``.
        model_dir: a ``train_demo`` output instead of the bundled weights.
        num_per_class: samples per class (``cond``).
        num_uncond: samples (``uncond``).
        steps: DDIM steps.
        seed: sampling seed.
        device: where to run the UNet.
        alpha, delta, min_clique, grid: the extraction thresholds (SPEC §2 defaults).

    Returns:
        A :class:`ValidationReport`.
    """
    unet, sched = load_demo(variant, model_dir=model_dir, device=device)
    ts = demo_training_set(variant, model_dir=model_dir)
    t0 = time.perf_counter()
    rep: dict = {"variant": variant}
    if variant == "cond":
        classes = []
        for c in range(NUM_CLASSES):
            x = ddim_sample(unet, sched, num_per_class, class_label=c, steps=steps, seed=seed + c)
            classes.append(_class_report(x, c, ts, alpha, delta, min_clique, grid))
        hits = sum(r.flagged and r.medoid_is_planted for r in classes if r.planted_index is not None)
        rep.update(
            num_samples=num_per_class * NUM_CLASSES,
            classes=classes,
            recall=hits / len(ts.planted),
            false_positives=sum(r.flagged for r in classes if r.planted_index is None),
        )
    else:
        x = ddim_sample(unet, sched, num_uncond, class_label=None, steps=steps, seed=seed)
        ref = ts.images.float() / 255
        d = _l2(x, ref)  # [n, 1797]
        knn = d.topk(50, dim=1, largest=False).values
        ratio = knn[:, 0] / (0.5 * knn.mean(dim=1))
        nearest = d.argmin(dim=1)
        extracted: dict[int, int] = {}
        for i in torch.nonzero(ratio <= 1).flatten().tolist():
            j = int(nearest[i])
            extracted[j] = extracted.get(j, 0) + 1
        planted = ref[list(ts.planted)]
        rep.update(
            num_samples=num_uncond,
            classes=[_class_report(x, None, ts, alpha, delta, min_clique, grid)],
            nn_extracted=dict(sorted(extracted.items())),
            nn_planted_found=sorted(j for j in extracted if j in ts.planted),
            frac_near_any_planted=float((_l2(x, planted).min(dim=1).values <= delta).float().mean()),
        )
    return ValidationReport(seconds=time.perf_counter() - t0, **rep)


def main(argv: Sequence[str] | None = None) -> int:
    """``memcore train-demo``: train the demo model(s), optionally validate them. Returns the exit status."""
    from memcore.cli import OneLineParser  # usage errors in one line, as memcore's other commands

    ap = OneLineParser(prog="memcore train-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder; a variant goes to OUT/<variant>")
    ap.add_argument("--variant", choices=(*VARIANTS, "both"), default="both")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1, as the bundled weights were trained: another count gives other weights)",
    )
    ap.add_argument(
        "--validate",
        action="store_true",
        help="run validate_demo on the result, print it and write validation.json",
    )
    args = ap.parse_args(argv)
    from memcore.io.results import atomic_write_json, check_out_dir

    check_out_dir(args.out)  # before training, not after it
    variants = VARIANTS if args.variant == "both" else (args.variant,)
    for v in variants:  # each variant's folder too: with "both", a bad OUT/uncond would be found after cond
        check_out_dir(Path(args.out) / v, flag="output folder")
    for v in variants:
        res = train_demo(
            Path(args.out) / v,
            variant=v,
            steps=args.steps,
            seed=args.seed,
            device=args.device,
            batch_size=args.batch_size,
            lr=args.lr,
            threads=args.threads,
        )
        print(f"[train-demo {v}] wrote {res.out_dir} in {res.seconds:.0f}s, final loss {res.final_loss:.4f}")
        if args.validate:
            rep = validate_demo(v, model_dir=res.out_dir, device=args.device)
            atomic_write_json(res.out_dir / VALIDATION_FILE, rep.to_json())  # beside the weights it describes
            print(json.dumps(rep.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
