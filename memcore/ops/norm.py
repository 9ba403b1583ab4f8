"""Fused GroupNorm + SiLU: the op, and a patch that swaps it into diffusers UNets.

In small pixel-space UNets (CIFAR / CelebA size) the memory-bound GroupNorm -> SiLU pairs cost about half as
much as the convolutions; one fused pass (``memcore/kernels/triton/groupnorm_silu.py``, float32 statistics,
NCHW or channels_last) removes a full write and re-read of the activations. There is no C++/CUDA version:
on CPU tensors the op and the patched UNets run the unfused PyTorch modules.
"""

from __future__ import annotations

import math
import numbers
import types
from typing import Any

import torch
from torch import nn

from memcore.ops import _backend
from memcore.reference import norm as _ref

_BACKENDS = ("auto", "reference", "triton")


def _resolve(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        if backend in ("cpu", "cuda"):
            raise ValueError(
                f"groupnorm_silu has no {backend!r} backend (Triton kernel only); use 'triton' or 'reference'"
            )
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(_BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and _backend.available("triton", device)[0]:
            return "triton"
        return "reference"
    ok, why = _backend.available(backend, device)
    if not ok:
        raise ValueError(why)
    return backend


@torch.library.custom_op("memcore::groupnorm_silu", mutates_args=())
def groupnorm_silu_op(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """The Triton fused kernel as a custom op (opaque to torch.compile; see ``groupnorm_silu``)."""
    from memcore.kernels.triton.groupnorm_silu import groupnorm_silu_triton

    return groupnorm_silu_triton(x, num_groups, weight, bias, eps)


@groupnorm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.empty_like(x, memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_affine(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check ``weight`` / ``bias`` once for every backend; returns them contiguous (the kernel indexes ``w[c]``).

    Their dtype follows PyTorch's ``group_norm`` rule on the CPU (the reference): x's dtype, or float32 for
    half-precision x (fp32 affine parameters, as under autocast), the two alike. The Triton kernel would take
    any float dtype (it reads them as float32), but then the backends would disagree on what is an error.
    """
    c = x.shape[1]
    allowed = (x.dtype, torch.float32)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != (c,) or t.device != x.device:
            raise ValueError(
                f"{name} must be a [{c}] tensor on {x.device}, got {list(t.shape)} on {t.device}"
            )
        if t.dtype not in allowed:
            want = "float32" if x.dtype == torch.float32 else f"x's dtype ({x.dtype}) or float32"
            raise TypeError(f"{name} dtype must be {want}, got {t.dtype} (PyTorch's group_norm rule)")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"weight and bias must have one dtype, got {weight.dtype} and {bias.dtype}")
    return (
        weight.contiguous() if weight is not None else None,
        bias.contiguous() if bias is not None else None,
    )


def groupnorm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))`` in one pass (inference; no autograd).

    Args:
        x: [N, C, H, W] float32 / float16 / bfloat16, NCHW-contiguous or channels_last (others are made
            contiguous).
        num_groups: G; must divide C.
        weight: [C] affine scale or None, on x's device, in x's dtype or float32.
        bias: [C] affine shift or None, like ``weight`` (and in the same dtype as it).
        eps: added to the variance (finite, > 0).
        backend: "auto" (Triton on CUDA tensors, else the reference), "triton" or "reference".

    Returns:
        [N, C, H, W] in x's dtype, in x's memory format (channels_last stays channels_last).

    Raises:
        TypeError: a non-tensor or wrongly typed x / weight / bias, a non-numeric eps.
        ValueError: bad shapes or devices, num_groups not dividing C, an unavailable backend.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a [N, C, H, W] tensor, got {x.dim()} dims")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing C={c}, got {num_groups!r}")
    weight, bias = _check_affine(x, weight, bias)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    name = _resolve(backend, x.device)
    if name == "reference":
        return _ref.groupnorm_silu(x, num_groups, weight, bias, eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise ValueError(
            "the fused GroupNorm+SiLU kernel is inference-only (no autograd); use torch.no_grad()"
        )
    return groupnorm_silu_op(x, num_groups, weight, bias, float(eps))


# ---------------------------------------------------------------------------------------------------------
# Swapping the fused pair into diffusers UNets


def _runs_plain_forward(m: nn.Module, *, own_forward: bool = True) -> bool:
    """Whether ``m(x)`` would run just its class's forward: no forward hooks (the module's or global ones)
    and, with ``own_forward``, no forward replaced on the instance (as accelerate's offload hooks do)."""
    from torch.nn.modules import module as _mod

    # torch's registries of global hooks (private: read with a default in case they move)
    if getattr(_mod, "_global_forward_hooks", None) or getattr(_mod, "_global_forward_pre_hooks", None):
        return False
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    return not (own_forward and "forward" in m.__dict__)


def _norm_silu(norm: nn.GroupNorm, act: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``act(norm(x))``, fused when the tensors allow it, else the original modules unchanged."""
    use = backend == "triton" or (backend == "auto" and x.device.type == "cuda")
    if backend == "triton":
        ok, why = _backend.available("triton", x.device)
        if not ok:  # e.g. the UNet was moved to the CPU after it was patched
            raise ValueError(f"fuse_groupnorm_silu(backend='triton'): {why}")
    if use and _backend.available("triton", x.device)[0]:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, norm.weight, norm.bias)
        )
        # conv_norm_out's own forward is the patched one (its hooks run around it either way)
        plain = _runs_plain_forward(act) and _runs_plain_forward(
            norm, own_forward="_memcore_act" not in norm.__dict__
        )
        if (
            plain
            and not needs_grad
            and x.dim() == 4  # the kernel is 2-D; video VAEs run conv_norm_out on [N, C, T, H, W]
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        ):
            return groupnorm_silu_op(x, norm.num_groups, norm.weight, norm.bias, float(norm.eps))
    if "_memcore_act" in norm.__dict__:  # conv_norm_out, whose own forward is the patched one
        return act(nn.GroupNorm.forward(norm, x))
    return act(norm(x))


def _norm_out_forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """Patched ``conv_norm_out.forward``: GroupNorm and the following ``conv_act`` (now Identity) in one."""
    return _norm_silu(self, self.__dict__["_memcore_act"], x, self.__dict__["_memcore_fused_backend"])


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D.forward`` (0.42) with norm1 -> SiLU and norm2 -> SiLU fused.

    Kept line for line with diffusers so the unfused fallback computes exactly what diffusers computes.
    """
    backend = self._memcore_fused_backend
    hidden_states = input_tensor
    hidden_states = _norm_silu(self.norm1, self.nonlinearity, hidden_states, backend)

    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)

    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)  # the time embedding keeps its own (unfused) activation
        temb = self.time_emb_proj(temb)[:, :, None, None]

    if self.time_embedding_norm == "default":
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = _norm_silu(self.norm2, self.nonlinearity, hidden_states, backend)
    elif self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(
                f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
            )
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = self.norm2(hidden_states)
        hidden_states = hidden_states * (1 + time_scale) + time_shift
        hidden_states = self.nonlinearity(hidden_states)
    else:
        hidden_states = _norm_silu(self.norm2, self.nonlinearity, hidden_states, backend)

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)

    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)

    return (input_tensor + hidden_states) / self.output_scale_factor


def _is_silu(m: Any) -> bool:
    return isinstance(m, nn.SiLU) and type(m).forward is nn.SiLU.forward


def _is_group_norm(m: Any) -> bool:
    # a subclass that overrides forward computes something else (e.g. upcasts); leave it alone
    return isinstance(m, nn.GroupNorm) and type(m).forward is nn.GroupNorm.forward


def fuse_groupnorm_silu(unet: nn.Module, *, backend: str = "auto") -> int:
    """Patch a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` in place to run GroupNorm+SiLU fused.

    Swaps every ``ResnetBlock2D``'s norm1 -> SiLU and norm2 -> SiLU pair (norm2 only with
    ``time_embedding_norm="default"``: with "scale_shift" a modulation sits between them) and the final
    ``conv_norm_out`` -> ``conv_act``. The time embedding's own SiLU is untouched. Parameters and state dict
    keys are unchanged (the modules' forwards are patched; ``conv_act`` becomes ``nn.Identity``).

    With ``backend="auto"`` the fused kernel runs on CUDA tensors (Triton) and the original modules run on
    CPU tensors, so CPU outputs are exactly the unfused UNet's; ``backend="triton"`` also runs the kernel on
    CPU tensors under ``TRITON_INTERPRET=1`` (tests). Like the ops' explicit backends, ``backend="triton"`` is
    refused (``ValueError``) where Triton cannot run on the UNet's device: here for the device the UNet is on
    (patch it after moving it), and in the forward for the device its inputs are on. Calling it twice swaps
    nothing more.

    The kernel is inference-only and takes float32 / float16 / bfloat16: with either backend, a pair whose
    input or GroupNorm weight needs a gradient (a forward outside ``torch.no_grad()`` on trainable weights)
    or whose input is float64 runs the original modules instead, so a patched UNet still trains and still
    runs in double precision, computing exactly what the unpatched one does. So does a pair whose modules
    carry forward hooks (or a forward replaced on the instance, as accelerate's offload hooks do) when the
    forward runs: the hooks still see what they saw. Not so for hooks on ``conv_norm_out`` itself, whose
    output is now SiLU's, nor for hooks on ``unet.conv_act`` (now ``nn.Identity``).

    Args:
        unet: the UNet (any module tree containing diffusers ``ResnetBlock2D`` blocks).
        backend: "auto" or "triton".

    Returns:
        The number of GroupNorm -> SiLU pairs swapped by this call.

    Raises:
        ValueError: a backend other than "auto" / "triton", or "triton" where it cannot run (see above).
        TypeError: ``unet`` is not a ``torch.nn.Module``.
    """
    from diffusers.models.resnet import ResnetBlock2D

    if backend not in ("auto", "triton"):
        raise ValueError(f"fuse_groupnorm_silu backend must be 'auto' or 'triton', got {backend!r}")
    if not isinstance(unet, nn.Module):
        raise TypeError(f"unet must be a torch.nn.Module, got {type(unet).__name__}")
    if backend == "triton":
        # as every op does for an explicit backend: refuse now rather than run the unfused modules silently
        p = next(unet.parameters(), None)
        ok, why = _backend.available("triton", p.device if p is not None else torch.device("cuda"))
        if not ok:
            raise ValueError(f"fuse_groupnorm_silu(backend='triton'): {why}")
    swapped = 0
    for module in unet.modules():
        if type(module) is not ResnetBlock2D or getattr(module, "_memcore_fused_backend", None) is not None:
            continue
        if not (_is_group_norm(module.norm1) and _is_group_norm(module.norm2)):
            continue
        if not _is_silu(module.nonlinearity):
            continue
        module._memcore_fused_backend = backend
        module.forward = types.MethodType(_resnet_forward, module)
        swapped += 1 if module.time_embedding_norm == "scale_shift" else 2
    norm_out = getattr(unet, "conv_norm_out", None)
    act = getattr(unet, "conv_act", None)
    if _is_group_norm(norm_out) and _is_silu(act) and "_memcore_act" not in norm_out.__dict__:
        # Patch the GroupNorm's forward in place (state dict keys unchanged); kept in __dict__, not as a
        # submodule, so the module tree and state dict stay exactly diffusers'.
        norm_out.__dict__["_memcore_act"] = act
        norm_out.__dict__["_memcore_fused_backend"] = backend
        norm_out.forward = types.MethodType(_norm_out_forward, norm_out)
        unet.conv_act = nn.Identity()
        swapped += 1
    return swapped
