"""Audit of the fused step against real scheduler configs: configs whose every image is inf/NaN in diffusers
(zero terminal SNR with epsilon prediction, or with DDIM eta=1) and a schedule diffusers cannot index are
refused with one clear error on every backend instead of returning inf/NaN or an IndexError.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends
from diffusers import DDIMScheduler, DDPMScheduler

from memcore.ops.step import StepConfig, fused_step
from memcore.sampling.schedule import make_plan

SHAPE = (2, 4, 8, 8)
# Stable Diffusion 2.1 with zero terminal SNR (arXiv 2305.08891), as diffusers' docs configure it
ZSNR = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_zero_snr_epsilon_is_refused_not_inf(backend, cls):
    # diffusers divides by sqrt(alphas_cumprod[999]) = 0 (huggingface/diffusers#3851): every image is inf/NaN
    s = cls(**ZSNR, prediction_type="epsilon")
    plan = make_plan(s, 50)
    g = torch.Generator().manual_seed(0)
    x, mo, noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    with pytest.raises(ValueError, match=r"zero terminal SNR.*v_prediction"):
        fused_step(x, mo, plan, 0, StepConfig.from_scheduler(s), noise=noise, backend=backend)
    # clipping keeps x0 finite (diffusers clamps the inf): still run, as diffusers does
    clipped = StepConfig(prediction_type="epsilon", clip_sample=True)
    assert torch.isfinite(fused_step(x, mo, plan, 0, clipped, noise=noise, backend=backend)).all()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_zero_snr_ddim_eta_one_is_refused_not_nan(backend, spacing):
    # sqrt(1 - abar_prev - sigma^2) of a rounded-negative number at t=999 (huggingface/diffusers#5969)
    s = DDIMScheduler(**{**ZSNR, "timestep_spacing": spacing}, prediction_type="v_prediction")
    plan = make_plan(s, 50)
    ref = DDIMScheduler.from_config(s.config)
    ref.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    x, mo, noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    want = ref.step(mo, ref.timesteps[0], x, eta=1.0, variance_noise=noise).prev_sample
    assert torch.isnan(want).all()  # why it is refused
    with pytest.raises(ValueError, match="eta < 1"):
        fused_step(x, mo, plan, 0, StepConfig.from_scheduler(s, eta=1.0), noise=noise, backend=backend)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_a_timestep_diffusers_cannot_index_is_a_clear_error(cls):
    # both raised an IndexError from deep inside make_plan (diffusers' own step fails on them too)
    # "leading" + steps_offset=1 + 1000 of 1000 steps schedules t=1000
    with pytest.raises(ValueError, match=r"timestep 1000 is outside \[0, 1000\)"):
        make_plan(cls(steps_offset=1), 1000)
    # trained_betas shorter than num_train_timesteps (diffusers compares neither)
    with pytest.raises(ValueError, match="outside trained_betas"):
        make_plan(cls(trained_betas=[0.01] * 10), 4)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_reference_uses_a_patched_alphas_cumprod_like_the_kernels(cls):
    # The zero-SNR workaround of diffusers' Euler scheduler / ComfyUI, applied to the scheduler object: the
    # reference backend rebuilt the scheduler from its config and lost it (inf images where diffusers and the
    # C++ kernel give finite ones).
    s = cls(**ZSNR, prediction_type="epsilon")
    s.alphas_cumprod[-1] = 2**-24
    plan = make_plan(s, 10)
    config = StepConfig.from_scheduler(s)
    g = torch.Generator().manual_seed(2)
    x, mo, noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    s.set_timesteps(10)
    if cls is DDIMScheduler:
        want = s.step(mo, s.timesteps[0], x).prev_sample
    else:
        want = s.step(mo, s.timesteps[0], x, generator=torch.Generator().manual_seed(3)).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(want).all()
    for backend in cpu_backends():
        got = fused_step(x, mo, plan, 0, config, noise=noise, backend=backend)
        assert torch.equal(got, want), backend


@pytest.mark.parametrize("step_backend", ["auto", "fused"])
def test_a_sampler_refuses_them_when_built(unet_pipe_dir, step_backend):
    """The Sampler refuses these schedules when it is built (not at its first step), and "auto" does not fall
    back to diffusers' step for a schedule that step cannot index either (it failed there with an IndexError)."""
    from diffusers import DDIMPipeline

    from memcore.sampling import Sampler, SamplerConfig

    pipe = DDIMPipeline.from_pretrained(unet_pipe_dir, local_files_only=True)
    cfg = SamplerConfig(num_inference_steps=4, batch_size=2, step_backend=step_backend)
    pipe.scheduler = DDIMScheduler(**{**ZSNR, "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="divides by 0"):
        Sampler(pipe, cfg)
    pipe.scheduler = DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match=r"timestep 1000 is outside \[0, 1000\)"):
        Sampler(pipe, SamplerConfig(num_inference_steps=1000, batch_size=2, step_backend=step_backend))
