"""The fused sampler step: CFG combine, classifier guidance, DDIM / DDPM update and step noise in one pass.

One elementwise kernel per step reads ``sample``, the model output (both CFG halves), the optional classifier
gradient and step noise, and writes ``prev_sample``:

1. classifier-free guidance ``e = u + g * (c - u)`` (diffusers pipelines' combine), optionally
   ``rescale_noise_cfg`` (arXiv 2305.08891 §3.4; its per-sample standard deviations are a reduction, computed
   in a pre-pass and passed to the kernel as a per-sample ratio);
2. classifier guidance of SIDE [S24 Alg. 1] ``e = e - lambda * sqrt(1 - alphabar_t) * grad``;
3. the predicted x0 / eps for ``prediction_type`` epsilon, v_prediction or sample, clipped when configured;
4. DDIM (arXiv 2010.02502 eq. 12/16): ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps
   + sigma z`` with ``sigma = eta * sqrt(variance)``; or DDPM ancestral (arXiv 2006.11239 eq. 7):
   ``x_prev = c0 x0 + c1 x_t + std z``.

Numeric modes (``StepConfig.mode``):

- ``"parity"``: bit-identical to diffusers on the same device. diffusers computes each operation in the
  storage dtype (float16/bfloat16 tensors are upcast to float32 per operation and rounded back) with 0-d
  float32 scalars from ``alphas_cumprod``. PyTorch treats such scalars differently per device, measured on
  torch 2.13 (CPU) and 2.11 (CUDA, H100): on the CPU, ``scalar * tensor`` first rounds the 0-d float32
  scalar to the 16-bit storage dtype, while ``tensor / scalar`` divides by the unrounded float32 scalar; on
  CUDA, ``scalar * tensor`` uses the unrounded scalar and ``tensor / scalar`` multiplies by the float32
  reciprocal. Python floats (guidance scales, eta, clip range) are float32 on both. The kernels replay that
  sequence of roundings; the per-step coefficients are computed on the host with the same 0-d tensor
  arithmetic as diffusers (``_coefficient_table``), rounded per the device's rule.
- ``"fp32"``: the same formula computed in float32 with one rounding to the storage dtype at the end; more
  accurate (it differs from diffusers by up to ~0.09 in float16 / ~0.55 in bfloat16 on one SD step, which is
  diffusers' own rounding error) but not bit-identical to diffusers.

CUDA graphs: the per-step scalars live in a small float32 table ``[S, NCOL]`` and the kernels read row
``step`` from an int64 tensor, so with ``fused_step_graphable`` one captured graph serves every step (the
engine writes the step index into the device tensor between replays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from memcore.ops import _backend, _native
from memcore.sampling.schedule import StepPlan

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MODES = ("parity", "fp32")

# Columns of the per-step coefficient table (must match csrc/step/step.h and kernels/triton/step.py).
COL_SA = 0  # sqrt(abar_t), as a left multiplier
COL_SB = 1  # sqrt(1 - abar_t), as a left multiplier
COL_DIV = 2  # divisor of the x0 (epsilon) / eps (sample) formula: sqrt(abar_t) or sqrt(1 - abar_t)
COL_RECIP = 3  # 1 / COL_DIV in float32 (CUDA PyTorch multiplies by the reciprocal of a CPU scalar)
COL_A = 4  # coefficient of x0 (DDIM sqrt(abar_prev); DDPM pred_original_sample_coeff)
COL_B = 5  # coefficient of eps (DDIM) or of x_t (DDPM current_sample_coeff)
COL_N = 6  # coefficient of the step noise (DDIM std_dev_t; DDPM standard deviation)
COL_NMODE = 7  # 0: no noise term; 1: + N * noise; 2: + 0 (DDPM's final step adds the integer 0)
COL_KC = 8  # classifier guidance coefficient lambda * sqrt(1 - abar_t)
NCOL = 9
_LEFT_MUL_COLS = (COL_SA, COL_SB, COL_A, COL_B, COL_N, COL_KC)

# Kernel flag bits (must match csrc/step/step.h and kernels/triton/step.py).
F_CFG = 1
F_RESCALE = 2
F_CLS = 4
F_PRED_SAMPLE = 8
F_PRED_V = 16
F_CLIP = 32
F_DDPM = 64
F_FP32 = 128
F_RECIP = 256


@dataclass(frozen=True)
class StepConfig:
    """Settings of the fused step that are constant over a sampling run.

    Attributes:
        prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        eta: DDIM noise weight in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like); DDIM only.
        clip_sample: clamp the predicted x0 to ``[-clip_sample_range, clip_sample_range]``.
        clip_sample_range: the clamp bound (> 0).
        guidance_rescale: ``rescale_noise_cfg`` factor in [0, 1] (0 disables it); needs CFG.
        mode: ``"parity"`` (bit-identical to diffusers) or ``"fp32"`` (float32, one rounding); see module doc.
    """

    prediction_type: str = "epsilon"
    eta: float = 0.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    guidance_rescale: float = 0.0
    mode: str = "parity"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'parity' or 'fp32', got {self.mode!r}")
        for name in ("eta", "clip_sample_range", "guidance_rescale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not 0.0 <= self.eta <= 1.0:
            # the DDIM paper's eta interpolates between DDIM (0) and DDPM (1); SamplerConfig takes [0, 1] too
            raise ValueError(
                f"eta must be in [0, 1], got {self.eta}: beyond 1, sigma_t = eta * sqrt(variance) can exceed "
                "sqrt(1 - alphabar_prev), and the DDIM direction term sqrt(1 - alphabar_prev - sigma_t^2) is then "
                "the square root of a negative number (NaN images)"
            )
        if self.clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        if not isinstance(self.clip_sample, bool):
            raise TypeError("clip_sample must be a bool")

    @classmethod
    def from_scheduler(
        cls, scheduler: Any, *, eta: float = 0.0, mode: str = "parity", guidance_rescale: float = 0.0
    ) -> StepConfig:
        """The config matching a diffusers scheduler (or a :class:`StepPlan`): prediction type and clipping."""
        if isinstance(scheduler, StepPlan):
            pt, clip, rng = scheduler.prediction_type, scheduler.clip_sample, scheduler.clip_sample_range
        else:
            c = scheduler.config
            pt, clip, rng = c.prediction_type, bool(c.clip_sample), float(c.clip_sample_range)
        return cls(
            prediction_type=str(pt),
            eta=float(eta),
            clip_sample=bool(clip),
            clip_sample_range=float(rng),
            guidance_rescale=float(guidance_rescale),
            mode=mode,
        )


# ---------------------------------------------------------------------------------------------------------
# Per-step coefficients


def _rounding_rule(device: torch.device) -> str:
    """'cpu' or 'cuda': how PyTorch combines a 0-d float32 CPU scalar with a 16-bit tensor (module doc)."""
    return "cuda" if device.type == "cuda" else "cpu"


def _coefficient_rows(plan: StepPlan, config: StepConfig, classifier_scale: float) -> torch.Tensor:
    """[S, NCOL] float32: diffusers' per-step scalars, computed with the same 0-d float32 tensor ops."""
    rows = []
    eta = float(config.eta)
    for i, t in enumerate(plan.timesteps):
        alpha_prod_t = plan.alpha_prod_t[i]
        alpha_prod_t_prev = plan.alpha_prod_t_prev[i]
        beta_prod_t = 1 - alpha_prod_t
        sa = alpha_prod_t ** (0.5)
        sb = beta_prod_t ** (0.5)
        if config.prediction_type == "epsilon":
            div = sa
        elif config.prediction_type == "sample":
            div = sb
        else:
            div = torch.tensor(1.0)
        recip = 1.0 / div
        if plan.kind == "ddim":
            variance = plan.variance[i]
            std_dev_t = eta * variance ** (0.5)
            a = alpha_prod_t_prev ** (0.5)
            b = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5)
            n = std_dev_t
            nmode = 1.0 if eta > 0 else 0.0
        else:
            beta_prod_t_prev = 1 - alpha_prod_t_prev
            current_alpha_t = alpha_prod_t / alpha_prod_t_prev
            current_beta_t = 1 - current_alpha_t
            a = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
            b = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
            if t > 0:
                # fixed_small_log: _get_variance already returns the standard deviation exp(0.5 log var)
                n = plan.variance[i] if plan.variance_type == "fixed_small_log" else plan.variance[i] ** 0.5
                nmode = 1.0
            else:
                n = torch.tensor(0.0)
                nmode = 2.0
        kc = classifier_scale * (1 - alpha_prod_t) ** 0.5
        vals = [sa, sb, div, recip, a, b, n, torch.tensor(nmode), kc]
        rows.append(torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in vals]))
    return torch.stack(rows)


def _rows(plan: StepPlan, config: StepConfig, classifier_scale: float) -> torch.Tensor:
    """``_coefficient_rows``, cached on the plan."""
    key = ("rows", config.prediction_type, float(config.eta), float(classifier_scale))
    rows = plan._cache.get(key)
    if rows is None:
        rows = _coefficient_rows(plan, config, classifier_scale)
        plan._cache[key] = rows
    return rows


def _check_schedule(plan: StepPlan, config: StepConfig) -> None:
    """Refuse a (plan, config) whose every image is NaN or inf whatever the model predicts (diffusers too).

    Two real configurations do that, both zero terminal SNR (``rescale_betas_zero_snr=True``, alphabar = 0 at
    the first trailing / linspace timestep): ``prediction_type="epsilon"`` without clipping divides by
    sqrt(alphabar_t) = 0 (huggingface/diffusers#3851), and DDIM with ``eta=1`` takes the square root of
    1 - alphabar_prev - sigma_t^2, mathematically 0 there and negative after rounding (diffusers#5969).
    Checked for every backend (the reference path included), once per (plan, config).
    """
    key = ("checked", config.prediction_type, float(config.eta), config.clip_sample)
    if key in plan._cache:
        return
    if config.prediction_type == "epsilon" and not config.clip_sample:
        zero = (plan.alpha_prod_t == 0).nonzero().flatten().tolist()
        if zero:
            i = zero[0]
            raise ValueError(
                f"prediction_type='epsilon' at step {i} (t={plan.timesteps[i]}) where alphas_cumprod[t] = 0 "
                "(zero terminal SNR, rescale_betas_zero_snr=True): x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) "
                "divides by 0, so every image is inf/NaN (in diffusers too, huggingface/diffusers#3851); "
                "zero-SNR models predict v: use prediction_type='v_prediction'"
            )
    rows = _rows(plan, config, 0.0)
    cols = [COL_SA, COL_SB, COL_DIV, COL_A, COL_B, COL_N]
    bad = torch.isnan(rows[:, cols]).any(dim=1).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        if plan.kind == "ddim" and torch.isnan(rows[i, COL_B]):
            var = float(config.eta) ** 2 * float(plan.variance[i])
            why = (
                f"1 - alphas_cumprod[prev] - sigma_t^2 < 0 with eta={config.eta} (sigma_t^2 = {var:.9g} rounds "
                "above 1 - alphas_cumprod[prev] where alphas_cumprod[t] = 0, zero terminal SNR; "
                "huggingface/diffusers#5969): use eta < 1"
            )
        else:
            why = "a NaN step coefficient (check the scheduler's betas)"
        raise ValueError(
            f"{plan.scheduler_class} step {i} (t={plan.timesteps[i]}): {why}; every image would be NaN "
            "(in diffusers too)"
        )
    plan._cache[key] = True


def coefficient_table(
    plan: StepPlan, config: StepConfig, classifier_scale: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The kernels' per-step scalar table for one (plan, config, classifier scale, dtype, device), cached.

    Returns:
        [S, NCOL] float32 on ``device``. In parity mode with a 16-bit dtype on the CPU, the left-multiplier
        columns hold the scalars rounded to ``dtype`` (what PyTorch's CPU kernels multiply by).
    """
    device = torch.device(device)
    rule = _rounding_rule(device)
    key = (
        "table",
        config.prediction_type,
        float(config.eta),
        float(classifier_scale),
        config.mode,
        dtype,
        rule,
        str(device),
    )
    table = plan._cache.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fused step: the coefficient table is built with a host-to-device copy, which a CUDA graph "
                "capture cannot hold; run the step once before capturing (or call "
                "memcore.ops.step.coefficient_table(plan, config, classifier_scale, dtype, device) first)"
            )
        table = _rows(plan, config, classifier_scale).clone()
        if config.mode == "parity" and rule == "cpu" and dtype in (torch.float16, torch.bfloat16):
            cols = list(_LEFT_MUL_COLS)
            table[:, cols] = table[:, cols].to(dtype).to(torch.float32)
        table = table.to(device).contiguous()
        plan._cache[key] = table
    return table


# ---------------------------------------------------------------------------------------------------------
# The custom op (one elementwise pass; per-step scalars read from the table at row `step`)


def _flags(plan: StepPlan, config: StepConfig, cfg: bool, rescale: bool, cls: bool, device) -> int:
    f = 0
    if cfg:
        f |= F_CFG
    if rescale:
        f |= F_RESCALE
    if cls:
        f |= F_CLS
    if config.prediction_type == "sample":
        f |= F_PRED_SAMPLE
    elif config.prediction_type == "v_prediction":
        f |= F_PRED_V
    if config.clip_sample:
        f |= F_CLIP
    if plan.kind == "ddpm":
        f |= F_DDPM
    if config.mode == "fp32":
        f |= F_FP32
    if _rounding_rule(torch.device(device)) == "cuda":
        f |= F_RECIP
    return f


def _run_native(
    backend: str,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    grad: torch.Tensor | None,
    noise: torch.Tensor | None,
    ratio: torch.Tensor | None,
    table: torch.Tensor,
    step: torch.Tensor,
    flags: int,
    scalars: list[float],
) -> torch.Tensor:
    out = torch.empty_like(sample)
    if sample.numel() == 0:
        return out
    batch = sample.shape[0]
    chw = sample.numel() // batch
    g, gr, clip = scalars
    common = (
        _native.dtype_code(sample),
        batch,
        chw,
        _native.ptr(sample),
        _native.ptr(model_output),
        _native.ptr(grad) if grad is not None else 0,
        _native.ptr(noise) if noise is not None else 0,
        _native.ptr(ratio) if ratio is not None else 0,
        _native.ptr(out),
        _native.ptr(table),
        table.shape[0],
    )
    fam = _native.family("step")
    if backend == "cpu":
        fam.step_cpu(*common, int(step.item()), flags, g, gr, 1.0 - gr, clip)
    else:  # cuda: the step index is read on the device (graph-capturable)
        with torch.cuda.device(sample.device):  # the core launches on the current device
            fam.step_cuda(*common, _native.ptr(step), flags, g, gr, 1.0 - gr, clip, _native.stream_of(sample))
    return out


@torch.library.custom_op("memcore::fused_step", mutates_args=())
def fused_step_op(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    grad: torch.Tensor | None,
    noise: torch.Tensor | None,
    ratio: torch.Tensor | None,
    table: torch.Tensor,
    step: torch.Tensor,
    flags: int,
    scalars: list[float],
    backend: str,
) -> torch.Tensor:
    """The fused elementwise step (checked inputs; see ``fused_step``).

    Args:
        sample: [B, C, H, W] contiguous, storage dtype.
        model_output: [B, C, H, W], or [2B, C, H, W] (uncond then cond) with the CFG flag; storage dtype.
        grad: [B, C, H, W] classifier gradient in the storage dtype, or None.
        noise: [B, C, H, W] step noise in the storage dtype, or None.
        ratio: [B] float32 ``std(cond) / std(cfg)`` for guidance rescale, or None.
        table: [S, NCOL] float32 per-step coefficients (``coefficient_table``).
        step: [] or [1] int64 step index (on the CPU for backend "cpu", on the device otherwise).
        flags: kernel flag bits (F_*).
        scalars: [guidance_scale, guidance_rescale, clip_sample_range] as floats.
        backend: "cpu", "cuda" or "triton".

    Returns:
        [B, C, H, W] prev_sample in the storage dtype.
    """
    if backend in ("cpu", "cuda"):
        return _run_native(backend, sample, model_output, grad, noise, ratio, table, step, flags, scalars)
    if backend == "triton":
        from memcore.kernels.triton.step import fused_step_triton

        return fused_step_triton(sample, model_output, grad, noise, ratio, table, step, flags, scalars)
    raise ValueError(f"fused_step_op: backend {backend!r} is not a kernel backend")


@fused_step_op.register_fake
def _(sample, model_output, grad, noise, ratio, table, step, flags, scalars, backend):
    return torch.empty_like(sample)


# ---------------------------------------------------------------------------------------------------------
# Public entry points


def _check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but sample is on {device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def _prepare(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    plan: StepPlan,
    config: StepConfig,
    guidance_scale: float | None,
    classifier_grad: torch.Tensor | None,
    classifier_scale: float,
    noise: torch.Tensor | None,
    noise_needed: bool,
) -> tuple:
    if not isinstance(plan, StepPlan):
        raise TypeError(
            f"plan must be a StepPlan (memcore.sampling.schedule.make_plan), got {type(plan).__name__}"
        )
    if not isinstance(config, StepConfig):
        raise TypeError(f"config must be a StepConfig, got {type(config).__name__}")
    _check_schedule(plan, config)
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        raise ValueError("sample must be a [B, C, H, W] tensor")
    if sample.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"sample dtype must be float32, float16 or bfloat16, got {sample.dtype}")
    dev = sample.device
    shape = tuple(sample.shape)
    cfg = guidance_scale is not None
    if cfg:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a float or None, got {type(guidance_scale).__name__}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        _check_tensor("model_output", model_output, (2 * shape[0], *shape[1:]), dev)
    else:
        _check_tensor("model_output", model_output, shape, dev)
    if model_output.dtype != sample.dtype:
        raise TypeError(
            f"model_output dtype {model_output.dtype} != sample dtype {sample.dtype} (diffusers keeps both in "
            "the UNet dtype; cast before the step)"
        )
    if config.guidance_rescale > 0 and not cfg:
        raise ValueError("guidance_rescale > 0 needs classifier-free guidance (guidance_scale)")
    if plan.kind == "ddpm" and config.eta != 0.0:
        raise ValueError("eta applies to DDIM only; DDPM's noise follows the scheduler's variance_type")
    cls = classifier_grad is not None
    if cls:
        _check_tensor("classifier_grad", classifier_grad, shape, dev)
        if config.prediction_type != "epsilon":
            raise ValueError(
                "classifier guidance (eps - lambda sqrt(1 - abar) grad) needs prediction_type epsilon"
            )
        if not math.isfinite(float(classifier_scale)):
            raise ValueError(f"classifier_scale must be finite, got {classifier_scale}")
        classifier_grad = classifier_grad.to(sample.dtype).contiguous()
    if noise_needed:
        if noise is None:
            raise ValueError(
                "noise is required for this step (DDIM with eta > 0, or DDPM before its last step): pass "
                "standard normal [B, C, H, W] step noise"
            )
    if noise is not None:
        _check_tensor("noise", noise, shape, dev)
        # diffusers draws step noise in the model-output dtype; cast like it so parity holds
        noise = noise.to(sample.dtype).contiguous()
    return cfg, cls, classifier_grad, noise


def _rescale_ratio(model_output: torch.Tensor, guidance_scale: float, config: StepConfig) -> torch.Tensor:
    """[B] float32 ``std(cond) / std(cfg)`` per sample: the reduction of rescale_noise_cfg (a pre-pass).

    In parity mode it is computed exactly as diffusers does (in the storage dtype); in fp32 mode in float32.
    """
    mo = model_output if config.mode == "parity" else model_output.float()
    u, c = mo.chunk(2)
    e = u + guidance_scale * (c - u)
    dims = list(range(1, mo.dim()))
    ratio = c.std(dim=dims, keepdim=True) / e.std(dim=dims, keepdim=True)
    return ratio.reshape(-1).to(torch.float32).contiguous()


def _noise_needed(plan: StepPlan, config: StepConfig, step_index: int | None) -> bool:
    if plan.kind == "ddim":
        return config.eta > 0
    if step_index is None:
        return any(t > 0 for t in plan.timesteps)
    return plan.timesteps[step_index] > 0


def fused_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    plan: StepPlan,
    step_index: int,
    config: StepConfig,
    *,
    guidance_scale: float | None = None,
    classifier_grad: torch.Tensor | None = None,
    classifier_scale: float = 0.0,
    noise: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One sampler step x_t -> x_{t_prev}, fused (see the module doc for the formula and numeric modes).

    Args:
        sample: [B, C, H, W] x_t in the storage dtype (float32, float16 or bfloat16).
        model_output: [B, C, H, W] model prediction, or [2B, C, H, W] = cat([uncond, cond]) when
            ``guidance_scale`` is not None (diffusers' CFG layout); same dtype as ``sample``.
        plan: the run's :class:`~memcore.sampling.schedule.StepPlan`.
        step_index: index into ``plan.timesteps`` (0 = first, noisiest step).
        config: the run's :class:`StepConfig`.
        guidance_scale: classifier-free guidance scale, or None for no CFG.
        classifier_grad: [B, C, H, W] ``grad_x log p(c | x_t, t)`` for SIDE classifier guidance, or None.
        classifier_scale: lambda: ``eps_hat = eps - lambda * sqrt(1 - abar_t) * grad``.
        noise: [B, C, H, W] standard normal step noise (required when eta > 0 or for DDPM steps with t > 0);
            cast to the storage dtype as diffusers draws it there.
        backend: "auto", "reference" (diffusers' scheduler), "cpu", "cuda" or "triton".

    Returns:
        [B, C, H, W] prev_sample in the storage dtype.
    """
    if isinstance(step_index, bool) or not isinstance(step_index, int):
        raise TypeError(f"step_index must be an int, got {type(step_index).__name__}")
    if not isinstance(plan, StepPlan):
        raise TypeError(
            f"plan must be a StepPlan (memcore.sampling.schedule.make_plan), got {type(plan).__name__}"
        )
    if not 0 <= step_index < len(plan.timesteps):
        raise ValueError(f"step_index {step_index} out of range for a plan of {len(plan.timesteps)} steps")
    cfg, cls, classifier_grad, noise = _prepare(
        sample,
        model_output,
        plan,
        config,
        guidance_scale,
        classifier_grad,
        classifier_scale,
        noise,
        _noise_needed(plan, config, step_index),
    )
    name = _backend.resolve(backend, sample.device, cuda_order=("cuda", "triton"))
    if name == "reference":
        from memcore.reference.step import reference_step

        return reference_step(
            sample,
            model_output,
            plan,
            step_index,
            config,
            guidance_scale=guidance_scale,
            classifier_grad=classifier_grad,
            classifier_scale=classifier_scale,
            noise=noise,
        )
    step = _step_tensor(plan, step_index, torch.device("cpu") if name == "cpu" else sample.device)
    return _launch(
        name, sample, model_output, plan, config, step, cfg, cls, guidance_scale, classifier_grad,
        classifier_scale, noise,
    )  # fmt: skip


def _step_tensor(plan: StepPlan, step_index: int, device: torch.device) -> torch.Tensor:
    """A 0-d int64 view of ``arange(S)`` on ``device`` holding ``step_index``: no host-to-device copy per step."""
    key = ("steps", str(device))
    steps = plan._cache.get(key)
    if steps is None:
        steps = torch.arange(len(plan.timesteps), dtype=torch.int64, device=device)
        plan._cache[key] = steps
    return steps[step_index]


def _launch(
    name, sample, model_output, plan, config, step, cfg, cls, guidance_scale, classifier_grad, classifier_scale,
    noise,
):  # fmt: skip
    rescale = cfg and config.guidance_rescale > 0
    ratio = _rescale_ratio(model_output, guidance_scale, config) if rescale else None
    table = coefficient_table(
        plan, config, float(classifier_scale) if cls else 0.0, sample.dtype, sample.device
    )
    flags = _flags(plan, config, cfg, rescale, cls, sample.device)
    scalars = [
        float(guidance_scale) if cfg else 0.0,
        float(config.guidance_rescale),
        float(config.clip_sample_range),
    ]
    return fused_step_op(
        sample.contiguous(),
        model_output.contiguous(),
        classifier_grad,
        noise,
        ratio,
        table,
        step,
        flags,
        scalars,
        name,
    )


def fused_step_graphable(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    plan: StepPlan,
    step_tensor: torch.Tensor,
    config: StepConfig,
    *,
    guidance_scale: float | None = None,
    classifier_grad: torch.Tensor | None = None,
    classifier_scale: float = 0.0,
    noise: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``fused_step`` with the step index read from a device tensor, so one CUDA graph serves every step.

    The kernel reads its per-step scalars from row ``step_tensor`` of the plan's coefficient table on the
    device; the host never looks at the step. Capture one call, then before each replay do
    ``step_tensor.fill_(i)`` (or ``copy_``) and refill the static ``noise`` buffer. ``noise`` must be given
    whenever any step of the plan needs it (DDIM eta > 0, DDPM); DDPM's last step ignores it as diffusers does.
    Guidance rescale adds a torch pre-pass (a reduction) that is captured with the rest.

    Args:
        step_tensor: [] or [1] int64 on the tensors' device (CPU for backend "cpu").
        Others: as ``fused_step`` ("reference" is not graphable and not accepted).

    Returns:
        [B, C, H, W] prev_sample in the storage dtype.
    """
    if (
        not isinstance(step_tensor, torch.Tensor)
        or step_tensor.dtype != torch.int64
        or step_tensor.numel() != 1
    ):
        raise TypeError("step_tensor must be a one-element int64 tensor")
    cfg, cls, classifier_grad, noise = _prepare(
        sample,
        model_output,
        plan,
        config,
        guidance_scale,
        classifier_grad,
        classifier_scale,
        noise,
        _noise_needed(plan, config, None),
    )
    name = _backend.resolve(backend, sample.device, cuda_order=("cuda", "triton"))
    if name == "reference":
        raise ValueError("fused_step_graphable needs a kernel backend (cpu, cuda or triton), not 'reference'")
    want = torch.device("cpu") if name == "cpu" else sample.device
    if step_tensor.device != want:
        raise ValueError(f"step_tensor must be on {want} for backend {name!r}, got {step_tensor.device}")
    return _launch(
        name, sample, model_output, plan, config, step_tensor.reshape(()), cfg, cls, guidance_scale,
        classifier_grad, classifier_scale, noise,
    )  # fmt: skip
