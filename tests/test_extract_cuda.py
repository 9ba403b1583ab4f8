"""The extraction pipeline on a CUDA device: memcore's engines against the reference path on the same device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from memcore.attacks import carlini
from memcore.io import results as R

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
