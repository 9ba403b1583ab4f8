"""The ``device`` argument of the public functions: parsed once, with a one-line error for a device this
process cannot use (instead of torch's assertion deep inside a model's ``.to()``)."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when a GPU is usable, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: :func:`default_device`).

    An int is a CUDA device index (torch would take it as an index of the current accelerator, and with none
    fail with a message that does not name the device).

    Raises:
        ValueError: a name torch does not know, or a device (CUDA or another accelerator such as 'mps') that
            this torch build or machine lacks.
    """
    if device is None:
        return default_device()
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        device = torch.device("cuda", device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type not in ("cpu", "cuda", "meta"):
        # torch parses every device type it has a name for ('mps', 'xpu', ...), usable here or not
        backend = getattr(torch, dev.type, None)
        is_available = getattr(backend, "is_available", None)
        if not callable(is_available) or not is_available():
            raise ValueError(f"device {str(dev)!r} is not available to this process (e.g. 'cpu', 'cuda')")
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {str(dev)!r}: this torch ({torch.__version__}) is a CPU-only build")
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r}: no CUDA device is visible to this process")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(
                f"device {str(dev)!r}: this process sees {n} CUDA device(s), cuda:0..cuda:{n - 1}"
            )
    return dev


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:<current>`` are one device (a module's parameters report the index, users often not)."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    cur = torch.cuda.current_device()
    return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)


__all__ = ["default_device", "resolve_device", "same_device"]
