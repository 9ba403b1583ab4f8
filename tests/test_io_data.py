"""Training-image readers: every DATA form of SPEC §7 and every error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from memcore.io.data import load_images, open_training_set


def _imgs(n=5, c=3, h=6, w=8, seed=0) -> np.ndarray:
    """uint8 [N, C, H, W]."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _save_folder(d, imgs: np.ndarray, names=None):
    d.mkdir()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[imgs.shape[1]]
    names = names or [f"img_{i:03d}.png" for i in range(len(imgs))]
    for name, im in zip(names, imgs):
        a = im.transpose(1, 2, 0)
        Image.fromarray(a[:, :, 0] if mode == "L" else a, mode=mode).save(d / name)
    return d


@pytest.mark.parametrize("c", [1, 3, 4])
def test_folder_sorted_order_and_channels(tmp_path, c):
    imgs = _imgs(c=c)
    # Written in scrambled order; the index is the sorted filename order.
    names = ["b.png", "a.png", "e.png", "c.png", "d.png"]
    d = _save_folder(tmp_path / "f", imgs, names)
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    ts = open_training_set(d)
    order = np.argsort(names)
    assert ts.names == tuple(sorted(names))
    assert ts.shape == (5, c, 6, 8) and ts.kind == "folder"
    assert torch.equal(ts.images, torch.from_numpy(imgs[order]))
    assert ts.name(0) == "a.png"
    assert load_images(d).dtype == torch.uint8


def test_folder_errors(tmp_path):
    d = _save_folder(tmp_path / "f", _imgs(n=3, c=3))
    Image.fromarray(np.zeros((7, 8, 3), np.uint8)).save(d / "img_999.png")
    with pytest.raises(ValueError, match=r"img_999\.png.*8x7"):
        open_training_set(d)

    d2 = _save_folder(tmp_path / "g", _imgs(n=2, c=3))
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(d2 / "img_100.png")  # mode L among RGB
    with pytest.raises(ValueError, match=r"img_100\.png.*L"):
        open_training_set(d2)

    d3 = _save_folder(tmp_path / "h", _imgs(n=2, c=3))
    (d3 / "img_050.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"img_050\.png.*cannot read"):
        open_training_set(d3)

    d4 = _save_folder(tmp_path / "i", _imgs(n=2, c=3))
    raw = (d4 / "img_000.png").read_bytes()
    (d4 / "img_000.png").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ValueError, match=r"img_000\.png"):
        open_training_set(d4)

    d5 = tmp_path / "empty"
    d5.mkdir()
    (d5 / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        open_training_set(d5)

    d6 = tmp_path / "p"
    d6.mkdir()
    Image.new("P", (4, 4)).save(d6 / "a.png")
    with pytest.raises(ValueError, match="mode 'P'"):
        open_training_set(d6)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    # a header claiming more pixels than PIL's limit raised DecompressionBombError, which is not an OSError
    d = _save_folder(tmp_path / "f", _imgs(n=2, c=3))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)  # so that these small images count as bombs
    with pytest.raises(ValueError, match=r"cannot read image \(DecompressionBombError"):
        open_training_set(d)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_images(tmp_path / "nope.npy")
    (tmp_path / "x.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported"):
        load_images(tmp_path / "x.pkl")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
def test_npy_layouts_uint8(tmp_path, layout):
    imgs = _imgs(c=1 if layout == "NHW" else 3)
    arr = {"NCHW": imgs, "NHWC": imgs.transpose(0, 2, 3, 1), "NHW": imgs[:, 0]}[layout]
    np.save(tmp_path / "a.npy", np.ascontiguousarray(arr))
    ts = open_training_set(tmp_path / "a.npy")
    assert ts.layout == layout and ts.kind == "npy"
    assert torch.equal(ts.images, torch.from_numpy(imgs))
    assert ts.name(2) == "a.npy[2]"


def test_npy_float_range_and_rounding(tmp_path):
    imgs = _imgs(c=3)
    f = imgs.astype(np.float32) / 255.0
    np.save(tmp_path / "f.npy", f)
    assert torch.equal(load_images(tmp_path / "f.npy"), torch.from_numpy(imgs))
    np.save(tmp_path / "h.npy", np.array([[[[0.5, 0.2]]]], dtype=np.float64).repeat(3, 1))  # [1,3,1,2]
    out = load_images(tmp_path / "h.npy")
    assert out[0, 0, 0].tolist() == [128, 51]  # round(127.5) = 128 (half to even), round(51.0) = 51
    np.save(tmp_path / "big.npy", f * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_images(tmp_path / "big.npy")
    bad = f.copy()
    bad[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="NaN"):
        load_images(tmp_path / "nan.npy")
    np.save(tmp_path / "i.npy", imgs.astype(np.int64))
    with pytest.raises(ValueError, match="dtype int64"):
        load_images(tmp_path / "i.npy")


def test_layout_errors_and_ambiguity(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 5, 6, 7), np.uint8))
    with pytest.raises(ValueError, match="channel axis"):
        load_images(tmp_path / "a.npy")
    np.save(tmp_path / "b.npy", np.zeros((2, 5), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_images(tmp_path / "b.npy")
    np.save(tmp_path / "e.npy", np.zeros((0, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        load_images(tmp_path / "e.npy")
    # [N, 3, 4, 4]: dim 1 and the last dim could both be channels. Without a hint: NCHW.
    amb = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    np.save(tmp_path / "amb.npy", amb)
    ts = open_training_set(tmp_path / "amb.npy")
    assert ts.layout == "NCHW" and ts.shape == (2, 3, 4, 4)
    # [N, 4, 4, 3] is unambiguous NHWC... but [N, 4, 8, 3] with expected (3, 4, 8) picks NHWC.
    amb2 = np.arange(2 * 4 * 8 * 3, dtype=np.uint8).reshape(2, 4, 8, 3)
    np.save(tmp_path / "amb2.npy", amb2)
    ts2 = open_training_set(tmp_path / "amb2.npy", expected_shape=(3, 4, 8))
    assert ts2.layout == "NHWC"
    assert torch.equal(ts2.images, torch.from_numpy(amb2).permute(0, 3, 1, 2))
    # An ambiguous [N, 1, 4, 1] with expected (1, 1, 4)?  NCHW gives (1, 4, 1), NHWC gives (1, 1, 4).
    np.save(tmp_path / "amb3.npy", np.zeros((2, 1, 4, 1), np.uint8))
    assert open_training_set(tmp_path / "amb3.npy", expected_shape=(1, 1, 4)).layout == "NHWC"
    assert open_training_set(tmp_path / "amb3.npy").layout == "NCHW"


def test_expected_shape(tmp_path):
    np.save(tmp_path / "a.npy", _imgs(c=1, h=8, w=8))
    assert load_images(tmp_path / "a.npy", expected_shape=(1, 8, 8)).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match=r"1x8x8.*1x16x16"):
        load_images(tmp_path / "a.npy", expected_shape=(1, 16, 16))
    with pytest.raises(ValueError, match="expected_shape"):
        load_images(tmp_path / "a.npy", expected_shape=(8, 8))


def test_npz_keys(tmp_path):
    imgs = _imgs()
    np.savez(tmp_path / "one.npz", whatever=imgs)
    assert torch.equal(load_images(tmp_path / "one.npz"), torch.from_numpy(imgs))
    np.savez(tmp_path / "named.npz", labels=np.arange(5), images=imgs)
    assert torch.equal(load_images(tmp_path / "named.npz"), torch.from_numpy(imgs))
    np.savez(tmp_path / "x.npz", y=np.arange(5), x=imgs)
    assert torch.equal(load_images(tmp_path / "x.npz"), torch.from_numpy(imgs))
    np.savez(tmp_path / "pos.npz", imgs, np.arange(5))  # arr_0, arr_1
    assert torch.equal(load_images(tmp_path / "pos.npz"), torch.from_numpy(imgs))
    np.savez(tmp_path / "bad.npz", a=imgs, b=imgs)
    with pytest.raises(ValueError, match=r"several arrays \(a, b\)"):
        load_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="no arrays"):
        load_images(tmp_path / "none.npz")


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".safetensors"])
def test_corrupt_files(tmp_path, suffix):
    p = tmp_path / f"c{suffix}"
    p.write_bytes(b"this is not an array file at all" * 3)
    with pytest.raises(ValueError, match=r"c\.(npy|npz|safetensors)"):
        load_images(p)


def test_safetensors(tmp_path):
    imgs = torch.from_numpy(_imgs(c=3))
    save_file({"anything": imgs.permute(0, 2, 3, 1).contiguous()}, str(tmp_path / "one.safetensors"))
    assert torch.equal(load_images(tmp_path / "one.safetensors"), imgs)
    save_file({"images": imgs.float() / 255, "labels": torch.arange(5)}, str(tmp_path / "two.safetensors"))
    assert torch.equal(load_images(tmp_path / "two.safetensors"), imgs)
    save_file({"a": imgs, "b": imgs.clone()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="none is named 'images'"):
        load_images(tmp_path / "bad.safetensors")
    save_file({"images": imgs.to(torch.int32)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(ValueError, match="dtype int32"):
        load_images(tmp_path / "int.safetensors")


def test_iter_chunks_streams_in_order(tmp_path):
    imgs = _imgs(n=11, c=1)
    np.save(tmp_path / "a.npy", imgs.astype(np.float32) / 255)
    ts = open_training_set(tmp_path / "a.npy")
    starts, chunks = zip(*ts.iter_chunks(4))
    assert starts == (0, 4, 8) and [len(c) for c in chunks] == [4, 4, 3]
    assert torch.equal(torch.cat(chunks), torch.from_numpy(imgs))
    d = _save_folder(tmp_path / "f", imgs)
    assert torch.equal(torch.cat([c for _, c in open_training_set(d).iter_chunks(5)]), torch.from_numpy(imgs))
    with pytest.raises(ValueError, match="chunk size"):
        next(ts.iter_chunks(0))


def test_float_arrays_of_any_byte_order_and_width(tmp_path):
    # a big-endian float array (saved on another machine, or as '>f4') and long double were range-checked at
    # open and then failed when read, with torch's error naming no file
    imgs = _imgs(c=3)
    f = imgs.astype(np.float64) / 255.0
    np.save(tmp_path / "be.npy", f.astype(">f4"))
    np.savez(tmp_path / "be.npz", images=f.astype(">f8"))
    np.save(tmp_path / "ld.npy", f.astype(np.longdouble))
    for name in ("be.npy", "be.npz", "ld.npy"):
        assert torch.equal(load_images(tmp_path / name), torch.from_numpy(imgs)), name


def test_suffix_naming_the_other_array_format(tmp_path):
    # np.load goes by the content: an archive named .npy came back as an NpzFile (AttributeError: no shape),
    # a bare array named .npz as an ndarray (TypeError: no context manager)
    np.savez(tmp_path / "z.npz", images=_imgs())
    (tmp_path / "z.npz").rename(tmp_path / "z.npy")
    with pytest.raises(ValueError, match=r"z\.npy: is an \.npz archive.*rename it to \.npz"):
        load_images(tmp_path / "z.npy")
    np.save(tmp_path / "a.npy", _imgs())
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    with pytest.raises(ValueError, match=r"a\.npz: is an \.npy array.*rename it to \.npy"):
        load_images(tmp_path / "a.npz")


def test_folder_image_corrupt_past_its_checksums_is_named_when_read(tmp_path):
    import struct
    import zlib

    d = _save_folder(tmp_path / "f", _imgs(n=3, c=3))
    # replace img_001's pixel stream by bytes that are not zlib data, with a valid chunk CRC: verify() (CRCs
    # only) passes it, decoding fails; that error was PIL's OSError naming no file
    raw = (d / "img_001.png").read_bytes()
    i = raw.index(b"IDAT")
    (n,) = struct.unpack(">I", raw[i - 4 : i])
    data = b"\x00" * 16
    chunk = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    (d / "img_001.png").write_bytes(raw[: i - 4] + chunk + raw[i + 8 + n :])
    ts = open_training_set(d)
    with pytest.raises(ValueError, match=r"img_001\.png: cannot decode image"):
        _ = ts.images
    assert torch.equal(next(ts.iter_chunks(1))[1], torch.from_numpy(_imgs(n=3, c=3)[:1]))


def test_folder_links_and_broken_links(tmp_path):
    imgs = _imgs(n=3, c=3)
    d = _save_folder(tmp_path / "f", imgs, ["a.png", "b.png", "d.png"])
    (d / "c.png").symlink_to(d / "a.png")  # followed: an image like any other
    (d / "x.png").mkdir()  # a sub-folder, whatever its name, takes no index
    assert open_training_set(d).names == ("a.png", "b.png", "c.png", "d.png")
    # a broken link (a partial download into a cache of links) was skipped: d.png silently became index 2
    (d / "bb.png").symlink_to(d / "missing.png")
    with pytest.raises(ValueError, match=r"bb\.png: a broken link"):
        open_training_set(d)


def test_folder_order_is_code_point_order(tmp_path):
    # the documented rule the index rests on: case-sensitive, not numeric, hidden files take no index
    names = ["img2.png", "img10.png", "a.png", "B.png", "C.JPG"]
    d = _save_folder(tmp_path / "f", _imgs(n=5, c=3), names)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(d / "._a.png")  # a macOS companion file
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert open_training_set(d).names == ("B.png", "C.JPG", "a.png", "img10.png", "img2.png")
