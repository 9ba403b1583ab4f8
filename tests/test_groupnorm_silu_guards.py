"""fuse_groupnorm_silu (audit): pairs whose unfused computation the fused kernel would not reproduce run the
original modules: a trainable GroupNorm bias under autograd, hooks or replaced forwards, non-4-D inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_groupnorm_silu import _tiny_unet
from tolerances import tol
from torch import nn

from memcore.ops.norm import fuse_groupnorm_silu, groupnorm_silu


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.triton
def test_trainable_norm_bias_alone_runs_the_modules():
    # BitFit-style fine-tuning: only the GroupNorm biases train. The fused op has no autograd formula, so
    # backward used to raise "no autograd formula was registered" (the check looked at weight only).
    unet = _tiny_unet().to(_device())
    for name, p in unet.named_parameters():
        p.requires_grad_("norm" in name and name.endswith("bias"))
    ref = copy.deepcopy(unet)
    fuse_groupnorm_silu(unet, backend="triton")
    x = torch.randn(1, 3, 8, 8, device=_device())
    got, want = unet(x, 10).sample, ref(x, 10).sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(unet.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.triton
def test_hooks_and_replaced_forwards_run_the_modules():
    unet = _tiny_unet().to(_device())
    ref = copy.deepcopy(unet)
    fuse_groupnorm_silu(unet, backend="triton")
    x = torch.randn(1, 3, 8, 8, device=_device())
    resnet, ref_resnet = unet.down_blocks[0].resnets[0], ref.down_blocks[0].resnets[0]
    seen: dict[str, list] = {"fused": [], "ref": []}
    for key, block in (("fused", resnet), ("ref", ref_resnet)):
        block.norm1.register_forward_hook(lambda m, i, o, k=key: seen[k].append(o.clone()))
        block.nonlinearity.register_forward_pre_hook(lambda m, i, k=key: seen[k].append(i[0].clone()))
    # an instance-replaced forward (what accelerate's offload hooks install) on another resnet's norm2
    for block in (unet.up_blocks[1].resnets[0], ref.up_blocks[1].resnets[0]):
        norm = block.norm2
        norm.forward = lambda t, norm=norm: nn.GroupNorm.forward(norm, t) * 0.5
    with torch.no_grad():
        got, want = unet(x, 10).sample, ref(x, 10).sample
    assert len(seen["fused"]) == len(seen["ref"]) > 0, "the hooks ran as often as on the unpatched UNet"
    for a, b in zip(seen["fused"], seen["ref"]):  # the first pair: its input is the UNet's own, unfused
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the other pairs are fused (last bits); the replaced norm2 (x 0.5) is not
    torch.testing.assert_close(got, want, **tol("groupnorm_silu", torch.float32))


class _ScaledGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_group_norm_subclass_with_its_own_forward_is_not_swapped():
    unet = _tiny_unet()
    block = unet.down_blocks[0].resnets[0]
    scaled = _ScaledGroupNorm(block.norm1.num_groups, block.norm1.num_channels, block.norm1.eps)
    scaled.load_state_dict(block.norm1.state_dict())
    block.norm1 = scaled
    n_resnets = sum(1 for m in unet.modules() if type(m).__name__ == "ResnetBlock2D")
    assert fuse_groupnorm_silu(unet) == 2 * (n_resnets - 1) + 1


class _VideoHead(nn.Module):
    """conv_norm_out -> conv_act on [N, C, T, H, W], as HunyuanVideo's causal VAE encoder runs them."""

    def __init__(self):
        super().__init__()
        self.conv_norm_out = nn.GroupNorm(2, 8, eps=1e-6)
        self.conv_act = nn.SiLU()

    def forward(self, x):
        return self.conv_act(self.conv_norm_out(x))


@pytest.mark.triton
def test_conv_norm_out_on_5d_input_runs_the_modules():
    torch.manual_seed(0)
    head = _VideoHead().to(_device())
    ref = copy.deepcopy(head)
    assert fuse_groupnorm_silu(head, backend="triton") == 1
    x = torch.randn(2, 8, 3, 4, 4, device=_device())
    with torch.no_grad():  # used to reach the 4-D kernel launcher: "too many values to unpack"
        torch.testing.assert_close(head(x), ref(x), rtol=0, atol=0)


def test_non_tensor_x_is_a_type_error():
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        groupnorm_silu([[[[1.0]]]], 1)


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_kernel_large_offset_and_constant_groups(channels_last):
    # Statistics and output of x - mean used to be formed as x * scale + (b - mean * scale): with a common
    # offset of 1000 standard deviations that cancelled to ~2e-4 (5x PyTorch's error, outside the float32
    # tolerance), and a constant group (variance 0, rstd = 1/sqrt(eps)) gave silu(b) off by ~4e-3.
    g = torch.Generator().manual_seed(0)
    offset = torch.randn(1, 16, 1, 1, generator=g, dtype=torch.float64) * 3 + 1000
    x = (torch.randn(2, 16, 6, 5, generator=g, dtype=torch.float64) + offset).float()
    const = torch.cat([torch.full((1, 8, 6, 5), 37.37), torch.full((1, 8, 6, 5), -3.3)], 1)  # G = C
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    dev = _device()
    for t, groups in (
        (x, 4),
        (x, 16),
        (const.expand(2, 16, 6, 5) + torch.arange(16.0).view(1, -1, 1, 1), 16),
    ):
        # float64 reference from NCHW: PyTorch's channels_last CPU group_norm is one-pass (E[x^2] - E[x]^2)
        want = F.silu(F.group_norm(t.double(), groups, w.double(), b.double(), 1e-6))
        xin = t.to(dev)
        if channels_last:
            xin = xin.contiguous(memory_format=torch.channels_last)
        got = groupnorm_silu(xin, groups, w.to(dev), b.to(dev), 1e-6, backend="triton")
        torch.testing.assert_close(got.double().cpu(), want, **tol("groupnorm_silu", torch.float32))
