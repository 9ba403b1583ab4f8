"""Step plans: everything the fused sampler step reads per step, taken from a diffusers scheduler.

A :class:`StepPlan` freezes, for one ``(scheduler config, num_inference_steps)``, the timesteps in sampling
order, diffusers' previous-timestep rule, and the ``alphas_cumprod`` values diffusers reads at each step, as
float32 exactly as the scheduler holds them. The fused step (``memcore.ops.step.fused_step``) turns these into
per-step coefficients with the same 0-d float32 tensor arithmetic as ``DDIMScheduler.step`` /
``DDPMScheduler.step``, so parity mode can be bit-identical to diffusers.

Previous-timestep rules (replicated, not "fixed"):

- DDIM: ``prev = t - num_train_timesteps // num_inference_steps`` for every spacing, even when that is not
  the next scheduled timestep (with ``timestep_spacing="linspace"`` and 50 of 1000 steps this happens on 19
  steps; with "trailing" on most). ``prev < 0`` reads ``final_alpha_cumprod`` (1.0 with
  ``set_alpha_to_one=True``, else ``alphas_cumprod[0]``).
- DDPM: ``prev`` is the next scheduled timestep (``DDPMScheduler.previous_timestep``), -1 after the last;
  ``prev < 0`` reads 1.0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

_DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True, eq=False)
class StepPlan:
    """The per-step schedule of one sampling run (S = number of inference steps).

    Attributes:
        kind: ``"ddim"`` or ``"ddpm"``.
        timesteps: model timesteps in sampling order, as the scheduler's ``set_timesteps`` gives them.
        prev_timesteps: diffusers' previous timestep per step (may be < 0 at the end).
        alpha_prod_t: [S] float32, ``alphas_cumprod[t]`` exactly as diffusers reads it.
        alpha_prod_t_prev: [S] float32, ``alphas_cumprod[prev]`` or the final value when ``prev < 0``.
        variance: [S] float32, diffusers' ``_get_variance`` per step: DDIM ``sigma_t^2 / eta^2`` (formula 16 of
            the DDIM paper, before ``eta``); DDPM the clamped posterior variance (``fixed_small``), its
            ``exp(0.5 log)`` standard deviation (``fixed_small_log``) or ``beta_t`` (``fixed_large``).
        num_train_timesteps: the scheduler's ``num_train_timesteps``.
        num_inference_steps: S.
        variance_type: DDPM variance type (``None`` for DDIM).
        scheduler_class: ``"DDIMScheduler"`` or ``"DDPMScheduler"``.
        scheduler_config: the source scheduler's config (a plain dict), to rebuild diffusers' own scheduler for
            the reference path.
        prediction_type, clip_sample, clip_sample_range: the source scheduler's settings (defaults for
            ``StepConfig.from_scheduler``).
    """

    kind: str
    timesteps: tuple[int, ...]
    prev_timesteps: tuple[int, ...]
    alpha_prod_t: torch.Tensor
    alpha_prod_t_prev: torch.Tensor
    variance: torch.Tensor
    num_train_timesteps: int
    num_inference_steps: int
    variance_type: str | None
    scheduler_class: str
    scheduler_config: dict[str, Any]
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float
    # Per-(config, dtype, device) coefficient tables built by memcore.ops.step; not part of the plan's identity.
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.num_inference_steps

    def __post_init__(self) -> None:
        if self.kind not in ("ddim", "ddpm"):
            raise ValueError(f"StepPlan.kind must be 'ddim' or 'ddpm', got {self.kind!r}")
        s = len(self.timesteps)
        if len(self.prev_timesteps) != s:
            raise ValueError("StepPlan: timesteps and prev_timesteps differ in length")
        for name in ("alpha_prod_t", "alpha_prod_t_prev", "variance"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (s,):
                raise ValueError(f"StepPlan.{name} must be a float32 tensor of shape [{s}]")


def _check_common(cfg: Any, name: str) -> None:
    if cfg.get("thresholding", False):
        raise ValueError(
            f"{name} with thresholding=True (dynamic thresholding needs a per-sample quantile) is not fused; "
            "use the reference path"
        )
    if cfg.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"{name}: unsupported prediction_type {cfg.get('prediction_type')!r}")
    if cfg.get("timestep_spacing", "leading") not in ("linspace", "leading", "trailing"):
        raise ValueError(f"{name}: unsupported timestep_spacing {cfg.get('timestep_spacing')!r}")


class ScheduleError(ValueError):
    """A schedule that diffusers' own step cannot run either: an error, not a reason to fall back to it."""


def make_plan(scheduler: Any, num_inference_steps: int) -> StepPlan:
    """Build the step plan of a diffusers ``DDIMScheduler`` or ``DDPMScheduler``.

    The given scheduler is not modified (a copy gets ``set_timesteps``).

    Args:
        scheduler: a ``diffusers.DDIMScheduler`` or ``diffusers.DDPMScheduler`` (any ``timestep_spacing``,
            ``steps_offset``, ``set_alpha_to_one``, beta schedule, ``prediction_type``, clip settings).
        num_inference_steps: number of sampling steps, 1 .. ``num_train_timesteps``.

    Returns:
        The :class:`StepPlan`.

    Raises:
        ValueError: another scheduler class ("not fused; use the reference path"), ``thresholding=True``,
            a DDPM ``variance_type`` other than fixed_small / fixed_small_log / fixed_large, a bad step count,
            or a schedule with a timestep >= ``num_train_timesteps`` ("leading" spacing with ``steps_offset``
            > 0 and all ``num_train_timesteps`` steps, where diffusers fails too).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if type(scheduler) not in (DDIMScheduler, DDPMScheduler):
        raise ValueError(
            f"{type(scheduler).__name__} is not fused; use the reference path "
            "(the fused step supports DDIMScheduler and DDPMScheduler)"
        )
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
    cfg = scheduler.config
    total = int(cfg.num_train_timesteps)
    if not 1 <= num_inference_steps <= total:
        raise ValueError(f"num_inference_steps must be in [1, {total}], got {num_inference_steps}")
    name = type(scheduler).__name__
    _check_common(cfg, name)
    kind = "ddim" if isinstance(scheduler, DDIMScheduler) else "ddpm"
    if kind == "ddpm":
        vt = cfg.variance_type
        if vt not in _DDPM_VARIANCE_TYPES:
            why = {
                "fixed_large_log": "diffusers' step takes sqrt(log(beta_t)) of a negative number there and "
                "returns NaN",
                "learned": "the variance comes from the model output",
                "learned_range": "the variance comes from the model output",
            }.get(vt, "unknown variance type")
            raise ValueError(
                f"DDPMScheduler variance_type={vt!r} is not fused ({why}); supported: "
                f"{', '.join(_DDPM_VARIANCE_TYPES)}"
            )

    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    acp = sched.alphas_cumprod.detach().to("cpu", torch.float32)
    timesteps = tuple(int(t) for t in sched.timesteps)
    if len(acp) < total and max(timesteps) >= len(acp):
        # diffusers takes the betas' length from trained_betas and T from the config without comparing them
        raise ScheduleError(
            f"{name}: timestep {max(timesteps)} is outside trained_betas ({len(acp)} entries, but "
            f"num_train_timesteps={total}; diffusers' step indexes alphas_cumprod out of range there)"
        )
    if max(timesteps) >= total:
        # "leading" adds steps_offset after spacing the steps T // steps apart: with steps == T the first
        # timestep is T - 1 + steps_offset, and diffusers' own step then fails on alphas_cumprod[T]
        raise ScheduleError(
            f"{name}: timestep {max(timesteps)} is outside [0, {total}) (timestep_spacing="
            f"{cfg.timestep_spacing!r}, steps_offset={cfg.steps_offset}, num_inference_steps="
            f"{num_inference_steps}; diffusers' step indexes alphas_cumprod out of range there): use fewer "
            "steps or another timestep_spacing"
        )
    a_t, a_prev, var, prevs = [], [], [], []
    with torch.no_grad():
        for t in timesteps:
            if kind == "ddim":
                prev = t - total // num_inference_steps
                final = sched.final_alpha_cumprod.detach().to("cpu", torch.float32)
                ap = acp[prev] if prev >= 0 else final
                v = sched._get_variance(t, prev)
            else:
                prev = int(sched.previous_timestep(t))
                ap = acp[prev] if prev >= 0 else torch.tensor(1.0)
                v = sched._get_variance(t)
            prevs.append(prev)
            a_t.append(acp[t].reshape(()))
            a_prev.append(ap.reshape(()).to(torch.float32))
            var.append(torch.as_tensor(v).detach().to("cpu", torch.float32).reshape(()))
    return StepPlan(
        kind=kind,
        timesteps=timesteps,
        prev_timesteps=tuple(prevs),
        alpha_prod_t=torch.stack(a_t),
        alpha_prod_t_prev=torch.stack(a_prev),
        variance=torch.stack(var),
        num_train_timesteps=total,
        num_inference_steps=num_inference_steps,
        variance_type=str(cfg.variance_type) if kind == "ddpm" else None,
        scheduler_class=name,
        scheduler_config=dict(cfg),
        prediction_type=str(cfg.prediction_type),
        clip_sample=bool(cfg.clip_sample),
        clip_sample_range=float(cfg.clip_sample_range),
    )
