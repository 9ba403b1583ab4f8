"""The fused sampler step against diffusers' own schedulers (the oracle), on every CPU backend.

Parity mode must be bit-identical to ``DDIMScheduler.step`` / ``DDPMScheduler.step`` called as diffusers
pipelines call them; fp32 mode must be within the table tolerance of the same step computed in float64.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import cpu_backends
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from tolerances import tol

from memcore.ops import step as step_ops
from memcore.ops.step import StepConfig, fused_step, fused_step_graphable
from memcore.reference.step import reference_step
from memcore.sampling.schedule import StepPlan, make_plan

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_BACKENDS = [b for b in cpu_backends() if b != "reference"]


@pytest.fixture(params=["best", "baseline"])
def cpu_isa(request):
    """Run a test on both CPU code paths: AVX2+F16C (when the CPU has it) and the baseline SSE2 one."""
    if "cpu" not in KERNEL_BACKENDS:
        pytest.skip("needs the compiled core")
    from memcore.ops import _native

    fam = _native.family("step")
    fam._set_cpu_baseline(request.param == "baseline")
    try:
        yield request.param
    finally:
        fam._set_cpu_baseline(False)


SHAPE = (2, 3, 5, 4)  # odd sizes on purpose


def _randn(shape, g, dtype):
    return torch.randn(shape, generator=g).to(dtype)


def _inputs(g, dtype, *, cfg: bool, shape=SHAPE):
    b = shape[0]
    x = _randn(shape, g, dtype)
    mo = _randn((2 * b, *shape[1:]) if cfg else shape, g, dtype)
    noise = _randn(shape, g, dtype)
    grad = _randn(shape, g, dtype)
    return x, mo, noise, grad


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    same = (
        (a.view(torch.int16) == b.view(torch.int16))
        if a.element_size() == 2
        else (a.view(torch.int32) == b.view(torch.int32))
    )
    if not bool(same.all()):
        diff = (a.double() - b.double()).abs().max().item()
        raise AssertionError(f"{what}: {int((~same).sum())} elements differ (max |diff| {diff})")


# ---------------------------------------------------------------------------------------------------------
# Plans


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_plan_matches_scheduler(spacing, steps):
    s = DDIMScheduler(
        timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0, set_alpha_to_one=False
    )
    plan = make_plan(s, steps)
    assert s.num_inference_steps is None, "make_plan must not modify the caller's scheduler"
    ref = DDIMScheduler.from_config(s.config)
    ref.set_timesteps(steps)
    assert plan.timesteps == tuple(int(t) for t in ref.timesteps)
    assert plan.prev_timesteps == tuple(t - 1000 // steps for t in plan.timesteps)
    for i, (t, p) in enumerate(zip(plan.timesteps, plan.prev_timesteps)):
        assert plan.alpha_prod_t[i].item() == ref.alphas_cumprod[t].item()
        want = ref.alphas_cumprod[p] if p >= 0 else ref.final_alpha_cumprod
        assert plan.alpha_prod_t_prev[i].item() == want.item()


def test_linspace_previous_timestep_is_not_the_next_scheduled_one():
    # diffusers' DDIM rule prev = t - T // steps; with linspace spacing and 50 steps it is not the next
    # scheduled timestep on 19 of the 50 steps (a fact measured while planning): replicated, not fixed.
    plan = make_plan(DDIMScheduler(timestep_spacing="linspace"), 50)
    nxt = (*plan.timesteps[1:], None)
    differs = sum(1 for p, n in zip(plan.prev_timesteps[:-1], nxt[:-1]) if p != n)
    assert differs == 19
    assert plan.prev_timesteps[-1] < 0


def test_ddpm_plan_uses_previous_timestep():
    s = DDPMScheduler(timestep_spacing="trailing")
    plan = make_plan(s, 7)
    assert plan.prev_timesteps == (*plan.timesteps[1:], -1)
    assert plan.kind == "ddpm" and plan.variance_type == "fixed_small"
    full = make_plan(DDPMScheduler(), 1000)
    assert full.prev_timesteps[:3] == (998, 997, 996)


def test_plan_rejects_unsupported():
    with pytest.raises(ValueError, match="not fused; use the reference path"):
        make_plan(EulerDiscreteScheduler(), 10)
    with pytest.raises(ValueError, match="thresholding"):
        make_plan(DDIMScheduler(thresholding=True), 10)
    with pytest.raises(ValueError, match="learned_range"):
        make_plan(DDPMScheduler(variance_type="learned_range"), 10)
    with pytest.raises(ValueError, match="NaN"):
        make_plan(DDPMScheduler(variance_type="fixed_large_log"), 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_plan(DDIMScheduler(), 1001)
    with pytest.raises(TypeError):
        make_plan(DDIMScheduler(), 10.0)


def test_fixed_large_log_is_nan_in_diffusers():
    # Why make_plan refuses fixed_large_log: diffusers' own step returns NaN there (sqrt of log(beta) < 0).
    s = DDPMScheduler(variance_type="fixed_large_log")
    s.set_timesteps(10)
    x = torch.randn(1, 1, 2, 2)
    out = s.step(torch.randn(1, 1, 2, 2), s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(out.prev_sample).all()


# ---------------------------------------------------------------------------------------------------------
# Parity: DDIM over the config grid


DDIM_GRID = list(
    itertools.product(
        ["epsilon", "v_prediction", "sample"],  # prediction type
        [0.0, 0.8],  # eta
        [False, True],  # clip_sample
        ["linspace", "leading", "trailing"],  # timestep_spacing
        [True, False],  # set_alpha_to_one
    )
)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("pred", "eta", "clip", "spacing", "alpha_one"), DDIM_GRID)
def test_ddim_parity_grid(backend, dtype, pred, eta, clip, spacing, alpha_one):
    g = torch.Generator().manual_seed(hash((pred, eta, clip, spacing, alpha_one)) % 2**31)
    s = DDIMScheduler(
        prediction_type=pred,
        clip_sample=clip,
        clip_sample_range=1.5 if clip else 1.0,
        timestep_spacing=spacing,
        set_alpha_to_one=alpha_one,
        steps_offset=1 if spacing == "leading" else 0,
    )
    steps = 9
    plan = make_plan(s, steps)
    config = StepConfig.from_scheduler(s, eta=eta)
    for i in range(steps):
        x, mo, noise, _ = _inputs(g, dtype, cfg=False)
        mo = mo * 3  # reach the clip range
        want = reference_step(x, mo, plan, i, config, noise=noise)
        got = fused_step(x, mo, plan, i, config, noise=noise, backend=backend)
        _assert_bitwise(got, want, f"step {i}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ddim_parity_equals_diffusers_step_directly(backend, dtype):
    # The oracle itself, spelled out: diffusers' pipeline lines, then scheduler.step(..., variance_noise=).
    g = torch.Generator().manual_seed(7)
    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    s.set_timesteps(10)
    plan = make_plan(s, 10)
    config = StepConfig.from_scheduler(s, eta=0.3)
    for i, t in enumerate(s.timesteps):
        x, mo, noise, _ = _inputs(g, dtype, cfg=True)
        noise_pred_uncond, noise_pred_text = mo.chunk(2)
        noise_pred = noise_pred_uncond + 7.5 * (noise_pred_text - noise_pred_uncond)
        want = s.step(noise_pred, t, x, eta=0.3, variance_noise=noise).prev_sample
        got = fused_step(x, mo, plan, i, config, guidance_scale=7.5, noise=noise, backend=backend)
        _assert_bitwise(got, want, f"step {i}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_cfg_and_rescale_parity(backend, dtype, rescale, cpu_isa):
    g = torch.Generator().manual_seed(11)
    s = DDIMScheduler(
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        clip_sample=False,
    )
    plan = make_plan(s, 6)
    config = StepConfig.from_scheduler(s, guidance_rescale=rescale)
    for i in range(6):
        x, mo, _, _ = _inputs(g, dtype, cfg=True)
        want = reference_step(x, mo, plan, i, config, guidance_scale=5.0)
        got = fused_step(x, mo, plan, i, config, guidance_scale=5.0, backend=backend)
        _assert_bitwise(got, want, f"step {i}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_over_a_50_step_chain(backend, dtype, cpu_isa):
    # A whole sampling run: the kernel's output feeds the next step, so one differing bit would compound.
    g = torch.Generator().manual_seed(3)
    s = DDIMScheduler(timestep_spacing="linspace", clip_sample=True)
    plan = make_plan(s, 50)
    config = StepConfig.from_scheduler(s, eta=0.5)
    x_ref = x_fused = _randn(SHAPE, g, dtype)
    for i in range(50):
        mo = _randn((2 * SHAPE[0], *SHAPE[1:]), g, dtype)
        noise = _randn(SHAPE, g, dtype)
        x_ref = reference_step(x_ref, mo, plan, i, config, guidance_scale=3.0, noise=noise)
        x_fused = fused_step(x_fused, mo, plan, i, config, guidance_scale=3.0, noise=noise, backend=backend)
    _assert_bitwise(x_fused, x_ref, "after 50 steps")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["parity", "fp32"])
def test_every_16bit_value_as_input(backend, dtype, mode, cpu_isa):
    # All 65536 bit patterns (subnormals, -0, the largest finite values, inf, NaN) as the sample and as the
    # model output: exercises the kernels' branch-free float16/bfloat16 conversions and rounding at the
    # edges of the range. Parity mode: bit-identical to diffusers (NaN compared as NaN); fp32 mode: the
    # same NaN/inf pattern as a float64 computation rounded once, values within tolerance.
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, 1, 256, 256)
    mo = bits[torch.randperm(65536, generator=torch.Generator().manual_seed(0))].view(dtype).reshape(x.shape)
    s = DDIMScheduler(clip_sample=False)
    plan = make_plan(s, 10)
    config = StepConfig.from_scheduler(s, mode=mode)
    got = fused_step(x, mo, plan, 9, config, backend=backend)
    if mode == "parity":
        want = reference_step(x, mo, plan, 9, config)
        nan = torch.isnan(want)
        assert torch.equal(nan, torch.isnan(got))
        _assert_bitwise(got[~nan], want[~nan], "all 16-bit inputs")
    else:
        want = reference_step(x.double(), mo.double(), plan, 9, config)
        finite = torch.isfinite(want) & (want.abs() < torch.finfo(dtype).max / 2)
        assert torch.equal(torch.isnan(got), torch.isnan(want.to(dtype)))
        torch.testing.assert_close(got[finite].double(), want[finite], **tol("step_fp32", dtype))


# ---------------------------------------------------------------------------------------------------------
# Parity: DDPM (diffusers draws its own noise; the reference feeds ours through randn_tensor)


DDPM_GRID = list(
    itertools.product(
        ["epsilon", "v_prediction", "sample"],
        ["fixed_small", "fixed_small_log", "fixed_large"],
        [False, True],  # clip
        ["linspace", "leading", "trailing"],
    )
)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("pred", "variance_type", "clip", "spacing"), DDPM_GRID)
def test_ddpm_parity_grid(backend, dtype, pred, variance_type, clip, spacing):
    g = torch.Generator().manual_seed(hash((pred, variance_type, clip, spacing)) % 2**31)
    s = DDPMScheduler(
        prediction_type=pred,
        variance_type=variance_type,
        clip_sample=clip,
        timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
    )
    plan = make_plan(s, 6)  # fewer inference steps than train steps: previous_timestep is the next scheduled
    config = StepConfig.from_scheduler(s)
    for i in range(6):
        x, mo, noise, _ = _inputs(g, dtype, cfg=False)
        want = reference_step(x, mo, plan, i, config, noise=noise)
        got = fused_step(x, mo, plan, i, config, noise=noise, backend=backend)
        _assert_bitwise(got, want, f"step {i} (t={plan.timesteps[i]})")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ddpm_reference_uses_our_noise_like_diffusers(backend):
    # The monkeypatched oracle equals diffusers drawing the same noise from a generator itself.
    s = DDPMScheduler()
    s.set_timesteps(1000)
    plan = make_plan(s, 1000)
    config = StepConfig.from_scheduler(s)
    x = torch.randn(SHAPE)
    mo = torch.randn(SHAPE)
    i = 10
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    want = s.step(mo, s.timesteps[i], x, generator=torch.Generator().manual_seed(5)).prev_sample
    _assert_bitwise(fused_step(x, mo, plan, i, config, noise=noise, backend=backend), want, "ddpm")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ddpm_final_step_adds_zero_without_noise(backend):
    s = DDPMScheduler(num_train_timesteps=50)
    plan = make_plan(s, 50)
    config = StepConfig.from_scheduler(s)
    x = torch.tensor([-0.0, 1.0, -2.0, 0.5]).reshape(1, 1, 2, 2)
    mo = torch.zeros_like(x)
    last = len(plan) - 1
    assert plan.timesteps[last] == 0
    want = reference_step(x, mo, plan, last, config)
    got = fused_step(x, mo, plan, last, config, backend=backend)  # no noise needed at t = 0
    _assert_bitwise(got, want, "t=0")
    with pytest.raises(ValueError, match="noise is required"):
        fused_step(x, mo, plan, 0, config, backend=backend)


# ---------------------------------------------------------------------------------------------------------
# Classifier guidance (SIDE)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_classifier_guidance_parity(backend, dtype, cpu_isa):
    g = torch.Generator().manual_seed(21)
    s = DDPMScheduler(clip_sample=True)
    plan = make_plan(s, 8)
    config = StepConfig.from_scheduler(s)
    for i in range(8):
        x, mo, noise, grad = _inputs(g, dtype, cfg=False)
        want = reference_step(
            x, mo, plan, i, config, classifier_grad=grad, classifier_scale=10.0, noise=noise
        )
        got = fused_step(
            x, mo, plan, i, config, classifier_grad=grad, classifier_scale=10.0, noise=noise, backend=backend
        )
        _assert_bitwise(got, want, f"step {i}")


def test_classifier_guidance_formula_float64():
    # eps_hat = eps - lambda * sqrt(1 - abar_t) * grad [S24 Alg. 1], then the DDIM update, spelled out.
    g = torch.Generator().manual_seed(2)
    s = DDIMScheduler(clip_sample=False)
    plan = make_plan(s, 5)
    config = StepConfig.from_scheduler(s)
    x, mo, _, grad = (t.double() for t in _inputs(g, torch.float64, cfg=False))
    i, lam = 2, 10.0
    abar = plan.alpha_prod_t[i].double()
    abar_prev = plan.alpha_prod_t_prev[i].double()
    eps = mo - lam * (1 - abar).sqrt() * grad
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    want = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
    got = reference_step(x, mo, plan, i, config, classifier_grad=grad, classifier_scale=lam)
    # diffusers' scalars (sqrt of alphas_cumprod) are 0-d float32 tensors: ~1e-7 relative each
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    no_guidance = reference_step(x, mo, plan, i, config)
    assert (got - no_guidance).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------
# fp32 mode


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_fp32_mode_within_tolerance_of_float64(backend, dtype, kind):
    g = torch.Generator().manual_seed(4)
    if kind == "ddim":
        s = DDIMScheduler(prediction_type="v_prediction", clip_sample=True)
        eta = 0.5
    else:
        s = DDPMScheduler(variance_type="fixed_small_log")
        eta = 0.0
    plan = make_plan(s, 10)
    fp32 = StepConfig.from_scheduler(s, eta=eta, mode="fp32", guidance_rescale=0.5 if kind == "ddim" else 0.0)
    par = StepConfig.from_scheduler(s, eta=eta, mode="parity", guidance_rescale=fp32.guidance_rescale)
    err_fp32 = err_par = 0.0
    shape = (4, 3, 16, 16)
    for i in range(10):
        x, mo, noise, _ = _inputs(g, dtype, cfg=True, shape=shape)
        want = reference_step(
            x.double(), mo.double(), plan, i, fp32, guidance_scale=4.0, noise=noise.double()
        )
        got = fused_step(x, mo, plan, i, fp32, guidance_scale=4.0, noise=noise, backend=backend)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol("step_fp32", dtype))
        par_out = fused_step(x, mo, plan, i, par, guidance_scale=4.0, noise=noise, backend=backend)
        err_fp32 += (got.double() - want).abs().mean().item()
        err_par += (par_out.double() - want).abs().mean().item()
    # one rounding instead of one per operation: more accurate on average (equal in float32 up to noise)
    if dtype != torch.float32:
        assert err_fp32 < err_par


# ---------------------------------------------------------------------------------------------------------
# Interface, errors, custom op


def test_step_config_validation_and_from_scheduler():
    s = DDIMScheduler(prediction_type="v_prediction", clip_sample=True, clip_sample_range=2.0)
    c = StepConfig.from_scheduler(s, eta=0.5, mode="fp32")
    assert (c.prediction_type, c.clip_sample, c.clip_sample_range, c.eta, c.mode) == (
        "v_prediction",
        True,
        2.0,
        0.5,
        "fp32",
    )
    assert StepConfig.from_scheduler(make_plan(s, 4)).clip_sample_range == 2.0
    with pytest.raises(ValueError, match="prediction_type"):
        StepConfig(prediction_type="x0")
    with pytest.raises(ValueError, match="mode"):
        StepConfig(mode="fast")
    with pytest.raises(ValueError, match="eta"):
        StepConfig(eta=-1.0)
    with pytest.raises(ValueError, match="guidance_rescale"):
        StepConfig(guidance_rescale=1.5)
    with pytest.raises(ValueError, match="clip_sample_range"):
        StepConfig(clip_sample_range=0.0)
    with pytest.raises(ValueError, match="eta"):
        StepConfig(eta=math.nan)


def test_step_config_rejects_eta_above_one():
    # eta = 5 used to be accepted and gave all-NaN images (sqrt of a negative DDIM direction term)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\].*square root of a negative number"):
        StepConfig(eta=5.0)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        StepConfig(eta=1.0 + 1e-9)
    assert StepConfig(eta=1.0).eta == 1.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"clip_sample": False},
        {"prediction_type": "v_prediction"},
        {"clip_sample": True, "clip_sample_range": 2.0},
    ],
    ids=["no-clip", "v-prediction", "clip-range-2"],
)
def test_reference_honours_a_step_config_the_scheduler_left_at_default(overrides):
    # DDIMScheduler() lists prediction_type / clip_sample / clip_sample_range in its config's
    # _use_default_values, and diffusers' from_config drops those keys, overrides included: the reference
    # oracle then ran the default scheduler's settings whatever the StepConfig said.
    plan = make_plan(DDIMScheduler(), 10)
    config = StepConfig(**overrides)
    # an independent oracle: diffusers' scheduler built with the config's settings directly (StepConfig's own
    # defaults, e.g. clip_sample=False, differ from DDIMScheduler's)
    explicit = DDIMScheduler(
        prediction_type=config.prediction_type,
        clip_sample=config.clip_sample,
        clip_sample_range=config.clip_sample_range,
    )
    explicit.set_timesteps(10)
    default = DDIMScheduler()
    default.set_timesteps(10)
    g = torch.Generator().manual_seed(11)
    differs_from_default = False
    for i in (0, 4, 9):
        x, mo, _, _ = _inputs(g, torch.float32, cfg=False)
        x, mo = 3 * x, 3 * mo  # a predicted x0 well outside [-1, 1], so the clip settings matter
        t = explicit.timesteps[i]
        got = fused_step(x, mo, plan, i, config, backend="reference")
        _assert_bitwise(
            got, explicit.step(mo, t, x, return_dict=False)[0], f"reference vs diffusers, step {i}"
        )
        for backend in KERNEL_BACKENDS:
            _assert_bitwise(fused_step(x, mo, plan, i, config, backend=backend), got, f"{backend}, step {i}")
        differs_from_default |= not torch.equal(got, default.step(mo, t, x, return_dict=False)[0])
    assert differs_from_default, "the test inputs must make the override visible"


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_step_input_errors(backend):
    s = DDIMScheduler()
    plan = make_plan(s, 4)
    c = StepConfig.from_scheduler(s)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="shape"):
        fused_step(x, torch.randn(SHAPE), plan, 0, c, guidance_scale=2.0, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        fused_step(x, torch.randn(SHAPE, dtype=torch.float64), plan, 0, c, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        fused_step(x.double(), torch.randn(SHAPE).double(), plan, 0, c, backend="cpu")
    with pytest.raises(ValueError, match="out of range"):
        fused_step(x, torch.randn(SHAPE), plan, 4, c, backend=backend)
    with pytest.raises(ValueError, match="noise is required"):
        fused_step(x, torch.randn(SHAPE), plan, 0, StepConfig(eta=1.0), backend=backend)
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        fused_step(x, torch.randn(SHAPE), plan, 0, StepConfig(guidance_rescale=0.5), backend=backend)
    with pytest.raises(ValueError, match="prediction_type epsilon"):
        fused_step(
            x,
            torch.randn(SHAPE),
            plan,
            0,
            StepConfig(prediction_type="sample"),
            classifier_grad=x,
            backend=backend,
        )
    with pytest.raises(ValueError, match="unknown backend"):
        fused_step(x, torch.randn(SHAPE), plan, 0, c, backend="fast")
    with pytest.raises(TypeError, match="StepPlan"):
        fused_step(x, torch.randn(SHAPE), object(), 0, c, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_inf_propagate_like_diffusers(backend):
    s = DDIMScheduler(clip_sample=True)
    plan = make_plan(s, 4)
    c = StepConfig.from_scheduler(s)
    x = torch.randn(SHAPE)
    mo = torch.randn(SHAPE)
    mo[0, 0, 0, 0] = math.nan
    mo[1, 0, 0, 0] = math.inf
    want = reference_step(x, mo, plan, 1, c)
    got = fused_step(x, mo, plan, 1, c, backend=backend)
    assert torch.isnan(got[0, 0, 0, 0])
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_graphable_variant_reads_the_step_from_a_tensor(backend):
    g = torch.Generator().manual_seed(9)
    s = DDPMScheduler()
    plan = make_plan(s, 5)
    c = StepConfig.from_scheduler(s)
    step_t = torch.zeros((), dtype=torch.int64)
    for i in range(5):
        x, mo, noise, _ = _inputs(g, torch.float16, cfg=False)
        step_t.fill_(i)
        got = fused_step_graphable(x, mo, plan, step_t, c, noise=noise, backend=backend)
        _assert_bitwise(got, fused_step(x, mo, plan, i, c, noise=noise, backend=backend), f"step {i}")
    with pytest.raises(ValueError, match="kernel backend"):
        fused_step_graphable(x, mo, plan, step_t, c, noise=noise, backend="reference")
    with pytest.raises(ValueError, match="noise is required"):
        fused_step_graphable(x, mo, plan, step_t, c, backend=backend)


def _op_args(dtype=torch.float16):
    s = DDIMScheduler(prediction_type="v_prediction", clip_sample=True)
    plan = make_plan(s, 5)
    config = StepConfig.from_scheduler(s, eta=0.5, guidance_rescale=0.3)
    x = torch.randn(SHAPE).to(dtype)
    mo = torch.randn(2 * SHAPE[0], *SHAPE[1:]).to(dtype)
    noise = torch.randn(SHAPE).to(dtype)
    table = step_ops.coefficient_table(plan, config, 0.0, dtype, torch.device("cpu"))
    ratio = step_ops._rescale_ratio(mo, 2.0, config)
    flags = step_ops._flags(plan, config, True, True, False, torch.device("cpu"))
    step = torch.tensor(2, dtype=torch.int64)
    return plan, config, (x, mo, None, noise, ratio, table, step, flags, [2.0, 0.3, 1.0], "cpu")


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="needs the compiled core")
def test_opcheck_custom_op():
    _, _, args = _op_args()
    torch.library.opcheck(step_ops.fused_step_op, args)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="needs the compiled core")
def test_torch_compile_fullgraph():
    plan, config, args = _op_args()

    def f(x, mo, noise, ratio, table, step):
        out = step_ops.fused_step_op(x, mo, None, noise, ratio, table, step, args[7], args[8], "cpu")
        return out * 1  # something around the op, so the graph is not only the op

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x, mo, _, noise, ratio, table, step = args[:7]
    _assert_bitwise(
        compiled(x, mo, noise, ratio, table, step), f(x, mo, noise, ratio, table, step), "compiled"
    )
    want = reference_step(x, mo, plan, 2, config, guidance_scale=2.0, noise=noise)
    _assert_bitwise(compiled(x, mo, noise, ratio, table, step), want, "compiled vs diffusers")


def test_plan_is_frozen():
    plan = make_plan(DDIMScheduler(), 3)
    assert isinstance(plan, StepPlan)
    with pytest.raises(AttributeError):
        plan.kind = "ddpm"


# ---------------------------------------------------------------------------------------------------------
# CUDA (the lent GPU): parity against diffusers on the same device, graphs, and the CPU-vs-CUDA rule


def _cuda_grid():
    return list(itertools.product(["epsilon", "v_prediction", "sample"], [0.0, 0.7], [False, True]))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("pred", "eta", "clip"), _cuda_grid())
def test_cuda_ddim_parity(backend, dtype, pred, eta, clip):
    g = torch.Generator().manual_seed(1)
    s = DDIMScheduler(prediction_type=pred, clip_sample=clip, timestep_spacing="linspace")
    plan = make_plan(s, 10)
    config = StepConfig.from_scheduler(s, eta=eta, guidance_rescale=0.5)
    for i in range(10):
        x, mo, noise, _ = (t.cuda() for t in _inputs(g, dtype, cfg=True, shape=(3, 4, 17, 9)))
        want = reference_step(x, mo, plan, i, config, guidance_scale=7.5, noise=noise)
        got = fused_step(x, mo, plan, i, config, guidance_scale=7.5, noise=noise, backend=backend)
        _assert_bitwise(got, want, f"{backend} step {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ddpm_classifier_parity_and_fp32(backend, dtype):
    g = torch.Generator().manual_seed(2)
    s = DDPMScheduler(variance_type="fixed_small_log")
    plan = make_plan(s, 8)
    par = StepConfig.from_scheduler(s)
    fp32 = StepConfig.from_scheduler(s, mode="fp32")
    for i in range(8):
        x, mo, noise, grad = (t.cuda() for t in _inputs(g, dtype, cfg=False, shape=(2, 3, 32, 32)))
        kw = dict(classifier_grad=grad, classifier_scale=10.0, noise=noise)
        _assert_bitwise(
            fused_step(x, mo, plan, i, par, backend=backend, **kw),
            reference_step(x, mo, plan, i, par, **kw),
            "par",
        )
        want = reference_step(
            x.double(),
            mo.double(),
            plan,
            i,
            fp32,
            **{**kw, "classifier_grad": grad.double(), "noise": noise.double()},
        )
        got = fused_step(x, mo, plan, i, fp32, backend=backend, **kw)
        torch.testing.assert_close(got.double(), want, **tol("step_fp32", dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_one_capture_serves_every_step(backend):
    g = torch.Generator().manual_seed(3)
    s = DDIMScheduler(timestep_spacing="trailing")
    plan = make_plan(s, 6)
    c = StepConfig.from_scheduler(s, eta=1.0)
    x, mo, noise, _ = (t.cuda() for t in _inputs(g, torch.float16, cfg=True, shape=(2, 4, 8, 8)))
    step_t = torch.zeros((), dtype=torch.int64, device="cuda")
    fused_step_graphable(x, mo, plan, step_t, c, guidance_scale=3.0, noise=noise, backend=backend)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_step_graphable(x, mo, plan, step_t, c, guidance_scale=3.0, noise=noise, backend=backend)
    for i in range(6):
        step_t.fill_(i)
        graph.replay()
        want = reference_step(x, mo, plan, i, c, guidance_scale=3.0, noise=noise)
        _assert_bitwise(out, want, f"graph replay step {i}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_batch(backend):
    s = DDIMScheduler()
    plan = make_plan(s, 4)
    x = torch.empty(0, 3, 4, 4)
    out = fused_step(x, torch.empty(0, 3, 4, 4), plan, 1, StepConfig(), guidance_scale=2.0, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="needs the compiled core")
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_fullgraph_public_entry_points():
    s = DDIMScheduler()
    plan = make_plan(s, 5)
    c = StepConfig.from_scheduler(s, eta=0.5)
    g = torch.Generator().manual_seed(0)
    x, mo, noise, _ = _inputs(g, torch.float16, cfg=True)
    step_t = torch.tensor(1)
    want = fused_step_graphable(x, mo, plan, step_t, c, guidance_scale=2.0, noise=noise, backend="cpu")

    def graphable(x, mo, noise, step_t):
        return fused_step_graphable(x, mo, plan, step_t, c, guidance_scale=2.0, noise=noise, backend="cpu")

    def eager(x, mo, noise):
        return fused_step(x, mo, plan, 1, c, guidance_scale=2.0, noise=noise, backend="cpu")

    _assert_bitwise(
        torch.compile(graphable, fullgraph=True, backend="eager")(x, mo, noise, step_t), want, "g"
    )
    _assert_bitwise(torch.compile(eager, fullgraph=True, backend="eager")(x, mo, noise), want, "eager")
