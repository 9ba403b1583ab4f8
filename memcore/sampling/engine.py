"""The batched sampling engine: fixed micro-batch, packed conditions, fused or diffusers step, CUDA graphs.

One ``Sampler`` holds a loaded model and a ``SamplerConfig``. It runs the model at one fixed micro-batch shape
(``batch_size`` candidates; the last micro-batch is padded with copies of its first job), so a candidate's
image is a function of (seed, condition, batch_size, slot) only: regenerated alone in its slot
(:meth:`Sampler.regenerate`) it is bit-identical to the same candidate inside any batch, whatever its
neighbours (a UNet's per-sample result depends on the batch *shape* through the kernels it picks, not on the
other samples' values). The slot matters on a multi-threaded CPU: there oneDNN/BLAS split the rows of a
batched matmul over threads, and a row's summation order can depend on which split it lands in (measured:
the tiny SD-layout pipeline at 2 threads gives the same candidate in slot 1 and slot 0 values 7e-7 apart,
while slot 1 with other neighbours is bit-identical). The slot of a candidate is its position in its
micro-batch (``SampleBatch`` row), i.e. its job index modulo ``batch_size`` when jobs are packed in order.

Per micro-batch::

    initial noise (one generator per seed) -> [UNet forward -> step] x S -> decode -> [0, 1] and uint8

The step is ``_apply_step``: the fused kernel of ``memcore.ops.step`` (DDIM/DDPM) or diffusers'
``scheduler.step`` (every other scheduler, and the reference path). With the fused step on CUDA the UNet
forward + step of each step index is captured in one CUDA graph (``cuda_graphs=True``), so the loop is
``S`` graph replays with no host-device synchronisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from memcore.models.loading import LoadedModel, load_model
from memcore.ops import _backend
from memcore.sampling.seeds import as_int, check_seeds, initial_noise, step_noise
from memcore.utils import DIFFUSERS_RANDN_LOCK
from memcore.utils.checks import finite_real
from memcore.utils.device import default_device
from memcore.utils.profiling import stage
from memcore.utils.transfer import to_device

MODES = ("parity", "fp32")
STEP_BACKENDS = ("auto", "fused", "diffusers")
DEFAULT_TEXT_GUIDANCE = 7.5  # diffusers' StableDiffusionPipeline default; [C23] does not confirm its value
_FUSED_KINDS = ("DDIMScheduler", "DDPMScheduler")
# torch.compile's modes (torch._inductor.list_mode_options; "default" is mode=None); the second two record
# inductor's own CUDA graphs (cudagraph trees).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
_CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


#: ``SamplerConfig.attention``: which scaled-dot-product-attention kernel the UNet's attention layers try
#: first ("auto": PyTorch's own order).
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


_KIND_NAMES = {"unet": "unconditional", "class_unet": "class-conditional", "sd_pipeline": "text-to-image"}


def check_model_options(cfg) -> None:
    """Validate the model options a config carries (``compile``, ``fuse_norm``, ``fuse_qkv``: bools;
    ``compile_mode``: one of COMPILE_MODES; ``attention``: one of ATTENTION_BACKENDS) — shared by
    SamplerConfig and the attacks' configs."""
    for name in ("compile", "fuse_norm", "fuse_qkv"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(cfg, name)!r}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {cfg.compile_mode!r}")
    if cfg.attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {cfg.attention!r}")


#: ``SamplerConfig.scheduler`` names the engine maps itself (the rest are diffusers class names).
_SCHEDULER_ALIASES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}
# What the loop calls on a scheduler (_denoise_eager, _apply_step): scheduler.step(model_output, t, sample, ...,
# return_dict=False), scale_model_input(x, t) and set_timesteps(n), plus the init_noise_sigma attribute.
_SCHEDULER_METHODS = ("set_timesteps", "scale_model_input", "step")


# Schedulers with the right methods that still do not sample a UNet (they run, and give wrong images or fail
# inside the loop).
_NOT_SAMPLERS = {
    "DDIMInverseScheduler": "it inverts DDIM (image -> noise), it does not sample",
    "DPMSolverMultistepInverseScheduler": "it inverts DPM-Solver (image -> noise), it does not sample",
    "DDPMWuerstchenScheduler": "its continuous-time steps are Wuerstchen's, not a UNet's integer timesteps",
    # its noise is torchsde's Brownian tree, seeded from torch's global RNG: outside memcore's (seed, step) noise
    "DPMSolverSDEScheduler": "its step noise comes from a torchsde Brownian tree with a seed of its own, so an "
    "image would not be a function of its seed (nor independent of its batch)",
}


def _unsupported_scheduler(cls: type) -> str | None:
    """Why the sampling loop cannot drive scheduler class ``cls``, or None when its class shows no reason.

    Only what the class itself shows (cheap, no instance): whether it has the methods the loop calls and whether
    its ``step`` takes ``(model_output, timestep, sample)`` and nothing else required.
    """
    if cls.__name__ in _NOT_SAMPLERS:
        return _NOT_SAMPLERS[cls.__name__]
    missing = [m for m in _SCHEDULER_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        return (
            f"it has no {', '.join(m + '()' for m in missing)} (it is not a noise-prediction scheduler for "
            "UNet sampling: flow-matching and other special-purpose schedulers lack them)"
        )
    params = list(inspect.signature(cls.step).parameters.values())[1:]  # after self
    names = [p.name for p in params]
    if names[:3] != ["model_output", "timestep", "sample"] or "return_dict" not in names:
        sig = inspect.signature(cls.step)
        return f"its step{sig} is not step(model_output, timestep, sample, ..., return_dict)"
    required = [
        p.name for p in params[3:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        return f"its step() needs inputs a sampling loop does not have: {', '.join(required)}"
    return None


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class ``SamplerConfig.scheduler`` names, checked to fit the sampling loop.

    Args:
        name: ``"ddim"``, ``"ddpm"`` or a diffusers scheduler class name (``"config"`` has no class before the
            model is loaded; the Sampler checks that one when it builds it).

    Returns:
        The class.

    Raises:
        ValueError: an unknown name, a name that is not a diffusers scheduler class, one whose optional dependency
            is not installed, or a scheduler the loop cannot drive (see ``_unsupported_scheduler``).
    """
    import diffusers

    cls_name = _SCHEDULER_ALIASES.get(name.lower(), name)
    try:
        cls = getattr(diffusers, cls_name, None)
    except (ImportError, RuntimeError):  # diffusers' lazy module failing to import an unrelated pipeline
        cls = None
    if cls is None:
        raise ValueError(
            f"unknown scheduler {name!r}: use 'ddim', 'ddpm', 'config' or a diffusers scheduler class name"
        )
    if cls_name in _NOT_SAMPLERS:  # before the dependency check: installing it would not help
        raise ValueError(
            f"scheduler {name!r} is not supported by memcore's sampling loop: {_NOT_SAMPLERS[cls_name]}"
        )
    if type(cls).__name__ == "DummyObject":  # diffusers' placeholder for a class whose dependency is missing
        needs = ", ".join(b for b in getattr(cls, "_backends", ()) if b != "torch") or "an optional package"
        raise ValueError(f"scheduler {name!r} needs {needs}, which is not installed")
    if not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(
            f"scheduler {name!r} is not a diffusers scheduler class (a SchedulerMixin subclass such as "
            "'PNDMScheduler' or 'EulerDiscreteScheduler')"
        )
    why = _unsupported_scheduler(cls)
    if why is not None:
        raise ValueError(f"scheduler {name!r} is not supported by memcore's sampling loop: {why}")
    return cls


def _compiled(fn: Any, config: SamplerConfig) -> Any:
    """``fn`` through ``torch.compile`` at the config's mode, static shapes (the micro-batch is fixed)."""
    return torch.compile(
        fn, dynamic=False, mode=None if config.compile_mode == "default" else config.compile_mode
    )


def attention_context(name: str) -> contextlib.AbstractContextManager:
    """The context the UNet runs in for ``SamplerConfig.attention``: "auto" changes nothing; a backend name
    moves that kernel to the front of SDPA's priority order, the others following in PyTorch's default order
    (flash, efficient, math, cudnn), so shapes the chosen kernel cannot take (e.g. cuDNN's head-dimension
    limit) still run."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    first = order[name]
    return sdpa_kernel([first, *(b for b in order.values() if b != first)], set_priority=True)


def _qkv_fused(module: torch.nn.Module) -> bool:
    """Whether a diffusers model's attention already runs on fused QKV projections."""
    return any("Fused" in type(p).__name__ for p in getattr(module, "attn_processors", {}).values())


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to sample.

    Attributes:
        num_inference_steps: sampler steps (>= 1).
        guidance_scale: classifier-free guidance for text models; None -> 7.5 (diffusers' default); <= 1
            disables CFG (diffusers' rule). Must be None for pixel UNets (they have no unconditional branch).
        eta: DDIM eta in [0, 1] (0 deterministic, 1 DDPM-like); step noise comes from the (seed, step) Philox
            stream. A scheduler whose ``step`` takes no eta (DDPM, PLMS, Euler, ...) refuses ``eta > 0``.
        mode: fused-step arithmetic: ``"parity"`` (diffusers' per-op rounding: same images as diffusers) or
            ``"fp32"`` (compute in fp32, round once; fused only).
        batch_size: the fixed micro-batch the model runs at (CFG doubles the UNet batch).
        backend: backend of the fused step op (``auto``/``reference``/``cpu``/``cuda``/``triton``).
        step_backend: ``"fused"`` (memcore.ops.step), ``"diffusers"`` (``scheduler.step``) or ``"auto"`` (fused
            for DDIM/DDPM when memcore.ops.step is present, diffusers otherwise).
        scheduler: which sampler: ``"ddim"`` (default, SPEC §2), ``"ddpm"``, ``"config"`` (the model's own
            scheduler as stored), or any diffusers scheduler class name (``"PNDMScheduler"``,
            ``"EulerDiscreteScheduler"``, ...) built from the model's scheduler config. A class name is checked
            here (a diffusers scheduler with ``set_timesteps``, ``scale_model_input`` and ``step(model_output,
            timestep, sample)``; flow-matching and inverse schedulers are refused); the Sampler then builds it
            and sets ``num_inference_steps`` timesteps before any sampling, so e.g. PNDM with too few steps
            fails there.
        cuda_graphs: (bool) capture UNet + fused step per step index in CUDA graphs (CUDA + fused step only).
        channels_last: (bool or None) NHWC UNet; None -> on for CUDA unless mode is ``"parity"`` (the stock
            pipelines run NCHW, and the layout changes conv algorithms, hence floats).
        compile: ``torch.compile`` the UNet forward (``torch.compile(unet, mode=compile_mode, dynamic=False)``;
            the model object itself is not changed) and, for latent models, the VAE decode. The fused step is
            already one opaque custom-op kernel, diffusers' ``scheduler.step`` is stateful Python, and the text
            encoder runs once per prompt; the VAE decodes once per micro-batch, but at 512x512 its
            memory-bound GroupNorm+SiLU layers are a visible share of an SD run, and inductor fuses them. The
            graphs are specialised to the fixed micro-batch (the engine pads the last batch, so every call has
            the same shapes); the timestep enters as a 0-d tensor, so the steps of a run, later micro-batches,
            :meth:`Sampler.regenerate` and other Samplers of the same architecture reuse one compiled graph
            (tested on CPU); another architecture, micro-batch, dtype, device or memory format compiles again.
            The first call pays a one-time compile: 10-50 s for the tiny test models on 2 CPU cores (inductor
            writes and builds C++; its on-disk cache makes repeats faster), 13-58 s for the benchmark UNets on
            an H100 (``max-autotune*`` autotuning takes longer). With CUDA graphs the UNet compiles in the
            warm-up calls before the capture, never inside it. Compiled kernels fuse and reorder float
            operations, so images differ from the eager model's in their last bits (~1e-6 on [0, 1] images in
            float32 over a few steps on CPU): ``mode="parity"`` is then no longer bit-identical with stock
            diffusers, though a candidate still regenerates bit-identically in the same process (same compiled
            kernels). With ``max-autotune*`` kernels are picked by timing, so like ``cudnn.benchmark`` they may
            differ in another process.
        compile_mode: ``torch.compile`` mode: ``"default"``, ``"max-autotune-no-cudagraphs"``, or
            ``"reduce-overhead"`` / ``"max-autotune"`` (these two make inductor record its own CUDA graphs, so
            on CUDA they are refused while the engine captures its own, ``cuda_graphs=True``).
        fuse_norm: replace GroupNorm+SiLU pairs by the fused kernel (``memcore.ops.norm``; CUDA only). Under
            ``compile`` the kernel is an opaque custom op to inductor, which fuses GroupNorm+SiLU itself
            otherwise: measure both (``benchmarks/bench_sampling.py --compile [--fuse-norm]``).
        fuse_qkv: one GEMM for each attention's Q, K, V projections (K, V for cross-attention): diffusers'
            ``fuse_qkv_projections()`` on the UNet and, for SD-layout pipelines, the VAE. Same products, other
            GEMM shapes, so the last bits may change (parity mode is then not bit-identical with diffusers);
            models whose UNet lacks the method (e.g. ``UNet2DModel``) are refused. The model is changed in
            place, as with ``fuse_norm``.
        guidance_rescale: diffusers' ``guidance_rescale`` in [0, 1] (0 = off); text models only, and like
            diffusers it applies only with CFG (ignored when ``guidance_scale <= 1``).
        attention: the scaled-dot-product-attention kernel the UNet's attention layers try first: ``"auto"``
            (PyTorch's choice: FlashAttention-2 for half precision on CUDA), ``"cudnn"`` (cuDNN's fused
            attention, Hopper-tuned; it takes head dimensions FlashAttention-2 pads, e.g. SD 1.x's 40),
            ``"flash"``, ``"efficient"`` or ``"math"``; a shape the chosen kernel cannot take falls back to the
            next in PyTorch's order. Another kernel sums in another order, so images differ in their last bits
            (parity with diffusers holds for ``"auto"`` only). The VAE runs with ``"auto"``. Under ``compile``
            the kernel is fixed when the UNet is first compiled: compiled graphs are shared per architecture,
            so a later Sampler of the same architecture with another ``attention`` reuses that choice.
    """

    num_inference_steps: int = 50
    guidance_scale: float | None = None
    eta: float = 0.0
    mode: str = "parity"
    batch_size: int = 16
    backend: str = "auto"
    step_backend: str = "auto"
    scheduler: str = "ddim"
    cuda_graphs: bool = True
    channels_last: bool | None = None
    compile: bool = False
    compile_mode: str = "default"
    fuse_norm: bool = False
    fuse_qkv: bool = False
    guidance_rescale: float = 0.0
    attention: str = "auto"

    def __post_init__(self) -> None:
        # numpy integers (a batch size read from an array or a sweep) as plain ints; floats and bools refused
        for name in ("num_inference_steps", "batch_size"):
            v = as_int(name, getattr(self, name))
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
            object.__setattr__(self, name, v)
        if self.guidance_scale is not None:
            finite_real(self.guidance_scale, "guidance_scale")
        if not 0.0 <= finite_real(self.eta, "eta") <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {self.backend!r}")
        if self.step_backend not in STEP_BACKENDS:
            raise ValueError(f"step_backend must be one of {STEP_BACKENDS}, got {self.step_backend!r}")
        if self.mode == "fp32" and self.step_backend == "diffusers":
            raise ValueError('mode="fp32" exists only for the fused step; use step_backend="fused" or "auto"')
        if not isinstance(self.scheduler, str) or not self.scheduler:
            raise TypeError("scheduler must be 'ddim', 'ddpm', 'config' or a diffusers scheduler class name")
        if self.scheduler != "config" and self.scheduler.lower() not in _SCHEDULER_ALIASES:
            # a class name: checked now (this imports diffusers); "config" names no class before the model loads
            scheduler_class(self.scheduler)
        # a truthy string such as "no" would otherwise switch the feature on
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise TypeError(f"channels_last must be a bool or None, got {self.channels_last!r}")
        check_model_options(self)
        rescale = finite_real(self.guidance_rescale, "guidance_rescale")
        if rescale < 0:
            raise ValueError("guidance_rescale must be >= 0")
        if rescale > 1:  # the fused step's limit too (StepConfig): a blend weight, 1 = fully rescaled
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")


@dataclasses.dataclass(frozen=True)
class SampleBatch:
    """One finished micro-batch of the streaming API.

    Rows ``>= valid`` are padding (the model always runs at the full micro-batch); their seed and condition id
    are -1 (a job's condition id may be -1 too: tell padding by ``valid``).

    Attributes:
        images_unit: ``[B, C, H, W]`` float32 in [0, 1], on the model's device.
        images_u8: ``[B, C, H, W]`` uint8, ``round(255 * images_unit)`` computed as the stock pipeline's
            ``numpy_to_pil`` does (``to_uint8`` in ``Sampler.uint8_dtype``: float16 for a float16 pixel model).
        seeds: ``[B]`` int64 (CPU: known on the host, reading it never syncs the device).
        condition_ids: ``[B]`` int64 (CPU), the ids given with the jobs.
        valid: number of real rows (a prefix).
    """

    images_unit: torch.Tensor
    images_u8: torch.Tensor
    seeds: torch.Tensor
    condition_ids: torch.Tensor
    valid: int


def to_uint8(unit: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..]`` float in [0, 1] -> uint8 exactly as diffusers' ``numpy_to_pil``: ``(x * 255).round()`` in ``dtype``
    (round half to even, as numpy), then cast.

    Args:
        unit: images in [0, 1], holding values of ``dtype`` (a float32 copy of them is fine: the cast is exact).
        dtype: the dtype numpy multiplies in, which depends on the pipeline (``uint8_dtype``): float32 for
            latent pipelines (their image processor casts to float32 before numpy), the model dtype for
            DDIMPipeline / DDPMPipeline (they hand the model-dtype tensor to numpy). It matters for float16:
            ``x * 255`` rounded to float16 can land on a .5 and round the other way (124 of the 15361 float16
            values in [0, 1] give another uint8 than in float32).
    """
    return (unit.to(dtype) * 255).round().to(torch.uint8)


def uint8_dtype(latent: bool, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the stock diffusers pipeline of a model turns its [0, 1] images into uint8 in (``to_uint8``).

    Latent (Stable Diffusion) pipelines go through ``VaeImageProcessor.pt_to_numpy``, which casts to float32.
    Pixel pipelines (DDIMPipeline, DDPMPipeline) call ``.numpy()`` on the model-dtype tensor, so numpy computes
    ``x * 255`` in float16 (or float64) there; numpy has no bfloat16 (those pipelines fail on it), and float32
    is exact for bfloat16 values.
    """
    if latent or model_dtype == torch.bfloat16:
        return torch.float32
    return model_dtype


_RANDN_LOCK = DIFFUSERS_RANDN_LOCK  # shared with memcore.reference.step


@contextlib.contextmanager
def _scheduler_noise(scheduler: Any, seeds: torch.Tensor, step: int) -> Iterator[None]:
    """Make diffusers' ``scheduler.step`` draw its step noise from the (seed, step) Philox stream.

    diffusers schedulers draw noise with ``randn_tensor`` imported into their module; a stateful generator there
    would tie a candidate's noise to its batch. We swap that name for the call, under a lock (a module global).
    Successive draws within one step use Philox streams 0, 1, 2, ...
    """
    module = sys.modules[type(scheduler).__module__]
    if not hasattr(module, "randn_tensor"):
        yield
        return
    calls = [0]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None, **_):
        shape = tuple(shape)
        if shape[0] != seeds.shape[0]:
            raise RuntimeError(
                f"internal: scheduler drew noise of batch {shape[0]}, engine batch {seeds.shape[0]}"
            )
        z = step_noise(
            seeds,
            step,
            shape[1:],
            device=device or seeds.device,
            dtype=dtype or torch.float32,
            stream=calls[0],
        )
        calls[0] += 1
        return z

    with _RANDN_LOCK:
        original = module.randn_tensor
        module.randn_tensor = randn_tensor
        try:
            yield
        finally:
            module.randn_tensor = original


def _make_scheduler(template: Any, choice: str, num_inference_steps: int) -> tuple[Any, Any]:
    """The scheduler template for ``SamplerConfig.scheduler`` built from the model's scheduler config, and a
    fresh copy with its timesteps set: built now so that a scheduler the loop cannot run fails here, before any
    work (the Sampler reads its timesteps from the copy).
    """
    if choice == "config":
        cls = type(template)
        why = _unsupported_scheduler(cls)
        if why is not None:
            raise ValueError(
                f"the model's scheduler {cls.__name__} (scheduler='config') is not supported by memcore's "
                f"sampling loop: {why}; choose one with SamplerConfig(scheduler=...)"
            )
    else:
        cls = scheduler_class(choice)
    name = cls.__name__
    try:
        made = cls.from_config(template.config)
    except Exception as exc:  # diffusers raises anything from TypeError to KeyError for a foreign config
        raise ValueError(
            f"cannot build {name} from the model's scheduler config ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        trial = cls.from_config(made.config)  # set_timesteps mutates: try it on a copy
        trial.set_timesteps(num_inference_steps)
    except Exception as exc:
        hint = ""
        if name == "PNDMScheduler" and not made.config.get("skip_prk_steps", False):
            hint = (
                f"; PNDMScheduler with skip_prk_steps=False starts with Runge-Kutta steps and needs "
                f"num_inference_steps >= {made.pndm_order}"
            )
        raise ValueError(
            f"{name} cannot set {num_inference_steps} inference steps ({type(exc).__name__}: {exc}){hint}"
        ) from exc
    if getattr(trial, "init_noise_sigma", None) is None or len(getattr(trial, "timesteps", ())) == 0:
        raise ValueError(
            f"{name} is not supported by memcore's sampling loop: after set_timesteps it has no "
            "init_noise_sigma or no timesteps (flow-matching and other special-purpose schedulers)"
        )
    return made, trial


class Sampler:
    """A model + config, ready to sample micro-batches (see the module docstring).

    Args:
        model: anything ``load_model`` accepts (path, diffusers object, ``LoadedModel``).
        config: ``SamplerConfig``.
        device: device for a model given by path (default CUDA when available); ignored for loaded objects
            unless given.
        dtype: parameter dtype (``torch.bfloat16`` or its name, "bfloat16"); None: as
            :func:`memcore.models.load_model` loads it (a loaded object keeps its dtype; from a path, float32).
    """

    def __init__(
        self,
        model: Any,
        config: SamplerConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        if config is None:
            config = SamplerConfig()
        elif not isinstance(config, SamplerConfig):
            raise TypeError(f"config must be a SamplerConfig, got {type(config).__name__}")
        self.config = config
        if device is None:
            if isinstance(model, LoadedModel):
                device = model.device
            elif isinstance(model, torch.nn.Module):
                device = next(model.parameters()).device
            elif hasattr(model, "unet") and isinstance(model.unet, torch.nn.Module):
                device = next(model.unet.parameters()).device
            else:
                device = default_device()
        self.model = lm = load_model(model, device=device, dtype=dtype)
        self.device = lm.device
        if self.device.type == "cuda" and torch.backends.cudnn.benchmark:
            # autotuning may pick other conv algorithms in another process: images would not regenerate
            warnings.warn(
                "torch.backends.cudnn.benchmark is on: convolution algorithms are chosen by timing, so a "
                "candidate regenerated in another process may differ in its last bits; turn it off for "
                "bit-identical regeneration",
                stacklevel=2,
            )
        if lm.kind == "sd_pipeline" and getattr(lm.unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError("UNets with time_cond_proj_dim (LCM guidance embedding) are not supported")

        # Guidance: CFG only for text models, with diffusers' "> 1" rule.
        gs = config.guidance_scale
        if lm.kind != "sd_pipeline":
            if gs is not None:
                raise ValueError(
                    f"guidance_scale is for text-to-image pipelines; a {lm.kind} model has no CFG"
                )
            if config.guidance_rescale > 0:
                raise ValueError(
                    f"guidance_rescale is for text-to-image pipelines (it rescales the CFG combine); a {lm.kind} "
                    "model has no CFG"
                )
            self.cfg_scale = None
        else:
            gs = DEFAULT_TEXT_GUIDANCE if gs is None else float(gs)
            self.cfg_scale = gs if gs > 1.0 else None

        # Scheduler and step path.
        self.scheduler_template, sched = _make_scheduler(
            lm.scheduler, config.scheduler, config.num_inference_steps
        )
        self.timesteps = sched.timesteps.clone()  # CPU, as DDIMPipeline keeps them
        self.init_noise_sigma = sched.init_noise_sigma
        self.t_device = self.timesteps.to(self.device)
        self.scheduler_name = type(sched).__name__
        self.step_accepts_eta = "eta" in inspect.signature(sched.step).parameters
        if float(config.eta) > 0 and not self.step_accepts_eta:
            # it would be dropped silently (DDPM's noise follows its variance_type, PLMS has none)
            raise ValueError(
                f"eta={config.eta} is DDIM's noise weight, but {self.scheduler_name}.step takes no eta: "
                "use eta=0 with this scheduler"
            )
        fusable = self.scheduler_name in _FUSED_KINDS
        sb = config.step_backend
        if sb == "auto":
            present = importlib.util.find_spec("memcore.ops.step") is not None
            sb = "fused" if fusable and present else "diffusers"
            if config.mode == "fp32":
                if not fusable:
                    raise ValueError(f'mode="fp32" needs the fused step; {self.scheduler_name} is not fused')
                sb = "fused"
        if sb == "fused" and not fusable:
            raise ValueError(
                f"{self.scheduler_name} has no fused step (only DDIM and DDPM): use step_backend='diffusers' or 'auto'"
            )
        if sb == "diffusers" and not fusable:
            warnings.warn(
                f"{self.scheduler_name} is not fused: it runs through diffusers' scheduler.step (the reference path)",
                stacklevel=2,
            )
        self.needs_step_noise = self.scheduler_name == "DDPMScheduler" or (
            self.scheduler_name == "DDIMScheduler" and float(config.eta) > 0
        )
        self.plan = None
        self.kernel_backend: str | None = None
        if sb == "fused":
            from memcore.sampling.schedule import ScheduleError, make_plan

            try:
                self.plan = make_plan(sched, config.num_inference_steps)
            except ValueError as exc:
                # a schedule diffusers cannot step either failed at its first step with an IndexError
                if config.step_backend == "fused" or config.mode == "fp32" or isinstance(exc, ScheduleError):
                    raise
                # e.g. thresholding or an unsupported timestep_spacing: diffusers runs it, unfused
                warnings.warn(
                    f"{self.scheduler_name} config is not fused ({exc}); using diffusers' step", stacklevel=2
                )
                sb = "diffusers"
        self.step_backend = sb
        if sb == "fused":
            from memcore.ops import _backend
            from memcore.ops.step import StepConfig

            self.step_config = StepConfig.from_scheduler(
                sched,
                eta=float(config.eta) if self.scheduler_name == "DDIMScheduler" else 0.0,  # DDPM has no eta
                mode=config.mode,
                # diffusers rescales only under CFG: guidance_scale <= 1 ignores it (the fused step refuses it)
                guidance_rescale=float(config.guidance_rescale) if self.cfg_scale is not None else 0.0,
            )
            from memcore.ops.step import _check_schedule

            # here, not at the first step: a schedule whose every image is NaN or inf is refused when it is built
            _check_schedule(self.plan, self.step_config)
            self.kernel_backend = _backend.resolve(config.backend, self.device, cuda_order=("cuda", "triton"))
            # Step indices as tensors for fused_step_graphable (the kernel reads the step on its device, so the
            # eager loop needs no host round trip either); the reference backend takes a Python int.
            step_dev = torch.device("cpu") if self.kernel_backend == "cpu" else self.device
            self.step_tensors = [
                torch.full((), i, dtype=torch.int64, device=step_dev) for i in range(len(self.timesteps))
            ]

        # Throughput options (the model is shared: these change it in place).
        unet = lm.unet
        cl = config.channels_last
        if cl is None:
            cl = self.device.type == "cuda" and config.mode != "parity"
        if cl:
            unet.to(memory_format=torch.channels_last)
        if config.fuse_qkv:
            if not hasattr(unet, "fuse_qkv_projections"):
                raise ValueError(
                    f"fuse_qkv=True needs a UNet with diffusers' fuse_qkv_projections() (e.g. "
                    f"UNet2DConditionModel); {type(unet).__name__} has none"
                )
            for mod in (unet, getattr(lm, "vae", None)):
                # idempotent: a model fused by an earlier Sampler keeps its fused projections
                if hasattr(mod, "fuse_qkv_projections") and not _qkv_fused(mod):
                    mod.fuse_qkv_projections()
        if config.fuse_norm:
            if self.device.type != "cuda":
                raise ValueError(
                    "fuse_norm=True needs a CUDA model (the fused GroupNorm+SiLU kernel is CUDA/Triton)"
                )
            from memcore.ops.norm import fuse_groupnorm_silu

            fused = fuse_groupnorm_silu(unet)
            if isinstance(fused, torch.nn.Module):
                unet = fused
        self.unet = unet
        self.use_graphs = (
            bool(config.cuda_graphs)
            and self.device.type == "cuda"
            and sb == "fused"
            and self.kernel_backend in ("cuda", "triton")
        )
        self.unet_fn = unet
        if config.compile:
            if self.use_graphs and config.compile_mode in _CUDAGRAPH_COMPILE_MODES:
                # Their cudagraph trees would record graphs of their own inside (or around) the engine's
                # capture of UNet + step; one owner of CUDA graphs keeps replay and memory pools simple.
                raise ValueError(
                    f"compile_mode={config.compile_mode!r} makes torch.compile record its own CUDA graphs, "
                    "but the engine already captures UNet + step in one (cuda_graphs=True): use "
                    "compile_mode='default' or 'max-autotune-no-cudagraphs', or cuda_graphs=False"
                )
            # Only the UNet forward is compiled, not the whole step (UNet + CFG + step): the fused step is one
            # opaque custom-op kernel already, so inductor has nothing to fuse into it (the CFG combine is
            # inside it); around it only the Philox step noise would fuse. Compiling the whole step was tried
            # (CPU, torch 2.13): it recompiled on the second step (the step's coefficient table is cached on
            # the plan on first use, a side effect dynamo guards on), and the diffusers step path (stateful
            # schedulers, the randn_tensor swap) cannot be traced without graph breaks. On CUDA the engine's
            # own graph already removes the launch overhead between UNet and step. dynamic=False: the
            # micro-batch is fixed by design (the last batch is padded), so one static graph serves a run.
            self.unet_fn = _compiled(unet, config)
        self.vae_decode = lm.vae.decode if lm.latent else None
        if config.compile and lm.latent:
            self.vae_decode = _compiled(lm.vae.decode, config)
        # the dtype the stock pipeline's numpy -> PIL conversion multiplies in (SampleBatch.images_u8)
        self.uint8_dtype = uint8_dtype(lm.latent, lm.unet.dtype)
        self._graph: Any = None
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._uncond: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------- conditions
    def _fresh_scheduler(self) -> Any:
        """A new scheduler per micro-batch: multistep schedulers (PLMS, ...) keep per-run state."""
        s = type(self.scheduler_template).from_config(self.scheduler_template.config)
        s.set_timesteps(self.config.num_inference_steps)
        return s

    def _encode_text(self, prompt: str) -> torch.Tensor:
        """``[1, L, D]`` CLIP embedding of one prompt, as diffusers' ``encode_prompt`` computes it (batch 1)."""
        hit = self._text_cache.get(prompt)
        if hit is not None:
            self._text_cache.move_to_end(prompt)
            return hit
        lm = self.model
        tok = lm.tokenizer
        inputs = tok(
            prompt,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(lm.text_encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(self.device)
        with torch.no_grad():
            emb = lm.text_encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        emb = emb.to(dtype=lm.text_encoder.dtype, device=self.device)
        self._text_cache[prompt] = emb
        if len(self._text_cache) > 1024:  # bounded: memory stays flat over many prompts
            self._text_cache.popitem(last=False)
        return emb

    def _uncond_embedding(self) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = self._encode_text("")  # diffusers: negative_prompt=None -> [""]
        return self._uncond

    def check_condition(self, condition: Any) -> Any:
        """Validate one condition for this model: None (unconditional), a class id, or a prompt."""
        kind = self.model.kind
        if kind == "unet":
            if condition is not None:
                raise ValueError(f"an unconditional model takes no condition, got {condition!r}")
            return None
        if condition is None:  # the usual slip: conditions not given to a conditional model
            what = f"a class id in [0, {self.model.num_classes})" if kind == "class_unet" else "a prompt"
            raise TypeError(f"a {_KIND_NAMES[kind]} model needs a condition per seed ({what}), got None")
        if kind == "class_unet":
            try:  # numpy integers and one-element integer tensors are class ids too; floats are not truncated
                condition = as_int("class id", condition)
            except TypeError:
                raise TypeError(
                    f"a class-conditional model takes int class ids, got {type(condition).__name__} {condition!r}"
                ) from None
            if not 0 <= condition < self.model.num_classes:
                raise ValueError(f"class id {condition} outside [0, {self.model.num_classes})")
            return condition
        if not isinstance(condition, str):
            raise TypeError(f"a text-to-image model takes prompts (str), got {type(condition).__name__}")
        return condition

    def _unet_kwargs(self, conditions: Sequence[Any]) -> dict[str, Any]:
        kind = self.model.kind
        if kind == "unet":
            return {}
        if kind == "class_unet":
            return {"class_labels": to_device(torch.tensor(list(conditions), dtype=torch.int64), self.device)}
        cond = torch.cat([self._encode_text(p) for p in conditions])
        if self.cfg_scale is not None:
            unc = self._uncond_embedding().expand(len(conditions), -1, -1)
            cond = torch.cat([unc, cond])  # diffusers' order: [uncond, cond]
        return {"encoder_hidden_states": cond}

    # ----------------------------------------------------------------------------------------------- step
    def _apply_step(
        self,
        scheduler: Any,
        sample: torch.Tensor,
        model_output: torch.Tensor,
        step_index: int,
        seeds: torch.Tensor,
        step_tensor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One sampler step ``x_t -> x_{t-1}``, fused or through diffusers.

        Args:
            scheduler: this micro-batch's diffusers scheduler (used by the diffusers path only).
            sample: ``[B, C, H, W]`` current sample.
            model_output: ``[B, C, H, W]``, or ``[2B, C, H, W]`` = UNet(cat([uncond, cond])) with CFG.
            step_index: index into the schedule.
            seeds: ``[B]`` int64 on the device, keys of the step noise.
            step_tensor: the step index as a 0-d int64 tensor (fused kernel backends; inside a CUDA graph it
                is the buffer the host rewrites between replays). None: ``self.step_tensors[step_index]``.

        Returns:
            ``[B, C, H, W]`` the previous sample.
        """
        cfg = self.config
        if self.step_backend == "fused":
            from memcore.ops.step import fused_step, fused_step_graphable

            kb = self.kernel_backend
            if step_tensor is None and kb != "reference":
                step_tensor = self.step_tensors[step_index]
            noise = None
            if self.needs_step_noise:
                key = step_index if step_tensor is None else step_tensor.to(sample.device)
                noise = step_noise(seeds, key, sample.shape[1:], device=sample.device, dtype=sample.dtype)
            kw = {"guidance_scale": self.cfg_scale, "noise": noise, "backend": kb}
            if kb == "reference":
                return fused_step(sample, model_output, self.plan, step_index, self.step_config, **kw)
            return fused_step_graphable(sample, model_output, self.plan, step_tensor, self.step_config, **kw)
        if self.cfg_scale is not None:
            # StableDiffusionPipeline's combine, op for op (same rounding)
            noise_pred_uncond, noise_pred_text = model_output.chunk(2)
            model_output = noise_pred_uncond + self.cfg_scale * (noise_pred_text - noise_pred_uncond)
            if cfg.guidance_rescale > 0.0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                model_output = rescale_noise_cfg(
                    model_output, noise_pred_text, guidance_rescale=cfg.guidance_rescale
                )
        kwargs = {"eta": float(cfg.eta)} if self.step_accepts_eta else {}
        t = self.timesteps[step_index]
        with _scheduler_noise(scheduler, seeds, step_index):
            return scheduler.step(model_output, t, sample, return_dict=False, **kwargs)[0]

    def _unet(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.cfg_scale is not None:
            x = torch.cat([x] * 2)
        with attention_context(self.config.attention):
            return self.unet_fn(x, t, return_dict=False, **kwargs)[0]

    # ------------------------------------------------------------------------------------------ the loop
    def _denoise_eager(self, x: torch.Tensor, seeds: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        scheduler = self._fresh_scheduler()
        for i in range(len(self.timesteps)):
            with stage("unet"):
                inp = torch.cat([x] * 2) if self.cfg_scale is not None else x
                inp = scheduler.scale_model_input(inp, self.timesteps[i])
                with attention_context(self.config.attention):
                    out = self.unet_fn(inp, self.t_device[i], return_dict=False, **kwargs)[0]
            with stage("step"):
                x = self._apply_step(scheduler, x, out, i, seeds)
        return x

    def _capture(self, x: torch.Tensor, seeds: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Capture UNet forward + fused step into one CUDA graph that serves every step index.

        The graph reads the sample ``self._gx``, the timestep ``self._gt`` and step index ``self._gstep`` (0-d
        device tensors: the UNet's time embedding, the step kernel's coefficient row and the Philox counter
        all come from them), the seeds and the condition buffers, and writes the next sample back into
        ``self._gx``. Between replays the host only enqueues two tiny device-side writes, so the loop never
        synchronises.
        """
        self._gx = x.clone()
        self._gseeds = seeds.clone()
        self._gkw = {k: v.clone() for k, v in kwargs.items()}
        self._gt = self.t_device[0].clone()
        self._gstep = torch.zeros((), dtype=torch.int64, device=self.device)

        def body() -> None:
            out = self._unet(self._gx, self._gt, self._gkw)
            new = self._apply_step(None, self._gx, out, 0, self._gseeds, step_tensor=self._gstep)
            self._gx.copy_(new)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # Warm-up: lazy inits, cuBLAS handles, cached step tables and, with compile=True, the whole
        # torch.compile (dynamo trace, inductor codegen, autotuning), which synchronises and so must not run
        # under capture. The capture then calls the compiled UNet with the same buffers, so its guards pass
        # and nothing recompiles inside torch.cuda.graph.
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        self._graph = g

    def _denoise_graphs(self, x: torch.Tensor, seeds: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        if self._graph is None:
            self._capture(x, seeds, kwargs)
        self._gx.copy_(x)
        self._gseeds.copy_(seeds)
        for k, v in kwargs.items():
            self._gkw[k].copy_(v)
        # NVTX ranges cannot live inside a graph: one range covers the replays (UNet + step of every step).
        with stage("unet:graph+step"):
            for i in range(len(self.timesteps)):
                self._gt.copy_(self.t_device[i])
                self._gstep.fill_(i)
                self._graph.replay()
        return self._gx.clone()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` final samples -> ``[B, C', H, W]`` float32 in [0, 1] (VAE first for latent models).

        Matches the stock pipelines: ``vae.decode(latents / scaling_factor)``, then ``(x / 2 + 0.5).clamp(0, 1)``
        in the model dtype (diffusers' ``x * 0.5 + 0.5`` is the same float op), then float32.
        """
        return self._decode(x).float()

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """``decode`` before the cast to float32: ``[B, C', H, W]`` in [0, 1] in the model dtype."""
        with stage("decode"):
            if self.model.latent:
                x = self.vae_decode(x / self.model.vae_scaling_factor, return_dict=False)[0]
            return (x / 2 + 0.5).clamp(0, 1)

    def run_batch(self, seeds: Sequence[int], conditions: Sequence[Any] | None = None) -> torch.Tensor:
        """Sample one micro-batch of up to ``batch_size`` candidates (padded to ``batch_size``).

        Args:
            seeds: ``n <= batch_size`` seeds.
            conditions: ``n`` conditions (None for unconditional models).

        Returns:
            ``[n, C, H, W]`` float32 in [0, 1] on the device.
        """
        seeds = check_seeds(seeds)
        n = len(seeds)
        bs = self.config.batch_size
        if not 1 <= n <= bs:
            raise ValueError(f"run_batch takes 1..{bs} seeds, got {n}")
        if conditions is None:
            conditions = [None] * n
        if len(conditions) != n:
            raise ValueError(f"{len(conditions)} conditions for {n} seeds")
        return self._run_padded(seeds, [self.check_condition(c) for c in conditions])[:n].float()

    @torch.no_grad()
    def _run_padded(self, seeds: list[int], conditions: list[Any]) -> torch.Tensor:
        """``[batch_size, C, H, W]`` images in [0, 1] in the model dtype (``_decode``) for up to ``batch_size``
        jobs, the rest padding."""
        n = len(seeds)
        bs = self.config.batch_size
        # Pad with copies of the first job: the other rows' values never change a row's result at fixed shape.
        seeds_p = seeds + [seeds[0]] * (bs - n)
        conds_p = list(conditions) + [conditions[0]] * (bs - n)
        lm = self.model
        noise_dtype = lm.text_encoder.dtype if lm.kind == "sd_pipeline" else lm.unet.dtype
        x = initial_noise(seeds_p, lm.sample_shape, device=self.device, dtype=noise_dtype)
        x = x * self.init_noise_sigma  # as the stock pipelines (1.0 for DDIM/DDPM)
        seeds_dev = to_device(torch.tensor(seeds_p, dtype=torch.int64), self.device)
        kwargs = self._unet_kwargs(conds_p)
        if self.use_graphs:
            x = self._denoise_graphs(x, seeds_dev, kwargs)
        else:
            x = self._denoise_eager(x, seeds_dev, kwargs)
        return self._decode(x)

    def regenerate(self, seed: int, condition: Any = None, *, slot: int = 0) -> torch.Tensor:
        """One candidate alone, bit-identical to its image when it ran in row ``slot`` of any micro-batch.

        Every row of the micro-batch runs the same job, so the result does not depend on what the other rows
        held when the candidate was first sampled; only its slot is kept (see the module docstring).

        Args:
            seed: the candidate's seed.
            condition: its condition (None for unconditional models).
            slot: its row in the micro-batch it was sampled in, ``0 <= slot < batch_size``.

        Returns:
            ``[C, H, W]`` float32 in [0, 1] on the device; ``to_uint8(image, self.uint8_dtype)`` is its
            ``SampleBatch.images_u8`` row.
        """
        bs = self.config.batch_size
        slot = as_int("slot", slot)
        if not 0 <= slot < bs:
            raise ValueError(f"slot must be in [0, {bs}), got {slot}")
        seeds = check_seeds([seed] * bs)
        return self._run_padded(seeds, [self.check_condition(condition)] * bs)[slot].float()

    def sample(self, seeds: Sequence[int], conditions: Sequence[Any] | None = None) -> torch.Tensor:
        """All candidates, micro-batch by micro-batch: ``[len(seeds), C, H, W]`` uint8 on the device."""
        seeds = check_seeds(seeds)
        # checked before indexing: fewer conditions than seeds was an IndexError
        if conditions is not None and len(conditions) != len(seeds):
            raise ValueError(f"{len(conditions)} conditions for {len(seeds)} seeds: give one per seed")
        jobs = [(0, None if conditions is None else conditions[i], s) for i, s in enumerate(seeds)]
        out = [b.images_u8[: b.valid] for b in self.stream(jobs)]
        if not out:
            return torch.empty((0, *self.model.image_shape), dtype=torch.uint8, device=self.device)
        return torch.cat(out)

    def stream(self, jobs: Iterable[tuple[int, Any, int]]) -> Iterator[SampleBatch]:
        """Yield finished micro-batches for ``jobs`` = iterable of ``(condition_id, condition, seed)``.

        Jobs are packed in order into micro-batches of ``batch_size`` regardless of their condition (conditions
        mix within a batch). The generator is lazy: it holds one micro-batch at a time and samples the next only
        when asked, so memory is bounded by one batch plus what the consumer keeps; nothing here waits for the
        device, so the consumer's kernels queue behind the sampler's.
        """
        bs = self.config.batch_size
        pending: list[tuple[int, Any, int]] = []
        for job in jobs:
            if not isinstance(job, tuple) or len(job) != 3:
                raise TypeError(f"a job is (condition_id, condition, seed), got {job!r}")
            cid = as_int("a job's condition_id", job[0])
            # SampleBatch.condition_ids is int64. Its padding rows hold -1 too, but they are the rows past
            # `valid`: a job may use -1 (memcore's extraction marks its NN-only candidates so)
            if not -(2**63) <= cid < 2**63:
                raise ValueError(f"a job's condition_id must be a 64-bit integer, got {cid}")
            pending.append((cid, job[1], job[2]))
            if len(pending) == bs:
                yield self._finish(pending)
                pending = []
        if pending:
            yield self._finish(pending)

    def _finish(self, jobs: list[tuple[int, Any, int]]) -> SampleBatch:
        n = len(jobs)
        bs = self.config.batch_size
        cids = [j[0] for j in jobs]  # checked ints (stream)
        conds = [self.check_condition(j[1]) for j in jobs]
        seeds = check_seeds([j[2] for j in jobs])
        native = self._run_padded(seeds, conds)  # padding rows hold copies of row 0's image
        # uint8 from the model-dtype values, as the stock pipeline converts them (uint8_dtype)
        images_u8 = to_uint8(native, self.uint8_dtype)
        unit = native.float()
        seeds_t = torch.tensor(seeds + [-1] * (bs - n), dtype=torch.int64)
        cids_t = torch.tensor(cids + [-1] * (bs - n), dtype=torch.int64)
        return SampleBatch(
            images_unit=unit, images_u8=images_u8, seeds=seeds_t, condition_ids=cids_t, valid=n
        )
