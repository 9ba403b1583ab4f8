"""Per-candidate randomness: initial noise from each seed's own generator, step noise from a counter-based RNG.

Two sources, chosen so that a candidate's image never depends on which other candidates share its batch:

- **Initial noise** of candidate ``seed``: ``torch.randn(shape, generator=torch.Generator(device).manual_seed(seed))``
  drawn alone (one generator per candidate), in the model's dtype exactly as diffusers' ``randn_tensor`` does
  with a list of generators. So a stock diffusers pipeline given ``[torch.Generator(device).manual_seed(s) for s
  in seeds]`` starts from the same noise.
- **Step noise** (DDIM with ``eta > 0``, DDPM, ancestral samplers): a counter-based generator keyed by
  ``(seed, step)``. A stateful generator shared by a batch would make each candidate's noise depend on its slot
  and its neighbours; a counter-based one is a pure function of (key, counter), so every element is computed
  independently, vectorised over the batch, and it runs unchanged inside a CUDA graph (no generator state, no
  host round trip).

The counter-based generator is **Philox4x32-10** (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy
as 1, 2, 3", SC 2011), written with int64 torch ops so it runs on any device:

- key ``(k0, k1) = (seed mod 2**32, seed // 2**32)``;
- counter ``(c0, c1, c2, c3) = (block, step, stream, 0)`` where ``block`` enumerates groups of 4 output values of
  one candidate's noise tensor (flattened, C-order), ``step`` is the sampler step index and ``stream`` separates
  independent draws within one step (0 for the scheduler's step noise, 1, 2, ... for further calls);
- 10 rounds of ``(c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))`` with the
  key bumped by the Weyl constants between rounds (Random123's reference; tested against its known-answer
  vectors);
- each 4x32-bit output gives 4 normals by Box-Muller on 24-bit uniforms ``u = ((x >> 8) + 0.5) / 2**24`` in (0, 1):
  ``(z0, z1) = sqrt(-2 ln u0) * (cos 2 pi u1, sin 2 pi u1)``, same for ``(u2, u3)``, computed in float32 and cast
  to the requested dtype.

The 32x32 -> 64-bit products are split into 16-bit halves so every intermediate fits in a signed int64 (torch
has no unsigned 64-bit multiply on every device).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

_M32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MAX_SEED = 2**63 - 1


def check_seeds(seeds: Sequence[int] | torch.Tensor | np.ndarray) -> list[int]:
    """Validate seeds: ints (Python, numpy, one-element integer tensors), or a 1-D integer tensor or numpy array,
    in ``[0, 2**63)``.

    Returns them as a list of ints.
    """
    if isinstance(seeds, torch.Tensor):
        if not _is_integer_tensor(seeds) or seeds.dim() != 1:
            raise TypeError(
                f"seeds must be a 1-D integer tensor or a sequence of ints, got {seeds.dtype} {seeds.dim()}-D"
            )
        seeds = seeds.tolist()
    elif isinstance(seeds, np.ndarray):  # not a Sequence, but the usual container of many seeds
        if seeds.dtype.kind not in "iu" or seeds.ndim != 1:
            raise TypeError(
                f"seeds must be a 1-D integer array or a sequence of ints, got {seeds.dtype} {seeds.ndim}-D"
            )
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of ints, got {type(seeds).__name__}")
    out = []
    for s in seeds:
        try:  # Python and numpy ints, one-element integer tensors (as_int); never floats or bools
            s = as_int("a seed", s)
        except TypeError:
            raise TypeError(f"every seed must be an int, got {type(s).__name__} {s!r}") from None
        if not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed {s} is outside [0, 2**63)")
        out.append(int(s))
    return out


def initial_noise(
    seeds: Sequence[int], shape: Sequence[int], *, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Initial noise of each candidate, drawn from its own ``torch.Generator(device).manual_seed(seed)``.

    Args:
        seeds: ``B`` seeds.
        shape: one candidate's shape ``[C, H, W]``.
        device: where the generator lives and the noise is drawn (as diffusers with device generators).
        dtype: the dtype the noise is drawn in (diffusers draws directly in the model dtype).

    Returns:
        ``[B, C, H, W]``: row ``b`` equals ``torch.randn((1, *shape), generator=Generator(device).manual_seed(
        seeds[b]), device=device, dtype=dtype)``, which is what diffusers' ``randn_tensor`` produces for a list
        of per-sample generators.
    """
    device = torch.device(device)
    seeds = check_seeds(seeds)
    rows = []
    for s in seeds:
        g = torch.Generator(device).manual_seed(s)
        rows.append(torch.randn((1, *shape), generator=g, device=device, dtype=dtype))
    if not rows:
        return torch.empty((0, *shape), device=device, dtype=dtype)
    return torch.cat(rows, dim=0)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b`` in [0, 2**32).

    ``a * b`` can reach 2**64, which overflows int64, so ``b`` is split into 16-bit halves:
    ``a*b = a*b_lo + (a*b_hi mod 2**16) * 2**16 + (a*b_hi >> 16) * 2**32``, every partial below 2**49.
    """
    p0 = b.bitwise_and(0xFFFF) * a
    p1 = b.bitwise_right_shift(16) * a
    low_full = p0 + p1.bitwise_and(0xFFFF).bitwise_left_shift(16)
    lo = low_full.bitwise_and(_M32)
    hi = p1.bitwise_right_shift(16) + low_full.bitwise_right_shift(32)
    return hi, lo


def philox4x32_10(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on broadcastable int64 tensors holding 32-bit unsigned values.

    Args:
        counter: four tensors ``c0..c3`` (values in [0, 2**32)), broadcastable together and with ``key``.
        key: two tensors ``k0, k1`` (values in [0, 2**32)).

    Returns:
        Four int64 tensors of the broadcast shape, each value in [0, 2**32): the generator's 128-bit output.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0).bitwise_and(_M32)
            k1 = (k1 + PHILOX_W1).bitwise_and(_M32)
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = (
            hi1.bitwise_xor(c1).bitwise_xor(k0),
            lo1,
            hi0.bitwise_xor(c3).bitwise_xor(k1),
            lo0,
        )
    return c0, c1, c2, c3


def _is_integer_tensor(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _host_checkable(t: torch.Tensor) -> bool:
    """Whether a value check on ``t`` is free: its data is in host memory and nothing is being traced.

    Reading a CUDA tensor's values waits for the device (and is illegal under CUDA graph capture), and a
    data-dependent branch breaks a ``torch.compile`` graph; those tensors get only their dtype and shape checked.
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _seed_tensor(seeds: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(seeds, torch.Tensor):
        if not _is_integer_tensor(seeds) or seeds.dim() != 1:
            raise TypeError(f"seeds tensor must be a 1-D integer tensor, got {seeds.dtype} {seeds.dim()}-D")
        # a negative seed would give a negative Philox key and NaN noise (log of a negative "uniform"). Checked
        # after the int64 cast: torch has no min() for uint16/32/64, and a uint64 seed >= 2**63 wraps negative.
        wide = seeds.to(dtype=torch.int64)
        if _host_checkable(seeds) and wide.numel() and int(wide.min()) < 0:
            bad = next(v for v in seeds.tolist() if not 0 <= v <= MAX_SEED)
            raise ValueError(f"seeds must be in [0, 2**63), got {bad}")
        return wide.to(device=device)
    return torch.tensor(check_seeds(seeds), dtype=torch.int64, device=device)


def as_int(name: str, v: object) -> int:
    """``v`` as an int (Python, numpy or one-element integer tensor); floats are refused rather than truncated,
    bools as a slip. The one integer rule of the sampling API (seeds' stream and step, slots, class ids)."""
    if isinstance(v, bool) or not hasattr(type(v), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if isinstance(v, torch.Tensor) and (v.dtype == torch.bool or v.numel() != 1):
        raise TypeError(f"{name} must be an int, got a {v.dtype} tensor of shape {list(v.shape)}")
    return operator.index(v)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}")
    out = []
    for d in shape:
        if isinstance(d, bool):
            raise TypeError(f"shape must hold ints, got {shape!r}")
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(f"shape must hold ints, got {shape!r}") from None
        if d < 0:
            raise ValueError(f"shape must hold sizes >= 0, got {tuple(shape)}")
        out.append(d)
    return tuple(out)


def step_noise(
    seeds: Sequence[int] | torch.Tensor,
    step: int | torch.Tensor,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    stream: int = 0,
) -> torch.Tensor:
    """Standard normal noise keyed by ``(seed, step, stream)``: Philox4x32-10 + Box-Muller (module docstring).

    Each candidate's noise depends only on its own seed, the step and the stream, never on the batch it sits in.
    No host synchronisation and no generator state, so it can be captured in a CUDA graph; ``step`` may be a
    0-d int64 device tensor for a graph that reads the step index from memory.

    Python ints are range-checked. Tensor arguments have their dtype and shape checked always, their values only
    when they live on the CPU outside ``torch.compile`` tracing: checking a device tensor's values would
    synchronise the host with the device (and cannot run under CUDA graph capture), so for device tensors the
    ranges below are the caller's responsibility (the engine's step tensors hold ``0..S-1`` and its seeds went
    through ``check_seeds``); values outside them give meaningless noise (NaN for a negative seed or step).

    Args:
        seeds: ``[B]`` seeds (ints in [0, 2**63) or a 1-D integer tensor).
        step: the sampler step index in [0, 2**32): an int or a one-element integer tensor.
        shape: one candidate's shape ``[C, H, W]`` (any shape; sizes >= 0).
        device: output device (default: the seeds tensor's device, else CPU).
        dtype: output floating ``torch.dtype``; the normals are computed in float32 and cast once.
        stream: independent sub-stream within one step, an int in [0, 2**32).

    Returns:
        ``[B, *shape]`` noise.

    Raises:
        TypeError: a non-integer seed, step or stream (floats are not truncated), a non-floating dtype, a shape
            that is not a sequence of ints.
        ValueError: a seed, step or stream out of range, a negative size in ``shape``.
    """
    if device is None:
        device = seeds.device if isinstance(seeds, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"step noise dtype must be a floating torch.dtype, got {dtype!r}")
    stream = as_int("stream", stream)
    if not 0 <= stream <= _M32:
        raise ValueError(f"stream {stream} must be in [0, 2**32)")
    shape = _check_shape(shape)
    if isinstance(step, torch.Tensor):
        if not _is_integer_tensor(step) or step.numel() != 1:
            raise TypeError(
                f"a step tensor must hold one integer, got {step.dtype} of shape {list(step.shape)}"
            )
        if _host_checkable(step) and not 0 <= int(step) <= _M32:
            raise ValueError(f"step must be in [0, 2**32), got {int(step)}")
        c1 = step.to(device=device, dtype=torch.int64).reshape(())
    else:
        step = as_int("step", step)
        if not 0 <= step <= _M32:
            raise ValueError(f"step must be an int in [0, 2**32), got {step!r}")
        # torch.full is a fill kernel, torch.tensor a host->device copy: only the former is CUDA-graph safe.
        c1 = torch.full((), step, dtype=torch.int64, device=device)
    s = _seed_tensor(seeds, device)
    numel = math.prod(shape)
    nblocks = (numel + 3) // 4
    blocks = torch.arange(nblocks, dtype=torch.int64, device=device)[None, :]  # [1, nb]
    k0 = s.bitwise_and(_M32)[:, None]  # [B, 1]
    k1 = s.bitwise_right_shift(32)[:, None]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    c2 = torch.full((), stream, dtype=torch.int64, device=device)
    x0, x1, x2, x3 = philox4x32_10((blocks, c1, c2, zero), (k0, k1))
    x0, x1, x2, x3 = (x.expand(s.shape[0], nblocks) for x in (x0, x1, x2, x3))
    scale = 1.0 / 16777216.0  # 2**-24

    def uniform(x: torch.Tensor) -> torch.Tensor:
        # Top 24 bits + 0.5: exactly representable in float32, strictly inside (0, 1), so log() is finite.
        return (x.bitwise_right_shift(8).to(torch.float32) + 0.5) * scale

    u0, u1, u2, u3 = uniform(x0), uniform(x1), uniform(x2), uniform(x3)
    two_pi = 2.0 * math.pi
    r0 = torch.sqrt(-2.0 * torch.log(u0))
    r1 = torch.sqrt(-2.0 * torch.log(u2))
    z = torch.stack(
        (
            r0 * torch.cos(two_pi * u1),
            r0 * torch.sin(two_pi * u1),
            r1 * torch.cos(two_pi * u3),
            r1 * torch.sin(two_pi * u3),
        ),
        dim=-1,
    )  # [B, nb, 4]
    z = z.reshape(s.shape[0], nblocks * 4)[:, :numel]
    return z.reshape(s.shape[0], *shape).to(dtype)
