"""Host -> device copies that never make the host wait for the device.

A pageable host tensor's ``.to("cuda")`` blocks the calling thread until the copy is done, and a copy on the
current stream also waits for every kernel queued before it. The extraction loop keeps the device busy by
queuing work ahead of it, so it copies through pinned memory (``to_device``) and uploads the training set
on a side stream from a worker thread (``Upload``) while the first batches sample.
"""

from __future__ import annotations

import concurrent.futures as cf

import torch

#: Pinned staging buffer of a background upload (two alternate, so the host fills one while the other copies).
UPLOAD_CHUNK_BYTES = 32 << 20


def _staged(t: torch.Tensor, device: torch.device) -> bool:
    """Whether copying ``t`` to ``device`` goes through pinned host memory: host to CUDA only (a tensor
    already on a device cannot be pinned, and needs no staging)."""
    return device.type == "cuda" and t.device.type == "cpu"


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor -> ``device`` without a host sync (pinned staging + ``non_blocking`` on CUDA); a tensor
    already on a device goes the plain way."""
    device = torch.device(device)
    if _staged(t, device):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Upload:
    """A host tensor copied to ``device`` in the background; :meth:`wait` gives it, ready for the caller's
    current stream.

    On CUDA a worker thread copies row chunks through two pinned staging buffers of ``chunk_bytes`` (host
    memory stays bounded whatever the tensor's size) on a side stream; :meth:`wait` joins the thread (it has
    long finished when the data is first needed) and makes the current stream wait for the copies — an event,
    not a host sync. Elsewhere the copy runs on the worker thread too (``background``) or at once. Do not
    start one while another thread captures a CUDA graph in the default (global) capture mode: the worker's
    event waits and pinned allocations are calls such a capture forbids in every thread.

    Args:
        host: [R, ...] tensor (any strides).
        device: where the copy lives.
        chunk_bytes: staging size; a chunk holds at least one row.
        background: copy on a worker thread (always from the host to CUDA; elsewhere only when asked: tests).
    """

    def __init__(
        self,
        host: torch.Tensor,
        device: torch.device | str,
        *,
        chunk_bytes: int = UPLOAD_CHUNK_BYTES,
        background: bool = False,
    ) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._future: cf.Future | None = None
        self._done = None
        staged = _staged(host, device)
        # a 0-d tensor has no rows to copy in chunks: one plain copy
        if host.numel() == 0 or host.dim() == 0 or not (background or staged):
            self._tensor = host.to(device).contiguous()  # nothing to copy, or not in the background
            return
        self._tensor = torch.empty(host.shape, dtype=host.dtype, device=device)
        stream = None
        if staged:  # through pinned buffers on a side stream; other copies are plain, chunk by chunk
            stream = torch.cuda.Stream(device)
            # the new tensor's memory may have served earlier work of the current stream: copy after it
            stream.wait_stream(torch.cuda.current_stream(device))
            self._done = torch.cuda.Event()
        row = max(1, host[0].numel() * host.element_size()) if host.shape[0] else 1
        rows = max(1, chunk_bytes // row)
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memcore-upload")
        self._future = pool.submit(self._copy, host, rows, stream)
        pool.shutdown(wait=False)

    def _copy(self, host: torch.Tensor, rows: int, stream) -> None:
        out = self._tensor
        if stream is None:  # not host to CUDA: plain chunked copies
            for s in range(0, host.shape[0], rows):
                out[s : s + rows].copy_(host[s : s + rows])
            return
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            shape = (min(rows, host.shape[0]), *host.shape[1:])
            staging = [torch.empty(shape, dtype=host.dtype, pin_memory=True) for _ in range(2)]
            freed: list[torch.cuda.Event | None] = [None, None]
            for i, s in enumerate(range(0, host.shape[0], rows)):
                k = i % 2
                if freed[k] is not None:
                    freed[k].synchronize()  # the copy out of this buffer two chunks ago is done
                e = min(s + rows, host.shape[0])
                buf = staging[k][: e - s]
                buf.copy_(host[s:e])
                out[s:e].copy_(buf, non_blocking=True)
                freed[k] = torch.cuda.Event()
                freed[k].record(stream)
            self._done.record(stream)
        # the caching allocator must not hand this memory out again before the side stream is done with it
        out.record_stream(stream)

    def wait(self) -> torch.Tensor:
        """The device tensor, its copy ordered before the current stream's later work (raises the worker's
        error, if any)."""
        if self._future is not None:
            self._future.result()
            self._future = None
        if self._done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done)
        return self._tensor


__all__ = ["UPLOAD_CHUNK_BYTES", "Upload", "to_device"]
