"""End to end: a sampling loop with the fused step reproduces stock diffusers pipelines bit for bit.

DDIMPipeline / DDPMPipeline draw the initial noise and every step's noise from one torch.Generator; the loop
below draws the same numbers in the same order with diffusers' own ``randn_tensor`` and hands them to
``fused_step``, so parity mode must give the identical image (the [C23] candidate a stock pipeline makes).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from memcore.ops.norm import fuse_groupnorm_silu
from memcore.ops.step import StepConfig, fused_step
from memcore.sampling.schedule import make_plan

BACKENDS = [b for b in cpu_backends() if b != "reference"]


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    ).eval()


def _fused_loop(unet, scheduler, steps, seed, batch, *, eta=0.0, backend="cpu"):
    plan = make_plan(scheduler, steps)
    config = StepConfig.from_scheduler(scheduler, eta=eta)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = randn_tensor(shape, generator=g, dtype=unet.dtype)
    with torch.no_grad():
        for i, t in enumerate(plan.timesteps):
            model_output = unet(x, torch.tensor(t)).sample
            needs_noise = eta > 0 if plan.kind == "ddim" else t > 0
            noise = randn_tensor(shape, generator=g, dtype=model_output.dtype) if needs_noise else None
            x = fused_step(x, model_output, plan, i, config, noise=noise, backend=backend)
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("fused_norm", [False, True])
def test_ddim_pipeline_bit_identical(backend, eta, fused_norm):
    unet = _unet()
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    pipe = DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=12,
        eta=eta,
        output_type="pt",
    ).images
    if fused_norm:
        fuse_groupnorm_silu(unet)  # CPU tensors: the original modules run, so the image must not change
    got = _fused_loop(unet, DDIMScheduler.from_config(sched.config), 12, 3, 2, eta=eta, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddpm_pipeline_bit_identical(backend):
    unet = _unet()
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small")
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=10, output_type="pt"
    )
    got = _fused_loop(unet, DDPMScheduler.from_config(sched.config), 10, 5, 2, backend=backend)
    assert torch.equal(got, want.images)
