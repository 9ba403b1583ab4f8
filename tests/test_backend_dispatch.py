"""Backend dispatch, autotuning and device parsing as users and embedders meet them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memcore.ops import _tune
from memcore.utils.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]


def test_autotune_env_accepts_common_spellings_and_rejects_typos():
    """MEMCORE_AUTOTUNE=off (or OFF, no, ' 0') turns tuning off; a typo is an error, not silent tuning."""
    script = textwrap.dedent(
        """
        import importlib, os
        from memcore.ops import _tune
        assert _tune.ENABLED is False, "MEMCORE_AUTOTUNE=off must disable autotuning"
        for value, want in (("OFF", False), ("no", False), (" 0 ", False), ("True", True), ("on", True)):
            os.environ["MEMCORE_AUTOTUNE"] = value
            assert importlib.reload(_tune).ENABLED is want, value
        os.environ["MEMCORE_AUTOTUNE"] = "of"
        try:
            importlib.reload(_tune)
        except ValueError as exc:
            assert "MEMCORE_AUTOTUNE='of'" in str(exc) and "\\n" not in str(exc), exc
        else:
            raise AssertionError("MEMCORE_AUTOTUNE=of was accepted")
        """
    )
    env = {**os.environ, "MEMCORE_AUTOTUNE": "off", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_choices_while_another_thread_adds_a_choice(monkeypatch):
    """choices() reads without the lock (tuning holds it for seconds); a choice added by another thread
    while it lists them must not raise 'dictionary changed size during iteration'. The insert is made
    deterministic here: it happens inside choices(), when the listed key is hashed again (for its seconds)."""
    monkeypatch.setattr(_tune, "_CHOSEN", {})
    monkeypatch.setattr(_tune, "_TIMES", {})

    class OtherThreadTunes:
        armed = False

        def __hash__(self):
            if OtherThreadTunes.armed:
                OtherThreadTunes.armed = False
                _tune._CHOSEN[("other-thread",)] = "cpu"
            return 0

    _tune._CHOSEN[OtherThreadTunes()] = "cpu"  # not a tuple: Python 3.14 caches tuple hashes
    OtherThreadTunes.armed = True
    listed = _tune.choices()
    assert not OtherThreadTunes.armed and len(listed) >= 1


def test_resolve_device_rejects_an_unavailable_accelerator():
    """'mps' / 'xpu' parse in every torch build; without the device they must fail here, in one line, not
    deep inside a model's .to()."""
    for name in ("mps", "xpu"):
        mod = getattr(torch, name, None)
        if mod is not None and mod.is_available():
            continue
        with pytest.raises(ValueError, match=f"device '{name}' is not available"):
            resolve_device(name)


def test_resolve_device_int_is_a_cuda_index():
    if torch.cuda.is_available():
        assert resolve_device(0) == torch.device("cuda", 0)
    else:  # torch's own error ("Cannot access accelerator device ...") became "unknown device 0"
        with pytest.raises(ValueError, match=r"device 'cuda:0': (this torch .* is a CPU-only build|no CUDA)"):
            resolve_device(0)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device(True)  # a bool is not an index


def test_cuda_backend_built_but_unusable_says_why():
    """A CUDA build on a machine whose driver the core cannot use: the error names the cause that
    build_info() reports (e.g. 'CUDA built, no device (cudaErrorInsufficientDriver)'), not a generic
    'needs memcore built with CUDA and a usable device'."""
    import memcore
    from memcore.ops import _backend

    info = memcore.build_info()
    if memcore.has_cuda() or not info["cuda"] or info["cuda_devices"] > 0:
        pytest.skip("needs a CUDA build whose core sees no device")
    with pytest.raises(ValueError) as exc:
        _backend.resolve("cuda", torch.device("cuda"))
    assert info["cuda_status"] in str(exc.value) and "\n" not in str(exc.value)
