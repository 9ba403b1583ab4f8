"""``SamplerConfig(compile=True)``: the torch.compile'd UNet against the eager one, and its compile count.

On this CPU lane inductor generates and builds C++ (a C++ compiler is needed); each test resets dynamo, so
it pays one trace of its UNet (a few seconds) plus inductor's codegen and build, which inductor's on-disk
cache shortens on reruns.

Tolerance: inductor fuses and reorders float operations (e.g. GroupNorm's reductions, the attention softmax),
so the compiled UNet is not bit-identical to the eager one. In float32 over a few steps of these tiny random
UNets the [0, 1] images differed by ~1e-6 (measured: 1.1e-6, class-conditional, eta 0.5, 3 steps); atol 1e-5
leaves room for other CPUs' vector widths while still catching any real error (a wrong timestep, condition or
step is off by >1e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from memcore.sampling import Sampler, SamplerConfig

ATOL = 1e-5  # see the module docstring


def _compiles() -> tuple[int, int]:
    """(frames compiled by dynamo, graphs handed to inductor) so far in this process."""
    return counters["frames"]["ok"], counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts without compiled code, so its own compiles are counted (and nothing leaks).

    On the GPU, cuDNN runs float32 convolutions in TF32 by default, and eager and compiled UNets may pick
    different algorithms: their images then differ by ~3e-3 after 10 steps (seen on the H100), which says
    nothing about compile. Full-precision convolutions make the comparison about the compiled graph."""
    torch._dynamo.reset()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = tf32
    torch._dynamo.reset()


def test_compile_config_checks():
    with pytest.raises(ValueError, match="compile_mode"):
        SamplerConfig(compile=True, compile_mode="fast")
    with pytest.raises(TypeError, match="compile must be a bool"):
        SamplerConfig(compile="yes")
    for mode in ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"):
        assert SamplerConfig(compile=True, compile_mode=mode).compile_mode == mode


def test_compile_class_conditional_matches_eager_without_recompiles(class_unet_dir):
    """10 DDIM steps with step noise (eta > 0): compiled ~= eager; one compile serves every step, the next
    (padded) micro-batch, regeneration and a second Sampler of the same model."""
    kw = dict(num_inference_steps=10, batch_size=3, eta=0.5)
    eager = Sampler(class_unet_dir, SamplerConfig(**kw))
    comp = Sampler(class_unet_dir, SamplerConfig(compile=True, **kw))
    assert comp.unet_fn is not comp.unet and eager.unet_fn is eager.unet
    f0, g0 = _compiles()
    got = comp.run_batch([1, 2, 3], [0, 1, 3])
    f1, g1 = _compiles()
    # One frame (UNet2DModel.forward) compiled once for the 10 steps; one graph (no graph break) for these
    # diffusers versions, two allowed so that a harmless graph break elsewhere does not fail the test.
    assert f1 - f0 == 1, f"{f1 - f0} dynamo compiles over 10 steps (the timestep must not be specialised)"
    assert 1 <= g1 - g0 <= 2
    ref = eager.run_batch([1, 2, 3], [0, 1, 3])
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert not torch.equal(got[0], got[1])  # the conditions and seeds reached the compiled UNet

    with torch._dynamo.config.patch(error_on_recompile=True):
        part = comp.run_batch([3, 1], [3, 0])  # padded micro-batch, other labels
        alone = comp.regenerate(3, 3, slot=2)
        again = Sampler(class_unet_dir, SamplerConfig(compile=True, **kw))  # another instance, same model
        other = again.run_batch([2], [1])
    assert _compiles()[0] == f1
    torch.testing.assert_close(part, ref[[2, 0]], rtol=0, atol=ATOL)
    assert torch.equal(alone, got[2])  # same compiled kernels, same slot: bit-identical regeneration
    torch.testing.assert_close(other[0], ref[1], rtol=0, atol=ATOL)


@pytest.mark.slow  # its own compile: ~25 s cold on 2 CPU cores
def test_compile_unconditional_matches_eager(unet_pipe_dir):
    kw = dict(num_inference_steps=3, batch_size=2)
    eager = Sampler(unet_pipe_dir, SamplerConfig(**kw)).sample([5, 6, 7])
    f0, _ = _compiles()
    comp = Sampler(unet_pipe_dir, SamplerConfig(compile=True, **kw)).sample([5, 6, 7])  # 2 batches
    assert _compiles()[0] - f0 == 1
    # uint8 images: a 1e-6 float difference can flip a rounding at a .5 boundary, so allow one level
    assert (comp.int() - eager.int()).abs().max() <= 1
    assert (comp != eager).float().mean() < 0.01


def test_compile_diffusers_step_path(class_unet_dir):
    """The unfused path (diffusers' scheduler.step around the compiled UNet), DDPM with step noise. Same model
    and micro-batch as the first test, so inductor's cache serves the graph (only dynamo traces again)."""
    kw = dict(num_inference_steps=3, batch_size=3, scheduler="ddpm", step_backend="diffusers")
    ref = Sampler(class_unet_dir, SamplerConfig(**kw)).run_batch([1, 2], [2, 0])
    f0, _ = _compiles()
    got = Sampler(class_unet_dir, SamplerConfig(compile=True, **kw)).run_batch([1, 2], [2, 0])
    assert _compiles()[0] - f0 == 1
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_compile_patched_groupnorm_silu_unet(class_unet_dir):
    """fuse_norm's patched forwards trace under torch.compile. The engine's fuse_norm=True is CUDA-only (the
    fused kernel is Triton), so on the CPU the UNet is patched by hand; with backend "auto" the patched blocks
    run the original GroupNorm and SiLU modules on CPU tensors, which is what gets compiled here. The Triton
    kernel itself under compile is covered by the triton-marked test below."""
    from memcore.models.loading import load_model
    from memcore.ops.norm import fuse_groupnorm_silu

    kw = dict(num_inference_steps=2, batch_size=3)
    ref = Sampler(class_unet_dir, SamplerConfig(**kw)).run_batch([1, 2], [0, 2])
    lm = load_model(class_unet_dir)
    assert fuse_groupnorm_silu(lm.unet) > 0
    f0, g0 = _compiles()
    got = Sampler(lm, SamplerConfig(compile=True, **kw)).run_batch([1, 2], [0, 2])
    assert _compiles()[0] - f0 == 1 and _compiles()[1] - g0 <= 2
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="fuse_norm=True needs a CUDA model"):
        Sampler(class_unet_dir, SamplerConfig(compile=True, fuse_norm=True, **kw))


@pytest.mark.triton
def test_compile_triton_groupnorm_silu_unet(class_unet_dir):
    """The fused GroupNorm+SiLU custom op (Triton; the interpreter on CPU) inside the compiled UNet: it is
    opaque to inductor (a custom op with a fake implementation), so the graph compiles around it."""
    import memcore.kernels.triton.groupnorm_silu as kernel_mod
    from memcore.models.loading import load_model
    from memcore.ops.norm import fuse_groupnorm_silu

    calls = [0]
    orig = kernel_mod.groupnorm_silu_triton

    def counting(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    # The interpreter lane runs it on CPU tensors; a GPU machine's Triton lane (no interpreter) on CUDA ones.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(num_inference_steps=2, batch_size=2)
    ref = Sampler(class_unet_dir, SamplerConfig(**kw), device=dev).run_batch([1, 2], [0, 2])
    lm = load_model(class_unet_dir, device=dev)
    assert fuse_groupnorm_silu(lm.unet, backend="triton") > 0
    kernel_mod.groupnorm_silu_triton = counting
    f0, g0 = _compiles()
    try:
        got = Sampler(lm, SamplerConfig(compile=True, **kw)).run_batch([1, 2], [0, 2])
    finally:
        kernel_mod.groupnorm_silu_triton = orig
    assert calls[0] > 0
    assert _compiles()[0] - f0 == 1 and _compiles()[1] - g0 <= 2  # the op does not break the graph
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)  # fused kernel: fp32 stats, another sum order


@pytest.mark.slow  # its own compiles: ~45 s cold on 2 CPU cores for the UNet, more for the VAE
def test_compile_sd_pipeline_matches_eager(tmp_path):
    """A tiny SD-layout pipeline with CFG: the compiled UNet2DConditionModel at batch 2B and the compiled VAE
    decode, one frame each."""
    from test_sampling import save_tiny_sd_pipeline

    d = save_tiny_sd_pipeline(tmp_path / "sd")
    kw = dict(num_inference_steps=3, batch_size=2)
    prompts = ["abc", "a photo"]
    ref = Sampler(d, SamplerConfig(**kw)).run_batch([1, 2], prompts)
    f0, g0 = _compiles()
    comp = Sampler(d, SamplerConfig(compile=True, **kw))
    got = comp.run_batch([1, 2], prompts)
    f1, g1 = _compiles()
    assert f1 - f0 == 2 and 2 <= g1 - g0 <= 4
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    with torch._dynamo.config.patch(error_on_recompile=True):
        comp.run_batch([3], ["ca"])  # new prompt, padded batch: same shapes, no recompile


# ----------------------------------------------------------------------------------------- CUDA (H100)
@pytest.mark.cuda
def test_cuda_compile_with_graphs_equals_eager(class_unet_dir):
    """compile=True inside the engine's CUDA graph: compiled in the warm-up, captured once, replayed."""
    kw = dict(num_inference_steps=10, batch_size=3, eta=0.3, step_backend="fused")
    seeds, labels = [1, 2, 3], [0, 1, 3]
    refs = {}
    for dtype in (torch.float32, torch.bfloat16):
        e = Sampler(class_unet_dir, SamplerConfig(cuda_graphs=False, **kw), device="cuda", dtype=dtype)
        g = Sampler(class_unet_dir, SamplerConfig(compile=True, **kw), device="cuda", dtype=dtype)
        assert g.use_graphs
        refs[dtype] = ref = e.run_batch(seeds, labels)
        a = g.run_batch(seeds, labels)
        if dtype == torch.float32:
            torch.testing.assert_close(a, ref, rtol=0, atol=1e-4)
        else:
            # bf16: inductor keeps fused intermediates in float32 where eager rounds each op to bf16, and over
            # 10 steps of this random UNet single pixels of the two differ by up to 0.15 (H100). Judge the
            # compiled images by the float32 ones: no further from them than eager bf16 is.
            err_compiled = (a - refs[torch.float32]).abs().max()
            err_eager = (ref - refs[torch.float32]).abs().max()
            assert err_compiled <= 1.5 * err_eager + 1e-3, (float(err_compiled), float(err_eager))
        with torch._dynamo.config.patch(error_on_recompile=True):
            b = g.regenerate(2, 1, slot=1)  # replays with new inputs, no recompile
        assert torch.equal(b, a[1])
    with pytest.raises(ValueError, match="own CUDA graphs"):
        Sampler(class_unet_dir, SamplerConfig(compile=True, compile_mode="reduce-overhead"), device="cuda")
    nog = Sampler(
        class_unet_dir,
        SamplerConfig(compile=True, compile_mode="max-autotune-no-cudagraphs", **kw),
        device="cuda",
    )
    assert nog.use_graphs
    torch.testing.assert_close(nog.run_batch(seeds, labels), refs[torch.float32], rtol=0, atol=1e-4)
