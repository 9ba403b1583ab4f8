"""Public sampling entry points: ``sample`` (SPEC §7) and the streaming iterator ``stream``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from memcore.sampling.engine import SampleBatch, Sampler, SamplerConfig
from memcore.sampling.seeds import check_seeds

_MAX_DEFAULT_BATCH = 32


def _broadcast_conditions(conditions: Any, n: int) -> list[Any] | None:
    if conditions is None:
        return None
    if isinstance(conditions, (str, int)) and not isinstance(conditions, bool):
        return [conditions] * n  # one condition for every seed
    if isinstance(conditions, torch.Tensor):
        conditions = conditions.tolist()
    conditions = list(conditions)
    if len(conditions) != n:
        raise ValueError(
            f"got {len(conditions)} conditions for {n} seeds: give one per seed (or a single one)"
        )
    return conditions


def sample(
    model: Any,
    *,
    seeds: Sequence[int] | torch.Tensor,
    conditions: Sequence[Any] | str | int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    mode: str = "parity",
    batch_size: int | None = None,
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    **options: Any,
) -> torch.Tensor:
    """Sample one image per seed (SPEC §7).

    Args:
        model: a local diffusers model or pipeline directory, a ``.safetensors`` file with ``config.json``
            beside it, a loaded diffusers object, a ``LoadedModel`` or a ``Sampler`` (reuses its model, caches
            and CUDA graphs; its config applies, and a ``batch_size`` that differs from it is an error).
        seeds: ``[N]`` seeds; candidate ``i`` starts from ``torch.randn`` of ``Generator(device).manual_seed(
            seeds[i])``.
        conditions: one per seed: class ids (class-conditional UNet) or prompts (text-to-image); a single value
            is used for every seed; None for unconditional models.
        num_inference_steps: sampler steps.
        guidance_scale: CFG scale for text models (None -> 7.5, diffusers' default).
        eta: DDIM eta; step noise is keyed by (seed, step).
        mode: ``"parity"`` (same floats as diffusers) or ``"fp32"`` (fused fp32 step).
        batch_size: the micro-batch the model runs at (the last one padded). An image is a function of
            (seed, condition, batch_size, slot) on a given backend/device/dtype, the slot being its row in
            its micro-batch (``i % batch_size`` here): ``Sampler(...).regenerate(seed, condition, slot=...)``
            with the same ``batch_size`` reproduces it bit-identically alone. None -> ``min(N, 32)``.
        backend: backend of the fused step.
        device: device for a model given by path (default CUDA when available).
        dtype: parameter dtype (``torch.bfloat16`` or its name, "bfloat16").
        **options: further ``SamplerConfig`` fields (``scheduler``, ``step_backend``, ``cuda_graphs``,
            ``channels_last``, ``compile``, ``compile_mode``, ``fuse_norm``, ``guidance_rescale``).

    Returns:
        ``[N, C, H, W]`` uint8 images on the model's device, ``round(255 * clamp(x / 2 + 0.5, 0, 1))`` as the
        stock pipelines' PIL/np output.
    """
    seeds = check_seeds(seeds)
    n = len(seeds)
    conds = _broadcast_conditions(conditions, n)
    if isinstance(model, Sampler):
        sampler = model
        if batch_size is not None and batch_size != sampler.config.batch_size:
            raise ValueError(
                f"batch_size={batch_size} differs from the Sampler's micro-batch {sampler.config.batch_size}"
            )
    else:
        if batch_size is None:
            batch_size = max(1, min(n, _MAX_DEFAULT_BATCH))
        cfg = SamplerConfig(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            mode=mode,
            batch_size=batch_size,
            backend=backend,
            **options,
        )
        sampler = Sampler(model, cfg, device=device, dtype=dtype)
    return sampler.sample(seeds, conds)


def stream(
    model: Any,
    jobs: Iterable[tuple[int, Any, int]],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    mode: str = "parity",
    batch_size: int = 16,
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    **options: Any,
) -> Iterator[SampleBatch]:
    """Stream finished micro-batches of images for ``jobs``.

    Args:
        model: as for ``sample``; pass a ``Sampler`` to reuse its loaded model, caches and CUDA graphs across
            calls (its config then applies and the other arguments are ignored).
        jobs: iterable of ``(condition_id, condition, seed)``; packed in order into micro-batches of
            ``batch_size`` across conditions.
        batch_size: the fixed micro-batch (explicit, so the images are reproducible).
        Other arguments: as for ``sample``.

    Yields:
        ``SampleBatch`` with ``images_unit [B, C, H, W]`` float32 in [0, 1] and ``images_u8`` on the device,
        ``seeds [B]`` and ``condition_ids [B]`` (CPU int64, -1 on padding rows) and ``valid`` (real rows, a
        prefix). Lazy: at most one batch is held by the engine at a time.
    """
    if isinstance(model, Sampler):
        sampler = model
    else:
        cfg = SamplerConfig(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            mode=mode,
            batch_size=batch_size,
            backend=backend,
            **options,
        )
        sampler = Sampler(model, cfg, device=device, dtype=dtype)
    return sampler.stream(jobs)
