"""PNG pairs: a generation beside its nearest training image, written once, atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from memcore.io.results import atomic_write_bytes

_MIN_SIDE = 128  # small images (8x8 digits, 32x32 CIFAR) are upscaled so a reader can see them


def _to_hwc_u8(img: torch.Tensor) -> torch.Tensor:
    if img.dim() != 3:
        raise ValueError(f"an image must be [C, H, W], got shape {tuple(img.shape)}")
    img = img.detach().cpu()
    if img.dtype != torch.uint8:
        # an int64 image of 0..255 would be clamped to [0, 1] and come out black and white, silently
        if not img.is_floating_point():
            raise TypeError(f"an image must be uint8 (0-255) or float in [0, 1], got {img.dtype}")
        img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] != 3:
        raise ValueError(f"an image needs 1 or 3 channels, got {img.shape[0]}")
    return img.permute(1, 2, 0).contiguous()


def pair_image(generated: torch.Tensor, train: torch.Tensor | None = None, *, gap: int = 4) -> torch.Tensor:
    """The pair as one uint8 [H', W', 3] picture: generation | gap | training match (when given).

    Args:
        generated: [C, H, W] uint8 or float in [0, 1].
        train: [C, H, W] or None.
    """
    a = _to_hwc_u8(generated)
    tiles = [a]
    if train is not None:
        b = _to_hwc_u8(train)
        if b.shape != a.shape:
            raise ValueError(
                f"generation {tuple(a.shape)} and training image {tuple(b.shape)} differ in shape"
            )
        tiles += [torch.full((a.shape[0], gap, 3), 255, dtype=torch.uint8), b]
    out = torch.cat(tiles, dim=1)
    scale = max(1, -(-_MIN_SIDE // a.shape[0]))
    if scale > 1:  # nearest-neighbour upscale keeps pixels honest
        out = out.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return out


def png_bytes(hwc: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(hwc.numpy(), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def save_pair(path: str | os.PathLike, generated: torch.Tensor, train: torch.Tensor | None = None) -> Path:
    """Write the pair as a PNG at ``path`` (temp file + rename: never a half image)."""
    path = Path(path)
    atomic_write_bytes(path, png_bytes(pair_image(generated, train)))
    return path
