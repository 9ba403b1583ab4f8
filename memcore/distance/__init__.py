"""Image distances for memorization audits: normalized L2 and tiled L2 ([C23] §4.2), public contract (SPEC §7).

Images are ``[N, C, H, W]`` tensors (NCHW; any strides, e.g. channels_last memory format, are accepted, but an
``[N, H, W, C]`` *shape* is not: pass ``x.permute(0, 3, 1, 2)``). Accepted dtypes:

- ``uint8`` (0..255): the exact integer path. The per-tile sum of squared differences is an exact integer on
  every backend, and ``d = float32(sqrt(S / (255² · n)))`` with IEEE operations, so results are bit-identical
  across backends and equal to the float64 formula on the same data rounded once to float32.
- ``float32``, ``float16``, ``bfloat16``: expected in [0, 1] (``value_range="unit"``, the default); model
  outputs in [-1, 1] take ``value_range="symmetric"`` (distances are then halved, i.e. computed on
  ``(x + 1) / 2``). Values are not clipped or range-checked. 16-bit inputs are upcast to float32 and all
  float paths accumulate in float32 (the C++ backend sums each tile in float32 chunks into a float64 total).
- ``float64``: only the ``reference`` backend (``auto`` picks it); the test oracle; returns float64.

Distances are on the [0, 1] pixel scale whatever the dtype. NaN/Inf in float inputs raise ``ValueError`` by
default; ``check_finite=True`` reads a flag back from the device (a host sync), so the extraction hot path
passes ``check_finite=False`` (then NaN/Inf inputs give unspecified distances, never an error). Pass
``check_finite=False`` too inside ``torch.compile(fullgraph=True)`` (the check is a data-dependent branch).

Functions (``grid=(rows, cols)`` must divide H and W; ``grid=(1, 1)`` is plain L2):

- :func:`l2` / :func:`tiled_l2`: pairwise ``[N, N]`` (``b=None``: exactly symmetric, zero diagonal) or cross
  ``[N, M]`` float32 matrices. The float distances among a small index subset (clique medoid, mean clique
  distance) are ``tiled_l2(a[idx])``.
- :func:`knn`: the k nearest references per query, streamed over the references in chunks (memory
  ``O(N·(k + chunk))``, independent of M), ascending; **ties go to the smaller reference index**, so the
  result equals a stable ascending sort of the cross matrix row.
- :func:`tiled_l2_graph`: the thresholded graph ``d <= alpha`` as a uint64 bitset ``[N, ceil(M/64)]``
  (bit j of row i in word ``j // 64`` at position ``j % 64``), the float matrix never leaving the kernel on
  the GPU backends. ``b=None``: among ``a`` with the diagonal clear; ``b=earlier_batch``: the cross block
  ``[N, ceil(M/64)]`` for building a condition's graph incrementally as batches finish (row block i of the
  full graph is ``tiled_l2_graph(batch_i, alpha, b=all_previous)`` next to the pairwise block). ``alpha`` is
  compared as float32 (what ``d <= alpha`` does on a float32 tensor), so for uint8 the bitset agrees bit for
  bit with thresholding :func:`tiled_l2`. Every backend derives pairwise results from one value per
  unordered pair, so pairwise matrices and bitsets are exactly symmetric for every dtype.

Backends: ``"reference"`` (pure PyTorch), ``"cpu"`` (C++/OpenMP), ``"triton"``, ``"cuda"``, ``"cublas"``;
``"auto"`` picks the fastest available for the tensors' device (CPU: cpu; CUDA: :data:`CUDA_ORDER` for uint8,
:data:`CUDA_ORDER_FLOAT` for floats). For uint8 images on CUDA, where every backend gives bit-identical results,
``auto`` is tuned instead: the first call of a shape class times the exact backends (``cuda``, ``triton``,
``cublas``) on the caller's tensors, drops any that does not reproduce the first one's result bit for bit,
and caches the fastest (:mod:`memcore.ops._tune`; ``MEMCORE_AUTOTUNE=0`` turns it off). ``"cublas"`` takes uint8 images only (TypeError otherwise) and computes
the exact path from int8 GEMMs (``torch._int_mm``: cuBLAS on CUDA tensors, torch's CPU int8 GEMM on CPU
tensors), bit-identical to the other backends; the static order never names it (on the H100 it was the slowest
exact backend: 10.6 ms SD pairwise, 51 ms CIFAR k-NN), autotuning may pick it.
"""

from __future__ import annotations

from numbers import Integral

import torch

from memcore.ops import _backend, _tune
from memcore.ops import distance as _ops
from memcore.utils.checks import finite_real

__all__ = ["CUDA_ORDER", "CUDA_ORDER_FLOAT", "knn", "l2", "tiled_l2", "tiled_l2_graph"]

#: Preference of ``backend="auto"`` on CUDA tensors, per input kind, as measured on an H100
#: (benchmarks/bench_distance.py, commit 251f2ba): uint8 SD pairwise 500×3×512×512 — cuda 2.86 ms, triton
#: 3.18 ms; CIFAR k-NN — cuda 52 ms, triton 65 ms. float32 pairwise 200×3×512×512 — triton 3.4 ms
#: (tf32x3 tensor cores), cuda 7.1 ms (fp32 direct differences). Since c020035 Triton is ahead for uint8
#: too (SD pairwise 2.50 ms against cuda's 2.86 ms; CIFAR k-NN 14.4 ms against 51.8 ms), so it leads here as
#: well. uint8 on CUDA is autotuned by default; this static order decides with MEMCORE_AUTOTUNE=0, under
#: torch.compile tracing before a shape class was tuned, and for the first candidate of the tuning.
CUDA_ORDER: tuple[str, ...] = ("triton", "cuda")
CUDA_ORDER_FLOAT: tuple[str, ...] = ("triton", "cuda")

#: Family-specific backends this family implements (accepted by name; ``auto`` reaches them only through
#: autotuning, after they reproduced the static choice's result bit for bit).
_EXTRA_BACKENDS = ("cublas",)

#: Device types on which ``auto`` is autotuned for uint8 inputs (on the CPU the C++ core is the fastest).
TUNE_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)
_RANGES = {"unit": 1.0, "symmetric": 0.5}


def _check_images(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images [N, C, H, W], got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; expected uint8, float32, float16, bfloat16 or float64")
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} has an empty C/H/W dimension: {tuple(x.shape)}")
    return x


def _check_pair(a: torch.Tensor, b: torch.Tensor | None, names: tuple[str, str]) -> None:
    if b is None:
        return
    if b.dtype != a.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must share a dtype, got {a.dtype} and {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"{names[0]} and {names[1]} are on different devices: {a.device} and {b.device}")
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same C, H, W; got {tuple(a.shape[1:])} and "
            f"{tuple(b.shape[1:])}"
        )


def _check_grid(grid: object, h: int, w: int) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, Integral) and not isinstance(g, bool) for g in grid)
    ):
        raise TypeError(f"grid must be a pair of ints (rows, cols), got {grid!r}")
    gh, gw = int(grid[0]), int(grid[1])
    if gh < 1 or gw < 1:
        raise ValueError(f"grid entries must be >= 1, got {grid!r}")
    if h % gh or w % gw:
        raise ValueError(
            f"grid {gh}x{gw} does not divide the image size {h}x{w} (H % rows and W % cols must be 0)"
        )
    return gh, gw


def _scale(value_range: str) -> float:
    if value_range not in _RANGES:
        raise ValueError(f"value_range must be 'unit' ([0, 1]) or 'symmetric' ([-1, 1]), got {value_range!r}")
    return _RANGES[value_range]


def _check_finite(x: torch.Tensor | None, name: str, check: bool) -> None:
    if not isinstance(check, bool):  # "no" would be truthy and check
        raise TypeError(f"check_finite must be a bool, got {check!r}")
    # meta tensors have no values: the ops' fake implementations give shapes, nothing to check
    if not check or x is None or x.dtype == torch.uint8 or x.numel() == 0 or x.device.type == "meta":
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf (pass check_finite=False to skip this check)")


def _backend_for(backend: str, x: torch.Tensor) -> str:
    order = CUDA_ORDER if x.dtype == torch.uint8 else CUDA_ORDER_FLOAT
    name = _backend.resolve(backend, x.device, cuda_order=order, extra=_EXTRA_BACKENDS)
    if x.dtype == torch.float64 and name != "reference":
        if backend == "auto":
            return "reference"
        raise TypeError(f"float64 images run only on backend='reference' (the oracle); {backend!r} was asked")
    return name


def _capturing(device: torch.device) -> bool:
    """Whether this thread's current stream on ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _run(backend: str, name: str, x: torch.Tensor, key: tuple, op):
    """``op(name)``; for ``auto`` on uint8 inputs ``op`` of the fastest exact backend of this shape class
    instead (tuned on first use, see :mod:`memcore.ops._tune`)."""
    if (
        backend != "auto"
        or x.dtype != torch.uint8
        or x.device.type not in TUNE_DEVICE_TYPES
        or not _tune.ENABLED
        or torch.compiler.is_compiling()
    ):
        return op(name)
    key = (*key, x.device.type, x.device.index if x.device.type == "cuda" else -1, tuple(x.shape[1:]))
    chosen = _tune.chosen(key)
    if chosen is None and _capturing(x.device):
        # tuning times candidates with device synchronisations, which a CUDA graph capture forbids: the
        # static choice, untuned (a later call outside the capture tunes the shape class)
        return op(name)
    if chosen is None:
        others = (CUDA_ORDER if x.device.type == "cuda" else ("cpu",)) + _EXTRA_BACKENDS
        cands = [name] + [c for c in others if c != name and _backend.available(c, x.device)[0]]
        chosen = _tune.pick(key, cands, op, x.device)
    return op(chosen)


def _prepare(a, b, grid, value_range, check_finite, backend, names=("a", "b")):
    a = _check_images(a, names[0])
    if b is not None:
        b = _check_images(b, names[1])
        _check_pair(a, b, names)
    gh, gw = _check_grid(grid, a.shape[2], a.shape[3])
    scale = _scale(value_range)
    _check_finite(a, names[0], check_finite)
    _check_finite(b, names[1], check_finite)
    return a, b, gh, gw, scale, _backend_for(backend, a)


def tiled_l2(
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    grid: tuple[int, int] = (4, 4),
    backend: str = "auto",
    value_range: str = "unit",
    check_finite: bool = True,
) -> torch.Tensor:
    """Tiled L2 [C23 §4.2]: the maximum over grid positions of the normalized L2 between same-position tiles.

    Args:
        a: [N, C, H, W] images.
        b: [M, C, H, W] images, or None for pairwise distances within ``a``.
        grid: (rows, cols) of tiles; must divide H and W.
        backend: "auto", "reference", "cpu", "triton", "cuda" or "cublas" (uint8 only).
        value_range: "unit" for float images in [0, 1], "symmetric" for [-1, 1]; ignored for uint8.
        check_finite: raise ValueError on NaN/Inf in float inputs (forces a device->host sync).

    Returns:
        [N, M] float32 ([N, N] symmetric with a zero diagonal when ``b`` is None).
    """
    a, b, gh, gw, scale, name = _prepare(a, b, grid, value_range, check_finite, backend)
    m = None if b is None else _tune.bucket(b.shape[0])
    return _run(
        backend,
        name,
        a,
        ("matrix", gh, gw, _tune.bucket(a.shape[0]), m),
        lambda be: _ops.distance_matrix(a, b, gh, gw, scale, be),
    )


def l2(
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    value_range: str = "unit",
    check_finite: bool = True,
) -> torch.Tensor:
    """Normalized L2 ``sqrt(mean((a - b)²))`` over all C·H·W values (SPEC §1).

    Args:
        a: [N, C, H, W] images.
        b: [M, C, H, W] images, or None for pairwise distances within ``a``.
        backend, value_range, check_finite: as in :func:`tiled_l2`.

    Returns:
        [N, M] float32 ([N, N] symmetric with a zero diagonal when ``b`` is None).
    """
    return tiled_l2(a, b, grid=(1, 1), backend=backend, value_range=value_range, check_finite=check_finite)


def knn(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    *,
    grid: tuple[int, int] | None = None,
    backend: str = "auto",
    value_range: str = "unit",
    check_finite: bool = True,
    chunk: int = _ops.DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest references of each query, streamed over ``refs`` (never an [N, M] matrix).

    Args:
        queries: [N, C, H, W] images.
        refs: [M, C, H, W] images.
        k: number of neighbours, 0 <= k <= M.
        grid: None for plain L2, or (rows, cols) for tiled L2.
        backend, value_range, check_finite: as in :func:`tiled_l2`.
        chunk: references per streamed block (memory O(N·(k + chunk)) besides the inputs). The Triton
            backend selects inside its kernel for k <= 128 (memory O(N·k), no chunk).

    Returns:
        (distances [N, k] float32 ascending, indices [N, k] int64 into ``refs``); ties by smaller index.
    """
    if not isinstance(k, Integral) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not isinstance(chunk, Integral) or isinstance(chunk, bool):  # as for k: the type is a TypeError
        raise TypeError(f"chunk must be an int, got {type(chunk).__name__} ({chunk!r})")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    _check_images(refs, "refs")  # refs=None would otherwise pass as the pairwise case of _prepare
    queries, refs, gh, gw, scale, name = _prepare(
        queries,
        refs,
        (1, 1) if grid is None else grid,
        value_range,
        check_finite,
        backend,
        ("queries", "refs"),
    )
    if k < 0 or k > refs.shape[0]:
        raise ValueError(f"k must be in [0, M] = [0, {refs.shape[0]}], got {k}")
    return _run(
        backend,
        name,
        queries,
        ("knn", gh, gw, int(k), _tune.bucket(queries.shape[0]), _tune.bucket(refs.shape[0])),
        lambda be: _ops.distance_knn(queries, refs, int(k), gh, gw, scale, int(chunk), be),
    )


def tiled_l2_graph(
    a: torch.Tensor,
    alpha: float,
    *,
    b: torch.Tensor | None = None,
    grid: tuple[int, int] = (4, 4),
    backend: str = "auto",
    value_range: str = "unit",
    check_finite: bool = True,
) -> torch.Tensor:
    """The threshold graph ``tiled_l2 <= alpha`` as a uint64 bitset (the clique engine's input).

    Args:
        a: [N, C, H, W] images.
        alpha: threshold on the [0, 1] distance scale (compared as float32; as float64 for float64 inputs).
        b: None for the graph among ``a`` (diagonal clear), or [M, C, H, W] for the cross block.
        grid: (rows, cols) of tiles; (1, 1) thresholds plain L2.
        backend, value_range, check_finite: as in :func:`tiled_l2`.

    Returns:
        uint64 [N, ceil(M/64)] (M = N for ``b=None``): bit j of row i (word j // 64, bit j % 64) is set iff
        ``d(a_i, b_j) <= alpha`` (and i != j in the pairwise case).
    """
    alpha = finite_real(alpha, "alpha")
    a, b, gh, gw, scale, name = _prepare(a, b, grid, value_range, check_finite, backend)
    m = None if b is None else _tune.bucket(b.shape[0])
    return _run(
        backend,
        name,
        a,
        ("graph", gh, gw, _tune.bucket(a.shape[0]), m),
        lambda be: _ops.distance_graph(a, b, alpha, gh, gw, scale, be),
    )
