"""Background uploads (memcore.utils.transfer): the chunked copy gives the host tensor back bit for bit
whatever the chunking and strides; the worker's errors reach ``wait``; on CUDA the copy runs on a side stream
and ``wait`` orders it before the current stream's work without a host sync."""

from __future__ import annotations

import pytest
import torch

from memcore.attacks import carlini
from memcore.utils import transfer


@pytest.mark.parametrize("chunk_bytes", [1, 7 * 64, 1 << 20])  # below a row (64 B), 7 rows, all at once
def test_background_chunks_equal_the_host_tensor(chunk_bytes):
    g = torch.Generator().manual_seed(0)
    host = torch.randint(0, 256, (23, 1, 8, 8), generator=g, dtype=torch.uint8)
    for src in (host, host.permute(0, 1, 3, 2), host[::2]):  # contiguous, transposed, strided rows
        up = transfer.Upload(src, "cpu", chunk_bytes=chunk_bytes, background=True)
        got = up.wait()
        assert torch.equal(got, src) and got.is_contiguous()
        assert up.wait() is got  # joined once, the same tensor afterwards


def test_already_there_is_not_copied():
    x = torch.arange(12, dtype=torch.int32).view(3, 4)
    assert transfer.Upload(x, "cpu").wait() is x
    assert transfer.to_device(x, torch.device("cpu")) is x


def test_empty_and_foreground():
    e = torch.empty((0, 3, 4, 4), dtype=torch.uint8)
    assert transfer.Upload(e, "cpu", background=True).wait().shape == (0, 3, 4, 4)
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert torch.equal(transfer.Upload(x.T, "cpu").wait(), x.T)


def test_worker_error_reaches_wait(monkeypatch):
    def boom(self, host, rows, stream):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(transfer.Upload, "_copy", boom)
    up = transfer.Upload(torch.zeros((4, 2)), "cpu", background=True)
    with pytest.raises(RuntimeError, match="disk gone"):
        up.wait()


def test_train_set_uses_the_upload():
    """The extraction's training set, held whole, comes from the upload: nearest sees the data."""
    g = torch.Generator().manual_seed(3)
    train = torch.randint(0, 256, (9, 1, 4, 4), generator=g, dtype=torch.uint8)
    tr = carlini._Train(train, torch.device("cpu"), "auto", None)
    assert tr.whole is None  # started by the extraction loop after its first batch, or by the first use
    j, d, c, match = tr.nearest(train[5:6], 0.0)
    assert isinstance(tr.whole, transfer.Upload)
    assert (int(j), float(d), int(c)) == (5, 0.0, 1) and torch.equal(match, train[5:6])


@pytest.mark.cuda
def test_cuda_upload_on_a_side_stream_without_host_sync():
    """Several staging chunks; the data is read on the current stream right after ``wait`` (no explicit
    synchronize), and neither the upload's start nor ``wait`` synchronizes the host with the device."""
    g = torch.Generator().manual_seed(1)
    host = torch.randint(0, 256, (1000, 3, 32, 32), generator=g, dtype=torch.uint8)
    busy = torch.randn((4096, 4096), device="cuda")
    for _ in range(20):  # queue device work ahead of the upload
        busy = busy @ busy / 64
    torch.cuda.set_sync_debug_mode("error")
    try:
        up = transfer.Upload(host, "cuda", chunk_bytes=3072 * 70)  # 15 chunks, two staging buffers
        up._future.result()  # the worker is done (its staging waits are on its own thread)
        dev = up.wait()
        total = dev.sum(dtype=torch.int64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(total) == int(host.sum(dtype=torch.int64))
    assert torch.equal(dev.cpu(), host)


def test_a_device_name_and_a_0d_tensor():
    # to_device(t, "cpu") raised AttributeError ('str' has no .type); a 0-d Upload in the background IndexError
    from memcore.utils.transfer import Upload, to_device

    t = torch.arange(4)
    assert torch.equal(to_device(t, "cpu"), t)
    assert torch.equal(Upload(torch.tensor(3.5), "cpu", background=True).wait(), torch.tensor(3.5))
