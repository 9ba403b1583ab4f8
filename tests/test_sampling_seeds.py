"""Seeds: initial noise per candidate generator; Philox4x32-10 step noise keyed by (seed, step)."""

from __future__ import annotations

import math

import numpy as np
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


def test_step_noise_refuses_out_of_range_and_non_integer_tensors():
    # CPU tensors are value-checked (free: no device to wait for); these used to give NaN or truncate silently
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*63\)"):
        step_noise(torch.tensor([-1]), 0, (1, 2, 2))
    with pytest.raises(ValueError, match=r"step must be in \[0, 2\*\*32\), got -1"):
        step_noise([1], torch.tensor(-1), (1, 2, 2))
    with pytest.raises(ValueError, match="step must be in"):
        step_noise([1], torch.tensor(2**40), (1, 2, 2))
    with pytest.raises(TypeError, match="step tensor must hold one integer"):
        step_noise([1], torch.tensor(1.7), (2,))
    with pytest.raises(TypeError, match="step tensor must hold one integer"):
        step_noise([1], torch.tensor([1, 2]), (2,))
    with pytest.raises(TypeError, match="seeds tensor must be a 1-D integer tensor"):
        step_noise(torch.tensor([1.0]), 0, (2,))
    # other integer dtypes are the same numbers
    same = step_noise(torch.tensor([42], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), (5,))
    assert torch.equal(same, step_noise([42], 3, (5,)))


def test_step_noise_refuses_bad_python_arguments():
    with pytest.raises(TypeError, match="stream must be an int, got float"):
        step_noise([1], 0, (2,), stream=1.5)
    with pytest.raises(TypeError, match="stream must be an int, got bool"):
        step_noise([1], 0, (2,), stream=True)
    with pytest.raises(TypeError, match="step must be an int, got float"):
        step_noise([1], 1.0, (2,))
    with pytest.raises(TypeError, match=r"floating torch\.dtype, got 'float32'"):
        step_noise([1], 0, (2,), dtype="float32")
    with pytest.raises(ValueError, match=r"sizes >= 0, got \(2, -1\)"):
        step_noise([1], 0, (2, -1))
    with pytest.raises(TypeError, match="shape must hold ints"):
        step_noise([1], 0, (2.0,))
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        step_noise([1], 0, "ab")
    assert torch.equal(
        step_noise([7], np.int64(2), (3,), stream=np.int64(1)), step_noise([7], 2, (3,), stream=1)
    )


def test_step_noise_does_not_read_device_tensor_values():
    # A device tensor's values are not checked (reading them would synchronise the host, and cannot happen
    # under CUDA graph capture): the range is the caller's. A meta tensor stands in: it has no values to read.
    z = step_noise(torch.tensor([-1], device="meta"), torch.tensor(-1, device="meta"), (2, 3))
    assert z.device.type == "meta" and z.shape == (1, 2, 3)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_step_noise_takes_unsigned_seed_tensors(dtype):
    # check_seeds takes them; step_noise raised NotImplementedError ("min_all" not implemented for 'UInt32')
    seeds = torch.tensor([0, 7, 65535], dtype=dtype)
    assert torch.equal(step_noise(seeds, 3, (5,)), step_noise([0, 7, 65535], 3, (5,)))


def test_step_noise_refuses_uint64_seed_past_int64():
    # 2**63 + 5 would wrap to a negative int64 key (NaN noise); the error names the seed as given
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*63\), got 9223372036854775813"):
        step_noise(torch.tensor([1, 2**63 + 5], dtype=torch.uint64), 0, (4,))
