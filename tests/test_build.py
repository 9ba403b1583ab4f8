"""The installed package: native core present, build information complete, CUDA reported honestly."""

from __future__ import annotations

import pytest
import torch

import memcore
from memcore.ops import _backend


def test_build_info_fields():
    info = memcore.build_info()
    for key in (
        "version",
        "native",
        "cpu",
        "cuda",
        "cuda_archs",
        "openmp",
        "families",
        "cuda_status",
        "torch",
    ):
        assert key in info, key
    assert info["native"] is True, "tests run against a built memcore._C"
    assert info["cpu"] is True


def test_has_cuda_matches_runtime():
    info = memcore.build_info()
    if not info["cuda"]:
        assert memcore.has_cuda() is False
    else:
        assert memcore.has_cuda() == (info["cuda_devices"] > 0 and torch.cuda.is_available())
        if info["cuda_devices"] == 0:
            assert "no device" in info["cuda_status"]


def test_backend_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert _backend.resolve("auto", cpu) == "cpu"
    assert _backend.resolve("reference", cpu) == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.resolve("fast", cpu)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _backend.resolve("cuda", cpu)


def test_no_compile_at_import():
    # Importing memcore must never build anything: the extension is already a file next to the package.
    import memcore.ops._native as nat

    assert nat.native_available()
    assert nat.native().__file__.endswith(".so")
