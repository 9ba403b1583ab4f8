"""The attack-cost model (``memcore.attacks.cost``: FLOPs, ``--dry-run``'s projection) against the FLOPs a run
really spends, and the ``memcore profile`` calibration (``memcore.attacks.profile``)."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from memcore.attacks import carlini
from memcore.attacks.cost import (
    H100_BF16_TFLOPS,
    H100_FP32_TFLOPS,
    H100_TF32_TFLOPS,
    project,
    unet_flops,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_extract import tiny_sd_pipeline, tiny_unet


def attn_unet():
    """A tiny unconditional UNet with self-attention blocks (attention is what the CPU FLOP count missed)."""
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    ).eval()  # fmt: skip
    return unet, DDIMScheduler(num_train_timesteps=100)


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipeline()


def cfg(**kw) -> carlini.ExtractConfig:
    base = dict(num_per_condition=3, num_inference_steps=1, grid=(2, 2), min_clique=2, batch_size=2)
    base.update(kw)
    return carlini.ExtractConfig(**base)


def projected(model, conditions, config, **kw):
    """What ``--dry-run`` projects for this run (the CLI's own steps), given the micro-batch."""
    m = carlini._load_model(model, config, torch.device("cpu"))
    conds = carlini._conditions_for(m, carlini._conditions_arg(conditions))
    return project(
        unet_flops(m.handle),
        conditions=len(conds),
        per_condition=config.num_per_condition,
        steps=config.num_inference_steps,
        cfg=(carlini._guidance(m.kind, config) or 0) > 1,
        micro_batch=config.micro_batch,
        **kw,
    )


# one micro-batch each (padded): 3 candidates at 4 -> 4 sampled; 2 prompts x 3 at 8 -> 8 sampled, with CFG
# (guidance 7.5: 2 UNet rows per image) and without (1.0: diffusers' rule is CFG only above 1)
@pytest.mark.parametrize(
    "which, conditions, kw",
    [
        ("attn", None, {"batch_size": 4}),
        ("sd", ["abc", "ca ab"], {"batch_size": 8}),
        ("sd", ["abc", "ca ab"], {"batch_size": 8, "guidance_scale": 1.0}),
    ],
)
def test_projected_flops_are_the_flops_the_run_spends(which, conditions, kw, sd_pipe):
    # Independent count: the whole extraction under FlopCounterMode, with PyTorch's math attention (plain
    # matmuls, which the counter knows on every device). Before: padding rows were not counted (4/3 too few
    # for the UNet), CPU attention counted 0, the SD context was 77 tokens whatever the tokenizer's length (12
    # here), and the text encoder was left out.
    model = attn_unet() if which == "attn" else sd_pipe
    config = cfg(**kw)
    proj = projected(model, conditions, config)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        carlini.extract(model, conditions, config=config, device="cpu", report=False)
    assert proj.total_flops == fc.get_total_flops() > 0
    assert proj.images_sampled == (4 if which == "attn" else 8)


def test_sd_flops_count_attention_context_decode_and_text_encoder(sd_pipe):
    config = cfg(batch_size=4)
    lm = carlini._load_model(sd_pipe, config, torch.device("cpu")).handle
    f = unet_flops(lm)
    # one UNet forward at the context the engine gives it: 12 tokens (the tokenizer's model_max_length)
    ctx = torch.zeros((1, sd_pipe.tokenizer.model_max_length, 16))
    x = torch.zeros((1, 4, 8, 8))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        lm.unet(x, torch.tensor([10]), encoder_hidden_states=ctx)
    assert f["unet_forward"] == fc.get_total_flops()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        lm.vae.decode(x)
    assert f["decode"] == fc.get_total_flops() > 0
    assert f["text_encoder"] > 0 and 0 < f["unet_forward_conv"] < f["unet_forward"]
    # the reference sampler's model (a ReferenceModel: its VAE and text encoder live in the pipeline) counts
    # the same; its decode counted 0 before
    ref = carlini._load_model(sd_pipe, dataclasses.replace(config, sampler="reference"), torch.device("cpu"))
    assert unet_flops(ref.handle) == f


def test_projection_arithmetic_padding_nn_candidates_and_units():
    flops = {"unet_forward": 1000, "decode": 0}
    p = project(flops, conditions=3, per_condition=12, steps=3, cfg=False, micro_batch=5, throughput=100.0)
    assert (p.candidates, p.images_sampled) == (36, 40)  # 8 micro-batches of 5, the last padded
    assert p.total_flops == 40 * 3 * 1000
    assert p.gpu_hours == pytest.approx(40 / 100 / 3600)  # images sampled / (images/s) / (s/h)
    assert p.peak_tflops is None and "100 images/s" in p.basis
    # the NN extraction's candidates beyond N are sampled too (unconditional: 1 condition x 12 + 28)
    p = project(flops, conditions=1, per_condition=12, steps=2, cfg=False, micro_batch=8, extra_candidates=28)
    assert (p.candidates, p.images_sampled) == (40, 40)
    assert any("28 of them the NN extraction's" in line for line in p.lines())
    # without the micro-batch, padding is not counted, and the lines say so
    p = project(flops, conditions=3, per_condition=12, steps=3, cfg=False)
    assert p.images_sampled == 36 and any("padding not counted" in line for line in p.lines())
    # an assumed peak: FLOP / (TFLOP/s x 1e12 x utilisation) / 3600 s
    p = project(flops, conditions=1, per_condition=10, steps=1, cfg=False, peak_tflops=1e-9, utilisation=0.5)
    assert p.gpu_hours == pytest.approx(10 * 1000 / (1e-9 * 1e12 * 0.5) / 3600)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):  # a NaN throughput printed NaN GPU-hours before
        with pytest.raises(ValueError, match="throughput"):
            project(flops, conditions=1, per_condition=1, steps=1, cfg=False, throughput=bad)


def test_assumed_peak_is_the_h100s_in_the_models_dtype():
    base = {"unet_forward": 1000, "unet_forward_conv": 600, "decode": 0, "decode_conv": 0}
    kw = dict(conditions=1, per_condition=1, steps=1, cfg=False)
    # bfloat16/float16: the H100 SXM dense tensor-core peak (was "~800", neither the SXM's 989 nor the PCIe's 756)
    for dt in ("bfloat16", "float16"):
        assert project({**base, "dtype": dt}, **kw).peak_tflops == H100_BF16_TFLOPS == 989.4
    # float32 (the default dtype) at PyTorch's defaults: convolutions in TF32, matmuls in plain float32
    prev = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("highest")
        p = project({**base, "dtype": "float32"}, **kw)
        want = 1000 / (600 / H100_TF32_TFLOPS + 400 / H100_FP32_TFLOPS)
        assert p.peak_tflops == pytest.approx(want) and want < 200
        assert p.gpu_hours == pytest.approx(1000 / (want * 1e12 * 0.5) / 3600)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls too
        assert project({**base, "dtype": "float32"}, **kw).peak_tflops == H100_TF32_TFLOPS
    finally:
        torch.backends.cudnn.allow_tf32 = prev[0]
        torch.set_float32_matmul_precision(prev[1])


def test_profile_calibrates_at_the_runs_micro_batch_after_a_warm_up(tmp_path, monkeypatch):
    from memcore.attacks.profile import run_profile
    from memcore.sampling.engine import Sampler

    monkeypatch.chdir(tmp_path)
    unet, sched = tiny_unet(None)
    config = cfg(num_per_condition=12, batch_size=8, nn_candidates=40)
    train = torch.zeros((4, 1, 8, 8), dtype=torch.uint8)
    batches = []
    real_run = Sampler._run_padded
    monkeypatch.setattr(Sampler, "_run_padded", lambda self, *a: batches.append(1) or real_run(self, *a))
    at_extract = []
    real_extract = carlini.extract
    monkeypatch.setattr(
        carlini, "extract", lambda *a, **k: at_extract.append(len(batches)) or real_extract(*a, **k)
    )
    # a Sampler built for the run is a model too (refused before: the calibration changed its micro-batch)
    sampler = carlini.extraction_sampler((unet, sched), config, device="cpu")
    prof = run_profile(sampler, None, config=config, device="cpu", calib_conditions=1, calib_n=6, train=train)
    # one micro-batch (graph capture, compile) was sampled before the timed calibration
    assert at_extract == [1] and prof["calibration"]["warmup_s"] >= 0
    cal = prof["calibration"]
    assert (cal["micro_batch"], cal["images_sampled"]) == (8, 8)  # 6 candidates, one padded batch of 8
    # throughput in images sampled per second: what the device did in the timed "sample" stage
    assert prof["throughput_images_per_s"] * prof["timings"]["sample"] == pytest.approx(8)
    proj = prof["projection"]
    assert proj["candidates"] == 40  # 12 + the NN extraction's 28 (left out before)
    assert proj["images_sampled"] == 40 and proj["micro_batch"] == 8
    assert proj["gpu_hours"] == pytest.approx(40 / prof["throughput_images_per_s"] / 3600)
    assert math.isclose(sum(prof["shares"].values()), 1.0) and "other" in prof["shares"]
    assert {"timings", "flops", "projection.gpu_hours"} <= set(prof["units"])
    assert list(tmp_path.iterdir()) == []  # the calibration writes nothing
