"""Shared test setup: lanes, markers and backend lists.

Lanes (tools/test.sh): the CPU lane runs ``-m "not triton"``; the interpreter lane runs ``-m triton`` with
``TRITON_INTERPRET=1`` set before Triton is imported. CUDA tests are marked ``cuda`` and skip cleanly
without a GPU and the CUDA build.
"""

from __future__ import annotations

import os

import pytest
import torch

import memcore
from memcore.ops import _backend

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    cuda_ok = memcore.has_cuda()
    triton_ok = _backend.triton_importable() and (torch.cuda.is_available() or _backend.triton_interpret())
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device and memcore built with CUDA")
    skip_triton = pytest.mark.skip(reason="needs triton with a GPU, or TRITON_INTERPRET=1 (interpreter lane)")
    for item in items:
        if "cuda" in item.keywords and not cuda_ok:
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and not triton_ok:
            item.add_marker(skip_triton)


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process (reference always; cpu when the core is built)."""
    names = ["reference"]
    if _backend.available("cpu", torch.device("cpu"))[0]:
        names.append("cpu")
    return names


@pytest.fixture
def rng() -> torch.Generator:
    """A seeded generator: every test draws fresh but reproducible random inputs."""
    return torch.Generator().manual_seed(1234)


# Saved tiny diffusers models shared by the sampling test modules (test_sampling's ``_unet`` builds them).
@pytest.fixture(scope="module")
def unet_pipe_dir(tmp_path_factory):
    from diffusers import DDIMPipeline, DDPMScheduler
    from test_sampling import _unet

    d = tmp_path_factory.mktemp("ddim_pipe")
    DDIMPipeline(_unet(), DDPMScheduler()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def class_unet_dir(tmp_path_factory):
    from diffusers import DDPMScheduler
    from test_sampling import _unet

    d = tmp_path_factory.mktemp("class_unet")
    _unet(num_class_embeds=4).save_pretrained(d)
    DDPMScheduler().save_pretrained(d)
    return d


@pytest.fixture
def load_bench(monkeypatch):
    """Import a benchmark script (``benchmarks/<name>``, a path from the checkout's root) as a module;
    sys.path and sys.modules are restored afterwards."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def load(path: str):
        monkeypatch.syspath_prepend(str(root / "benchmarks"))
        p = root / path
        spec = importlib.util.spec_from_file_location(f"_bench_{p.stem}", p)
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, mod)
        spec.loader.exec_module(mod)
        return mod

    saved = list(sys.path)
    yield load
    sys.path[:] = saved
