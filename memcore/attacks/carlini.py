"""Carlini et al. 2023 extraction, end to end: generate-and-filter (SPEC §2) and unconditional
nearest-neighbour extraction (SPEC §3).

Data path (ARCHITECTURE.md). Candidates are streamed from the sampler in job order, micro-batches packed
across conditions. Each condition owns a device slot ``[N, C, H, W]`` (uint8); as a batch of its candidates
arrives, the rows of the threshold graph for those candidates against every earlier candidate of the same
condition are computed on the device (``memcore.distance.tiled_l2_graph(new, alpha, b=slot[:end])``: the
bitset epilogue; the float N×N matrix is never built). When the condition's N candidates are in, the lower
triangle is mirrored into the symmetric bitset, copied to the host (non-blocking, behind a CUDA event) and
the maximum clique runs on a CPU worker thread (the clique engine releases the GIL) while the device samples
the next conditions. When the clique is known, the main thread enqueues (without waiting) the tiled-L2
distances among its members (medoid and mean clique distance, the ranking key) and the verification of the
medoid against the training set (nearest image by normalized L2, extracted iff ≤ delta, eidetic count), starts
a non-blocking copy of those few numbers and two images to the host, and frees the slot (later writes to it
are ordered after these reads on the stream). A reader thread waits for the copy, builds the record and
writes the PNG pair of a flagged/extracted condition; the main thread appends the record to the results
directory, in condition order. So the host waits for the device only in the worker threads, and the sampling
queue never drains. Slots are recycled, so device memory is ``slots × N`` images whatever the number of
conditions.

The training set is held on the device whole when it fits (``train_chunk``), else streamed through it in
chunks from the host for every verification and NN batch (same results, more transfer).

A tool that runs many extractions builds what does not change between them once: the sampler
(:func:`extraction_sampler`: loaded model, caches, CUDA graphs) and the training set
(:func:`extraction_training_set`: read or hashed, checked, on the device), and passes them to every call.

Unconditional models with training data also run SPEC §3: every candidate batch is matched against the whole
training set with the streamed k-NN (k = 50), ``ratio = d_1 / (alpha · mean(d_1..d_k))``, and an O(train)
state keeps, per training image, the best ratio and the seed of the candidate that achieved it (ties: smaller
seed, so the result does not depend on batch composition). Memory stays flat as candidates grow; extracted
candidates are regenerated from their seeds for the PNG pairs. The NN candidates are split over shards/ranks
(``memcore.attacks.nn.assignment``), each part's state is checkpointed in the results directory, and the parts
merge exactly into ``nn_extraction.json`` once they cover every candidate (see :mod:`memcore.attacks.nn`).

Seeds: candidate ``i`` of condition ``g`` has seed ``seed + g · N + i`` (N = ``num_per_condition``); the
unconditional NN candidates are seeds ``seed + i`` (the first N are also the clique candidates). A candidate
regenerates bit-identically alone with the same micro-batch size (``batch_size``), backend, device and dtype.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import numbers
import os
import platform
import sys
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import torch

from memcore.attacks import nn as _nn
from memcore.attacks.nn import NNExtraction, NNState
from memcore.io import results as _results
from memcore.io.prompts import check_text
from memcore.metrics.pr import flagged_precision_recall, pr_from_records, ranking_key
from memcore.sampling.seeds import MAX_SEED, as_int
from memcore.utils.device import resolve_device, same_device
from memcore.utils.profiling import stage
from memcore.utils.transfer import Upload, to_device

SAMPLERS = ("memcore", "reference")
DTYPES = ("float32", "float16", "bfloat16")  # model dtypes an extraction runs in
#: NN extraction runs its k-NN on blocks of candidates of at most this many bytes of images ...
NN_BLOCK_BYTES = 64 << 20
#: ... and at most this many candidates (at least one sampled batch either way).
NN_BLOCK_MAX = 4096
SAVE_IMAGES = ("none", "flagged", "all")


# ---------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Parameters of the attack (defaults of SPEC §2/§3; every one is a CLI flag).

    Attributes:
        num_per_condition: N candidates per condition (SPEC default 500).
        num_inference_steps: sampler steps (DDIM 50).
        guidance_scale: classifier-free guidance for text models; None = 7.5 for text models, unused otherwise.
        eta: DDIM eta (0 = deterministic DDIM).
        alpha: edge threshold on tiled L2 ([0, 1] scale; [C23] does not publish it; default 0.1).
        grid: tiled-L2 grid (rows, cols); must divide the image size.
        min_clique: a condition is flagged when its maximum clique has at least this many members.
        delta: verification threshold on normalized L2 to the nearest training image.
        nn_k: neighbours of the unconditional NN test (SPEC §3, 50).
        nn_alpha: alpha of the NN ratio test (SPEC §3, 0.5).
        nn_candidates: candidates of the NN extraction (None = ``num_per_condition``; at least
            ``num_per_condition``): the first ``num_per_condition`` of them are also the generate-and-filter
            candidates.
        seed: base seed.
        batch_size: micro-batch the model runs at (padded); None = min(N, 64). Part of an image's identity.
        sampler: "memcore" (the sampling engine) or "reference" (a plain diffusers loop; the oracle path).
        mode: sampling mode of the engine ("parity" reproduces diffusers; "fp32" is fused-only).
        backend: backend of the distance/clique/sampling ops ("auto", "reference", "cpu", "cuda", "triton").
        dtype: model dtype name ("float32", "float16", "bfloat16").
        compile / compile_mode: ``torch.compile`` the UNet (see ``memcore.sampling.SamplerConfig``; images then
            differ from stock diffusers in their last bits, so it is part of the run parameters).
        fuse_norm: fused GroupNorm+SiLU kernel in the UNet (CUDA only; also changes the last bits).
        fuse_qkv: fused Q/K/V projections in the attention layers (text-to-image pipelines; may change the
            last bits; see ``memcore.sampling.SamplerConfig``).
        attention: the attention kernel the UNet tries first ("auto", "cudnn", "flash", "efficient", "math";
            see ``memcore.sampling.SamplerConfig``; other than "auto" it may change the last bits).
        clique_budget: node budget of the clique search (None: the engine's default); a condition whose
            search hit it has ``clique_exact = False``.
        save_images: "flagged" writes PNG pairs of flagged or extracted conditions, "all" of every condition,
            "none" nothing.
        max_nn_images: PNG pairs written for NN extractions (regenerated from their seeds).
        slots: condition buffers on the device (≥ 2 lets cliques overlap sampling).
        sync_timing: synchronize the device around each stage so per-stage timings are exact (profile).
        train_chunk: training images on the device at once (None: the whole set when it takes at most 8 GiB
            and a quarter of the free device memory, else chunks of half that, streamed from the host for every
            k-NN / verification). Results do not depend on it.
        nn_checkpoint_s: with a results directory, the NN extraction state is checkpointed at most this often
            (seconds; each checkpoint waits for the device once), so an interrupted run loses at most this much
            NN work. 0 checkpoints after every batch.
    """

    num_per_condition: int = 500
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    eta: float = 0.0
    alpha: float = 0.1
    grid: tuple[int, int] = (4, 4)
    min_clique: int = 10
    delta: float = 0.15
    nn_k: int = 50
    nn_alpha: float = 0.5
    nn_candidates: int | None = None
    seed: int = 0
    batch_size: int | None = None
    sampler: str = "memcore"
    mode: str = "parity"
    backend: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    compile_mode: str = "default"
    fuse_norm: bool = False
    fuse_qkv: bool = False
    attention: str = "auto"
    clique_budget: int | None = None
    save_images: str = "flagged"
    max_nn_images: int = 64
    slots: int = 3
    sync_timing: bool = False
    nn_checkpoint_s: float = 60.0
    train_chunk: int | None = None

    def __post_init__(self) -> None:
        # numpy numbers (a sweep read from an array) as plain ones, as SamplerConfig takes them; bools refused
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v) not in (int, float):
                object.__setattr__(self, f.name, int(v) if isinstance(v, numbers.Integral) else float(v))
        if isinstance(self.grid, (tuple, list)):
            object.__setattr__(
                self,
                "grid",
                tuple(
                    int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else x
                    for x in self.grid
                ),
            )

        def pos_int(name: str, v: Any, lo: int = 1, hi: int | None = None) -> None:
            if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"{name} must be an integer {bound}, got {v!r}")

        pos_int("num_per_condition", self.num_per_condition)
        pos_int("num_inference_steps", self.num_inference_steps)
        pos_int("min_clique", self.min_clique)
        pos_int("nn_k", self.nn_k)
        pos_int("max_nn_images", self.max_nn_images, 0)
        pos_int("slots", self.slots)
        pos_int("seed", self.seed, 0, MAX_SEED)
        if self.batch_size is not None:
            pos_int("batch_size", self.batch_size)
        if self.nn_candidates is not None:
            pos_int("nn_candidates", self.nn_candidates)
        if self.clique_budget is not None:
            pos_int("clique_budget", self.clique_budget)
        if self.train_chunk is not None:
            pos_int("train_chunk", self.train_chunk)
        for name in ("alpha", "delta", "nn_alpha", "eta", "nn_checkpoint_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.nn_alpha == 0:
            raise ValueError("nn_alpha must be > 0")
        for name in ("alpha", "delta"):  # tiled and plain L2 of [0, 1] images are at most 1
            if getattr(self, name) > 1:
                raise ValueError(
                    f"{name} must be in [0, 1] (distances are on the [0, 1] pixel scale), got {getattr(self, name)}"
                )
        if self.nn_candidates is not None and self.nn_candidates < self.num_per_condition:
            raise ValueError(
                f"nn_candidates ({self.nn_candidates}) must be >= num_per_condition ({self.num_per_condition}): "
                "the NN extraction's candidates include the generate-and-filter ones"
            )
        if self.eta > 1:  # the reference sampler's too (diffusers' DDIM step turns NaN beyond 1)
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if not isinstance(self.sync_timing, bool):
            raise TypeError(f"sync_timing must be a bool, got {self.sync_timing!r}")
        if self.guidance_scale is not None and (
            not isinstance(self.guidance_scale, (int, float))
            or isinstance(self.guidance_scale, bool)  # float(True) = 1.0 would switch CFG off
            or not math.isfinite(self.guidance_scale)
        ):
            raise ValueError(f"guidance_scale must be a finite number or None, got {self.guidance_scale!r}")
        g = tuple(self.grid) if isinstance(self.grid, (tuple, list)) else ()
        if len(g) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in g):
            raise ValueError(f"grid must be two positive integers (rows, cols), got {self.grid!r}")
        object.__setattr__(self, "grid", g)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.save_images not in SAVE_IMAGES:
            raise ValueError(f"save_images must be one of {SAVE_IMAGES}, got {self.save_images!r}")
        from memcore.sampling.engine import check_model_options

        check_model_options(self)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        from memcore.ops._backend import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.sampler == "memcore":
            # the sampler's own checks (eta in [0, 1], mode, ...) now, not after a results directory exists
            _sampler_config("unet", self)

    @property
    def micro_batch(self) -> int:
        return self.batch_size or _results.default_micro_batch(self.num_per_condition)

    def seed_of(self, condition_id: int, index: int) -> int:
        return self.seed + condition_id * self.num_per_condition + index


# --------------------------------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class ConditionResult:
    """The record of one condition (one line of ``results.jsonl``; SPEC §7 fields plus details).

    Attributes:
        condition_id: index of the condition in the run's condition list.
        condition: the prompt, class id, or "" for an unconditional model.
        flagged: clique_size >= min_clique.
        clique_size: size of the maximum clique of the candidates' threshold graph.
        clique_exact: False when the clique search hit its budget (clique_size is then a lower bound).
        clique_members: candidate indices (0..N-1) of the clique, sorted.
        clique_seeds: their seeds.
        medoid_index / medoid_seed: the member with the least summed tiled L2 to the other members.
        mean_clique_distance: mean pairwise tiled L2 inside the clique (None for a clique of one).
        nearest_train_index / nearest_train_distance / extracted / eidetic_count: verification of the medoid
            against the training set (None without training data).
        image: path of the PNG pair relative to the results directory, or None.
    """

    condition_id: int
    condition: Any
    flagged: bool
    clique_size: int
    clique_exact: bool
    clique_members: tuple[int, ...]
    clique_seeds: tuple[int, ...]
    medoid_index: int
    medoid_seed: int
    mean_clique_distance: float | None
    num_candidates: int
    nearest_train_index: int | None = None
    nearest_train_distance: float | None = None
    extracted: bool | None = None
    eidetic_count: int | None = None
    image: str | None = None

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ConditionResult:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in rec.items() if k in names}
        kw["clique_members"] = tuple(kw.get("clique_members", ()))
        kw["clique_seeds"] = tuple(kw.get("clique_seeds", ()))
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class ExtractionResult:
    """Everything a run produced (the records of the whole results directory when ``out`` is given)."""

    conditions: tuple[ConditionResult, ...]
    ranking: tuple[int, ...]
    nn: NNExtraction | None
    summary: dict[str, Any]
    out: Path | None

    @property
    def flagged(self) -> tuple[ConditionResult, ...]:
        return tuple(c for c in self.conditions if c.flagged)

    @property
    def extracted(self) -> tuple[ConditionResult, ...]:
        return tuple(c for c in self.conditions if c.extracted)


# ---------------------------------------------------------------------------------------------------- models
@dataclasses.dataclass(frozen=True)
class _Model:
    kind: str  # "unet" | "class_unet" | "sd_pipeline"
    image_shape: tuple[int, int, int]
    num_classes: int | None
    identity: str
    handle: Any  # what the sampler needs
    unet: Any
    sampler: Any = None  # a memcore.sampling.Sampler given as the model, reused as is


def _as_sampler(model: Any) -> Any:
    """``model`` if it is a ``memcore.sampling.Sampler``, else None (without importing diffusers)."""
    engine = sys.modules.get("memcore.sampling.engine")  # a Sampler exists only once this was imported
    return model if engine is not None and isinstance(model, engine.Sampler) else None


def _identity(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.path.abspath(os.fspath(model))
    sampler = _as_sampler(model)
    if sampler is not None:
        # the model it was built from: a Sampler of a path resumes a run started with that path
        src = sampler.model.source
        return os.path.abspath(src) if src and os.path.exists(src) else f"<{src or 'Sampler'}:in-memory>"
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(model, tuple):
        name = getattr(getattr(model[0], "config", None), "_name_or_path", None)
    return f"<{type(model).__name__}:{name or 'in-memory'}>"


def _load_model(model: Any, config: ExtractConfig, device: torch.device) -> _Model:
    from memcore.attacks.reference import load_reference_model

    dtype = getattr(torch, config.dtype)
    sampler = _as_sampler(model)
    if sampler is not None:
        if config.sampler != "memcore":
            raise ValueError(
                f"a Sampler runs the memcore engine; config.sampler={config.sampler!r} needs the model itself"
            )
        lm = sampler.model
        if not same_device(lm.device, device):
            raise ValueError(f"the Sampler's model is on {lm.device}, but the extraction runs on {device}")
        if lm.dtype != dtype:
            raise ValueError(f"the Sampler's model is {lm.dtype}, but config.dtype is {config.dtype!r}")
        _check_sampler_config(sampler, lm.kind, config)
        return _Model(lm.kind, tuple(lm.image_shape), lm.num_classes, _identity(model), lm, lm.unet, sampler)
    if config.sampler == "reference":
        m = load_reference_model(model, device=device)
        if dtype != torch.float32:
            (m.pipeline if m.pipeline is not None else m.unet).to(dtype=dtype)
        return _Model(m.kind, m.image_shape, m.num_classes, _identity(model), m, m.unet)
    from memcore.models.loading import load_model

    if isinstance(model, tuple) and len(model) == 2:  # (UNet2DModel, scheduler)
        lm = load_model(model[0], device=device, dtype=dtype, scheduler=model[1])
    else:
        lm = load_model(model, device=device, dtype=dtype)
    return _Model(lm.kind, tuple(lm.image_shape), lm.num_classes, _identity(model), lm, lm.unet)


# --------------------------------------------------------------------------------------------------- sampler
Job = tuple[int, Any, int]  # (condition_id, condition, seed)


def _batched(it: Iterable[Job], n: int) -> Iterator[list[Job]]:
    buf: list[Job] = []
    for j in it:
        buf.append(j)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _sampler_config(kind: str, config: ExtractConfig) -> Any:
    """The ``SamplerConfig`` an extraction with ``config`` samples a model of ``kind`` with."""
    from memcore.sampling import SamplerConfig

    return SamplerConfig(
        num_inference_steps=config.num_inference_steps,
        guidance_scale=_guidance(kind, config),
        eta=config.eta,
        mode=config.mode,
        batch_size=config.micro_batch,
        backend=config.backend,
        compile=config.compile,
        compile_mode=config.compile_mode,
        fuse_norm=config.fuse_norm,
        fuse_qkv=config.fuse_qkv,
        attention=config.attention,
    )


def _check_sampler_config(sampler: Any, kind: str, config: ExtractConfig) -> None:
    """Refuse a Sampler whose images would not be the ones ``config`` (and so the run's records) describes."""
    want = _sampler_config(kind, config)
    diff = [
        f"{f.name} (Sampler {getattr(sampler.config, f.name)!r}, config {getattr(want, f.name)!r})"
        for f in dataclasses.fields(want)
        if getattr(sampler.config, f.name) != getattr(want, f.name)
    ]
    if diff:
        raise ValueError(
            "the Sampler was not built for this ExtractConfig: "
            + "; ".join(diff)
            + " (build it with memcore.attacks.carlini.extraction_sampler(model, config))"
        )


def extraction_sampler(
    model: Any, config: ExtractConfig | None = None, *, device: torch.device | str | None = None
) -> Any:
    """A ``memcore.sampling.Sampler`` for running :func:`extract` with ``config`` several times on one model.

    Pass it to :func:`extract` / :func:`iter_extract` as the model: every call then reuses the loaded model,
    its text-embedding cache, its CUDA graphs and its compiled UNet instead of building them again (a tool
    that calls ``extract`` per batch of prompts saves the graph capture and its warm-up UNet calls each time).
    Images and records are the same as when the model itself is passed. A call whose ``config`` samples
    differently (steps, guidance, micro-batch, mode, dtype, backend, compile, fusion, attention) is refused.

    Args:
        model: anything :func:`extract` accepts (but a Sampler).
        config: the extraction parameters (default ``ExtractConfig()``); ``config.sampler`` must be "memcore".
        device: where it samples (default: CUDA when available).

    Returns:
        A ``memcore.sampling.Sampler``.
    """
    config = config or ExtractConfig()
    if config.sampler != "memcore":
        raise ValueError(
            f"extraction_sampler builds the memcore engine; config.sampler is {config.sampler!r}"
        )
    if _as_sampler(model) is not None:
        raise TypeError("model is a Sampler already")
    device = resolve_device(device)
    from memcore.sampling import Sampler

    m = _load_model(model, config, device)
    return Sampler(m.handle, _sampler_config(m.kind, config), device=device)


def _make_sampler(
    model: _Model, config: ExtractConfig, device: torch.device
) -> Callable[[Iterable[Job]], Iterator[torch.Tensor]]:
    """A function jobs -> iterator of uint8 [b, C, H, W] device batches, in job order."""
    if config.sampler == "reference":
        from memcore.attacks.reference import reference_generate

        def ref(jobs: Iterable[Job]) -> Iterator[torch.Tensor]:
            for chunk in _batched(jobs, config.micro_batch):
                # pad to the fixed micro-batch (repeat the last job) so an image depends on its seed only
                pad = chunk + [chunk[-1]] * (config.micro_batch - len(chunk))
                with stage("unet"):
                    imgs = reference_generate(
                        model.handle,
                        [s for _, _, s in pad],
                        [c for _, c, _ in pad] if model.kind != "unet" else None,
                        num_inference_steps=config.num_inference_steps,
                        guidance_scale=config.guidance_scale,
                        eta=config.eta,
                        device=device,
                    )
                yield imgs[: len(chunk)].to(device)

        return ref

    from memcore.sampling import Sampler

    # one Sampler for the run: loaded model, caches and CUDA graphs are reused (also for regeneration); a
    # Sampler passed as the model (checked against the config in _load_model) is reused across runs too
    engine = model.sampler or Sampler(model.handle, _sampler_config(model.kind, config), device=device)

    def eng(jobs: Iterable[Job]) -> Iterator[torch.Tensor]:
        for b in engine.stream(jobs):
            yield b.images_u8[: b.valid]

    return eng


# ----------------------------------------------------------------------------------------- distance / clique
def _graph_rows(new: torch.Tensor, upto: torch.Tensor, config: ExtractConfig) -> torch.Tensor:
    from memcore.distance import tiled_l2_graph

    return tiled_l2_graph(
        new, config.alpha, b=upto, grid=config.grid, backend=config.backend, check_finite=False
    )


def _unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """int64/uint64 [R, W] words -> bool [R, n] (bit j in word j // 64 at position j % 64)."""
    w = words.view(torch.int64)
    shifts = torch.arange(64, device=w.device, dtype=torch.int64)
    bits = (w[..., None] >> shifts) & 1
    return bits.reshape(w.shape[0], -1)[:, :n].bool()


def _pack_bits(adj: torch.Tensor) -> torch.Tensor:
    """bool [R, n] -> int64 [R, ceil(n/64)] words (view as uint64 for the bitset dtype)."""
    r, n = adj.shape
    w = -(-n // 64)
    pad = torch.zeros((r, w * 64), dtype=torch.int64, device=adj.device)
    pad[:, :n] = adj.to(torch.int64)
    shifts = torch.arange(64, device=adj.device, dtype=torch.int64)
    # distinct powers of two: the sum is the bitwise OR (bit 63 wraps to the sign bit, as intended)
    return (pad.reshape(r, w, 64) << shifts).sum(-1)


def _symmetrize(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Row i of ``rows`` is valid for columns j < i (earlier candidates): mirror the strict lower triangle."""
    a = _unpack_bits(rows, n)
    low = torch.tril(a, -1)
    return _pack_bits(low | low.T)


def _clique_backend(config: ExtractConfig) -> str:
    # the clique engine runs on the host: "auto" (C++ core when built) unless the reference path is asked for
    return "reference" if config.backend == "reference" else "auto"


def _max_clique(adj_cpu: torch.Tensor, config: ExtractConfig) -> tuple[list[int], bool]:
    from memcore.graph import max_clique

    kw = {} if config.clique_budget is None else {"node_budget": config.clique_budget}
    # min_size=1: the exact clique of every condition, also below min_clique, so that unflagged conditions
    # get a medoid, a verification and a place in the ranking (recall of the PR curve)
    res = max_clique(adj_cpu, min_size=1, validate=False, backend=_clique_backend(config), **kw)
    return [int(m) for m in res.members.tolist()], bool(res.exact)


# ------------------------------------------------------------------------------------------ training data
class _Train:
    """Training images for verification (SPEC §2.5) and the k-NN of SPEC §3.

    Held on the device whole when they fit the budget (``train_chunk`` None: at most 8 GiB and a quarter of
    the free device memory), else kept on the host and streamed through the device ``chunk`` images at a
    time, so device memory is O(chunk) whatever the size of the training set. Results are identical either
    way: uint8 distances are exact, nearest images keep the first (smallest) index on ties and the k-NN merges
    chunks in (distance, index) order.

    A set that fits is uploaded in the background (``start``; the extraction loop calls it once the first
    batch is under way): a pageable copy in front of the first launch would leave the GPU idle (150 MB,
    CIFAR-10, ~10 ms). Not earlier: the first batch captures the sampler's CUDA graph, and a capture in
    PyTorch's default (global) mode forbids the upload thread's event waits and pinned allocations.
    """

    def __init__(
        self,
        images: torch.Tensor,
        device: torch.device,
        backend: str,
        chunk: int | None,
        whole: Upload | None = None,
    ) -> None:
        self.host = images
        self.backend = backend
        self.device = device
        n = images.shape[0]
        # a prepared set's device copy (``whole``) fixes the layout: held whole, not streamed
        self.chunk = n if whole is not None else _train_chunk(images, device, chunk)
        self.whole = whole

    def start(self) -> None:
        """Begin the background upload of a set held whole (no-op when streamed, or once started)."""
        if self.whole is None and self.chunk >= len(self):
            self.whole = Upload(self.host, self.device)

    def __len__(self) -> int:
        return self.host.shape[0]

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, [c, C, H, W] device images) covering the training set in order."""
        self.start()
        if self.whole is not None:
            yield 0, self.whole.wait()
            return
        for s in range(0, len(self), self.chunk):
            yield s, to_device(self.host[s : s + self.chunk].contiguous(), self.device)

    def knn(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, k] ascending distances of each query to its k nearest training images and their indices."""
        from memcore.distance import knn
        from memcore.ops.distance import merge_topk

        k = min(k, len(self))
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        for s, part in self.chunks():
            d, i = knn(q, part, min(k, part.shape[0]), backend=self.backend, check_finite=False)
            best = (d, i + s) if best is None else merge_topk(best, (d, i + s), k)
        assert best is not None
        return best

    def nearest(self, img: torch.Tensor, delta: float) -> tuple[torch.Tensor, ...]:
        """Nearest training image of ``img`` [1, C, H, W] by normalized L2, with no host sync.

        Returns:
            (index int64 [], distance float32 [], count within ``delta`` int64 [], the image [1, C, H, W]);
            ties go to the smallest index, as ``argmin`` over the whole set.
        """
        from memcore.distance import l2

        best_j = best_d = cnt = match = None
        for s, part in self.chunks():
            d = l2(img, part, backend=self.backend, check_finite=False)[0]
            j = torch.argmin(d)
            dj = d.gather(0, j.view(1))[0]
            c = (d <= delta).sum()  # in float32, as on the distance matrix: extracted and count agree
            im = part.index_select(0, j.view(1))
            if best_d is None:
                best_j, best_d, cnt, match = j + s, dj, c, im
                continue
            better = dj < best_d  # strict: an earlier chunk (smaller index) wins a tie
            best_j = torch.where(better, j + s, best_j)
            best_d = torch.where(better, dj, best_d)
            match = torch.where(better, im, match)
            cnt = cnt + c
        return best_j, best_d, cnt, match


def _train_chunk(images: torch.Tensor, device: torch.device, chunk: int | None) -> int:
    """Training images on the device at once: ``chunk`` (``train_chunk``) or the automatic budget, at most all."""
    return min(images.shape[0], chunk or _auto_train_chunk(images, device))


def _auto_train_chunk(images: torch.Tensor, device: torch.device) -> int:
    """Whole set on the CPU or when it fits the budget; else chunks of half the budget (two in flight)."""
    n = images.shape[0]
    if device.type != "cuda" or n == 0:
        return n
    per = max(1, images[0].numel() * images.element_size())
    free, _total = torch.cuda.mem_get_info(device)
    budget = min(8 << 30, free // 4)
    return n if n * per <= budget else max(1, budget // 2 // per)


class PreparedTrainingSet:
    """Training images read, checked, described and placed on the device once, for several extractions.

    Built by :func:`extraction_training_set`; pass it as ``train=`` to :func:`extract` / :func:`iter_extract`.
    Each call then skips what it would otherwise repeat: reading and decoding the files, hashing the images
    (the sha256 that identifies them in a results directory) and uploading the set to the device; the
    Triton k-NN's packed copy of the set is kept between calls too, as it is keyed on the device tensor.
    Records are the same as when the path or tensor itself is given, and a results directory started with
    either resumes with the prepared set (and the other way round): the run parameters are the same.

    A tensor is copied when prepared, so later writes to it cannot make the recorded digest lie. The host
    images stay in memory while the object lives (they feed streamed chunks and the PNG pairs); a set held
    whole also keeps its device copy.

    Attributes:
        images: uint8 [T, C, H, W] host images, read-only: an extraction refuses a set whose images were
            written to in place since it was prepared (the recorded digest and the device copy would lie).
        device: the device the extractions must run on.
        train_chunk: the ``train_chunk`` it was prepared with (None: the automatic budget).
        chunk: training images on the device at once (T when held whole).
    """

    def __init__(self, images: torch.Tensor, info: dict, device: torch.device, train_chunk: int | None):
        self._images = images
        # torch has no read-only tensor; its version counter moves on every in-place write (not on writes
        # through .data), which is what _for_run checks
        self._version = images._version
        self.device = device
        self.train_chunk = train_chunk
        self._info = dict(info)
        self.chunk = _train_chunk(images, device, train_chunk)
        # a set held whole is uploaded now, blocking: an upload thread still running when a later extraction
        # captures its first CUDA graph would break the capture (see _Train)
        self._whole: Upload | None = None
        if self.chunk >= len(self) > 0:
            self._whole = Upload(images, device)
            self._whole.wait()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def __len__(self) -> int:
        return self._images.shape[0]

    @property
    def images(self) -> torch.Tensor:
        """uint8 [T, C, H, W] host images (read them; see the class docstring)."""
        return self._images

    @property
    def info(self) -> dict:
        """How the set is identified in the run parameters: ``source`` (a path, or ``<tensor>``), ``num`` and
        ``sha256`` (of the uint8 images)."""
        return dict(self._info)

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        where = "whole" if self._whole is not None else f"streamed {self.chunk} at a time"
        return f"PreparedTrainingSet({self._info['source']}, {len(self)}x{c}x{h}x{w} uint8, {self.device}, {where})"

    def _for_run(self, device: torch.device, config: ExtractConfig) -> None:
        """Refuse an extraction this set was not prepared for (before anything is loaded)."""
        if self._images._version != self._version:
            raise ValueError(
                "the prepared training set's images were written to since it was prepared; prepare it again "
                "with extraction_training_set (its recorded sha256 and device copy describe the old images)"
            )
        if not same_device(self.device, device):
            raise ValueError(
                f"the training set was prepared on {self.device}, but the extraction runs on {device}"
            )
        if config.train_chunk is not None and config.train_chunk != self.train_chunk:
            raise ValueError(
                f"the training set was prepared with train_chunk={self.train_chunk}, "
                f"config.train_chunk is {config.train_chunk}"
            )

    def _train(self, backend: str) -> _Train:
        return _Train(self.images, self.device, backend, self.chunk, whole=self._whole)


def extraction_training_set(
    train: torch.Tensor | str | os.PathLike,
    config: ExtractConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> PreparedTrainingSet:
    """Prepare training images once for several :func:`extract` calls (see :class:`PreparedTrainingSet`).

    Args:
        train: uint8 [T, C, H, W] (or float in [0, 1]), a path readable by ``memcore.io.open_training_set``
            or a set it opened, as :func:`extract` takes.
        config: the extraction parameters; only ``train_chunk`` is used (default ``ExtractConfig()``). Later
            calls may pass another config, but not another explicit ``train_chunk``.
        device: where the extractions will run (default: CUDA when available).

    Returns:
        The prepared set; its image shape is checked against the model by each extraction.
    """
    if isinstance(train, PreparedTrainingSet):
        raise TypeError("train is a PreparedTrainingSet already")
    if train is None:
        raise TypeError("train is None: there is no training set to prepare")
    config = config or ExtractConfig()
    device = resolve_device(device)
    t, info = _load_train(train, None)
    assert t is not None and info is not None
    host = t.cpu()
    if host is train:  # the caller's own uint8 tensor: keep a copy that the recorded digest stays true for
        host = host.clone()
    return PreparedTrainingSet(host.contiguous(), info, device, config.train_chunk)


def _to_host(ts: list[torch.Tensor | None], device: torch.device) -> tuple[list[torch.Tensor | None], Any]:
    """Start device -> host copies (pinned, non_blocking) and return them with an event to wait on."""
    if device.type != "cuda":
        return [None if t is None else t.cpu() for t in ts], None
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        out.append(h)
    ev = torch.cuda.Event()
    ev.record()
    return out, ev


def _condition_stats(
    buf: torch.Tensor, members: list[int], tr: _Train | None, config: ExtractConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Device work of SPEC §2 steps 4–5 for one condition, with no host sync.

    Args:
        buf: [N, C, H, W] the condition's candidates.
        members: the clique (sorted candidate indices, at least one).

    Returns:
        (scalars [6] float64: medoid position in ``members``, mean pairwise tiled L2 (0 for one member),
        nearest training index, its normalized L2, eidetic count, extracted flag — the last four 0 without
        training data), the medoid image [1, C, H, W], the nearest training image [1, C, H, W] or None.
    """
    from memcore.distance import tiled_l2

    k = len(members)
    idx = to_device(torch.tensor(members, dtype=torch.int64), device)
    sub = buf.index_select(0, idx)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    if k > 1:
        d = tiled_l2(sub, grid=config.grid, backend=config.backend, check_finite=False).double()
        pos = torch.argmin(d.sum(1))  # least summed distance; the first on ties
        mean = d.sum() / (k * (k - 1))
    else:
        pos, mean = torch.zeros((), dtype=torch.int64, device=device), zero
    med = sub.index_select(0, pos.view(1))
    j = dist = cnt = ext = zero
    match = None
    if tr is not None:
        j, dj, c, match = tr.nearest(med, config.delta)
        # the comparison in float32, as on the distance matrix: extracted and eidetic count agree
        ext, cnt, dist, j = (dj <= config.delta).double(), c.double(), dj.double(), j.double()
    scal = torch.stack([pos.double(), mean.double(), j, dist, cnt, ext])
    return scal, med, match


# ----------------------------------------------------------------------------------------------- the engine
class _Slot:
    def __init__(self, n: int, shape: tuple[int, int, int], device: torch.device) -> None:
        self.buf = torch.empty((n, *shape), dtype=torch.uint8, device=device)
        # bitset rows kept as int64 (uint64 has few kernels on CUDA); viewed as uint64 where needed
        self.rows = torch.zeros((n, -(-n // 64)), dtype=torch.int64, device=device)
        self.cid = -1
        self.cond: Any = None
        self.count = 0
        self.future: cf.Future | None = None


class _Timer:
    def __init__(self, device: torch.device, sync: bool) -> None:
        self.t: dict[str, float] = {}
        self.sync = sync and device.type == "cuda"

    def add(self, name: str, dt: float) -> None:
        self.t[name] = self.t.get(name, 0.0) + dt

    def span(self, name: str):
        timer = self

        class _S:
            def __enter__(self):
                if timer.sync:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()
                self.rng = stage(name)
                self.rng.__enter__()

            def __exit__(self, *exc):
                if timer.sync:
                    torch.cuda.synchronize()
                self.rng.__exit__(*exc)
                timer.add(name, time.perf_counter() - self.t0)

        return _S()


def _conditions_arg(conditions: Any) -> list[Any] | None:
    """The ``conditions`` argument as a list (or None), refusing what is not a sequence of conditions.

    A bare string would otherwise be iterated character by character ("a cat" as five prompts, "35" as the
    class ids 3 and 5) and a bare class id fail deep inside: both are one condition the caller meant as a list.
    """
    if conditions is None:
        return None
    if isinstance(conditions, (str, bytes)):
        raise TypeError(
            f"conditions must be a sequence of conditions, got the string {conditions!r}: pass [{conditions!r}]"
        )
    if isinstance(conditions, torch.Tensor) and conditions.dim() != 1:
        raise TypeError(f"conditions as a tensor must be 1-D class ids, got shape {tuple(conditions.shape)}")
    # a set has no order for condition ids to follow, a mapping iterates its keys
    if (
        not isinstance(conditions, Iterable)
        or isinstance(conditions, (Set, Mapping))
        or getattr(conditions, "ndim", 1) != 1
    ):
        raise TypeError(
            "conditions must be a sequence (prompts for a text model, class ids for a class-conditional UNet), "
            f"got {type(conditions).__name__} {conditions!r}"
        )
    return list(conditions)


def _class_id(c: Any) -> int:
    """A class id as an int: Python, numpy and 0-d tensor integers, or a string of digits; else ValueError."""
    if isinstance(c, str) and c.strip().isascii() and c.strip().isdigit():  # not "٣", which int() reads as 3
        return int(c)
    try:
        return as_int("class id", c)  # the sampler's rule: no bools, no floats truncated
    except TypeError:
        raise ValueError(f"class-conditional model: condition {c!r} is not a class id") from None


def _conditions_for(model: _Model, conditions: list[Any] | None) -> list[Any]:
    """The run's conditions for this model (``conditions`` as :func:`_conditions_arg` returns it)."""
    if model.kind == "unet":
        if conditions not in (None, [], [""]):
            raise ValueError("an unconditional model takes no conditions (use --unconditional)")
        return [""]
    if not conditions:
        raise ValueError(
            "a conditional model needs conditions: prompts for a text model, class ids for a class-conditional UNet"
        )
    if model.kind == "class_unet":
        out = []
        for c in conditions:
            c = _class_id(c)
            if model.num_classes is not None and not 0 <= c < model.num_classes:
                raise ValueError(f"class id {c} out of range for a model with {model.num_classes} classes")
            out.append(c)
        return out
    for i, c in enumerate(conditions):
        if not isinstance(c, str):
            raise ValueError(f"text model: condition {c!r} is not a prompt string")
        check_text(c, f"text model: prompt {i}")
    return [str(c) for c in conditions]  # numpy strings as plain ones (JSON records, token digest)


def _conditions_digest(conds: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(conds), ensure_ascii=False).encode()).hexdigest()


def _check_fit(model: _Model, config: ExtractConfig) -> None:
    """Refuse what the model cannot run, before anything is sampled or written (the run and its dry run):
    a tiled-L2 grid that does not divide its image size, more DDIM steps than its training timesteps."""
    (_c, h, w), (gh, gw) = model.image_shape, config.grid
    if h % gh or w % gw:
        raise ValueError(f"grid {gh}x{gw} does not divide the model's image size {h}x{w}")
    steps, trained = config.num_inference_steps, _schedule_params(model)["num_train_timesteps"]
    if steps > trained:  # both samplers' DDIMScheduler would refuse it, in diffusers' words, mid-set-up
        raise ValueError(
            f"num_inference_steps ({steps}) cannot exceed the model's num_train_timesteps ({trained}, from its "
            "scheduler config): DDIM steps through a subset of the timesteps it was trained on"
        )


def _train_shape_check(got: Sequence[int], shape: tuple[int, int, int], source: str) -> None:
    """Refuse training images of shape ``got`` (C, H, W) for a model that generates ``shape``."""
    got, shape = tuple(got), tuple(shape)
    if got != shape:
        # a channels-last tensor is the usual way to get here: say so rather than only print two shapes
        hint = " (channels last? pass images as [T, C, H, W])" if got == (*shape[1:], shape[0]) else ""
        raise ValueError(f"training images {source} have shape {got} but the model generates {shape}{hint}")


def _run_params(
    model: _Model, conds: list[Any], config: ExtractConfig, train_info: dict | None, device
) -> dict:
    cfg = dataclasses.asdict(config)
    for k in (
        "slots",
        "sync_timing",
        "max_nn_images",
        "nn_checkpoint_s",
        "train_chunk",
    ):  # do not change records
        cfg.pop(k)
    if cfg["attention"] == "auto":  # added after the first results format: its default keeps old directories
        cfg.pop("attention")
    return {
        "model": model.identity,
        "model_sha256": _model_sha256(model),
        "scheduler": _schedule_params(model),
        "model_kind": model.kind,
        "image_shape": list(model.image_shape),
        "num_conditions": len(conds),
        "conditions_sha256": _conditions_digest(conds),
        "train": None if train_info is None else {k: _resolve(v) for k, v in train_info.items()},
        "device_type": device.type,
        **cfg,
        "grid": list(config.grid),
        "guidance_scale": _guidance(model.kind, config),
        **({"prompt_tokens_sha256": _tokens_sha256(model, conds)} if model.kind == "sd_pipeline" else {}),
    }


def _model_sha256(model: _Model) -> str:
    """The digest of the weights the run samples with (``memcore.models.fingerprint``): with it a results
    directory refuses another model behind the same path or in-memory description."""
    from memcore.models.fingerprint import weights_sha256

    parts = _components(model)
    return weights_sha256(
        {
            "unet": model.unet,
            "text_encoder": getattr(parts, "text_encoder", None),
            "vae": getattr(parts, "vae", None),
        }
    )


def _components(model: _Model) -> Any:
    """What holds the text encoder, tokenizer and VAE: a LoadedModel, or the reference path's SD pipeline."""
    return getattr(model.handle, "pipeline", None) or model.handle


def _tokens_sha256(model: _Model, conds: list[Any]) -> str:
    """sha256 of the token ids the text encoder gets for the run's prompts and the empty (unconditional)
    prompt, tokenized as the samplers tokenize them. The tokenizer is not a weight: this pins what of it a run
    depends on, stable across tokenizer library versions that serialize tokenizers differently."""
    parts = _components(model)
    tok = parts.tokenizer
    enc = tok(["", *map(str, conds)], padding="max_length", max_length=tok.model_max_length, truncation=True)
    ids = {"input_ids": [list(map(int, x)) for x in enc["input_ids"]]}
    if getattr(parts.text_encoder.config, "use_attention_mask", False):  # then the mask is an input too
        ids["attention_mask"] = [list(map(int, x)) for x in enc["attention_mask"]]
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()


# DDIMScheduler's arguments: the schedule both samplers build from the model's scheduler config
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "clip_sample",
    "set_alpha_to_one",
    "steps_offset",
    "prediction_type",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "timestep_spacing",
    "rescale_betas_zero_snr",
)


def _schedule_params(model: _Model) -> dict[str, Any]:
    """The DDIM schedule the run samples with, as both samplers build it (``DDIMScheduler.from_config`` of the
    model's scheduler config): an edited ``scheduler_config.json`` changes images, so it is a run parameter.
    A fixed list of keys, so that a diffusers release adding an argument does not refuse a directory."""
    sched = model.handle.scheduler
    cfg = sched.config
    hit = _SCHEDULES.get(sched)
    if hit is not None and hit[0] is cfg:  # from_config costs ~8 ms: once per scheduler, not per call
        return dict(hit[1])
    from diffusers import DDIMScheduler

    eff = DDIMScheduler.from_config(cfg).config
    out = {k: eff[k] for k in _SCHEDULE_KEYS if k in eff}
    if out.get("trained_betas") is not None:
        out["trained_betas"] = [float(b) for b in out["trained_betas"]]
    _SCHEDULES[sched] = (cfg, out)
    return dict(out)


# scheduler -> (its config object when read, the schedule parameters)
_SCHEDULES: weakref.WeakKeyDictionary[Any, tuple[Any, dict[str, Any]]] = weakref.WeakKeyDictionary()


def _resolve(v: Any) -> Any:
    return v.result() if isinstance(v, cf.Future) else v


def _guidance(kind: str, config: ExtractConfig) -> float | None:
    if kind == "sd_pipeline":
        return 7.5 if config.guidance_scale is None else float(config.guidance_scale)
    return None


def iter_extract(
    model: Any,
    conditions: Sequence[Any] | None = None,
    *,
    config: ExtractConfig | None = None,
    train: PreparedTrainingSet | torch.Tensor | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    shard: _results.ShardSpec | None = None,
    progress: bool = False,
    _state: dict | None = None,
) -> Iterator[ConditionResult]:
    """Run generate-and-filter, yielding one :class:`ConditionResult` per finished condition.

    Args:
        model: a local diffusers model/pipeline directory or a loaded model (see ``memcore.models``); with
            ``config.sampler="reference"`` also a ``(UNet2DModel, scheduler)`` pair; or a Sampler from
            :func:`extraction_sampler` with the same ``config`` (reused across calls; it sets the default device).
        conditions: prompts (text models), class ids (class-conditional UNets), None for unconditional models.
        config: the attack parameters.
        train: training images, uint8 [T, C, H, W] (or float in [0, 1]), a path readable by
            ``memcore.io.open_training_set`` or a set it opened (the same as its path), or a set from
            :func:`extraction_training_set` (read and uploaded once for many calls; it sets the default
            device); enables verification (and NN extraction for unconditional models).
        out: results directory (resumable); None keeps everything in memory.
        device: where sampling and distances run (default: the Sampler's or prepared set's device, else CUDA
            when available).
        shard: which part of the conditions this process runs (default: the torchrun rank, if any).
        progress: show a progress bar with ETA.

    Yields:
        ConditionResult, in order of completion (condition order for a single process), each already appended
        to ``out`` when yielded; resuming ``out`` yields only the conditions it still lacked (the directory's
        earlier records are read back by :func:`extract`).

    A run that fails, is interrupted or is closed before it has written anything but the results directory's
    ``params.json`` takes that back (see ``ResultsDir.abandon``): a refused command leaves no directory that
    would then refuse the corrected one.

    Raises:
        TypeError / ValueError: at the call, for a ``config`` that is not an ``ExtractConfig``, conditions
            that are not a sequence, or an unknown device; everything that needs the model or the training
            data (loaded at the first ``next()``) is checked then, before anything is sampled or written.
    """
    if config is not None and not isinstance(config, ExtractConfig):
        raise TypeError(f"config must be an ExtractConfig, got {type(config).__name__}")
    conditions = _conditions_arg(conditions)  # a generator of conditions is read once, here
    if device is not None:
        resolve_device(device)
    state = _state if _state is not None else {}
    return _abandoning(
        _extraction(
            model, conditions, config=config, train=train, out=out, device=device, shard=shard,
            progress=progress, state=state,
        ),
        state,
    )  # fmt: skip


def _abandoning(results: Iterator[ConditionResult], state: dict) -> Iterator[ConditionResult]:
    """``results`` (the generator :func:`iter_extract` returns), taking back the results directory's
    ``params.json`` when the run fails or is closed before writing anything else (``ResultsDir.abandon``)."""
    try:
        yield from results
    except BaseException:
        rd = state.get("results_dir")
        if rd is not None:
            rd.abandon()
        raise


def _extraction(
    model: Any,
    conditions: Sequence[Any] | None,
    *,
    config: ExtractConfig | None,
    train: PreparedTrainingSet | torch.Tensor | str | os.PathLike | None,
    out: str | os.PathLike | None,
    device: torch.device | str | None,
    shard: _results.ShardSpec | None,
    progress: bool,
    state: dict,
) -> Iterator[ConditionResult]:
    """The body of :func:`iter_extract` (which see); ``state`` collects what :func:`extract` reports."""
    config = config or ExtractConfig()
    if config.min_clique > config.num_per_condition:  # legal (a quick try-out), but say what it means
        warnings.warn(
            f"min_clique ({config.min_clique}) exceeds num_per_condition ({config.num_per_condition}): no "
            "condition can be flagged",
            stacklevel=3,
        )
    given = _as_sampler(model)
    prepared = train if isinstance(train, PreparedTrainingSet) else None
    if device is None:
        device = given.device if given is not None else prepared.device if prepared is not None else None
    device = resolve_device(device)
    if prepared is not None:
        prepared._for_run(device, config)
    if config.backend != "auto":
        from memcore.ops._backend import available

        ok, why = available(config.backend, device)
        if not ok:  # before anything is loaded or written (the distance ops would say it only mid-run)
            raise ValueError(why)
    conditions = _conditions_arg(conditions)  # before the model is loaded: a type error costs nothing
    timer = _Timer(device, config.sync_timing)
    t_start = time.perf_counter()
    with timer.span("load"):
        m = _load_model(model, config, device)
    conds = _conditions_for(m, conditions)
    n_cands = max(config.num_per_condition, config.nn_candidates or 0) if m.kind == "unet" else None
    last_seed = config.seed_of(len(conds) - 1, (n_cands or config.num_per_condition) - 1)
    if last_seed > MAX_SEED:  # now, not when the sampler reaches it with a results directory begun
        raise ValueError(
            f"the run's seeds go up to {last_seed} (seed + conditions x num_per_condition), beyond the largest "
            f"seed {MAX_SEED}: choose a smaller seed"
        )
    _check_fit(m, config)
    # without a results directory nothing needs the training set's digest before the summary: hash it on a
    # thread (hashlib releases the GIL) while the device samples, instead of in front of the first batch
    train_t, train_info = _load_train(train, m.image_shape, lazy_digest=out is None)
    # the sampler refuses what the model cannot do (fuse_norm off CUDA, fuse_qkv without the diffusers hook)
    # when it is built: build it before the results directory exists, so a refused run writes nothing
    sampler = _make_sampler(m, config, device)
    shard = shard or _results.shard_from_env()
    rd = None
    done: set[int] = set()
    if out is not None:
        rd = _results.ResultsDir(out, _run_params(m, conds, config, train_info, device), shard=shard)
        done = rd.completed_ids()
    state.update(model=m, conditions=conds, results_dir=rd, timer=timer, device=device, train_info=train_info)
    if prepared is not None:
        tr: _Train | None = prepared._train(config.backend)
    else:
        tr = _Train(train_t, device, config.backend, config.train_chunk) if train_t is not None else None
    n = config.num_per_condition
    todo = [g for g in shard.select(range(len(conds))) if g not in done]
    # SPEC §3 on unconditional models: NN candidate indices [0, n_nn) (seeds seed + i). This process runs its
    # assignment minus what any checkpoint part already covers; [0, N) is fed from condition 0's own
    # candidates when condition 0 runs here, the rest are NN-only jobs (condition id -1).
    n_nn = max(n, config.nn_candidates or n)
    nn_state: NNState | None = None
    nn_todo: list[tuple[int, int]] = []
    nn_file = None
    if m.kind == "unet" and tr is not None:
        if out is None and not shard.is_whole:  # its result would claim all n_nn candidates, but hold a part
            raise ValueError(
                f"the NN extraction of shard {shard.index}/{shard.count} (--shard or the torchrun rank) runs only "
                "part of the candidates, which merge in a results directory: pass out=, or shard=ShardSpec()"
            )
        nn_todo = _nn.assignment(n_nn, n, shard)
        nn_state = NNState(len(tr), device)
        if out is not None:
            nn_file = _nn.part_path(out, shard)
            nn_todo = _nn.subtract(nn_todo, _nn.covered(out, len(tr)))
            if nn_file.exists():  # this part's own earlier progress: continue from it
                nn_state, _ = NNState.load(nn_file, device)
    feed0 = {i for lo, hi in nn_todo for i in range(lo, min(hi, n))} if 0 in todo else set()
    nn_only = _nn.subtract(nn_todo, [(0, n)]) if 0 in todo else nn_todo
    images_dir = Path(out) / "images" if out is not None else None

    def jobs() -> Iterator[Job]:
        # the NN-only candidates follow the first condition (condition 0, when this process runs it)
        for g in [*todo[:1], None, *todo[1:]]:  # None: the NN-only block
            if g is None:
                for lo, hi in nn_only:
                    for i in range(lo, hi):
                        yield (-1, None, config.seed + i)
                continue
            for i in range(n):
                yield (g, None if m.kind == "unet" else conds[g], config.seed_of(g, i))

    slots = [_Slot(n, m.image_shape, device) for _ in range(config.slots)]
    free = list(range(config.slots))
    active: dict[int, int] = {}  # condition id -> slot, while filling
    pending: OrderedDict[int, int] = OrderedDict()  # condition id -> slot, clique running
    filled: set[int] = set()  # conditions whose N clique candidates are all in
    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memcore-clique")
    n_jobs = n * len(todo) + _nn.length(nn_only)
    bar = _progress(n_jobs, progress)
    t_ckpt = time.perf_counter()
    n_flagged = 0
    # NN candidates wait on the device until a block is full, then meet the training set in one k-NN: a
    # k-NN call has fixed costs (the Triton filter's sampled cut, launches) worth paying per block, not per
    # micro-batch. A block holds at most NN_BLOCK_BYTES of images (and >= one batch); candidates count as
    # folded in (``NNState.mark``) only once their block has run, so a checkpoint never claims them early.
    nn_buf: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []
    nn_rows = max(1, min(NN_BLOCK_MAX, NN_BLOCK_BYTES // max(1, math.prod(m.image_shape))))

    def nn_save() -> None:
        nn_state.save(nn_file, {"params": rd.params})
        rd.keep_params()  # a rank beside this one may have taken params.json back meanwhile (abandon)

    def nn_flush() -> None:
        if not nn_buf:
            return
        with timer.span("nn"):
            q = torch.cat([x[0] for x in nn_buf])
            seeds = torch.cat([x[1] for x in nn_buf])
            d, j = tr.knn(q, config.nn_k)
            nn_state.update(d, j, seeds, config.nn_alpha)
            for lo, hi in _nn.normalize((i, i + 1) for x in nn_buf for i in x[2]):
                nn_state.mark(lo, hi)
        nn_buf.clear()

    def clique_job(host_adj: torch.Tensor, event: Any) -> tuple[list[int], bool, float]:
        t0 = time.perf_counter()
        if event is not None:
            event.synchronize()  # the host copy of the bitset has landed (waits in this thread only)
        with stage("clique"):
            members, exact = _max_clique(host_adj, config)
        return members, exact, time.perf_counter() - t0

    reader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memcore-read")
    reading: OrderedDict[int, cf.Future] = OrderedDict()  # condition id -> result being read back

    def launch(cid: int) -> None:
        """Enqueue the device work of a condition whose clique is known (medoid, mean distance,
        verification), start its host copy, free its slot, and hand the read-back to the reader thread:
        the main thread never waits for the device here, so sampling of later conditions stays queued."""
        si = pending.pop(cid)
        slot = slots[si]
        t0 = time.perf_counter()
        members, exact, t_clique = slot.future.result()
        timer.add("clique_wait", time.perf_counter() - t0)
        timer.add("clique", t_clique)
        with timer.span("clique_stats"):
            scal, med, match = _condition_stats(slot.buf, members, tr, config, device)
        host, ev = _to_host([scal, med, match], device)
        slot.future = None
        slot.cid = -1
        free.append(si)  # later writes to the slot are queued after the reads above (stream order)
        reading[cid] = reader.submit(read_job, cid, slot.cond, members, exact, host, ev)

    def read_job(cid, cond, members, exact, host, ev) -> ConditionResult:
        if ev is not None:
            ev.synchronize()
        scal, med, match = host
        pos, mean, j, dist, cnt, ext = scal.tolist()
        medoid = members[int(pos)]
        res = ConditionResult(
            condition_id=cid,
            condition=cond,
            flagged=len(members) >= config.min_clique,
            clique_size=len(members),
            clique_exact=exact,
            clique_members=tuple(members),
            clique_seeds=tuple(config.seed_of(cid, i) for i in members),
            medoid_index=medoid,
            medoid_seed=config.seed_of(cid, medoid),
            mean_clique_distance=mean if len(members) > 1 else None,
            num_candidates=n,
        )
        if tr is not None:
            res = dataclasses.replace(
                res, nearest_train_index=int(j), nearest_train_distance=dist, extracted=bool(ext),
                eidetic_count=int(cnt),
            )  # fmt: skip
        want_png = config.save_images == "all" or (
            config.save_images == "flagged" and (res.flagged or res.extracted)
        )
        if images_dir is not None and want_png:
            t0 = time.perf_counter()
            from memcore.report.images import save_pair

            rel = f"images/cond{cid:06d}_seed{res.medoid_seed}.png"
            save_pair(images_dir.parent / rel, med[0], None if match is None else match[0])
            res = dataclasses.replace(res, image=rel)
            timer.add("write", time.perf_counter() - t0)
        return res

    def emit(res: ConditionResult) -> ConditionResult:
        nonlocal n_flagged
        if rd is not None and res.condition_id not in done:
            with timer.span("write"):
                rd.append(res.to_record())
        if bar is not None and res.flagged:
            n_flagged += 1
            bar.set_postfix(flagged=n_flagged, refresh=False)
        return res

    def drain(block_one: bool) -> Iterator[ConditionResult]:
        """Launch the conditions whose clique is done (``block_one``: wait for the oldest, to free a slot),
        then yield finished records in condition order (deterministic record order for one process)."""
        while pending:
            cid, si = next(iter(pending.items()))
            if not block_one and not slots[si].future.done():
                break
            block_one = False
            launch(cid)
        while reading:
            cid, fut = next(iter(reading.items()))
            if not fut.done():
                break
            reading.pop(cid)
            yield emit(fut.result())

    def flush() -> Iterator[ConditionResult]:
        while pending:
            launch(next(iter(pending)))
        while reading:
            _, fut = reading.popitem(last=False)
            t0 = time.perf_counter()
            res = fut.result()
            timer.add("read_wait", time.perf_counter() - t0)
            yield emit(res)

    try:
        it = iter(sampler(jobs()))
        job_iter = jobs()
        while True:
            t0 = time.perf_counter()
            with stage("sample"):
                try:
                    imgs = next(it)
                except StopIteration:
                    break
            if timer.sync:
                torch.cuda.synchronize()
            timer.add("sample", time.perf_counter() - t0)
            if tr is not None:
                tr.start()  # after the first batch: its CUDA graph capture is over (see _Train)
            b = imgs.shape[0]
            batch_jobs = [next(job_iter) for _ in range(b)]
            if bar is not None:
                bar.update(b)
            if nn_state is not None:
                sel = [
                    r
                    for r, (g, _, s) in enumerate(batch_jobs)
                    if g == -1 or (g == 0 and s - config.seed in feed0)
                ]
                if sel:
                    with timer.span("nn"):
                        idx = [batch_jobs[r][2] - config.seed for r in sel]
                        seeds = to_device(torch.tensor([batch_jobs[r][2] for r in sel]), device)
                        # a copy: the sampler may reuse its output buffer for the next batch
                        q = imgs.clone() if len(sel) == b else imgs[to_device(torch.tensor(sel), device)]
                        nn_buf.append((q, seeds, idx))
                    if sum(x[0].shape[0] for x in nn_buf) >= nn_rows:
                        nn_flush()
                    if nn_file is not None and time.perf_counter() - t_ckpt >= config.nn_checkpoint_s:
                        nn_flush()
                        with timer.span("nn_checkpoint"):
                            nn_save()
                        t_ckpt = time.perf_counter()
            r = 0
            while r < b:  # contiguous runs of one condition
                g = batch_jobs[r][0]
                e = r
                while e < b and batch_jobs[e][0] == g:
                    e += 1
                if g < 0:  # NN-only candidates
                    r = e
                    continue
                if g not in active and g not in filled:
                    if not free:
                        if not pending:  # cannot happen with slots >= 2 (see the module docstring)
                            raise RuntimeError(
                                f"no free condition slot (slots={config.slots}); use slots >= 2"
                            )
                        yield from drain(block_one=True)
                    si = free.pop(0)
                    slots[si].cid, slots[si].cond, slots[si].count = g, conds[g], 0
                    active[g] = si
                if g in active:
                    slot = slots[active[g]]
                    take = min(e - r, n - slot.count)
                    if take > 0:
                        s0, s1 = slot.count, slot.count + take
                        with timer.span("graph"):
                            slot.buf[s0:s1] = imgs[r : r + take]
                            words = _graph_rows(slot.buf[s0:s1], slot.buf[:s1], config)
                            slot.rows[s0:s1, : words.shape[1]] = words.view(torch.int64)
                        slot.count = s1
                    if slot.count == n:
                        with timer.span("graph"):
                            adj = _symmetrize(slot.rows, n)  # int64 words
                            (host,), ev = _to_host([adj], device)
                            host = host.view(torch.uint64)  # the clique engine's bitset dtype
                        slot.future = pool.submit(clique_job, host, ev)
                        pending[g] = active.pop(g)
                        filled.add(g)
                r = e
            yield from drain(block_one=False)
        yield from flush()
        if nn_state is not None:
            nn_flush()
            k_eff = min(config.nn_k, len(tr))
            if nn_file is None:
                nn = nn_state.result(n_nn, k_eff, config.nn_alpha)
            else:
                with timer.span("nn_checkpoint"):
                    if nn_todo:  # else this part is unchanged (or this process had nothing to fold in)
                        nn_save()
                    nn = _nn.finalize(out, n_nn, k_eff, config.nn_alpha)
                if nn is None:  # other parts still running: the last one to finish merges
                    state["nn_progress"] = _nn.progress(out, n_nn)
            if nn is not None:
                nn = _nn_images(nn, m, config, device, sampler, tr, images_dir, timer)
                state["nn"] = nn
                if out is not None:
                    _results.atomic_write_json(Path(out) / "nn_extraction.json", nn.to_dict())
    finally:
        # closed or interrupted mid-run: the queued cliques and read-backs are of records that will not be
        # emitted (a resume recomputes them); wait only for the ones running
        pool.shutdown(wait=True, cancel_futures=True)
        reader.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        if rd is not None:
            rd.close()
        timer.add("total", time.perf_counter() - t_start)


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="candidates", dynamic_ncols=True, smoothing=0.05)


def _nn_images(nn, m, config, device, sampler, tr, images_dir, timer) -> NNExtraction:
    """Write the PNG pairs of the first ``max_nn_images`` NN extractions that have none yet, regenerating
    their best candidates from the seeds (bit-identical at the run's micro-batch size)."""
    if images_dir is None or config.save_images == "none" or not nn.seeds or config.max_nn_images == 0:
        return nn
    from memcore.report.images import save_pair

    paths = list(nn.images or (None,) * len(nn.seeds))
    sel = [i for i in range(min(len(nn.seeds), config.max_nn_images)) if paths[i] is None]
    jobs = [(0, None, nn.seeds[i]) for i in sel]
    with timer.span("regenerate"):
        k = 0
        for imgs in sampler(iter(jobs)):
            for img in imgs:
                i = sel[k]
                rel = _nn.image_name(nn.extracted_train_indices[i], nn.seeds[i])
                save_pair(images_dir.parent / rel, img, tr.host[nn.extracted_train_indices[i]])
                paths[i] = rel
                k += 1
    return dataclasses.replace(nn, images=tuple(paths))


def _digest(t: torch.Tensor) -> str:
    """sha256 of a uint8 tensor's bytes, read in place (no copy on the host)."""
    a = t.detach().cpu().contiguous().numpy()
    return hashlib.sha256(memoryview(a).cast("B")).hexdigest()


def _load_train(
    train: Any, shape: tuple[int, int, int] | None, *, lazy_digest: bool = False
) -> tuple[torch.Tensor | None, dict | None]:
    """Training images as uint8 [T, C, H, W] and their description for the run parameters.

    ``shape`` (C, H, W) is checked when given. With ``lazy_digest`` the images' sha256 is a ``Future``
    computed on a background thread (resolved by ``_run_params``)."""
    if train is None:
        return None, None
    if isinstance(train, PreparedTrainingSet):
        if shape is not None:
            _train_shape_check(train.images.shape[1:], shape, f"({train.info['source']})")
        return train.images, train.info
    from memcore.io.data import TrainingSet, open_training_set, unit_to_uint8

    if isinstance(train, torch.Tensor):
        t = train
        if not t.is_floating_point() and t.dtype != torch.uint8:
            raise TypeError(f"training images must be uint8 or float in [0, 1], got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"training images (tensor) must be [T, C, H, W], got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError("training images (tensor) hold no images")
        if t.is_floating_point():
            if not bool(((t >= 0) & (t <= 1)).all()):  # NaN fails both comparisons
                raise ValueError("float training images must be in [0, 1] (NaN is an error)")
            t = unit_to_uint8(t)  # the rule training files are read with
        if shape is not None:
            _train_shape_check(t.shape[1:], shape, "(tensor)")
        return t, {"source": "<tensor>", "num": int(t.shape[0]), "sha256": _digest_of(t, lazy_digest)}
    if isinstance(train, TrainingSet):  # opened already (memcore.io.open_training_set): stands for its file
        if shape is not None:
            _train_shape_check(train.image_shape, shape, f"({train.source})")
        ts, train = train, train.source
    elif isinstance(train, (str, os.PathLike)):
        ts = open_training_set(train, expected_shape=shape)
    else:
        raise TypeError(
            "train must be a tensor, a path, an opened memcore.io TrainingSet or a PreparedTrainingSet, "
            f"got {type(train).__name__}"
        )
    t = ts.images
    if t.shape[0] == 0:
        raise ValueError(f"training data {train} holds no images")
    # the digest of the decoded images, as for a tensor: a file rewritten in place is another training set
    source = os.path.abspath(os.fspath(train))
    return t, {"source": source, "num": int(t.shape[0]), "sha256": _digest_of(t, lazy_digest)}


def _digest_of(t: torch.Tensor, lazy: bool) -> Any:
    """``_digest(t)``, or with ``lazy`` a ``Future`` of it computed on a thread (hashlib releases the GIL)."""
    if not lazy:
        return _digest(t)
    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memcore-digest")
    digest = pool.submit(_digest, t)
    pool.shutdown(wait=False)
    return digest


# ----------------------------------------------------------------------------------------------- extract()
def extract(
    model: Any,
    conditions: Sequence[Any] | None = None,
    *,
    config: ExtractConfig | None = None,
    train: PreparedTrainingSet | torch.Tensor | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    shard: _results.ShardSpec | None = None,
    progress: bool = False,
    report: bool = True,
) -> ExtractionResult:
    """Run the whole Carlini extraction (SPEC §2, and §3 for unconditional models with training data).

    Same arguments as :func:`iter_extract`; with ``out``, records are appended as conditions finish
    (resumable), then ``summary.json`` and ``report.html`` are written (for a sharded run, after merging every
    part present; the last rank to finish writes the complete summary).

    Returns:
        ExtractionResult over every record of the results directory (or of this run without ``out``).
    """
    config = config or ExtractConfig()
    state: dict = {}
    fresh = list(
        iter_extract(
            model,
            conditions,
            config=config,
            train=train,
            out=out,
            device=device,
            shard=shard,
            progress=progress,
            _state=state,
        )
    )
    rd = state.get("results_dir")
    if out is None:
        results = sorted(fresh, key=lambda r: r.condition_id)
        summary = _summary(results, state.get("nn"), config, state)
        return ExtractionResult(tuple(results), tuple(summary["ranking"]), state.get("nn"), summary, None)
    with _results.summary_lock(out):  # ranks finishing together: the last summary written has every record
        if rd is not None and not rd.shard.is_whole:
            records = _results.merge_parts(out)
        else:
            records = _results.load_results(out)
        results = [ConditionResult.from_record(r) for r in records]
        nn = state.get("nn") or _read_nn(Path(out))
        summary = _summary(results, nn, config, state)
        _results.atomic_write_json(Path(out) / "summary.json", summary)
        if report:
            from memcore.report.html import write_report

            write_report(out, [r.to_record() for r in results], summary)
    return ExtractionResult(tuple(results), tuple(summary["ranking"]), nn, summary, Path(out))


def _summary(
    results: list[ConditionResult], nn: NNExtraction | None, config: ExtractConfig, state: dict
) -> dict:
    recs = [r.to_record() for r in results]
    ranked = sorted(results, key=lambda r: ranking_key(r.flagged, r.mean_clique_distance))
    counts: dict[str, Any] = {
        "conditions_total": len(state.get("conditions", [])),
        "conditions_done": len(results),
        "flagged": sum(r.flagged for r in results),
        "inexact_cliques": sum(not r.clique_exact for r in results),
    }
    pr = None
    if any(r.extracted is not None for r in results):
        counts["extracted"] = sum(bool(r.extracted) for r in results)
        curve = pr_from_records(recs)
        p, rc = flagged_precision_recall([r.flagged for r in results], [bool(r.extracted) for r in results])
        counts["extractions_at_zero_fp"] = curve.extractions_at_zero_fp if curve else 0
        pr = {"flagged_precision": p, "flagged_recall": rc, **(curve.to_dict() if curve else {})}
    timer: _Timer | None = state.get("timer")
    timings = dict(timer.t) if timer else {}
    rd = state.get("results_dir")
    params = rd.params if rd is not None else {}
    m = state.get("model")
    if not params and m is not None:
        params = _run_params(m, state["conditions"], config, state.get("train_info"), state["device"])
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(state.get("device")),
        "device_name": torch.cuda.get_device_name(state["device"])
        if state.get("device") is not None and state["device"].type == "cuda"
        else platform.processor() or platform.machine(),
    }
    try:
        import memcore

        env["memcore"] = memcore.__version__
        env["build"] = memcore.build_info()
    except Exception:  # build_info is informative only
        pass
    from memcore.ops import _tune

    tuned = _tune.choices()
    if tuned:  # which distance backend `auto` picked per shape class in this process, and the timings
        env["distance_autotune"] = {
            "/".join(str(x) for x in key): {"chosen": v["chosen"], "seconds": v["seconds"]}
            for key, v in tuned.items()
        }
    summary: dict[str, Any] = {
        "params": params,
        "counts": counts,
        "ranking": [r.condition_id for r in ranked],
        "precision_recall": pr,
        "timings": timings,
        "environment": env,
    }
    if nn is None and state.get("nn_progress") is not None:
        summary["nn_progress"] = state["nn_progress"]  # a sharded NN extraction still running elsewhere
    if nn is not None:
        d = nn.to_dict()
        summary["nn_extraction"] = d
        summary["extracted_train_indices"] = list(nn.extracted_train_indices)
        summary["extracted_seeds"] = list(nn.seeds)
    return summary


def summarize_dir(out: str | os.PathLike, *, merge: bool = True, report: bool = True) -> dict[str, Any]:
    """Merge the parts of a results directory (optional), rewrite ``summary.json`` and ``report.html``.

    For ``memcore merge DIR`` after a sharded run; timings of an earlier summary are kept.
    """
    out = Path(out)
    if merge:  # parts gathered from several nodes into a new folder: their own copies of the parameters
        _results.adopt_part_params(out)
    params = _results.load_params(out)
    with _results.summary_lock(out):  # beside ranks still finishing: see extract
        return _summarize_dir(out, params, merge, report)


def _summarize_dir(out: Path, params: dict[str, Any], merge: bool, report: bool) -> dict[str, Any]:
    records = _results.merge_parts(out) if merge else _results.load_results(out)
    results = [ConditionResult.from_record(r) for r in records]
    old = {}
    if (out / "summary.json").exists():
        old = _results.read_json_file(out / "summary.json")
    nn = _read_nn(out)
    cfg_fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    kw = {k: v for k, v in params.items() if k in cfg_fields}
    kw["grid"] = tuple(kw.get("grid", (4, 4)))
    if kw.get("guidance_scale") is not None and params.get("model_kind") != "sd_pipeline":
        kw["guidance_scale"] = None
    config = ExtractConfig(**kw)
    state: dict[str, Any] = {"conditions": [None] * int(params.get("num_conditions", len(results)))}
    if nn is None and _nn.part_files(out):  # a sharded NN extraction: merge its parts if all are in
        n_nn = max(config.num_per_condition, config.nn_candidates or config.num_per_condition)
        num_train = (params.get("train") or {}).get("num")
        k_eff = min(config.nn_k, int(num_train)) if num_train else config.nn_k
        nn = _nn.finalize(out, n_nn, k_eff, config.nn_alpha)
        if nn is None:
            state["nn_progress"] = _nn.progress(out, n_nn)
    summary = _summary(results, nn, config, state)
    summary["params"] = params
    summary["timings"] = old.get("timings", {})
    summary["environment"] = old.get("environment", summary["environment"])
    _results.atomic_write_json(out / "summary.json", summary)
    if report:
        from memcore.report.html import write_report

        write_report(out, records, summary)
    return summary


def _read_nn(out: Path) -> NNExtraction | None:
    f = out / "nn_extraction.json"
    if not f.exists():
        return None
    return NNExtraction.from_dict(_results.read_json_file(f))
