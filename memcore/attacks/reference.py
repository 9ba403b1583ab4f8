"""The reference path of the Carlini extraction: a plain diffusers sampling loop, naive torch distances and
networkx cliques. Slow and simple on purpose: it is the oracle that memcore's engine path is compared with
(tests) and the baseline of ``benchmarks/bench_extract.py``. Nothing here shares code with the engines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch


# ------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def reference_sample(
    unet: Any,
    scheduler: Any,
    seeds: Sequence[int],
    class_labels: Sequence[int] | None = None,
    *,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """DDIM (or any diffusers scheduler) loop over a ``UNet2DModel``, written as diffusers' DDIMPipeline does.

    The batch is exactly ``seeds`` (no padding); each initial noise is
    ``torch.randn(shape, generator=torch.Generator(device).manual_seed(seed))``, and that image's generator
    also draws its DDIM step noise when ``eta > 0`` (as DDIMPipeline with a list of generators), so an image
    depends on its seed only, never on the global RNG or its batch.

    Args:
        unet: a diffusers UNet2DModel (unconditional, or class-conditional when ``class_labels`` is given).
        scheduler: a diffusers scheduler (a copy is used; its config is not changed).
        seeds: [B] integer seeds.
        class_labels: [B] class ids or None.

    Returns:
        uint8 [B, C, H, W] images (``(x / 2 + 0.5).clamp(0, 1)``, then ``round(x * 255)``, both in the UNet's
        dtype as DDIMPipeline's output, float32 for bfloat16).
    """
    device = torch.device(device)
    from diffusers import DDIMScheduler

    # SPEC §2: DDIM, built from the model's own scheduler config (betas, timestep spacing)
    sched = DDIMScheduler.from_config(scheduler.config)
    cfg = unet.config
    size = (
        cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
    )
    shape = (1, cfg.in_channels, *size)
    # one generator per image, as DDIMPipeline(generator=[...]): it draws the initial noise and then, with
    # eta > 0, the step noise (diffusers' randn_tensor draws per image from a list of generators)
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    x = torch.cat([torch.randn(shape, generator=g, device=device) for g in gens]).to(unet.dtype)
    labels = None if class_labels is None else torch.as_tensor(list(class_labels), device=device)
    sched.set_timesteps(num_inference_steps)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        eps = unet(inp, t, class_labels=labels).sample
        kwargs = {"eta": eta} if "eta" in sched.step.__code__.co_varnames else {}
        if "generator" in sched.step.__code__.co_varnames:
            kwargs["generator"] = gens
        x = sched.step(eps, t, x, **kwargs).prev_sample
    # as DDIMPipeline: (x / 2 + 0.5).clamp(0, 1) in the model dtype, then numpy_to_pil's round(x * 255) on that
    # array, i.e. in the model dtype too (float16: the product is rounded to float16 first); numpy has no
    # bfloat16, float32 holds its values exactly
    img = (x / 2 + 0.5).clamp(0, 1)
    if img.dtype == torch.bfloat16:
        img = img.float()
    return (img * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------ distances
def naive_tiled_l2(
    a: torch.Tensor, b: torch.Tensor | None = None, grid: tuple[int, int] = (4, 4)
) -> torch.Tensor:
    """Tiled L2 in float64 by its definition (SPEC §1): per-tile RMS difference, maximum over tiles.

    Args:
        a: [N, C, H, W] uint8 (or float in [0, 1]).
        b: [M, C, H, W] or None (pairwise).

    Returns:
        float64 [N, M].
    """
    b = a if b is None else b
    gh, gw = grid
    _n, c, h, w = a.shape
    if h % gh or w % gw:
        raise ValueError(f"grid {grid} does not divide image size {h}x{w}")
    scale = 255.0 if a.dtype == torch.uint8 else 1.0

    def tiles(x: torch.Tensor) -> torch.Tensor:
        x = x.double() / scale
        x = x.reshape(x.shape[0], c, gh, h // gh, gw, w // gw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(x.shape[0], gh * gw, -1)  # [N, T, c*th*tw]

    ta, tb = tiles(a), tiles(b)
    d = ((ta[:, None] - tb[None]) ** 2).mean(-1).sqrt()  # [N, M, T]
    return d.amax(-1)


def _medoid_position(sub32: torch.Tensor) -> int:
    """Position of the least summed distance in ``sub32`` [K, K] (the float32 distances memcore reports), the
    first on ties; the sums are exact (``math.fsum``), so the rule is the engines' documented one: argmin of
    the summed reported distances, not of one order's rounding of them."""
    sums = [math.fsum(row) for row in sub32.double().tolist()]
    return sums.index(min(sums))


def naive_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalized L2 (RMS difference) in float64: [N, M]."""
    return naive_tiled_l2(a, b, grid=(1, 1))


# --------------------------------------------------------------------------------------------------- cliques
def networkx_max_clique(adj: torch.Tensor) -> list[int]:
    """A maximum clique of the boolean [N, N] adjacency via networkx, ties broken to the lexicographically
    smallest sorted member list (enumerates maximal cliques: fine for the small graphs of tests/demo)."""
    import networkx as nx

    n = adj.shape[0]
    g = nx.Graph()
    g.add_nodes_from(range(n))
    ii, jj = torch.nonzero(torch.triu(adj.bool(), 1), as_tuple=True)
    g.add_edges_from(zip(ii.tolist(), jj.tolist()))
    if n == 0:
        return []
    best: list[int] | None = None
    for c in nx.find_cliques(g):
        c = sorted(c)
        if best is None or len(c) > len(best) or (len(c) == len(best) and c < best):
            best = c
    return best or []


# ------------------------------------------------------------------------------------------ the whole attack
@dataclasses.dataclass(frozen=True)
class ReferenceRecord:
    condition_id: int
    flagged: bool
    clique_size: int
    members: tuple[int, ...]
    medoid_index: int
    mean_clique_distance: float | None
    nearest_train_index: int | None = None
    nearest_train_distance: float | None = None
    extracted: bool | None = None
    eidetic_count: int | None = None


def reference_condition(
    images: torch.Tensor,
    *,
    alpha: float,
    grid: tuple[int, int],
    min_clique: int,
    train: torch.Tensor | None = None,
    delta: float = 0.15,
    condition_id: int = 0,
) -> ReferenceRecord:
    """Generate-and-filter of SPEC §2 steps 2–5 for one condition's candidates ``images`` [N, C, H, W].

    Every rule is on the float32 distances memcore reports, as the engines document them: for uint8 images
    ``float32(sqrt(S / (255² n)))`` from the exact integer squared tile maxima ``S``. The medoid is the least
    exact sum of a member's distances (the first member on ties), the mean clique distance their exact mean,
    and the nearest training image the least float32 distance (the first index on ties).
    """
    from memcore.reference import distance as ref_distance

    u8 = images.dtype == torch.uint8
    # uint8: the reference distances, float32(sqrt(S / (255² n))) from exact integer S
    d = ref_distance.distance_matrix(images, None, grid) if u8 else naive_tiled_l2(images, grid=grid)
    # compare in float32 as the engines do (the threshold is a float32 comparison, SPEC §7 bitset rule)
    adj = d.float() <= torch.tensor(alpha, dtype=torch.float32)
    adj.fill_diagonal_(False)
    members = networkx_max_clique(adj)
    sub = d[members][:, members].float()
    k = len(members)
    medoid = members[_medoid_position(sub)] if k else -1
    mean = math.fsum(sub.double().flatten().tolist()) / (k * (k - 1)) if k > 1 else None
    rec = ReferenceRecord(condition_id, k >= min_clique, k, tuple(members), medoid, mean)
    if train is not None and k:
        if u8 and train.dtype == torch.uint8:
            dt = ref_distance.distance_matrix(images[medoid : medoid + 1], train, (1, 1))[0]
        else:
            dt = naive_l2(images[medoid : medoid + 1], train)[0].float()
        j = int(torch.argmin(dt))  # the first index among equal float32 distances
        rec = dataclasses.replace(
            rec,
            nearest_train_index=j,
            nearest_train_distance=float(dt[j]),
            extracted=bool(dt[j] <= delta),
            eidetic_count=int((dt <= delta).sum()),
        )
    return rec


def reference_nn_extraction(
    candidates: torch.Tensor, seeds: Sequence[int], train: torch.Tensor, *, k: int = 50, alpha: float = 0.5
) -> dict[int, tuple[int, float]]:
    """SPEC §3 by brute force: {training index: (best seed, best ratio)} for ratio <= 1 (ties: smaller seed).

    S is the k nearest training images, x included (all of them when there are fewer than k). A candidate at
    distance 0 from x has ratio 0, also when every image of S is a copy of x (0/0), as the engine documents.
    """
    d = naive_l2(candidates, train)
    top = torch.sort(d, dim=1, stable=True)
    nd, ni = top.values[:, :k], top.indices[:, :k]
    ratio = (nd[:, 0] / (alpha * nd.mean(1))).float()
    ratio = torch.where(nd[:, 0] == 0, 0.0, ratio)  # an exact copy of x extracts it (not 0/0 = NaN)
    best: dict[int, tuple[int, float]] = {}
    for s, r, j in zip(seeds, ratio.tolist(), ni[:, 0].tolist()):
        if r <= 1 and (j not in best or (r, s) < (best[j][1], best[j][0])):
            best[j] = (int(s), r)
    return best


# ----------------------------------------------------------------------------------------------- model loading
@dataclasses.dataclass(frozen=True)
class ReferenceModel:
    """A diffusers model as the reference path sees it.

    Attributes:
        kind: "unet" (unconditional UNet2DModel), "class_unet" (``num_class_embeds`` set) or "sd_pipeline".
        unet: the UNet (of the pipeline for "sd_pipeline").
        scheduler: the scheduler (DDIM from the model's scheduler config when it has one).
        pipeline: the diffusers pipeline for "sd_pipeline", else None.
        image_shape: (C, H, W) of decoded images.
        num_classes: number of classes of a class-conditional UNet, else None.
    """

    kind: str
    unet: Any
    scheduler: Any
    pipeline: Any
    image_shape: tuple[int, int, int]
    num_classes: int | None


def load_reference_model(model: Any, *, device: torch.device | str = "cpu") -> ReferenceModel:
    """Load a local diffusers model for the reference path.

    Args:
        model: a directory (pipeline with ``model_index.json``, or a UNet2DModel with ``config.json`` and an
            optional ``scheduler_config.json``), a ``(unet, scheduler)`` pair, a diffusers pipeline object, or a
            ``ReferenceModel`` (moved to ``device`` and returned: loaded once, used by several calls).
    """
    import os

    from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel

    from memcore.utils.device import resolve_device

    device = resolve_device(device)
    if isinstance(model, ReferenceModel):
        (model.pipeline if model.pipeline is not None else model.unet).to(device)
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise ValueError(f"model {path!r} is not a local directory; memcore never downloads models")
        if os.path.exists(os.path.join(path, "model_index.json")):
            model = DiffusionPipeline.from_pretrained(
                path, local_files_only=True, low_cpu_mem_usage=False, safety_checker=None
            )
        else:
            unet = UNet2DModel.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
            sc = os.path.join(path, "scheduler_config.json")
            sched = DDIMScheduler.from_pretrained(path) if os.path.exists(sc) else DDIMScheduler()
            model = (unet, sched)
    if isinstance(model, tuple):
        unet, sched = model
        unet = unet.to(device).eval()
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
        ncls = getattr(cfg, "num_class_embeds", None)
        kind = "class_unet" if ncls else "unet"
        return ReferenceModel(kind, unet, sched, None, (cfg.out_channels, *size), ncls)
    if hasattr(model, "unet") and hasattr(model, "vae"):
        pipe = model.to(device)
        pipe.set_progress_bar_config(disable=True)
        f = pipe.vae_scale_factor
        s = pipe.unet.config.sample_size
        return ReferenceModel("sd_pipeline", pipe.unet, pipe.scheduler, pipe, (3, s * f, s * f), None)
    raise TypeError(f"cannot use a {type(model).__name__} as a diffusion model")


@torch.no_grad()
def reference_generate(
    model: ReferenceModel,
    seeds: Sequence[int],
    conditions: Sequence[Any] | None,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """uint8 [len(seeds), C, H, W] images through the stock diffusers path (one batch)."""
    device = torch.device(device)
    if model.kind == "sd_pipeline":
        from diffusers import DDIMScheduler

        gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        pipe = model.pipeline
        if not isinstance(pipe.scheduler, DDIMScheduler):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        out = pipe(
            prompt=list(conditions),
            generator=gens,
            num_inference_steps=num_inference_steps,
            guidance_scale=7.5 if guidance_scale is None else guidance_scale,
            eta=eta,
            output_type="np",
        ).images
        return (torch.from_numpy(out) * 255).round().to(torch.uint8).permute(0, 3, 1, 2).contiguous()
    labels = list(conditions) if model.kind == "class_unet" else None
    return reference_sample(
        model.unet,
        model.scheduler,
        seeds,
        labels,
        num_inference_steps=num_inference_steps,
        eta=eta,
        device=device,
    )
