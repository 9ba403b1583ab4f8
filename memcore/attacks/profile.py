"""``memcore profile``: a short calibration run that measures the per-stage cost of the attack and turns the
measured sampling throughput into the projected GPU-hours of the full run.

The calibration runs the real pipeline (``memcore.attacks.carlini``) on the first ``calib_conditions``
conditions with ``calib_n`` candidates each, with ``sync_timing`` on (the device is synchronized around each
stage, so the wall time of a stage is its cost; the real run does not synchronize). Every stage is also an
NVTX range (``memcore.utils.profiling.stage``), so ``nsys profile memcore profile ...`` shows the pipeline.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from memcore.attacks import carlini
from memcore.attacks.cost import project, unet_flops
from memcore.utils.device import resolve_device

STAGES = ("sample", "graph", "clique_wait", "clique_stats", "verify", "nn", "write", "regenerate")

#: What the numbers of ``profile.json`` are in.
UNITS = {
    "calibration.seconds": "s (wall time of the calibration run, model load excluded)",
    "calibration.warmup_s": "s (one warm-up micro-batch before it: CUDA-graph capture, compile, library init)",
    "timings": "s (per stage, summed; 'clique' runs on a worker thread, beside the others)",
    "shares": "fraction of calibration.seconds ('other': the rest: read-back waits, Python between stages)",
    "throughput_images_per_s": "images sampled per second (micro-batch rows, padding included)",
    "flops": "FLOP counts (2 per multiply-add) of one image / one prompt, not rates",
    "projection.total_flops": "FLOP",
    "projection.peak_tflops": "TFLOP/s (null: the measured throughput was used)",
    "projection.gpu_hours": "hours",
}


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
    """Measure, project, and return a JSON-able dict (with ``lines`` for printing; ``units`` says in what).

    The calibration samples at the run's own micro-batch (``config.micro_batch``): throughput depends on it,
    and a ``Sampler`` given as ``model`` is built for it. One warm-up micro-batch runs first, untimed in the
    throughput: the first batch of a run pays one-time costs (CUDA-graph capture, ``torch.compile``, library
    initialisation) that a calibration of a batch or two would otherwise spread over the whole run. Nothing is
    written (no results directory).
    """
    if calib_conditions < 1 or calib_n < 2:
        raise ValueError("calibration needs at least 1 condition and 2 candidates per condition")
    dev = resolve_device(device)
    calib = None if conditions is None else list(conditions)[:calib_conditions]
    cfg = dataclasses.replace(
        config,
        num_per_condition=calib_n,
        nn_candidates=None,
        batch_size=config.micro_batch,
        # nothing is flagged or written in a calibration: a min_clique above calib_n would only warn so
        min_clique=min(config.min_clique, calib_n),
        sync_timing=True,
        save_images="none",
    )
    # the model is loaded once: the calibration runs on a Sampler (or, for the reference sampler, a
    # ReferenceModel) built here, whose model the FLOPs are counted on
    if carlini._as_sampler(model) is None and cfg.sampler == "memcore":
        model = carlini.extraction_sampler(model, cfg, device=dev)
    m = carlini._load_model(model, cfg, dev)
    if m.sampler is None:
        model = m.handle  # a ReferenceModel, in cfg.dtype
    handle = m.handle
    conds = carlini._conditions_for(m, carlini._conditions_arg(conditions))
    warmup = _warm_up(m, cfg, dev, None if m.kind == "unet" else conds[0])
    res = carlini.extract(model, calib, config=cfg, train=train, out=None, device=dev, report=False)
    t = res.summary["timings"]
    bs = cfg.micro_batch
    cands = calib_n * len(res.conditions)
    sampled = -(-cands // bs) * bs  # the NN extraction's calibration candidates are the conditions' own
    total = t.get("total", 0.0) - t.get("load", 0.0)
    sample = t.get("sample", 0.0)
    shares = {k: t[k] / total for k in STAGES if k in t and total > 0}
    if shares:
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    outside = (total - sample) / total if total > 0 else float("nan")
    thr = sampled / sample if sample > 0 else None
    flops = unet_flops(handle)
    g = carlini._guidance(handle.kind, config)
    extra = 0
    if handle.kind == "unet" and train is not None:  # the NN extraction runs with training data only
        extra = (config.nn_candidates or config.num_per_condition) - config.num_per_condition
    proj = project(
        flops,
        conditions=len(conds),
        per_condition=config.num_per_condition,
        steps=config.num_inference_steps,
        cfg=g is not None and g > 1,
        throughput=thr,
        extra_candidates=extra,
        micro_batch=config.micro_batch,
        device=str(dev),
    )
    lines = [
        f"calibration: {len(res.conditions)} conditions x {calib_n} candidates on {dev} in {total:.2f}s "
        f"(after a {warmup:.2f}s warm-up micro-batch)",
        f"sampling throughput {thr:.4g} images/s (micro-batch {bs}, {sampled} images sampled)"
        if thr
        else "sampling throughput: not measured",
        "per-stage share of wall time (sync timing): "
        + ", ".join(f"{k} {v:.2%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])),
        f"outside sampling: {outside:.3%} of wall time",
        f"projected full run ({len(conds)} conditions x {config.num_per_condition}):",
        *("  " + line for line in proj.lines()),
    ]
    return {
        "device": str(dev),
        "units": UNITS,
        "calibration": {
            "conditions": len(res.conditions),
            "per_condition": calib_n,
            "micro_batch": bs,
            "images_sampled": sampled,
            "seconds": total,
            "warmup_s": warmup,
        },
        "timings": t,
        "shares": shares,
        "outside_sampling_share": outside,
        "throughput_images_per_s": thr,
        "flops": flops,
        "projection": proj.to_dict(),
        "lines": lines,
    }


def _warm_up(m: Any, cfg: carlini.ExtractConfig, dev: torch.device, condition: Any) -> float:
    """Sample one micro-batch through the extraction's own sampler path; returns its wall time (s)."""
    t0 = time.perf_counter()
    for _ in carlini._make_sampler(m, cfg, dev)(iter([(0, condition, cfg.seed)])):
        pass
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
