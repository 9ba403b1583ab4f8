"""The one door to the compiled core ``memcore._C``.

Only ``memcore/ops`` imports this module. The core takes raw pointers, sizes, strides, a dtype code and the
CUDA stream as integers (it never links libtorch), so everything here turns tensors into those integers after
checking device, dtype and contiguity.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# Must match csrc/common/common.h::DType.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.uint8: 0,
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int32: 5,
    torch.int64: 6,
    torch.uint64: 7,
}


@functools.cache
def _load() -> tuple[Any | None, str | None]:
    try:
        from memcore import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # a source checkout that was never built
        return (
            None,
            f"memcore._C is not built ({exc}); install with `pip install .` or run tools/dev_build.py",
        )
    return _C, None


def native() -> Any:
    """The compiled module. Raises RuntimeError with a build hint when it is missing."""
    mod, err = _load()
    if mod is None:
        raise RuntimeError(err)
    return mod


def native_available() -> bool:
    return _load()[0] is not None


def family(name: str) -> Any:
    """The compiled submodule ``memcore._C.<name>`` (one per op family)."""
    mod = native()
    sub = getattr(mod, name, None)
    if sub is None:
        raise RuntimeError(f"memcore._C was built without the '{name}' family; rebuild the extension")
    return sub


@functools.cache
def cuda_device_status() -> tuple[int, str]:
    """(device count, text) as the native CUDA runtime sees it; (0, reason) when unusable."""
    mod, err = _load()
    if mod is None:
        return 0, err or "not built"
    return tuple(mod.cuda_device_status())  # type: ignore[return-value]


def native_cuda_usable() -> bool:
    """True only when the CUDA part was built and a device is usable by both the core and torch."""
    mod, _ = _load()
    if mod is None or not mod.build_info()["cuda"]:
        return False
    return cuda_device_status()[0] > 0 and torch.cuda.is_available()


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"dtype {t.dtype} is not supported by the native core") from None


def ptr(t: torch.Tensor) -> int:
    """Data pointer of a contiguous tensor (0 for an empty one, which kernels never dereference)."""
    if not t.is_contiguous():
        raise ValueError("internal: native ops take contiguous tensors")
    return t.data_ptr() if t.numel() else 0


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of the tensor's device as an integer handle (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
