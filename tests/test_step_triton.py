"""The Triton fused step against diffusers (interpreter lane on CPU tensors; the GPU when present).

On CPU tensors the Triton kernel follows PyTorch's CPU rounding rule, so parity mode is bit-identical to
diffusers on the CPU; on CUDA tensors it follows the CUDA rule (tests/test_step.py::test_cuda_*).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tolerances import tol

from memcore.ops.step import StepConfig, fused_step, fused_step_graphable
from memcore.reference.step import reference_step
from memcore.sampling.schedule import make_plan

pytestmark = pytest.mark.triton

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPE = (2, 3, 5, 3)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _t(shape, g, dtype):
    return torch.randn(shape, generator=g).to(dtype).to(_device())


def _bitwise(a, b, what):
    if a.element_size() == 2:
        same = a.view(torch.int16) == b.view(torch.int16)
    else:
        same = a.view(torch.int32) == b.view(torch.int32)
    assert bool(same.all()), (
        f"{what}: {int((~same).sum())} differ, max {(a.double() - b.double()).abs().max()}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("pred", "eta", "clip", "spacing"),
    [
        ("epsilon", 0.0, False, "linspace"),
        ("epsilon", 0.6, True, "leading"),
        ("v_prediction", 0.6, False, "trailing"),
        ("sample", 0.0, True, "linspace"),
    ],
)
def test_triton_ddim_parity(dtype, pred, eta, clip, spacing):
    g = torch.Generator().manual_seed(5)
    s = DDIMScheduler(
        prediction_type=pred, clip_sample=clip, timestep_spacing=spacing, set_alpha_to_one=False
    )
    plan = make_plan(s, 4)
    config = StepConfig.from_scheduler(s, eta=eta, guidance_rescale=0.4)
    for i in (0, 3):
        x, noise = _t(SHAPE, g, dtype), _t(SHAPE, g, dtype)
        mo = _t((2 * SHAPE[0], *SHAPE[1:]), g, dtype) * 2
        want = reference_step(x, mo, plan, i, config, guidance_scale=6.0, noise=noise)
        got = fused_step(x, mo, plan, i, config, guidance_scale=6.0, noise=noise, backend="triton")
        _bitwise(got, want, f"step {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_triton_ddpm_classifier_parity(dtype, variance_type):
    g = torch.Generator().manual_seed(6)
    s = DDPMScheduler(variance_type=variance_type, clip_sample=True)
    plan = make_plan(s, 3)
    config = StepConfig.from_scheduler(s)
    for i in (0, 2):  # the last step (t = 0) adds no noise
        x, mo, noise, grad = (_t(SHAPE, g, dtype) for _ in range(4))
        kw = dict(classifier_grad=grad, classifier_scale=12.0, noise=noise)
        want = reference_step(x, mo, plan, i, config, **kw)
        got = fused_step(x, mo, plan, i, config, backend="triton", **kw)
        _bitwise(got, want, f"step {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_fp32_mode(dtype):
    g = torch.Generator().manual_seed(7)
    s = DDIMScheduler(prediction_type="v_prediction")
    plan = make_plan(s, 5)
    config = StepConfig.from_scheduler(s, eta=0.3, mode="fp32")
    x, noise = _t(SHAPE, g, dtype), _t(SHAPE, g, dtype)
    mo = _t((2 * SHAPE[0], *SHAPE[1:]), g, dtype)
    want = reference_step(x.double(), mo.double(), plan, 1, config, guidance_scale=3.0, noise=noise.double())
    got = fused_step(x, mo, plan, 1, config, guidance_scale=3.0, noise=noise, backend="triton")
    torch.testing.assert_close(got.double(), want, **tol("step_fp32", dtype))


def test_triton_graphable_and_cpu_kernel_agree():
    g = torch.Generator().manual_seed(8)
    s = DDPMScheduler(prediction_type="sample")
    plan = make_plan(s, 3)
    config = StepConfig.from_scheduler(s)
    step_t = torch.zeros((), dtype=torch.int64, device=_device())
    for i in range(3):
        x, mo, noise = (_t(SHAPE, g, torch.bfloat16) for _ in range(3))
        step_t.fill_(i)
        got = fused_step_graphable(x, mo, plan, step_t, config, noise=noise, backend="triton")
        _bitwise(got, reference_step(x, mo, plan, i, config, noise=noise), f"step {i}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) on inf * 0 and NaN
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_every_16bit_value_as_input(dtype):
    # All 65536 bit patterns (subnormals, -0, extremes, inf, NaN) as sample and model output.
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, 1, 256, 256)
    mo = bits[torch.randperm(65536, generator=torch.Generator().manual_seed(0))].view(dtype).reshape(x.shape)
    if dtype == torch.bfloat16 and _device() == "cpu":
        # bfloat16 values this small make float32-subnormal intermediates, which the Triton interpreter
        # (numpy) does not carry bit-exactly; they are zeroed here. The C++ kernel is bit-exact on them
        # (tests/test_step.py), and on a GPU this test runs on every bit pattern.
        x = torch.where(x.float().abs() < 1e-30, torch.zeros_like(x), x)
        mo = torch.where(mo.float().abs() < 1e-30, torch.zeros_like(mo), mo)
    x, mo = x.to(_device()), mo.to(_device())
    s = DDIMScheduler(clip_sample=True)
    plan = make_plan(s, 10)
    config = StepConfig.from_scheduler(s)
    got = fused_step(x, mo, plan, 9, config, backend="triton")
    want = reference_step(x, mo, plan, 9, config)
    nan = torch.isnan(want)
    assert torch.equal(nan, torch.isnan(got))
    _bitwise(got[~nan], want[~nan], "all 16-bit inputs")
