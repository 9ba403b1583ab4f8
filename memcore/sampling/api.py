"""Public sampling entry points: ``sample`` (SPEC §7) and the streaming iterator ``stream``."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import torch

from memcore.sampling.engine import SampleBatch, Sampler, SamplerConfig
from memcore.sampling.seeds import check_seeds

_MAX_DEFAULT_BATCH = 32


def _single_condition(c: Any) -> Any:
    """``c`` as one condition (a class id as an int, or a prompt) when it is a scalar, else None."""
    if isinstance(c, str):
        return c
    if isinstance(c, (bool, np.bool_)):
        return None
    if isinstance(c, torch.Tensor):
        if c.dim() == 0 and not (c.is_floating_point() or c.is_complex() or c.dtype == torch.bool):
            return int(c)
        return None
    if isinstance(c, np.ndarray):
        # a 0-d integer array is a class id like a 0-d integer tensor (it was refused as "not a class id")
        return int(c) if c.ndim == 0 and c.dtype.kind in "iu" else None
    if hasattr(type(c), "__index__"):  # int, numpy integers
        return operator.index(c)
    return None


def _broadcast_conditions(conditions: Any, n: int) -> list[Any] | None:
    if conditions is None:
        return None
    single = _single_condition(conditions)
    if single is not None:
        return [single] * n  # one condition for every seed (documented)
    if isinstance(conditions, (torch.Tensor, np.ndarray)):
        if conditions.ndim == 0:
            raise TypeError(
                f"a single condition must be a class id (int) or a prompt (str), got a {conditions.dtype} scalar"
            )
        if conditions.ndim != 1:
            raise TypeError(
                f"conditions as an array must be 1-D (one class id per seed), got shape {list(conditions.shape)}"
            )
        conditions = conditions.tolist()
    elif isinstance(conditions, (Mapping, AbstractSet, bytes, bytearray)) or not isinstance(
        conditions, Iterable
    ):
        # a set has no order to match seeds by, a mapping iterates its keys, bytes iterate small ints
        raise TypeError(
            "conditions must be a sequence with one condition per seed, or a single class id (int) or prompt "
            f"(str) for every seed; got {type(conditions).__name__} {conditions!r}"
        )
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
    conditions: Sequence[Any] | torch.Tensor | str | int | None = None,
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
        conditions: one per seed: class ids (class-conditional UNet; ints, numpy integers or one-element integer
            tensors, or a 1-D integer tensor / array of them) or prompts (text-to-image); a single class id or
            prompt is used for every seed; None for unconditional models. Anything else (a float, a set) is a
            ``TypeError``.
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
        stock pipelines' PIL output, in their arithmetic (for a float16 pixel model the product is rounded to
        float16 first, as DDIMPipeline's numpy conversion does; see ``to_uint8``).
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
