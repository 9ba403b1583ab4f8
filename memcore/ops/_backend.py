"""Backend names and the ``backend="auto"`` rule shared by every op family.

- ``reference``: pure PyTorch (memcore/reference), any device; the oracle and the benchmark baseline.
- ``cpu``: the C++ core (OpenMP), CPU tensors.
- ``cuda``: the CUDA kernels of the core, CUDA tensors, when the CUDA part was built.
- ``triton``: Triton kernels, CUDA tensors; CPU tensors only under the interpreter (``TRITON_INTERPRET=1``).
- ``cublas``: exact int8 GEMMs through ``torch._int_mm`` (cuBLAS(Lt) on CUDA tensors, torch's CPU int8 GEMM on
  CPU tensors); a family-specific backend (only the uint8 distance family offers it, see
  :data:`FAMILY_BACKENDS`), accepted when named explicitly and never chosen by the static ``auto`` order: on
  the H100 it was the slowest exact backend (bench_distance.py, c020035). (The distance family autotunes
  ``auto`` for uint8 on CUDA, see :mod:`memcore.ops._tune`; that can pick it, after checking its result.)

``auto`` picks, for the tensors' device, the fastest backend that is available: CUDA tensors -> ``cuda`` if
built else ``triton`` else ``reference``; CPU tensors -> ``cpu`` if built else ``reference``. A family may pass
its own preference order (e.g. when its Triton kernel beats its CUDA one) through ``cuda_order``, and the
family-specific backends it implements through ``extra`` (accepted by name only, never by ``auto``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from memcore.ops import _native

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
#: Backends that only some families implement; a family passes the ones it has to resolve(extra=...), so the
#: others keep rejecting them as unknown.
FAMILY_BACKENDS = ("cublas",)


# What this process can use is fixed for its lifetime, so it is probed once, at import. Keeping the probes
# (importlib, the native module, the CUDA runtime) out of resolve() also keeps resolve() traceable by
# torch.compile(fullgraph=True): dynamo cannot trace find_spec or pybind11 calls.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
_NATIVE = _native.native_available()
_NATIVE_CUDA = _native.native_cuda_usable()


def _cuda_unusable_reason() -> str:
    """Which of the three conditions of ``native_cuda_usable`` fails (built, seen by the core, seen by torch):
    "CUDA built, no device (cudaErrorInsufficientDriver)" says what to fix, "built with CUDA and a usable
    device" does not."""
    if not _NATIVE:
        return "memcore._C is not built"
    if not _native.native().build_info()["cuda"]:
        return "memcore was built without its CUDA part (no CUDA compiler found, or MEMCORE_CUDA=OFF)"
    count, text = _native.cuda_device_status()
    if count <= 0:
        return text
    return f"torch sees no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})"


_CUDA_WHY = "" if _NATIVE_CUDA else _cuda_unusable_reason()
# Triton reads TRITON_INTERPRET when it is imported, so later changes of the variable do not count either.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_interpret() -> bool:
    return _TRITON_INTERPRET


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def available(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run on tensors of ``device``, and why not."""
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        if device.type != "cpu":
            return False, f"backend 'cpu' needs CPU tensors, got {device}"
        if not _NATIVE:
            return False, "backend 'cpu' needs the compiled core (memcore._C is not built)"
        return True, ""
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"backend 'cuda' needs CUDA tensors, got {device}"
        if not _NATIVE_CUDA:
            return False, f"backend 'cuda' is not usable here: {_CUDA_WHY} (see memcore.build_info())"
        return True, ""
    if backend == "triton":
        if not triton_importable():
            return False, "backend 'triton' needs the triton package"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpret():
            return True, ""
        return (
            False,
            f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}",
        )
    if backend == "cublas":
        # torch._int_mm exists on every torch this package supports, for CPU and CUDA tensors.
        if device.type in ("cpu", "cuda"):
            return True, ""
        return False, f"backend 'cublas' needs CPU or CUDA tensors, got {device}"
    return False, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


def resolve(
    backend: str,
    device: torch.device,
    *,
    cuda_order: tuple[str, ...] = ("cuda", "triton"),
    extra: tuple[str, ...] = (),
) -> str:
    """Turn a user's backend choice into a concrete one for ``device``; clear error when unavailable.

    ``extra``: the :data:`FAMILY_BACKENDS` the calling family implements, valid only when named explicitly.
    """
    names = BACKENDS + tuple(e for e in extra if e in FAMILY_BACKENDS)
    if not isinstance(backend, str) or backend not in names:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(names)}")
    if backend != "auto":
        ok, why = available(backend, device)
        if not ok:
            raise ValueError(why)
        return backend
    order = (*cuda_order, "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if available(name, device)[0]:
            return name
    return "reference"
