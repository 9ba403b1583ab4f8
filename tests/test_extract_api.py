"""The embedding API of memcore's Carlini extraction (``ExtractConfig``, ``iter_extract``): what a tool
calling it from Python relies on, beyond what tests/test_extract.py covers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_extract import cfg, tiny_unet

from memcore.attacks import carlini


@pytest.fixture(scope="module")
def class_model():
    return tiny_unet(3)


def test_config_takes_numpy_scalars_as_plain_numbers():
    # the sampler's own config takes them (a sweep read from an array); this one said "must be an integer
    # >= 1, got np.int64(12)" and "must be a finite number >= 0, got np.float32(0.5)"
    c = cfg(
        num_per_condition=np.int64(12), batch_size=np.int32(5), grid=(np.int64(2), 2), eta=np.float32(0.5)
    )
    assert c == cfg(eta=0.5)
    assert type(c.num_per_condition) is int and type(c.batch_size) is int and type(c.eta) is float
    assert all(type(x) is int for x in c.grid)
    with pytest.raises(ValueError, match=r"num_per_condition must be an integer >= 1, got np\.True_"):
        cfg(num_per_condition=np.bool_(True))


def test_guidance_scale_refuses_a_bool():
    # float(True) = 1.0: a slip silently switched classifier-free guidance off (SamplerConfig refuses it)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number or None, got True"):
        carlini.ExtractConfig(guidance_scale=True)


def test_closing_the_iterator_does_not_run_the_queued_cliques(class_model, monkeypatch):
    real, calls = carlini._max_clique, []

    def slow(adj, config):
        calls.append(time.perf_counter())
        time.sleep(1.0)
        return real(adj, config)

    monkeypatch.setattr(carlini, "_max_clique", slow)
    it = carlini.iter_extract(class_model, [0, 1, 2, 0, 1], config=cfg(slots=3), device="cpu")
    next(it)  # condition 0; the cliques of 1 (running) and 2 (and 3) are queued behind it
    started = len(calls)
    it.close()  # their records would be thrown away: waiting for them only delays the interrupt
    assert started == 2 and len(calls) == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("memcore-")]


def test_an_in_memory_nn_extraction_is_not_a_shard_claiming_every_candidate(monkeypatch, tmp_path):
    # under torchrun (or with shard=) and out=None, rank 1 returned an NNExtraction saying num_candidates=40
    # while it had matched only its own 14, with no state to merge: partial results that look complete
    import torch

    from memcore.io.results import ShardSpec

    u = tiny_unet(None)
    train = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=r"NN extraction of shard 1/2 .* pass out=, or shard=ShardSpec\(\)"):
        carlini.extract(u, None, config=cfg(nn_candidates=40), train=train, device="cpu")
    assert not list(tmp_path.iterdir())
    whole = carlini.extract(
        u, None, config=cfg(nn_candidates=40), train=train, device="cpu", shard=ShardSpec()
    )
    assert whole.nn.num_candidates == 40 and len(whole.conditions) == 1


def test_iter_extract_checks_its_arguments_when_called():
    # a generator function reported "35" (a bare string) or a dict config only at the first next(), far from
    # the call that was wrong
    with pytest.raises(TypeError, match="got the string '35'"):
        carlini.iter_extract("no/such/model", "35")
    with pytest.raises(TypeError, match="config must be an ExtractConfig, got dict"):
        carlini.iter_extract("no/such/model", [0], config={"num_per_condition": 4})
    with pytest.raises(ValueError, match="unknown device"):
        carlini.iter_extract("no/such/model", [0], device="gpu7")
    it = carlini.iter_extract("no/such/model", (c for c in [0, 1]))  # the model loads at the first next()
    with pytest.raises(FileNotFoundError):
        next(it)
