"""Fused GroupNorm + SiLU: the Triton kernel against ``F.group_norm`` -> SiLU in float64, and the UNet patch
against the unfused diffusers UNet."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from tolerances import tol

from memcore.ops import _backend
from memcore.ops.norm import fuse_groupnorm_silu, groupnorm_silu
from memcore.reference.norm import groupnorm_silu as reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (shape, groups): odd sizes, channels per group not a power of two, one-pixel maps, one group
# NHWC schedule: several channel blocks (C > 256, 10 channels per group) and many pixel tiles (HW = 1600)
CASES = [
    ((2, 6, 5, 7), 3),
    ((1, 12, 1, 1), 4),
    ((3, 32, 8, 8), 8),
    ((2, 9, 3, 4), 1),
    ((1, 20, 11, 3), 20),
    ((2, 320, 9, 7), 32),
    ((1, 64, 40, 40), 8),
]


def _tiny_unet(**kw) -> UNet2DModel:
    torch.manual_seed(0)
    cfg = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )
    cfg.update(kw)
    return UNet2DModel(**cfg).eval()


def _n_resnets(unet) -> int:
    return sum(1 for m in unet.modules() if type(m) is ResnetBlock2D)


def test_reference_is_group_norm_then_silu():
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    y = torch.nn.functional.group_norm(x, 3, w, b, 1e-5)
    torch.testing.assert_close(reference(x, 3, w, b, 1e-5), y * torch.sigmoid(y), rtol=1e-12, atol=1e-12)


def test_auto_on_cpu_is_the_reference_and_errors():
    x = torch.randn(2, 6, 5, 7)
    assert torch.equal(groupnorm_silu(x, 3), reference(x, 3, None, None, 1e-5))
    with pytest.raises(ValueError, match="dividing"):
        groupnorm_silu(x, 4)
    with pytest.raises(ValueError, match="no 'cpu' backend"):
        groupnorm_silu(x, 3, backend="cpu")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        groupnorm_silu(x[0], 3)
    with pytest.raises(TypeError, match="dtype"):
        groupnorm_silu(x.double(), 3)
    with pytest.raises(ValueError, match="weight"):
        groupnorm_silu(x, 3, torch.ones(5))


def test_patch_counts_pairs_and_keeps_cpu_outputs_exact():
    unet = _tiny_unet()
    ref = copy.deepcopy(unet)
    keys = list(unet.state_dict())
    n = fuse_groupnorm_silu(unet)
    assert n == 2 * _n_resnets(unet) + 1
    assert fuse_groupnorm_silu(unet) == 0, "a second call swaps nothing"
    assert list(unet.state_dict()) == keys
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(unet(x, 10).sample, ref(x, 10).sample)  # CPU tensors: the unfused modules


def test_patch_scale_shift_blocks_fuse_norm1_only():
    unet = _tiny_unet(resnet_time_scale_shift="scale_shift")
    ref = copy.deepcopy(unet)
    assert fuse_groupnorm_silu(unet) == _n_resnets(unet) + 1
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(unet(x, 3).sample, ref(x, 3).sample)


def test_patch_condition_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    ref = copy.deepcopy(unet)
    assert fuse_groupnorm_silu(unet) == 2 * _n_resnets(unet) + 1
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.equal(unet(x, 5, ctx).sample, ref(x, 5, ctx).sample)
    with pytest.raises(ValueError, match="backend"):
        fuse_groupnorm_silu(unet, backend="cuda")


# ---------------------------------------------------------------------------------------------------------
# The Triton kernel (interpreter lane on CPU tensors; GPU when present)


def _check_kernel(device, dtype, shape, groups, channels_last, affine):
    g = torch.Generator().manual_seed(sum(shape) + groups)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    w = torch.randn(shape[1], generator=g).to(dtype) if affine else None
    b = torch.randn(shape[1], generator=g).to(dtype) if affine else None
    x = x.to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = w.to(device) if affine else None
    b = b.to(device) if affine else None
    got = groupnorm_silu(x, groups, w, b, 1e-6, backend="triton")
    want = reference(x.double(), groups, w.double() if affine else None, b.double() if affine else None, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, **tol("groupnorm_silu", dtype))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "groups"), CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_kernel_matches_reference(dtype, shape, groups, channels_last):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_kernel(device, dtype, shape, groups, channels_last, affine=True)


@pytest.mark.triton
def test_triton_kernel_without_affine_and_empty():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_kernel(device, torch.float32, (2, 8, 4, 5), 4, False, affine=False)
    empty = torch.empty(0, 8, 4, 4, device=device)
    assert groupnorm_silu(empty, 4, backend="triton").shape == empty.shape


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_patched_unet_matches_unfused(monkeypatch, channels_last):
    import memcore.kernels.triton.groupnorm_silu as kernel_mod

    calls = []
    orig = kernel_mod.groupnorm_silu_triton

    def counting(*args, **kwargs):
        t = args[0]
        calls.append(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
        return orig(*args, **kwargs)

    monkeypatch.setattr(kernel_mod, "groupnorm_silu_triton", counting)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = _tiny_unet().to(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(unet)
    n = fuse_groupnorm_silu(unet, backend="triton")
    assert n == 2 * _n_resnets(unet) + 1
    # On the GPU cuDNN runs float32 convolutions in TF32 by default: a 1e-7 difference from the fused norm then
    # moves the UNet's output by ~1e-4 (seen on the H100). Full-precision convolutions isolate the kernel.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            got, want = unet(x, 10).sample, ref(x, 10).sample
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert len(calls) == n, "every swapped pair ran the fused kernel once"
    if channels_last:
        assert any(calls), "the NHWC schedule ran"
    torch.testing.assert_close(got, want, **tol("groupnorm_silu", torch.float32))


@pytest.mark.triton
def test_triton_patched_unet_runs_the_modules_under_autograd_and_in_float64(monkeypatch):
    import memcore.kernels.triton.groupnorm_silu as kernel_mod

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the kernel is inference-only and float32/16/bf16")

    monkeypatch.setattr(kernel_mod, "groupnorm_silu_triton", counting)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = _tiny_unet().to(device)
    ref = copy.deepcopy(unet)
    fuse_groupnorm_silu(unet, backend="triton")
    x = torch.randn(1, 3, 8, 8, device=device)
    got, want = unet(x, 10).sample, ref(x, 10).sample  # grad enabled, trainable weights: a training step
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(unet.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        unet64, ref64 = unet.double(), ref.double()
        torch.testing.assert_close(
            unet64(x.double(), 10).sample, ref64(x.double(), 10).sample, rtol=0, atol=0
        )
    assert not calls


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_auto_patch_channels_last_unet(dtype):
    unet = _tiny_unet(block_out_channels=(32, 64), norm_num_groups=16).to("cuda", dtype)
    unet = unet.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(unet)
    fuse_groupnorm_silu(unet)  # auto: fused on CUDA tensors
    x = torch.randn(4, 3, 8, 8, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = unet(x, 10).sample, ref(x, 10).sample
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.cuda
def test_cuda_compile_with_the_fused_op():
    x = torch.randn(2, 32, 16, 16, device="cuda", dtype=torch.float16)
    w = torch.randn(32, device="cuda", dtype=torch.float16)
    from memcore.ops.norm import groupnorm_silu_op

    f = torch.compile(lambda t: groupnorm_silu_op(t, 8, w, None, 1e-5) * 2, fullgraph=True)
    torch.testing.assert_close(
        f(x).double(),
        2 * reference(x.double(), 8, w.double(), None, 1e-5),
        **tol("groupnorm_silu", torch.float16),
    )


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_groupnorm_silu_op(channels_last):
    from memcore.ops.norm import groupnorm_silu_op

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 8, 4, 3, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    torch.library.opcheck(groupnorm_silu_op, (x, 4, w, b, 1e-5))


def test_affine_parameters_checked_alike_for_every_backend():
    x = torch.randn(2, 6, 5, 7)
    # checked before the backend is chosen, so "triton" gives the same errors as the reference
    for backend in ("reference", "triton"):
        with pytest.raises(TypeError, match=r"weight must be a torch.Tensor or None, got list"):
            groupnorm_silu(x, 3, [1.0] * 6, backend=backend)
        with pytest.raises(TypeError, match=r"weight dtype must be float32, got torch.int64"):
            groupnorm_silu(x, 3, torch.ones(6, dtype=torch.int64), backend=backend)
        with pytest.raises(TypeError, match=r"weight dtype must be float32, got torch.float16"):
            groupnorm_silu(x, 3, torch.ones(6, dtype=torch.float16), backend=backend)
        with pytest.raises(TypeError, match="weight and bias must have one dtype"):
            groupnorm_silu(x.half(), 3, torch.ones(6), torch.zeros(6, dtype=torch.float16), backend=backend)
        with pytest.raises(TypeError, match="eps must be a real number"):
            groupnorm_silu(x, 3, eps="1e-5", backend=backend)
    # float32 affine parameters with half-precision x are PyTorch's mixed-precision rule, accepted
    xh = x.to(torch.float16)
    w, b = torch.randn(6), torch.randn(6)
    y = F.group_norm(xh, 3, w, b, 1e-5)
    assert torch.equal(groupnorm_silu(xh, 3, w, b), F.silu(y))
    # a strided weight view gives what its contiguous copy gives (the kernel indexes w[c])
    ws = torch.randn(12)[::2]
    assert torch.equal(groupnorm_silu(x, 3, ws), groupnorm_silu(x, 3, ws.clone()))


@pytest.mark.skipif(
    _backend.available("triton", torch.device("cpu"))[0], reason="Triton runs on CPU tensors in this lane"
)
def test_patch_refuses_triton_where_it_cannot_run():
    # used to patch and then silently run the unfused modules
    unet = _tiny_unet()
    with pytest.raises(ValueError, match=r"backend='triton'\): backend 'triton' needs"):
        fuse_groupnorm_silu(unet, backend="triton")
    assert fuse_groupnorm_silu(unet) > 0  # auto still patches (and runs unfused on CPU)
