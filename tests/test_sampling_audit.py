"""Sampling audit: uint8 rule of float16 pixel pipelines, guidance_rescale without CFG, eta on schedulers without
one, numpy seeds and conditions, parity over DDIM's schedule settings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import memcore.sampling as ms
from memcore.sampling import Sampler, SamplerConfig
from memcore.sampling.engine import uint8_dtype
from memcore.sampling.seeds import check_seeds


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _pil_u8(images) -> torch.Tensor:
    """A pipeline's PIL output as a [N, C, H, W] uint8 tensor."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from test_sampling import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd_audit"))


# ---------------------------------------------------------------------------------------------- uint8 rule
def test_to_uint8_in_float16_matches_numpy_on_every_float16_value():
    # DDIMPipeline hands a float16 tensor to numpy, so numpy_to_pil's x * 255 is rounded to float16 before
    # round(): 124 of these values give another uint8 than the same product in float32
    x = torch.from_numpy(np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16).copy())
    want16 = torch.from_numpy((x.numpy() * 255).round().astype("uint8"))
    want32 = torch.from_numpy((x.float().numpy() * 255).round().astype("uint8"))
    assert not torch.equal(want16, want32)
    assert torch.equal(ms.to_uint8(x.float(), torch.float16), want16)  # from the exact float32 copy
    assert torch.equal(ms.to_uint8(x.float()), want32)  # the default: float32 (latent pipelines)
    assert uint8_dtype(latent=False, model_dtype=torch.float16) == torch.float16
    assert uint8_dtype(latent=True, model_dtype=torch.float16) == torch.float32  # pt_to_numpy casts first
    assert uint8_dtype(latent=False, model_dtype=torch.bfloat16) == torch.float32  # numpy has no bfloat16


def test_float16_pixel_model_uint8_equals_ddim_pipeline_pil(unet_pipe_dir):
    from diffusers import DDIMPipeline

    seeds = [0, 1, 2, 3]
    pipe = DDIMPipeline.from_pretrained(unet_pipe_dir, local_files_only=True).to(torch.float16)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=len(seeds), generator=_gens(seeds), num_inference_steps=1, output_type="np").images
    pil = _pil_u8(pipe.numpy_to_pil(out))
    s = Sampler(unet_pipe_dir, SamplerConfig(num_inference_steps=1, batch_size=4), dtype=torch.float16)
    unit = s.run_batch(seeds)
    assert torch.equal(unit, torch.from_numpy(out.astype(np.float32)).permute(0, 3, 1, 2))  # same floats
    # and the same uint8: in float32, 25 of these 768 values came out one level off
    assert torch.equal(ms.sample(s, seeds=seeds), pil)
    batch = next(s.stream([(0, None, seed) for seed in seeds]))
    assert torch.equal(batch.images_u8, pil) and batch.images_unit.dtype == torch.float32
    assert torch.equal(ms.to_uint8(s.regenerate(3, slot=3), s.uint8_dtype), pil[3])
    # the extraction's reference path (a DDIMPipeline loop written out) converts as the pipeline does too
    from memcore.attacks.reference import reference_sample

    assert torch.equal(reference_sample(pipe.unet, pipe.scheduler, seeds, num_inference_steps=1), pil)


# ------------------------------------------------------------------------------------- guidance_rescale
def test_guidance_rescale_without_cfg_is_ignored_as_diffusers_does(tiny_sd, class_unet_dir):
    # guidance_scale <= 1 turns CFG off, and diffusers applies guidance_rescale only under CFG; the fused step
    # failed at the first step ("guidance_rescale > 0 needs classifier-free guidance")
    kw = dict(num_inference_steps=2, batch_size=1, guidance_scale=1.0)
    want = Sampler(tiny_sd, SamplerConfig(**kw)).run_batch([3], ["abc"])
    for sb in ("fused", "diffusers"):
        s = Sampler(tiny_sd, SamplerConfig(step_backend=sb, guidance_rescale=0.7, **kw))
        assert torch.equal(s.run_batch([3], ["abc"]), want)
    # a model without CFG at all refuses it up front, as it refuses guidance_scale
    with pytest.raises(ValueError, match="guidance_rescale is for text-to-image"):
        Sampler(class_unet_dir, SamplerConfig(num_inference_steps=2, batch_size=1, guidance_rescale=0.5))


# ----------------------------------------------------------------------------------------------------- eta
def test_eta_refused_by_schedulers_whose_step_has_none(unet_pipe_dir):
    # DDPM's step has no eta: eta=0.5 was dropped silently (same images as eta=0)
    for name in ("ddpm", "PNDMScheduler"):
        with pytest.raises(ValueError, match=r"eta=0\.5 is DDIM's noise weight.*takes no eta"):
            Sampler(
                unet_pipe_dir, SamplerConfig(num_inference_steps=4, batch_size=1, scheduler=name, eta=0.5)
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PNDM's "not fused" note
        Sampler(unet_pipe_dir, SamplerConfig(num_inference_steps=4, batch_size=1, scheduler="PNDMScheduler"))
    assert Sampler(unet_pipe_dir, SamplerConfig(num_inference_steps=4, eta=0.5)).needs_step_noise


# ------------------------------------------------------------------------------------- seeds, conditions
def test_sampler_sample_fewer_conditions_than_seeds(class_unet_dir):
    s = Sampler(class_unet_dir, SamplerConfig(num_inference_steps=1, batch_size=2))
    with pytest.raises(ValueError, match="1 conditions for 2 seeds: give one per seed"):  # was an IndexError
        s.sample([1, 2], [0])


def test_numpy_seeds_and_zero_d_class_id(class_unet_dir):
    assert check_seeds(np.array([0, 7, 2**63 - 1], dtype=np.uint64)) == [0, 7, 2**63 - 1]
    assert check_seeds(np.array([3], dtype=np.int32)) == [3]
    assert check_seeds([torch.tensor(5), np.int64(6), 7]) == [5, 6, 7]  # every integer spelling of as_int
    with pytest.raises(TypeError, match="every seed must be an int, got Tensor"):
        check_seeds([torch.tensor(5.0)])
    with pytest.raises(TypeError, match="1-D integer array"):
        check_seeds(np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="1-D integer array"):
        check_seeds(np.array([[1, 2]]))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        check_seeds(torch.tensor([1 + 0j]))
    with pytest.raises(ValueError, match="outside"):
        check_seeds(np.array([2**63], dtype=np.uint64))
    s = Sampler(class_unet_dir, SamplerConfig(num_inference_steps=1, batch_size=2))
    want = ms.sample(s, seeds=[4, 5], conditions=[2, 2])
    assert torch.equal(ms.sample(s, seeds=np.array([4, 5]), conditions=np.array(2)), want)


# -------------------------------------------------------------------------------- parity over DDIM settings
@pytest.mark.parametrize(
    "sched_kw",
    [
        dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
        dict(timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False),
        dict(timestep_spacing="linspace", prediction_type="sample", clip_sample_range=0.5),
    ],
)
def test_fused_parity_with_ddim_pipeline_over_schedule_settings(unet_pipe_dir, sched_kw):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(unet_pipe_dir, subfolder="unet", local_files_only=True)
    pipe = DDIMPipeline(unet, DDIMScheduler(**sched_kw))
    pipe.set_progress_bar_config(disable=True)
    seeds = [0, 2**63 - 1, 0]  # the extremes, and a duplicate
    out = pipe(batch_size=3, generator=_gens(seeds), num_inference_steps=5, output_type="np").images
    s = Sampler(pipe, SamplerConfig(num_inference_steps=5, batch_size=3, scheduler="config"))
    assert s.step_backend == "fused"
    assert torch.equal(s.run_batch(seeds), torch.from_numpy(out).permute(0, 3, 1, 2))
    assert torch.equal(ms.sample(s, seeds=seeds), _pil_u8(pipe.numpy_to_pil(out)))


def test_config_integers_may_be_numpy_integers():
    # SamplerConfig(batch_size=np.int64(4)) was refused as "must be an int >= 1, got 4"
    c = SamplerConfig(batch_size=np.int64(4), num_inference_steps=np.int32(3))
    assert (c.batch_size, c.num_inference_steps) == (4, 3) and type(c.batch_size) is int
    with pytest.raises(TypeError, match="batch_size must be an int, got float"):
        SamplerConfig(batch_size=4.0)
    with pytest.raises(TypeError, match="num_inference_steps must be an int, got bool"):
        SamplerConfig(num_inference_steps=True)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        SamplerConfig(batch_size=np.int64(0))
