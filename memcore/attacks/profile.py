"""``memcore profile``: a short calibration run that measures the per-stage cost of the attack and turns the
measured sampling throughput into the projected GPU-hours of the full run.

The calibration runs the real pipeline (``memcore.attacks.carlini``) on the first ``calib_conditions``
conditions with ``calib_n`` candidates each, with ``sync_timing`` on (the device is synchronized around each
stage, so the wall time of a stage is its cost; the real run does not synchronize). Every stage is also an
NVTX range (``memcore.utils.profiling.stage``), so ``nsys profile memcore profile ...`` shows the pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from memcore.attacks import carlini
from memcore.attacks.cost import project, unet_flops
from memcore.utils.device import resolve_device

STAGES = ("sample", "graph", "clique_wait", "clique_stats", "verify", "nn", "write", "regenerate")


def run_profile(
    model: Any,
    conditions: Sequence[Any] | None,
    *,
    config: carlini.ExtractConfig,
    device: str | torch.device | None = None,
    calib_conditions: int = 2,
    calib_n: int = 32,
    train: Any = None,
) -> dict[str, Any]:
    """Measure, project, and return a JSON-able dict (with ``lines`` for printing)."""
    if calib_conditions < 1 or calib_n < 2:
        raise ValueError("calibration needs at least 1 condition and 2 candidates per condition")
    dev = resolve_device(device)
    full_conditions = len(conditions) if conditions is not None else 1
    calib = None if conditions is None else list(conditions)[:calib_conditions]
    cfg = dataclasses.replace(
        config,
        num_per_condition=calib_n,
        nn_candidates=None,
        batch_size=min(config.micro_batch, calib_n),
        sync_timing=True,
        save_images="none",
    )
    # the model is loaded once: the calibration runs on a Sampler (or, for the reference sampler, a
    # ReferenceModel) built here, whose model the FLOPs are counted on
    sampler = carlini._as_sampler(model)
    if sampler is None and cfg.sampler == "memcore":
        sampler = model = carlini.extraction_sampler(model, cfg, device=dev)
    elif sampler is None:
        model = carlini._load_model(model, cfg, dev).handle  # a ReferenceModel, in cfg.dtype
    res = carlini.extract(model, calib, config=cfg, train=train, out=None, device=dev, report=False)
    t = res.summary["timings"]
    cands = calib_n * len(res.conditions)
    total = t.get("total", 0.0) - t.get("load", 0.0)
    sample = t.get("sample", 0.0)
    shares = {k: t[k] / total for k in STAGES if k in t and total > 0}
    outside = (total - sample) / total if total > 0 else float("nan")
    thr = cands / sample if sample > 0 else None
    handle = sampler.model if sampler is not None else model
    flops = unet_flops(handle)
    g = carlini._guidance(handle.kind, config)
    proj = project(
        flops,
        conditions=full_conditions,
        per_condition=config.num_per_condition,
        steps=config.num_inference_steps,
        cfg=g is not None and g > 1,
        throughput=thr,
    )
    lines = [
        f"calibration: {len(res.conditions)} conditions x {calib_n} candidates on {dev} in {total:.2f}s",
        f"sampling throughput {thr:.4g} images/s" if thr else "sampling throughput: not measured",
        "per-stage share of wall time (sync timing): "
        + ", ".join(f"{k} {v:.2%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])),
        f"outside sampling: {outside:.3%} of wall time",
        f"projected full run ({full_conditions} conditions x {config.num_per_condition}):",
        *("  " + line for line in proj.lines()),
    ]
    return {
        "device": str(dev),
        "calibration": {"conditions": len(res.conditions), "per_condition": calib_n, "seconds": total},
        "timings": t,
        "shares": shares,
        "outside_sampling_share": outside,
        "throughput_images_per_s": thr,
        "flops": flops,
        "projection": proj.to_dict(),
        "lines": lines,
    }
