"""Training images from disk: an image folder, an ``.npz``/``.npy`` array or a ``.safetensors`` file.

Every form becomes uint8 images ``[N, C, H, W]`` (0-255). The index of an image is its position in that
tensor: for a folder, the position of its file in sorted filename order. ``nearest_train_index`` and
``extracted_train_indices`` in the results refer to this index.

Rules (SPEC §7, DATA):

- **Folder**: the files directly inside it whose suffix is an image suffix (``.png``, ``.jpg``, ``.jpeg``,
  ``.bmp``, ``.gif``, ``.tif``, ``.tiff``, ``.webp``, case-insensitive), sorted by filename in Python string
  order, i.e. by Unicode code point of the name as the file system returns it: case-sensitive (``B.png``
  before ``a.png``), not numeric (``img10.png`` before ``img2.png``; zero-pad the numbers), no Unicode
  normalisation (a composed ``é`` sorts after ``z``, a decomposed one after ``e``). Sub-folders, hidden files
  (``.DS_Store``, macOS ``._*`` companions) and files with other suffixes are ignored and take no index.
  Symbolic links are followed; an image-suffixed entry that is not a readable file (a broken link) is an
  error, not skipped, since skipping it would shift the index of every image after it. Every image must have
  the size and mode of the first; modes ``L`` (C = 1), ``RGB`` (C = 3) and ``RGBA`` (C = 4) are read as they
  are, any other mode is an error (convert the folder first: silently guessing a palette's channels would
  change distances). Pixels are read as stored, the way a PIL-based training loader reads them: EXIF
  orientation is not applied, an animated or multi-page file gives its first frame, and a 16-bit-per-channel
  RGB(A) PNG is the 8-bit image PIL decodes (16-bit grey, mode ``I;16``, is an error). Images are not
  converted to the model's channels: a mismatch with ``expected_shape`` is an error.
- **Arrays** (``.npy``, ``.npz``, ``.safetensors``): ``[N, H, W]`` (one channel), ``[N, C, H, W]`` or
  ``[N, H, W, C]``. Layout rule: the array is NHWC when its last dimension is in {1, 3, 4} and dimension 1 is
  not; NCHW when dimension 1 is in {1, 3, 4} and the last is not. When both are (e.g. ``[N, 3, 4, 4]`` or
  ``[N, 1, 8, 1]``) it is ambiguous: ``expected_shape`` decides if exactly one reading matches it, otherwise
  NCHW (the torch convention) is taken. When neither is, it is an error.
- **dtypes**: uint8 is taken as is. Floating point values (any width or byte order) must lie in [0, 1] (NaN
  is an error) and become ``round(x * 255)`` (round half to even). Any other dtype (bool, int64, ...) is an
  error.
- **Which array**: ``.npz`` — the only array, else the key ``images``, ``x`` or ``arr_0`` (first present),
  else an error listing the keys; ``.safetensors`` — the only tensor or the key ``images``. The suffix says
  the format: an ``.npz`` holding a bare array or an ``.npy`` holding an archive is an error. ``.npy`` files
  are memory-mapped, so :meth:`TrainingSet.iter_chunks` streams them without holding all images in memory.

Errors are one line that names the file and the problem: ``FileNotFoundError`` for a missing path,
``ValueError`` for everything else (corrupt files, wrong layout, dtype, range, image size for the model).
Files are checked when opened; an image whose compressed data turns out corrupt only when decoded fails
when read, as a ``ValueError`` naming it. Nothing is written by this module.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz", ".safetensors")
_CHANNEL_COUNTS = (1, 3, 4)
_MODE_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}
# Key preference when an .npz holds several arrays.
_NPZ_KEYS = ("images", "x", "arr_0")


@dataclass(frozen=True)
class TrainingSet:
    """A set of training images, opened and checked, decoded on demand.

    Attributes:
        source: the path it was read from.
        kind: ``"folder"``, ``"npy"``, ``"npz"`` or ``"safetensors"``.
        shape: ``(N, C, H, W)`` of the uint8 images.
        names: the filenames of a folder's images in index order; empty for an array (see :meth:`name`).
        layout: how an array was read (``"NCHW"``, ``"NHWC"`` or ``"NHW"``); ``"folder"`` for a folder.
    """

    source: str
    kind: str
    shape: tuple[int, int, int, int]
    names: tuple[str, ...]
    layout: str
    # (start, stop) -> uint8 [stop - start, C, H, W]; checked at open time, so it does not fail later on
    # well-formed input.
    _read: Callable[[int, int], torch.Tensor] = field(repr=False, compare=False)

    def __len__(self) -> int:
        return self.shape[0]

    def name(self, i: int) -> str:
        """A readable name of image ``i``: its filename for a folder, ``"<file>[i]"`` for an array."""
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        return self.names[i] if self.names else f"{Path(self.source).name}[{i}]"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return self.shape[1:]

    @functools.cached_property
    def images(self) -> torch.Tensor:
        """All images, uint8 ``[N, C, H, W]``, contiguous (read once, then cached)."""
        return self._read(0, len(self))

    def iter_chunks(self, n: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream the images in order, ``n`` at a time.

        Args:
            n: the chunk size (> 0); the last chunk may be shorter.

        Yields:
            ``(start, chunk)``: the index of the chunk's first image and the uint8 images
            ``[min(n, N - start), C, H, W]``.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"chunk size must be a positive int, got {n!r}")
        for start in range(0, len(self), n):
            stop = min(start + n, len(self))
            yield start, self._read(start, stop)


def load_images(path: str | Path, *, expected_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Read training images into memory.

    Args:
        path: an image folder, ``.npy``, ``.npz`` or ``.safetensors`` file (rules in the module docstring).
        expected_shape: ``(C, H, W)`` the model works on; a mismatch is a ValueError. ``None``: no check.

    Returns:
        uint8 images ``[N, C, H, W]``, contiguous.
    """
    return open_training_set(path, expected_shape=expected_shape).images


def open_training_set(path: str | Path, *, expected_shape: Sequence[int] | None = None) -> TrainingSet:
    """Open and check training images without decoding all of them (see :class:`TrainingSet`).

    Every check (layout, dtype, value range, image sizes and modes, ``expected_shape``) happens here, so a
    bad file fails before any work starts. Arrays other than ``.npy`` are loaded into memory here.

    Args:
        path: an image folder, ``.npy``, ``.npz`` or ``.safetensors`` file.
        expected_shape: ``(C, H, W)`` the images must have, or ``None``.

    Returns:
        The opened :class:`TrainingSet`.
    """
    p = Path(path)
    exp = _check_expected(expected_shape)
    if not p.exists():
        raise FileNotFoundError(f"training data not found: {p}")
    if p.is_dir():
        ts = _open_folder(p)
    else:
        suffix = p.suffix.lower()
        if suffix == ".npy":
            arr, kind = _load_npy(p), "npy"
        elif suffix == ".npz":
            arr, kind = _load_npz(p), "npz"
        elif suffix == ".safetensors":
            arr, kind = _load_safetensors(p), "safetensors"
        else:
            raise ValueError(
                f"{p}: unsupported training data file type {p.suffix!r}; use an image folder or one of "
                f"{', '.join(ARRAY_SUFFIXES)}"
            )
        ts = _open_array(p, arr, kind, exp)
    if exp is not None and ts.image_shape != exp:
        c, h, w = ts.image_shape
        raise ValueError(
            f"{p}: training images are {c}x{h}x{w} (CxHxW) but the model works on {exp[0]}x{exp[1]}x{exp[2]}"
        )
    return ts


# --------------------------------------------------------------------------------------------- helpers


def _check_expected(expected_shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    if expected_shape is None:
        return None
    exp = tuple(expected_shape)
    if len(exp) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in exp):
        raise ValueError(f"expected_shape must be three positive ints (C, H, W), got {expected_shape!r}")
    return exp  # type: ignore[return-value]


def _open_folder(p: Path) -> TrainingSet:
    from PIL import Image, UnidentifiedImageError

    files = sorted(
        (f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")),
        key=lambda f: f.name,
    )
    files = [f for f in files if not f.is_dir()]  # sub-folders take no index, whatever their name
    for f in files:
        # a broken link (a partial download into a cache of links) is a missing image, not a non-image:
        # skipping it would silently shift the index of every image after it
        if not f.is_file():
            what = "a broken link" if f.is_symlink() else "not a regular file"
            raise ValueError(f"{f}: {what}; every image file in the folder takes an index, fix or remove it")
    if not files:
        raise ValueError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    first_size = first_mode = None
    for f in files:
        try:
            with Image.open(f) as im:
                size, mode = im.size, im.mode
                # verify() reads the whole file (checksums for PNG), so truncated files fail now, not midway.
                im.verify()
        except (
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            ValueError,
            Image.DecompressionBombError,
        ) as exc:
            # DecompressionBombError: a header claiming more pixels than PIL's safety limit (not an OSError)
            raise ValueError(f"{f}: cannot read image ({type(exc).__name__}: {exc})") from None
        if mode not in _MODE_CHANNELS:
            raise ValueError(
                f"{f}: image mode {mode!r} is not supported; convert the folder to L (grey), RGB or RGBA"
            )
        if first_size is None:
            first_size, first_mode = size, mode
        elif size != first_size or mode != first_mode:
            raise ValueError(
                f"{f}: image is {size[0]}x{size[1]} {mode} but {files[0].name} is "
                f"{first_size[0]}x{first_size[1]} {first_mode}; all images must have one size and mode"
            )
    w, h = first_size
    c = _MODE_CHANNELS[first_mode]

    def read(start: int, stop: int) -> torch.Tensor:
        out = np.empty((stop - start, h, w, c), dtype=np.uint8)
        for i, f in enumerate(files[start:stop]):
            try:
                with Image.open(f) as im:
                    a = np.asarray(im, dtype=np.uint8)
                out[i] = a.reshape(h, w, c)
            except (OSError, SyntaxError, ValueError) as exc:
                # verify() checks a PNG's checksums, not its compressed stream: corrupt data with valid
                # checksums (or a file changed since the open) only shows when decoded
                raise ValueError(f"{f}: cannot decode image ({type(exc).__name__}: {exc})") from None
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    return TrainingSet(
        source=str(p),
        kind="folder",
        shape=(len(files), c, h, w),
        names=tuple(f.name for f in files),
        layout="folder",
        _read=read,
    )


def _load_npy(p: Path) -> np.ndarray:
    try:
        # Memory-mapped: chunks are read from disk on demand.
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{p}: not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):  # np.load goes by the content: a zip archive gives an NpzFile
        arr.close()
        raise ValueError(f"{p}: is an .npz archive, not an .npy array; rename it to .npz")
    return arr


def _load_npz(p: Path) -> np.ndarray:
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{p}: not a readable .npz archive ({exc})") from None
    if isinstance(z, np.ndarray):  # np.load goes by the content: a bare .npy array has no keys to choose
        raise ValueError(f"{p}: is an .npy array, not an .npz archive; rename it to .npy")
    try:
        with z:
            keys = list(z.files)
            if not keys:
                raise ValueError(f"{p}: the .npz file holds no arrays")
            if len(keys) == 1:
                key = keys[0]
            else:
                key = next((k for k in _NPZ_KEYS if k in keys), None)
                if key is None:
                    raise ValueError(
                        f"{p}: the .npz file holds several arrays ({', '.join(keys)}) and none is named "
                        f"{', '.join(_NPZ_KEYS)}; save the images under the key 'images'"
                    )
            return z[key]
    except ValueError as exc:
        if str(exc).startswith(str(p)):
            raise
        raise ValueError(f"{p}: not a readable .npz archive ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{p}: not a readable .npz archive ({exc})") from None


def _load_safetensors(p: Path) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                raise ValueError(f"{p}: the .safetensors file holds no tensors")
            if len(keys) == 1:
                key = keys[0]
            elif "images" in keys:
                key = "images"
            else:
                raise ValueError(
                    f"{p}: the .safetensors file holds several tensors ({', '.join(sorted(keys))}) and none "
                    "is named 'images'"
                )
            return f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{p}: not a readable .safetensors file ({exc})") from None
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        if isinstance(exc, ValueError) and str(exc).startswith(str(p)):
            raise
        raise ValueError(f"{p}: not a readable .safetensors file ({type(exc).__name__}: {exc})") from None


def _detect_layout(shape: tuple[int, ...], exp: tuple[int, int, int] | None, p: Path) -> str:
    if len(shape) == 3:
        return "NHW"
    if len(shape) != 4:
        raise ValueError(
            f"{p}: the image array has shape {list(shape)}; expected [N, H, W], [N, C, H, W] or [N, H, W, C]"
        )
    first_is_c = shape[1] in _CHANNEL_COUNTS
    last_is_c = shape[3] in _CHANNEL_COUNTS
    if last_is_c and not first_is_c:
        return "NHWC"
    if first_is_c and not last_is_c:
        return "NCHW"
    if not first_is_c and not last_is_c:
        raise ValueError(
            f"{p}: cannot find the channel axis of shape {list(shape)}: neither dim 1 nor the last dim is "
            "1, 3 or 4"
        )
    # Ambiguous: both could be channels. Let the model's shape decide when exactly one reading fits it.
    if exp is not None:
        nchw = tuple(shape[1:]) == exp
        nhwc = (shape[3], shape[1], shape[2]) == exp
        if nhwc and not nchw:
            return "NHWC"
    return "NCHW"


def unit_to_uint8(t: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (range-checked by the caller) -> uint8 ``round(x * 255)``, half to even, computed
    in float64: in float32 the product can land on a half and round the other way (0.8058823 gives 206
    against 205), so a tensor and the same array saved to a file would differ. Chunked over the first axis,
    so the float64 temporaries stay small whatever the size of the set.

    Args:
        t: float [N, ...] images.

    Returns:
        uint8 [N, ...] on ``t``'s device.
    """
    out = torch.empty(t.shape, dtype=torch.uint8, device=t.device)
    rows = max(1, (32 << 20) // max(1, t[0].numel())) if t.shape[0] else 1
    for s in range(0, t.shape[0], rows):
        out[s : s + rows] = torch.round(t[s : s + rows].to(torch.float64) * 255.0)
    return out


def _to_uint8(arr: np.ndarray | torch.Tensor, p: Path) -> torch.Tensor:
    """Convert one chunk to uint8 (already range-checked)."""
    if isinstance(arr, np.ndarray):
        dtype = arr.dtype
        if dtype.kind == "f":
            # torch takes neither a non-native byte order (a '>f4' array saved on another machine) nor
            # long double: native float16/32/64 as they are (exactly what unit_to_uint8 widens), wider
            # floats as float64 (the precision _check_values range-checked them at)
            dtype = dtype.newbyteorder("=") if dtype.itemsize <= 8 else np.dtype(np.float64)
        # np.array copies: a memory-mapped chunk becomes an ordinary, writable array.
        t = torch.from_numpy(np.array(arr, dtype=dtype, copy=True))
    else:
        t = arr
    return t if t.dtype == torch.uint8 else unit_to_uint8(t)


def _check_values(arr: np.ndarray | torch.Tensor, p: Path) -> None:
    """Check the dtype and (for floats) that every value is in [0, 1], streaming over the first axis."""
    if isinstance(arr, torch.Tensor):
        dtype_name = str(arr.dtype).removeprefix("torch.")
        is_uint8 = arr.dtype == torch.uint8
        is_float = arr.dtype.is_floating_point
    else:
        dtype_name = str(arr.dtype)
        is_uint8 = arr.dtype == np.uint8
        is_float = np.issubdtype(arr.dtype, np.floating)
    if is_uint8:
        return
    if not is_float:
        raise ValueError(
            f"{p}: image dtype {dtype_name} is not supported; use uint8 (0-255) or float in [0, 1]"
        )
    n = arr.shape[0]
    step = max(1, (1 << 24) // max(1, int(np.prod(arr.shape[1:]))))  # ~16M values per pass
    for s in range(0, n, step):
        c = arr[s : s + step]
        c = (
            c.to(torch.float64)
            if isinstance(c, torch.Tensor)
            else torch.from_numpy(np.array(c, np.float64, copy=True))
        )
        if torch.isnan(c).any():
            raise ValueError(f"{p}: the image array contains NaN")
        lo, hi = float(c.min()), float(c.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{p}: float images must lie in [0, 1] but values range over [{lo:g}, {hi:g}] (in chunk at "
                f"index {s}); scale them or save them as uint8"
            )


def _open_array(
    p: Path, arr: np.ndarray | torch.Tensor, kind: str, exp: tuple[int, int, int] | None
) -> TrainingSet:
    shape = tuple(int(s) for s in arr.shape)
    layout = _detect_layout(shape, exp, p)
    if shape[0] == 0:
        raise ValueError(f"{p}: the image array is empty (shape {list(shape)})")
    if any(s == 0 for s in shape):
        raise ValueError(f"{p}: the image array has an empty dimension (shape {list(shape)})")
    _check_values(arr, p)
    if layout == "NHW":
        n, h, w = shape
        c = 1
    elif layout == "NHWC":
        n, h, w, c = shape
    else:
        n, c, h, w = shape

    def read(start: int, stop: int) -> torch.Tensor:
        t = _to_uint8(arr[start:stop], p)
        if layout == "NHW":
            t = t.unsqueeze(1)
        elif layout == "NHWC":
            t = t.permute(0, 3, 1, 2)
        return t.contiguous()

    return TrainingSet(
        source=str(p),
        kind=kind,
        shape=(n, c, h, w),
        names=(),
        layout=layout,
        _read=read,
    )
