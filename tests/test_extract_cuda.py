"""The extraction pipeline on a CUDA device: memcore's engines against the reference path on the same device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from memcore.attacks import carlini
from memcore.io import results as R
from memcore.utils.transfer import to_device

sys.path.insert(0, str(Path(__file__).parent))


@pytest.mark.cuda
def test_cuda_engine_agrees_with_reference_path(tmp_path):
    from test_extract import cfg, tiny_unet

    model = tiny_unet(3)
    train = torch.randint(
        0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    eng = carlini.extract(model, [0, 1, 2], config=cfg(), train=train, out=tmp_path / "e", device="cuda")
    ref = carlini.extract(
        model, [0, 1, 2], config=cfg(sampler="reference", backend="reference"), train=train, device="cuda"
    )
    assert [r.flagged for r in eng.conditions] == [r.flagged for r in ref.conditions]
    assert [r.clique_members for r in eng.conditions] == [r.clique_members for r in ref.conditions]
    assert [r.nearest_train_index for r in eng.conditions] == [r.nearest_train_index for r in ref.conditions]
    assert len(R.load_results(tmp_path / "e")) == 3


@pytest.mark.cuda
def test_cuda_nn_extraction_and_regeneration(tmp_path):
    from test_extract import cfg, tiny_unet

    model = tiny_unet(None, seed=1)
    config = cfg(num_per_condition=8, nn_candidates=40, nn_k=5, batch_size=8)
    first = carlini.extract(model, None, config=config, device="cuda")
    assert first.nn is None  # no training data, no NN extraction
    # plant a few candidates in the training set: the NN pass must find them with the right seeds
    from memcore.models.loading import load_model
    from memcore.sampling import Sampler, SamplerConfig

    s = Sampler(
        load_model(model[0], device="cuda", scheduler=model[1]),
        SamplerConfig(num_inference_steps=3, batch_size=8),
    )
    imgs = torch.cat([b.images_u8[: b.valid].cpu() for b in s.stream((0, None, i) for i in range(40))])
    train = torch.cat([torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8), imgs[[3, 33]]])
    res = carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cuda")
    got = dict(zip(res.nn.extracted_train_indices, res.nn.seeds))
    assert got.get(50) == 3 and got.get(51) == 33


@pytest.mark.cuda
def test_cuda_steady_state_loop_never_syncs():
    """The per-batch work of the extraction loop on the GPU — sampling a micro-batch (CUDA graph replays), the
    incremental bitset rows, the NN k-NN + state update — runs with ``torch.cuda.set_sync_debug_mode("error")``:
    no operation in it waits for the device (SPEC: no host–device sync inside the loop)."""
    from test_extract import cfg, tiny_unet

    from memcore.attacks.nn import NNState
    from memcore.models.loading import load_model
    from memcore.sampling import Sampler, SamplerConfig

    model = tiny_unet(None, seed=1)
    s = Sampler(
        load_model(model[0], device="cuda", scheduler=model[1]),
        SamplerConfig(num_inference_steps=3, batch_size=8),
    )
    config = cfg(num_per_condition=16, batch_size=8)
    train = carlini._Train(
        torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8), torch.device("cuda"), "auto", None
    )
    state = NNState(len(train), "cuda")
    buf = torch.empty((16, 1, 8, 8), dtype=torch.uint8, device="cuda")
    rows = torch.zeros((16, 1), dtype=torch.int64, device="cuda")

    def one_pass(seed0: int) -> None:
        for k, b in enumerate(s.stream((0, None, seed0 + i) for i in range(16))):
            imgs = b.images_u8[: b.valid]
            s0, s1 = 8 * k, 8 * k + b.valid
            buf[s0:s1] = imgs
            words = carlini._graph_rows(buf[s0:s1], buf[:s1], config)
            rows[s0:s1, : words.shape[1]] = words.view(torch.int64)
            seeds = to_device(torch.arange(seed0 + s0, seed0 + s1), torch.device("cuda"))
            d, j = train.knn(imgs, 5)
            state.update(d, j, seeds, 0.5)

    one_pass(0)  # warm-up: graph capture, lazy inits, caching allocators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_pass(100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(state.ratio).any()


@pytest.mark.cuda
def test_cuda_extraction_sampler_replays_its_graphs_across_runs(tmp_path):
    """A Sampler reused by several extractions replays the CUDA graphs it captured in the first: the records
    equal those of runs that each build their own Sampler (and capture again)."""
    from test_extract import cfg, tiny_unet

    model = tiny_unet(3)
    config = cfg()
    sampler = carlini.extraction_sampler(model, config, device="cuda")
    assert sampler.use_graphs
    here = f"cuda:{torch.cuda.current_device()}"  # the same device as "cuda", named with its index
    runs = [
        carlini.extract(sampler, c, config=config, device=d)
        for c, d in zip(([0, 1], [2], [1, 0]), (None, here, "cuda"))
    ]
    assert sampler._graph is not None
    for c, got in zip(([0, 1], [2], [1, 0]), runs):
        want = carlini.extract(model, c, config=config, device="cuda")
        assert [r.to_record() for r in got.conditions] == [r.to_record() for r in want.conditions]


@pytest.mark.cuda
def test_cuda_prepared_training_set_is_uploaded_once(tmp_path, monkeypatch):
    """A training set prepared on the GPU serves several extractions (with a reused Sampler capturing its graph
    after the upload) without another upload; the records equal runs given the tensor itself."""
    from test_extract import cfg, tiny_unet

    model = tiny_unet(None, seed=1)
    config = cfg(num_per_condition=8, nn_candidates=20, nn_k=4, batch_size=8)
    train = torch.randint(
        0, 256, (30, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
    )
    prepared = carlini.extraction_training_set(train, config, device="cuda")
    sampler = carlini.extraction_sampler(model, config, device="cuda")
    uploads = []
    real = carlini.Upload
    monkeypatch.setattr(carlini, "Upload", lambda *a, **k: uploads.append(1) or real(*a, **k))
    runs = [carlini.extract(sampler, None, config=config, train=prepared) for _ in range(2)]
    assert uploads == []
    want = carlini.extract(model, None, config=config, train=train, device="cuda")
    assert len(uploads) == 1
    for got in runs:
        assert [r.to_record() for r in got.conditions] == [r.to_record() for r in want.conditions]
        assert got.nn == want.nn
    with pytest.raises(ValueError, match="prepared on cuda, but the extraction runs on cpu"):
        carlini.extract(model, None, config=config, train=prepared, device="cpu")
