"""Reference sampler step: diffusers' own scheduler, called the way diffusers pipelines call it.

This is the oracle of the fused step's parity mode: the classifier-free guidance combine and
``rescale_noise_cfg`` exactly as ``StableDiffusionPipeline`` writes them, then ``DDIMScheduler.step`` /
``DDPMScheduler.step``. The classifier-guidance term of SIDE [S24 Algorithm 1] has no diffusers
counterpart; it is written here in the same style (0-d float32 scalars times the storage-dtype tensor):
``eps_hat = eps - classifier_scale * (1 - alphabar_t) ** 0.5 * grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from memcore.ops.step import StepConfig
    from memcore.sampling.schedule import StepPlan


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float):
    """diffusers' ``rescale_noise_cfg`` (pipeline_stable_diffusion.py; arXiv 2305.08891 §3.4), verbatim.

    Copied rather than imported: importing it pulls in the Stable Diffusion pipeline and transformers.
    """
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    # rescale the results from guidance (fixes overexposure)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    # mix with the original results from guidance by factor guidance_rescale to avoid "plain looking" images
    noise_cfg = guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg
    return noise_cfg


def guided_model_output(
    model_output: torch.Tensor,
    guidance_scale: float | None,
    guidance_rescale: float,
    classifier_grad: torch.Tensor | None,
    classifier_scale: float,
    alpha_prod_t: torch.Tensor,
) -> torch.Tensor:
    """CFG combine (+ rescale) and the classifier-guidance term, in the storage dtype, op by op.

    Args:
        model_output: [B, C, H, W], or [2B, C, H, W] = cat([uncond, cond]) when ``guidance_scale`` is set.
        guidance_scale: CFG scale ``g`` (``u + g * (c - u)``) or None.
        guidance_rescale: ``rescale_noise_cfg`` factor (0 disables it).
        classifier_grad: [B, C, H, W] ``grad_x log p(c | x_t, t)`` or None.
        classifier_scale: lambda of SIDE.
        alpha_prod_t: 0-d float32, ``alphas_cumprod[t]``.

    Returns:
        [B, C, H, W] the guided noise prediction.
    """
    eps = model_output
    if guidance_scale is not None:
        noise_pred_uncond, noise_pred_text = model_output.chunk(2)
        eps = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        if guidance_rescale > 0.0:
            eps = rescale_noise_cfg(eps, noise_pred_text, guidance_rescale=guidance_rescale)
    if classifier_grad is not None:
        eps = eps - classifier_scale * (1 - alpha_prod_t) ** 0.5 * classifier_grad
    return eps


@contextlib.contextmanager
def _ddpm_noise(noise: torch.Tensor | None) -> Iterator[None]:
    """Make ``DDPMScheduler.step`` use ``noise`` where it would draw its own (it has no noise argument)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    if noise is None:
        yield
        return

    def fake(shape, generator=None, device=None, dtype=None, **kw):
        if tuple(shape) != tuple(noise.shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != drawn shape {tuple(shape)}")
        return noise.to(device=device, dtype=dtype)

    from memcore.utils import DIFFUSERS_RANDN_LOCK

    with DIFFUSERS_RANDN_LOCK:  # the sampling engine swaps the same module global
        orig = ddpm_mod.randn_tensor
        ddpm_mod.randn_tensor = fake
        try:
            yield
        finally:
            ddpm_mod.randn_tensor = orig


def _scheduler(plan: StepPlan, config: StepConfig) -> Any:
    """diffusers' scheduler for the plan with the config's prediction/clip settings (cached on the plan)."""
    key = ("reference_scheduler", config.prediction_type, config.clip_sample, config.clip_sample_range)
    sched = plan._cache.get(key)
    if sched is None:
        import diffusers

        cfg = dict(plan.scheduler_config)
        # diffusers' from_config drops every key this list names (the source scheduler left them at their
        # defaults), overrides below included: without the pop a StepConfig differing from a default-built
        # scheduler would be ignored by the oracle
        cfg.pop("_use_default_values", None)
        cfg.update(
            prediction_type=config.prediction_type,
            clip_sample=config.clip_sample,
            clip_sample_range=config.clip_sample_range,
        )
        sched = getattr(diffusers, plan.scheduler_class).from_config(cfg)
        sched.set_timesteps(plan.num_inference_steps)
        # The values the plan read from the source scheduler, not its config's: a scheduler whose
        # alphas_cumprod was patched after construction (e.g. alphas_cumprod[-1] = 2**-24, the zero-SNR
        # workaround of diffusers' Euler scheduler and ComfyUI) must give the oracle the same schedule.
        acp = sched.alphas_cumprod.clone()
        for t, prev, a_t, a_prev in zip(
            plan.timesteps, plan.prev_timesteps, plan.alpha_prod_t, plan.alpha_prod_t_prev
        ):
            acp[t] = a_t
            if prev >= 0:
                acp[prev] = a_prev
            elif plan.kind == "ddim":
                sched.final_alpha_cumprod = a_prev.clone()
        sched.alphas_cumprod = acp
        plan._cache[key] = sched
    return sched


def reference_step(
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
) -> torch.Tensor:
    """One sampler step through diffusers (the parity oracle). Shapes as in ``memcore.ops.step.fused_step``.

    Works for any floating dtype, float64 included (the fp32 mode's accuracy oracle).
    """
    sched = _scheduler(plan, config)
    t = sched.timesteps[step_index]
    eps = guided_model_output(
        model_output,
        guidance_scale,
        config.guidance_rescale,
        classifier_grad,
        classifier_scale,
        sched.alphas_cumprod[t],
    )
    if plan.kind == "ddim":
        out = sched.step(
            eps,
            t,
            sample,
            eta=config.eta,
            variance_noise=noise if config.eta > 0 else None,
            return_dict=False,
        )
        return out[0]
    with _ddpm_noise(noise):
        return sched.step(eps, t, sample, return_dict=False)[0]
