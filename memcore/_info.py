"""Build and runtime information: ``memcore.build_info()`` and ``memcore.has_cuda()``."""

from __future__ import annotations

from typing import Any


def build_info() -> dict[str, Any]:
    """What the installed native core was built with, plus what this process can use.

    Returns:
        A dict with ``version``, ``native`` (whether ``memcore._C`` imports), ``cpu``, ``cuda`` (CUDA part
        built), ``cuda_archs``, ``cuda_compiler_version``, ``cuda_runtime_version``, ``openmp``,
        ``cxx_compiler``, ``families`` (compiled op families), ``cuda_devices`` and ``cuda_status`` (e.g.
        "CUDA built, no device (cudaErrorInsufficientDriver)"), and the versions of torch and triton.
    """
    import torch

    from memcore.ops import _backend, _native

    info: dict[str, Any] = {"native": _native.native_available()}
    if info["native"]:
        info.update(_native.native().build_info())
        count, text = _native.cuda_device_status()
        info["cuda_devices"] = count
        info["cuda_status"] = text
    else:
        info.update(cpu=False, cuda=False, openmp=False, families=[], cuda_devices=0)
        info["cuda_status"] = _native._load()[1]
    info["torch"] = torch.__version__
    info["torch_cuda_available"] = torch.cuda.is_available()
    if _backend.triton_importable():
        import importlib.metadata

        info["triton"] = importlib.metadata.version("triton")
    else:
        info["triton"] = None
    return info


def has_cuda() -> bool:
    """True only when the CUDA part of the core was built and a CUDA device is usable."""
    from memcore.ops import _native

    return _native.native_cuda_usable()
