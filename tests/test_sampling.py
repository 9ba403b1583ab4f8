"""The sampling engine against stock diffusers (parity mode, CPU), regeneration and step-noise invariance."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings

import numpy as np
import pytest
import torch
from tolerances import tol

import memcore.sampling as ms
from memcore.sampling import Sampler, SamplerConfig

HAS_FUSED = importlib.util.find_spec("memcore.ops.step") is not None
needs_fused = pytest.mark.skipif(not HAS_FUSED, reason="memcore.ops.step (the fused step) is not merged")


def _unet(**kw):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        **kw,
    )


def _tiny_tokenizer(max_len: int):
    """An offline CLIP tokenizer: byte alphabet (+ end-of-word forms), three merges, the two specials."""
    from memcore.models.offline import offline_clip_tokenizer

    return offline_clip_tokenizer(max_len, merges=[("a", "b"), ("ab", "c</w>"), ("c", "a</w>")])


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny random Stable-Diffusion-layout pipeline built from small configs and saved to disk."""
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd_pipe"))


def save_tiny_sd_pipeline(d):
    """Build the tiny random SD-layout pipeline (seeded) and save it to ``d``; returns ``d``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    tok = _tiny_tokenizer(12)
    te = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=515,
            eos_token_id=516,
            pad_token_id=516,
            hidden_size=16,
            intermediate_size=24,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=12,
            vocab_size=517,
        )
    )
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(d)
    return d


def _np_to_u8(images: np.ndarray) -> torch.Tensor:
    """diffusers' numpy_to_pil conversion, as a [N, C, H, W] uint8 tensor."""
    return torch.from_numpy((images * 255).round().astype("uint8")).permute(0, 3, 1, 2)


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------------ parity with diffusers
def test_unconditional_parity_with_ddim_pipeline(unet_pipe_dir):
    from diffusers import DDIMPipeline

    seeds = [3, 1, 4, 1000, 2**35]
    pipe = DDIMPipeline.from_pretrained(unet_pipe_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=len(seeds), generator=_gens(seeds), num_inference_steps=50, output_type="np").images
    s = Sampler(unet_pipe_dir, SamplerConfig(batch_size=len(seeds), step_backend="diffusers"), device="cpu")
    unit = s.run_batch(seeds)
    assert torch.equal(unit, torch.from_numpy(ref).permute(0, 3, 1, 2))  # bit-identical floats
    out = ms.sample(unet_pipe_dir, seeds=seeds, device="cpu", step_backend="diffusers")
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 8, 8)
    assert torch.equal(out, _np_to_u8(ref))


def _class_reference(unet_dir, seeds, labels, steps):
    """A hand loop written exactly as diffusers' DDIMPipeline, with class labels (no stock pipeline exists)."""
    from diffusers import DDIMScheduler, UNet2DModel
    from diffusers.utils.torch_utils import randn_tensor

    unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(unet_dir, local_files_only=True)
    image = randn_tensor(
        (len(seeds), 3, 8, 8), generator=_gens(seeds), device=torch.device("cpu"), dtype=unet.dtype
    )
    scheduler.set_timesteps(steps)
    class_labels = torch.tensor(labels)
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_output = unet(image, t, class_labels=class_labels).sample
            image = scheduler.step(model_output, t, image, eta=0.0, generator=_gens(seeds)).prev_sample
    image = (image / 2 + 0.5).clamp(0, 1)
    return image.cpu().permute(0, 2, 3, 1).numpy()


def test_class_conditional_parity_with_hand_loop(class_unet_dir):
    seeds, labels = [11, 12, 13], [2, 0, 3]
    ref = _class_reference(class_unet_dir, seeds, labels, 50)
    out = ms.sample(class_unet_dir, seeds=seeds, conditions=labels, device="cpu", step_backend="diffusers")
    assert torch.equal(out, _np_to_u8(ref))
    unit = Sampler(class_unet_dir, SamplerConfig(batch_size=3, step_backend="diffusers")).run_batch(
        seeds, labels
    )
    assert torch.equal(unit, torch.from_numpy(ref).permute(0, 3, 1, 2))


def test_sd_pipeline_parity(sd_dir):
    from diffusers import StableDiffusionPipeline

    seeds = [5, 6, 7]
    prompt = "a photo of abc"
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        prompt,
        num_images_per_prompt=len(seeds),
        generator=_gens(seeds),
        num_inference_steps=50,
        guidance_scale=7.5,
        output_type="np",
    ).images
    s = Sampler(sd_dir, SamplerConfig(batch_size=3, step_backend="diffusers"), device="cpu")
    assert s.model.kind == "sd_pipeline" and s.model.latent and s.model.vae_scale_factor == 2
    assert s.model.image_shape == (3, 16, 16) and s.cfg_scale == 7.5
    unit = s.run_batch(seeds, [prompt] * 3)
    assert torch.equal(unit, torch.from_numpy(ref).permute(0, 3, 1, 2))
    out = ms.sample(sd_dir, seeds=seeds, conditions=prompt, device="cpu", step_backend="diffusers")
    assert torch.equal(out, _np_to_u8(ref))


# ------------------------------------------------------------------------------- regeneration invariance
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_regenerate_alone_equals_inside_batch(unet_pipe_dir, eta):
    s = Sampler(
        unet_pipe_dir, SamplerConfig(num_inference_steps=20, batch_size=4, eta=eta, step_backend="diffusers")
    )
    batch = s.run_batch([21, 22, 23, 24])
    for slot, seed in enumerate([21, 22, 23, 24]):
        assert torch.equal(s.regenerate(seed, slot=slot), batch[slot])
        # this small pixel UNet is slot-independent too (no row-split matmuls); the SD test needs the slot
        assert torch.equal(s.run_batch([seed])[0], batch[slot])
    other = s.run_batch([99, 24, 98])  # different neighbours, different slot
    assert torch.equal(other[1], batch[3])
    # the micro-batch size is part of an image's identity (documented): batch 1 differs from padded batch 4
    s1 = Sampler(
        unet_pipe_dir, SamplerConfig(num_inference_steps=20, batch_size=1, eta=eta, step_backend="diffusers")
    )
    assert s1.run_batch([24]).shape == (1, 3, 8, 8)


def test_step_noise_does_not_depend_on_batch(class_unet_dir):
    # DDPM draws fresh noise every step: through diffusers' scheduler.step, fed by the (seed, step) Philox stream
    cfg = SamplerConfig(num_inference_steps=10, batch_size=3, scheduler="ddpm", step_backend="diffusers")
    s = Sampler(class_unet_dir, cfg)
    a = s.run_batch([1, 2, 3], [0, 1, 2])
    b = s.run_batch([2, 7], [1, 3])
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    # eta = 1 DDIM differs from eta = 0 (the noise is really applied)
    d0 = Sampler(
        class_unet_dir, SamplerConfig(num_inference_steps=10, batch_size=3, step_backend="diffusers")
    )
    d1 = Sampler(
        class_unet_dir, SamplerConfig(num_inference_steps=10, batch_size=3, eta=1.0, step_backend="diffusers")
    )
    assert not torch.equal(d0.run_batch([1], [0]), d1.run_batch([1], [0]))


def test_sd_mixed_prompts_regenerate(sd_dir):
    s = Sampler(sd_dir, SamplerConfig(num_inference_steps=8, batch_size=3, step_backend="diffusers"))
    prompts = ["abc", "a photo", "ca"]
    batch = s.run_batch([1, 2, 3], prompts)
    # Same slot: bit-identical alone and with other neighbours (at any thread count).
    assert torch.equal(s.regenerate(2, "a photo", slot=1), batch[1])
    assert torch.equal(s.run_batch([4, 3], ["abc", "ca"])[1], batch[2])
    assert torch.equal(s.run_batch([7, 2, 8], ["ca", "a photo", "abc"])[1], batch[1])
    assert not torch.equal(s.regenerate(1, "ca", slot=0), batch[0])  # the prompt matters
    with pytest.raises(ValueError, match="slot"):
        s.regenerate(1, "ca", slot=3)


# ---------------------------------------------------------------------------------------- streaming API
def test_stream_batches(class_unet_dir):
    consumed = []

    def jobs():
        for i in range(7):
            consumed.append(i)
            yield (100 + i % 2, i % 4, 50 + i)

    it = ms.stream(class_unet_dir, jobs(), num_inference_steps=4, batch_size=3, step_backend="diffusers")
    first = next(it)
    assert len(consumed) == 3  # lazy: one micro-batch at a time
    assert isinstance(first, ms.SampleBatch) and first.valid == 3
    assert first.images_unit.shape == (3, 3, 8, 8) and first.images_unit.dtype == torch.float32
    assert 0 <= first.images_unit.min() and first.images_unit.max() <= 1
    assert torch.equal(first.images_u8, ms.to_uint8(first.images_unit))
    assert first.seeds.tolist() == [50, 51, 52] and first.condition_ids.tolist() == [100, 101, 100]
    rest = list(it)
    assert [b.valid for b in rest] == [3, 1]
    last = rest[-1]
    assert last.seeds.tolist() == [56, -1, -1] and last.condition_ids.tolist() == [100, -1, -1]
    # same images as sample() with the same micro-batch
    allu8 = torch.cat([first.images_u8] + [b.images_u8[: b.valid] for b in rest])
    ref = ms.sample(
        class_unet_dir,
        seeds=list(range(50, 57)),
        conditions=[i % 4 for i in range(7)],
        num_inference_steps=4,
        batch_size=3,
        step_backend="diffusers",
    )
    assert torch.equal(allu8, ref)


# ------------------------------------------------------------------------------ other schedulers, errors
def test_other_schedulers_through_reference_path(unet_pipe_dir):
    for name in ("PNDMScheduler", "EulerAncestralDiscreteScheduler"):
        with pytest.warns(UserWarning, match="not fused"):
            s = Sampler(unet_pipe_dir, SamplerConfig(num_inference_steps=6, batch_size=2, scheduler=name))
        assert s.step_backend == "diffusers"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = s.run_batch([1, 2])
            b = s.run_batch([3, 2])
        assert torch.isfinite(a).all()
        assert torch.equal(a[1], b[1])  # stateful (PLMS) and stochastic (ancestral) samplers regenerate too


def test_pndm_matches_stock_pipeline_loop(unet_pipe_dir):
    """PLMS through the reference path equals diffusers' DDPMPipeline-style loop with a PNDM scheduler."""
    from diffusers import PNDMScheduler, UNet2DModel
    from diffusers.utils.torch_utils import randn_tensor

    seeds = [8, 9]
    unet = UNet2DModel.from_pretrained(unet_pipe_dir, subfolder="unet", local_files_only=True)
    sched = PNDMScheduler.from_pretrained(unet_pipe_dir, subfolder="scheduler", local_files_only=True)
    sched.set_timesteps(10)
    x = randn_tensor((2, 3, 8, 8), generator=_gens(seeds), device=torch.device("cpu"), dtype=unet.dtype)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    ref = (x / 2 + 0.5).clamp(0, 1)
    with pytest.warns(UserWarning, match="not fused"):
        s = Sampler(
            unet_pipe_dir, SamplerConfig(num_inference_steps=10, batch_size=2, scheduler="PNDMScheduler")
        )
    assert torch.equal(s.run_batch(seeds), ref)


def test_bad_inputs(unet_pipe_dir, class_unet_dir, sd_dir):
    with pytest.raises(ValueError, match="guidance_scale"):
        Sampler(unet_pipe_dir, SamplerConfig(guidance_scale=3.0))
    s = Sampler(class_unet_dir, SamplerConfig(num_inference_steps=2, batch_size=2, step_backend="diffusers"))
    with pytest.raises(ValueError, match="class id"):
        s.run_batch([1], [4])
    with pytest.raises(TypeError, match="class ids"):
        s.run_batch([1], ["cat"])
    with pytest.raises(ValueError, match=r"1\.\.2 seeds"):
        s.run_batch([1, 2, 3], [0, 0, 0])
    with pytest.raises(ValueError, match="one per seed"):
        ms.sample(s, seeds=[1, 2], conditions=[0, 1, 2])
    with pytest.raises(ValueError, match="unconditional"):
        ms.sample(unet_pipe_dir, seeds=[1], conditions=[0], num_inference_steps=2)
    with pytest.raises(ValueError, match="not a local path"):
        ms.sample("google/ddpm-cifar10-32", seeds=[0])
    with pytest.raises(ValueError, match="num_inference_steps"):
        SamplerConfig(num_inference_steps=0)
    with pytest.raises(ValueError, match="mode"):
        SamplerConfig(mode="fast")
    with pytest.raises(ValueError, match="fused"):
        SamplerConfig(mode="fp32", step_backend="diffusers")
    with pytest.raises(ValueError, match="backend must be one of"):
        SamplerConfig(backend="gpu")
    with pytest.raises(ValueError, match="unknown scheduler"):
        Sampler(unet_pipe_dir, SamplerConfig(scheduler="NoSuchScheduler"))
    with pytest.raises(ValueError, match="no fused step"):
        Sampler(unet_pipe_dir, SamplerConfig(scheduler="PNDMScheduler", step_backend="fused"))
    sd = Sampler(sd_dir, SamplerConfig(num_inference_steps=2, batch_size=1, step_backend="diffusers"))
    with pytest.raises(TypeError, match="prompts"):
        sd.run_batch([1], [3])
    assert Sampler(sd_dir, SamplerConfig(guidance_scale=1.0, step_backend="diffusers")).cfg_scale is None
    meta = json.loads((sd_dir / "model_index.json").read_text())
    assert meta["safety_checker"] == [None, None]  # the loader skips absent components


# ------------------------------------------------------------------------------------ fused step (merged)
@needs_fused
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_fused_parity_equals_diffusers_path(class_unet_dir, scheduler, eta, backend):
    kw = dict(num_inference_steps=20, batch_size=3, eta=eta, backend=backend, scheduler=scheduler)
    fused = Sampler(class_unet_dir, SamplerConfig(step_backend="fused", **kw))
    ref = Sampler(class_unet_dir, SamplerConfig(step_backend="diffusers", **kw))
    assert fused.step_backend == "fused"
    a = fused.run_batch([1, 2, 3], [0, 1, 2])
    assert torch.equal(a, ref.run_batch([1, 2, 3], [0, 1, 2]))
    assert torch.equal(fused.run_batch([3], [2])[0], a[2])


@needs_fused
def test_fused_sd_parity_and_fp32(sd_dir):
    kw = dict(num_inference_steps=10, batch_size=2)
    fused = Sampler(sd_dir, SamplerConfig(step_backend="fused", **kw))
    ref = Sampler(sd_dir, SamplerConfig(step_backend="diffusers", **kw))
    a = fused.run_batch([1, 2], ["abc", "ca"])
    assert torch.equal(a, ref.run_batch([1, 2], ["abc", "ca"]))
    fp32 = Sampler(sd_dir, SamplerConfig(mode="fp32", **kw)).run_batch([1, 2], ["abc", "ca"])
    torch.testing.assert_close(fp32, a, **tol("sample_fp32_vs_parity", torch.float32))


@needs_fused
def test_unfusable_config_falls_back_to_diffusers(unet_pipe_dir):
    import dataclasses

    from diffusers import DDIMScheduler

    from memcore.models import load_model

    lm = load_model(unet_pipe_dir)
    lm = dataclasses.replace(lm, scheduler=DDIMScheduler(thresholding=True))
    with pytest.warns(UserWarning, match="not fused"):
        s = Sampler(lm, SamplerConfig(num_inference_steps=4, batch_size=1, scheduler="config"))
    assert s.step_backend == "diffusers"
    with pytest.raises(ValueError):
        Sampler(
            lm, SamplerConfig(num_inference_steps=4, batch_size=1, scheduler="config", step_backend="fused")
        )


@needs_fused
def test_fused_default_sample_equals_stock(unet_pipe_dir):
    from diffusers import DDIMPipeline

    seeds = [3, 1, 4]
    pipe = DDIMPipeline.from_pretrained(unet_pipe_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=3, generator=_gens(seeds), num_inference_steps=50, output_type="np").images
    out = ms.sample(unet_pipe_dir, seeds=seeds, device="cpu")  # auto: the fused step
    assert torch.equal(out, _np_to_u8(ref))


@needs_fused
def test_fused_ddpm_regenerates(unet_pipe_dir):
    s = Sampler(
        unet_pipe_dir,
        SamplerConfig(num_inference_steps=10, batch_size=3, scheduler="ddpm", step_backend="fused"),
    )
    assert torch.equal(s.run_batch([1, 2, 3])[2], s.run_batch([3])[0])


# ----------------------------------------------------------------------------------------- CUDA (H100)
@pytest.mark.cuda
def test_cuda_parity_and_regeneration(unet_pipe_dir, sd_dir):
    from diffusers import DDIMPipeline

    torch.backends.cudnn.benchmark = False
    seeds = [3, 1, 4, 1000]
    pipe = DDIMPipeline.from_pretrained(unet_pipe_dir, local_files_only=True).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cuda").manual_seed(s) for s in seeds]
    ref = pipe(batch_size=4, generator=gens, num_inference_steps=50, output_type="pt").images
    s = Sampler(unet_pipe_dir, SamplerConfig(batch_size=4, step_backend="diffusers"), device="cuda")
    unit = s.run_batch(seeds)
    assert torch.equal(unit, ref.float())
    assert torch.equal(s.run_batch([1000])[0], unit[3])
    for dtype in (torch.bfloat16, torch.float16):
        sd = Sampler(
            sd_dir,
            SamplerConfig(num_inference_steps=10, batch_size=3, mode="parity"),
            device="cuda",
            dtype=dtype,
        )
        batch = sd.run_batch([1, 2, 3], ["abc", "a photo", "ca"])
        assert torch.equal(sd.run_batch([3], ["ca"])[0], batch[2])


@pytest.mark.cuda
@needs_fused
def test_cuda_graphs_equal_eager(class_unet_dir, sd_dir):
    for path, conds in ((class_unet_dir, [0, 1, 3]), (sd_dir, ["abc", "ca", "a photo"])):
        for dtype in (torch.float32, torch.bfloat16):
            kw = dict(num_inference_steps=10, batch_size=3, eta=0.3, step_backend="fused")
            g = Sampler(path, SamplerConfig(cuda_graphs=True, **kw), device="cuda", dtype=dtype)
            e = Sampler(path, SamplerConfig(cuda_graphs=False, **kw), device="cuda", dtype=dtype)
            assert g.use_graphs and not e.use_graphs
            a = g.run_batch([1, 2, 3], conds)
            assert torch.equal(a, e.run_batch([1, 2, 3], conds))
            assert torch.equal(g.run_batch([2], conds[1:2])[0], a[1])  # replay with new inputs


def test_fuse_qkv_matches_unfused_and_is_idempotent(sd_dir, class_unet_dir):
    """fuse_qkv=True: diffusers' fused Q/K/V projections in the UNet and VAE give the unfused images up to
    float32 rounding; a second Sampler on the fused model keeps it fused; UNets without the method are refused."""
    from memcore.models.loading import load_model

    kw = dict(num_inference_steps=3, batch_size=2)
    prompts = ["abc", "a photo"]
    ref = Sampler(sd_dir, SamplerConfig(**kw)).run_batch([1, 2], prompts)
    lm = load_model(sd_dir)
    fused = Sampler(lm, SamplerConfig(fuse_qkv=True, **kw))
    names = {type(p).__name__ for p in lm.unet.attn_processors.values()}
    assert names == {"FusedAttnProcessor2_0"}, names
    assert {type(p).__name__ for p in lm.vae.attn_processors.values()} <= {"FusedAttnProcessor2_0"}
    got = fused.run_batch([1, 2], prompts)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    again = Sampler(lm, SamplerConfig(fuse_qkv=True, **kw)).run_batch([1, 2], prompts)
    assert torch.equal(again, got)
    with pytest.raises(ValueError, match="fuse_qkv_projections"):
        Sampler(class_unet_dir, SamplerConfig(fuse_qkv=True, **kw))
    with pytest.raises(TypeError, match="fuse_qkv must be a bool"):
        SamplerConfig(fuse_qkv=1)


def test_attention_backend_first_in_sdpa_order_during_unet_calls(sd_dir):
    """attention="math" puts SDPA's math kernel first while the UNet runs (the other kernels follow, for
    shapes it cannot take), restores PyTorch's order afterwards, and gives "auto"'s images up to rounding;
    "auto" leaves the order alone. Unknown names are refused."""
    from torch.nn.attention import SDPBackend

    from memcore.models.loading import load_model

    kw = dict(num_inference_steps=3, batch_size=2)
    prompts = ["abc", "a photo"]
    before = torch._C._get_sdp_priority_order()
    seen = []
    lm = load_model(sd_dir)
    hook = lm.unet.register_forward_pre_hook(lambda *_: seen.append(torch._C._get_sdp_priority_order()))
    try:
        ref = Sampler(lm, SamplerConfig(**kw)).run_batch([1, 2], prompts)
        assert seen and all(o == before for o in seen)
        seen.clear()
        got = Sampler(lm, SamplerConfig(attention="math", **kw)).run_batch([1, 2], prompts)
    finally:
        hook.remove()
    assert seen and all(o[0] == int(SDPBackend.MATH) and sorted(o) == sorted(before) for o in seen)
    assert torch._C._get_sdp_priority_order() == before
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="attention must be one of"):
        SamplerConfig(attention="flash3")


@pytest.mark.cuda
def test_cudnn_attention_takes_sd_shapes_and_captures(sd_dir):
    """The SD 1.x self-attention shape at 64x64 latents (8 heads of 40, 4096 tokens, bf16) runs on cuDNN's
    kernel alone (else attention="cudnn" would silently fall back to FlashAttention-2 there), close to the
    math kernel; a Sampler with attention="cudnn" captures its CUDA graph and replays what eager computes."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn((2, 8, 4096, 40), generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        got = F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2)
    kw = dict(num_inference_steps=5, batch_size=2, attention="cudnn", step_backend="fused")
    prompts = ["abc", "a photo"]
    gr = Sampler(sd_dir, SamplerConfig(cuda_graphs=True, **kw), device="cuda", dtype=torch.bfloat16)
    ea = Sampler(sd_dir, SamplerConfig(cuda_graphs=False, **kw), device="cuda", dtype=torch.bfloat16)
    assert gr.use_graphs
    assert torch.equal(gr.run_batch([1, 2], prompts), ea.run_batch([1, 2], prompts))


def test_dtype_names_and_missing_conditions(class_unet_dir):
    # dtype by name, as ExtractConfig and the CLI spell it, gives the same images as the torch.dtype
    a = ms.sample(class_unet_dir, seeds=[3], conditions=[1], num_inference_steps=2, dtype="float32")
    b = ms.sample(class_unet_dir, seeds=[3], conditions=[1], num_inference_steps=2, dtype=torch.float32)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match=r"floating torch\.dtype"):
        ms.sample(class_unet_dir, seeds=[3], conditions=[1], num_inference_steps=2, dtype="int8")
    with pytest.raises(
        TypeError, match=r"class-conditional model needs a condition per seed \(a class id in"
    ):
        ms.sample(class_unet_dir, seeds=[3], num_inference_steps=2)


# ------------------------------------------------------------------------------- argument validation
def test_sampler_config_refuses_nonsense_values():
    # truthy strings used to switch features on
    with pytest.raises(TypeError, match="cuda_graphs must be a bool, got 'no'"):
        SamplerConfig(cuda_graphs="no")
    with pytest.raises(TypeError, match="channels_last must be a bool or None, got 'no'"):
        SamplerConfig(channels_last="no")
    for name, bad in (("eta", "0.5"), ("eta", True), ("guidance_scale", "7.5"), ("guidance_rescale", "x")):
        with pytest.raises(TypeError, match=f"{name} must be a real number"):
            SamplerConfig(**{name: bad})
    for name, bad in (
        ("guidance_scale", math.inf),
        ("guidance_rescale", math.nan),
        ("guidance_rescale", math.inf),
    ):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            SamplerConfig(**{name: bad})
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        SamplerConfig(eta=1.5)
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
        SamplerConfig(guidance_rescale=1.5)
    with pytest.raises(ValueError, match="guidance_rescale must be >= 0"):
        SamplerConfig(guidance_rescale=-0.1)
    ok = SamplerConfig(eta=np.float32(0.5), guidance_scale=3, channels_last=None, cuda_graphs=False)
    assert ok.eta == 0.5 and ok.guidance_scale == 3


def test_scheduler_names_checked_at_config_time():
    with pytest.raises(ValueError, match="'UNet2DModel' is not a diffusers scheduler class"):
        SamplerConfig(scheduler="UNet2DModel")
    with pytest.raises(
        ValueError, match=r"'FlowMatchEulerDiscreteScheduler' is not supported.*scale_model_input"
    ):
        SamplerConfig(scheduler="FlowMatchEulerDiscreteScheduler")
    with pytest.raises(ValueError, match=r"'KarrasVeScheduler' is not supported.*step"):
        SamplerConfig(scheduler="KarrasVeScheduler")
    with pytest.raises(ValueError, match=r"'RePaintScheduler' is not supported.*original_image, mask"):
        SamplerConfig(scheduler="RePaintScheduler")
    with pytest.raises(ValueError, match=r"'DDIMInverseScheduler' is not supported.*inverts DDIM"):
        SamplerConfig(scheduler="DDIMInverseScheduler")
    # its noise is torchsde's own (seeded apart from the candidate): refused whether torchsde is installed or not
    with pytest.raises(ValueError, match=r"'DPMSolverSDEScheduler' is not supported.*Brownian tree"):
        SamplerConfig(scheduler="DPMSolverSDEScheduler")
    with pytest.raises(ValueError, match="unknown scheduler 'NoSuchScheduler'"):
        SamplerConfig(scheduler="NoSuchScheduler")
    assert SamplerConfig(scheduler="EulerDiscreteScheduler").scheduler == "EulerDiscreteScheduler"


def test_scheduler_checked_by_the_sampler_before_sampling():
    import dataclasses

    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from memcore.models import load_model

    lm = load_model(_unet(), scheduler=DDPMScheduler())
    # PNDM's Runge-Kutta warm-up needs 4 steps: numpy used to fail with "operands could not be broadcast"
    with pytest.raises(ValueError, match=r"PNDMScheduler cannot set 2 inference steps.*>= 4"):
        Sampler(lm, SamplerConfig(num_inference_steps=2, batch_size=1, scheduler="PNDMScheduler"))
    # the model's own scheduler (scheduler="config") has no class name to check before the model is loaded
    flow = dataclasses.replace(lm, scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(
        ValueError, match=r"FlowMatchEulerDiscreteScheduler.*scheduler='config'.*not supported"
    ):
        Sampler(flow, SamplerConfig(num_inference_steps=2, batch_size=1, scheduler="config"))


def test_sampler_argument_types(class_unet_dir):
    with pytest.raises(TypeError, match="config must be a SamplerConfig, got dict"):
        Sampler(class_unet_dir, {"batch_size": 2})
    s = Sampler(class_unet_dir, SamplerConfig(num_inference_steps=2, batch_size=2, step_backend="diffusers"))
    for bad in (1.7, "1", True):
        with pytest.raises(TypeError, match="slot must be an int"):
            s.regenerate(3, 1, slot=bad)
    with pytest.raises(ValueError, match=r"slot must be in \[0, 2\)"):
        s.regenerate(3, 1, slot=np.int64(2))
    with pytest.raises(ValueError, match=r"condition_id must be a 64-bit integer, got 9223372036854775808"):
        next(s.stream([(2**63, 0, 5)]))
    # padding rows are told by `valid`, not by their id: a job may use -1 (extraction's NN-only candidates)
    batch = next(s.stream([(-1, 0, 5)]))
    assert batch.valid == 1 and batch.condition_ids.tolist() == [-1, -1]
    with pytest.raises(TypeError, match="condition_id must be an int"):
        next(s.stream([("3", 0, 5)]))
    batch = next(s.stream([(np.int64(4), 0, 5)]))
    assert batch.condition_ids.tolist() == [4, -1]


def test_sample_conditions_scalars_and_numpy_ids(class_unet_dir):
    s = Sampler(class_unet_dir, SamplerConfig(num_inference_steps=2, batch_size=2, step_backend="diffusers"))
    want = ms.sample(s, seeds=[1, 2], conditions=[3, 3])
    # a single class id is used for every seed (documented), whatever integer type spells it
    for single in (3, np.int64(3), torch.tensor(3)):
        assert torch.equal(ms.sample(s, seeds=[1, 2], conditions=single), want)
    for seq in ([np.int64(3), np.int64(3)], [torch.tensor(3), 3], torch.tensor([3, 3]), np.array([3, 3])):
        assert torch.equal(ms.sample(s, seeds=[1, 2], conditions=seq), want)
    with pytest.raises(TypeError, match=r"one condition per seed.*got float 3.0"):
        ms.sample(s, seeds=[1, 2], conditions=3.0)
    with pytest.raises(TypeError, match=r"one condition per seed.*got set"):
        ms.sample(s, seeds=[1, 2], conditions={3})
    with pytest.raises(TypeError, match=r"class ids, got float 3.0"):  # not truncated
        ms.sample(s, seeds=[1], conditions=[3.0])
    with pytest.raises(TypeError, match="class ids, got Tensor"):
        ms.sample(s, seeds=[1], conditions=[torch.tensor(2.7)])
