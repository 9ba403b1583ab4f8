"""A CLIP tokenizer built without any download, for random-weight Stable-Diffusion-layout pipelines.

Cost profiling and tests build SD-layout pipelines with random weights (FLOPs do not depend on weights), but a
real CLIP vocabulary would have to be downloaded. This tokenizer has the byte-level alphabet of GPT-2/CLIP
(every byte maps to one printable symbol, so any text tokenizes), the end-of-word forms, optional merges and the
two special tokens: ``2 * 256 + len(merges) + 2`` ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def byte_alphabet() -> list[str]:
    """The 256 symbols of the GPT-2/CLIP byte-level alphabet, in byte order of the printable-first table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def offline_clip_tokenizer(max_len: int = 77, merges: Sequence[tuple[str, str]] = ()) -> Any:
    """A ``transformers.CLIPTokenizer`` with a byte-level vocabulary, built locally.

    Args:
        max_len: ``model_max_length`` (77 for SD-1.x text encoders).
        merges: BPE merges, e.g. ``[("a", "b")]``; each adds its merged symbol to the vocabulary.

    Returns:
        The tokenizer; its vocabulary size is ``2 * 256 + len(merges) + 2``.
    """
    from transformers import CLIPTokenizer

    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=max_len)
