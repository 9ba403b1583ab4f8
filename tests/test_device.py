"""The public functions' ``device`` argument: parsed once, with one-line errors for devices that cannot run."""

from __future__ import annotations

import pytest
import torch

from memcore.utils.device import default_device, resolve_device


def test_names_and_default():
    assert resolve_device(None) == default_device()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("meta")).type == "meta"
    with pytest.raises(ValueError, match=r"unknown device 'tpu' \(e\.g\. 'cpu', 'cuda', 'cuda:1'\)$"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device(1.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(
        ValueError, match=r"device 'cuda(:0)?': (this torch .* is a CPU-only build|no CUDA device)"
    ):
        resolve_device("cuda")


@pytest.mark.cuda
def test_cuda_index_past_the_visible_devices():
    n = torch.cuda.device_count()
    assert resolve_device("cuda").type == "cuda" and resolve_device(f"cuda:{n - 1}").index == n - 1
    with pytest.raises(ValueError, match=f"sees {n} CUDA device"):
        resolve_device(f"cuda:{n}")
