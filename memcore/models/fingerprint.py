"""Content digests of a model's weights: how a results directory knows which model its records came from.

A path names where weights were, not what they are: a checkpoint overwritten in place, or two in-memory
models of one architecture, would otherwise resume each other's results directories. ``weights_sha256``
hashes the weights themselves, as the extraction runs them (in their dtype, in C order whatever the memory
format), so a change of any single weight is a different digest.

What it does not cover: the scheduler configuration and the tokenizer (neither is a weight; edit them and
the digest stays; an extraction records its DDIM schedule and its prompts' token ids beside the digest).
Derived copies that memcore's own speed options add in place are left out, so that the digest of a shared
model does not depend on which Sampler touched it first: diffusers' ``fuse_qkv_projections()`` adds
``to_qkv`` / ``to_kv`` / ``to_added_qkv`` (concatenations of ``to_q``, ``to_k``, ``to_v``, which stay),
``channels_last`` changes only the layout, and the fused GroupNorm+SiLU keeps its modules' state-dict keys.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping
from typing import Any

import torch

# diffusers' fused projections: concatenated copies of weights that stay in the state dict
_DERIVED = ("to_qkv", "to_kv", "to_added_qkv")
# per module: (what its tensors were when hashed, the digest); see _state_key for when it is reused
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state dict entries that identify the weights, sorted by key (derived fused copies left out)."""
    sd = module.state_dict(keep_vars=True)
    items = [(k, v) for k, v in sd.items() if isinstance(v, torch.Tensor) and not _derived(k)]
    return sorted(items, key=lambda kv: kv[0])


def _derived(key: str) -> bool:
    """``...attn1.to_qkv.weight``: a parameter of one of the fused projections."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in _DERIVED


def _state_key(items: list[tuple[str, torch.Tensor]]) -> tuple:
    """What makes a cached digest stale: another tensor (storage, dtype, shape) or an in-place write to one.

    ``_version`` counts in-place writes (``add_``, ``copy_``, an optimizer step, ``load_state_dict``), but not
    writes through ``.data``, which has a counter of its own: after ``p.data.mul_(2)`` the cached digest is
    reused. Hashing every call instead would cost an SD pipeline's 2 GB device->host copy and sha256 per
    extraction, which is the embedded many-calls use this cache is for.
    """
    return tuple((k, t.data_ptr(), _version(t), t.dtype, tuple(t.shape)) for k, t in items)


def _version(t: torch.Tensor) -> int | None:
    # tensors made under torch.inference_mode() keep no version counter (None): a module holding one is
    # hashed on every call
    return None if t.is_inference() else t._version


def _module_sha256(module: torch.nn.Module) -> str:
    items = _tensors(module)
    key = _state_key(items)
    hit = _CACHE.get(module)
    if hit is not None and hit[0] == key and all(k[2] is not None for k in key):
        return hit[1]
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        # C order whatever the memory format (channels_last), as bytes (bfloat16 has no numpy dtype)
        flat = t.cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    digest = h.hexdigest()
    _CACHE[module] = (key, digest)
    return digest


def weights_sha256(modules: Mapping[str, torch.nn.Module | None] | torch.nn.Module | Any) -> str:
    """sha256 over the weights of named modules (e.g. ``unet``, ``text_encoder``, ``vae``).

    Args:
        modules: one of
            - a mapping component name -> module; None entries (a pixel model has no VAE) are skipped. The names
              are part of the digest, the order of the mapping is not;
            - a ``LoadedModel``: its ``unet``, ``text_encoder`` and ``vae``, the digest an extraction of it
              records as ``model_sha256``;
            - a single ``torch.nn.Module``, taken as the denoiser: the digest of ``{"unet": module}``, which is
              what an extraction of a pixel UNet records.

    Returns:
        64 hex digits. Each module's digest is cached while its tensors are unchanged (see ``_state_key``).

    Raises:
        TypeError: anything else, or a mapping entry that is not a ``torch.nn.Module``.
    """
    # imported here: memcore.models imports this module before loading.py
    from memcore.models.loading import LoadedModel

    if isinstance(modules, LoadedModel):
        modules = {"unet": modules.unet, "text_encoder": modules.text_encoder, "vae": modules.vae}
    elif isinstance(modules, torch.nn.Module):
        modules = {"unet": modules}
    elif not isinstance(modules, Mapping):
        raise TypeError(
            "weights_sha256 takes a mapping of component name -> torch.nn.Module, a LoadedModel or a single "
            f"torch.nn.Module, got {type(modules).__name__}"
        )
    bad = [n for n in modules if not isinstance(n, str)]
    if bad:
        raise TypeError(f"component names must be str, got {type(bad[0]).__name__} {bad[0]!r}")
    h = hashlib.sha256()
    for name in sorted(modules):
        m = modules[name]
        if m is None:
            continue
        if not isinstance(m, torch.nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        h.update(f"{name}:{_module_sha256(m)}\n".encode())
    return h.hexdigest()
