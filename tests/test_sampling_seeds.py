"""Seeds: initial noise per candidate generator; Philox4x32-10 step noise keyed by (seed, step)."""

from __future__ import annotations

import math

import pytest
import torch

from memcore.sampling.seeds import check_seeds, initial_noise, philox4x32_10, step_noise


def _t(*vals):
    return tuple(torch.tensor(v, dtype=torch.int64) for v in vals)


# Random123 kat_vectors for philox4x32_10: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = philox4x32_10(_t(*ctr), _t(*key))
    assert tuple(int(x) for x in out) == expected


def test_philox_vectorised_matches_scalar():
    ctrs = torch.tensor([[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    keys = torch.tensor([[0, 0], [0xFFFFFFFF] * 2, [0xA4093822, 0x299F31D0]])
    out = philox4x32_10(tuple(ctrs.T), tuple(keys.T))
    for i, (_, _, exp) in enumerate(KAT):
        assert tuple(int(o[i]) for o in out) == exp


def test_initial_noise_is_per_seed_randn():
    seeds = [0, 7, 2**40 + 3]
    x = initial_noise(seeds, (3, 5, 4), device="cpu", dtype=torch.float32)
    assert x.shape == (3, 3, 5, 4)
    for i, s in enumerate(seeds):
        ref = torch.randn((3, 5, 4), generator=torch.Generator("cpu").manual_seed(s))
        assert torch.equal(x[i], ref)


def test_step_noise_independent_of_batch_composition():
    shape = (3, 7, 5)  # 105 values: not a multiple of 4, exercises the tail
    alone = step_noise([42], 3, shape)
    batch = step_noise([9, 42, 42, 2**62], 3, shape)
    assert torch.equal(batch[1], alone[0]) and torch.equal(batch[2], alone[0])
    assert not torch.equal(batch[0], alone[0])
    assert not torch.equal(step_noise([42], 4, shape), alone)  # the step is part of the key
    assert not torch.equal(step_noise([42], 3, shape, stream=1), alone)
    # a tensor step (what a CUDA graph reads from memory) gives the same numbers
    assert torch.equal(step_noise(torch.tensor([42]), torch.tensor(3), shape), alone)


def test_step_noise_is_standard_normal():
    z = step_noise(list(range(8)), 0, (64, 64, 4)).flatten().double()
    n = z.numel()
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    # Kolmogorov-Smirnov distance against the normal CDF
    zs = z.sort().values
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - ecdf).abs().max().item() < 1.63 / math.sqrt(n) * 1.5  # well inside the 1% critical value
    # neighbouring seeds are uncorrelated
    a, b = step_noise([5, 6], 0, (4096,)).double()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.1


def test_step_noise_dtype_and_errors():
    assert step_noise([1], 0, (2, 3), dtype=torch.float16).dtype == torch.float16
    assert step_noise([1, 2], 0, (0,)).shape == (2, 0)
    with pytest.raises(ValueError, match="step"):
        step_noise([1], -1, (2,))
    with pytest.raises(TypeError):
        step_noise([1], 0, (2,), dtype=torch.int32)
    with pytest.raises(ValueError, match="outside"):
        check_seeds([-1])
    with pytest.raises(TypeError):
        check_seeds([1.5])
    with pytest.raises(TypeError):
        check_seeds("123")
