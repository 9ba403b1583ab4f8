"""load_model on model folders as they are found in the wild: variants, half-precision pipelines, broken
model_index.json / config.json / tokenizer folders. Each failure is one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_models_loading import _tiny_unet
from test_sampling import save_tiny_sd_pipeline

from memcore.models import load_model, weights_sha256


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd_fp16(tmp_path_factory, sd_dir):
    """The tiny pipeline saved in float16: plain files and, beside them, a copy holding only fp16 variants."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd16")
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True).to(torch.float16)
    pipe.save_pretrained(root / "plain")
    pipe.save_pretrained(root / "variant", variant="fp16")
    return root


def _copy(src: Path, dst: Path, index=None) -> Path:
    shutil.copytree(src, dst)
    if index is not None:
        p = dst / "model_index.json"
        p.write_text(json.dumps(index(json.loads(p.read_text()))))
    return dst


def test_a_folder_of_fp16_variant_files_loads_them(tmp_path):
    # used to fail with "Error no file named diffusion_pytorch_model.bin found" (diffusers loads a variant
    # only when told, and memcore has no way to tell it)
    from diffusers import UNet2DModel

    u = _tiny_unet().half()
    u.save_pretrained(tmp_path / "plain")
    u.save_pretrained(tmp_path / "v", variant="fp16")
    u.save_pretrained(tmp_path / "vsharded", variant="fp16", max_shard_size="20KB")
    assert not (tmp_path / "v" / "diffusion_pytorch_model.safetensors").exists()
    want = weights_sha256(load_model(tmp_path / "plain"))
    assert weights_sha256(load_model(tmp_path / "v")) == want
    assert weights_sha256(load_model(tmp_path / "vsharded")) == want
    ref = UNet2DModel.from_pretrained(tmp_path / "vsharded", variant="fp16", local_files_only=True)
    assert weights_sha256(ref) == want
    # two variants and no plain file: no choice is made for the user
    shutil.copy(
        tmp_path / "v" / "diffusion_pytorch_model.fp16.safetensors",
        tmp_path / "v" / "diffusion_pytorch_model.ema.safetensors",
    )
    with pytest.raises(
        FileNotFoundError, match=r"^model: no diffusion_pytorch_model\.safetensors .*ema, fp16"
    ):
        load_model(tmp_path / "v")


def test_a_weights_file_diffusers_does_not_look_for_is_named(tmp_path):
    _tiny_unet().save_pretrained(tmp_path / "plain")
    d = tmp_path / "odd"
    d.mkdir()
    shutil.copy(tmp_path / "plain" / "config.json", d)
    shutil.copy(tmp_path / "plain" / "diffusion_pytorch_model.safetensors", d / "unet.safetensors")
    with pytest.raises(
        FileNotFoundError, match=r"no diffusion_pytorch_model\.safetensors .*only unet\.safetensors"
    ):
        load_model(d)


def test_fp16_pipelines(sd_fp16, sd_dir):
    # transformers loads a float16 text encoder as float16 where diffusers makes the UNet float32: sampling
    # then failed in the UNet's cross-attention ("mat1 and mat2 must have the same dtype")
    plain = load_model(sd_fp16 / "plain")
    assert plain.unet.dtype == plain.text_encoder.dtype == plain.vae.dtype == torch.float32
    variant = load_model(sd_fp16 / "variant")  # used to fail: no diffusion_pytorch_model.bin
    assert weights_sha256(variant) == weights_sha256(plain)
    half = load_model(sd_fp16 / "variant", dtype=torch.float16)
    assert weights_sha256(half) == weights_sha256(load_model(sd_dir, dtype=torch.float16))


def test_a_tokenizer_folder_without_its_vocabulary(tmp_path, sd_dir):
    # transformers built a CLIPTokenizer of the two special tokens: every prompt became the same ids
    d = _copy(sd_dir, tmp_path / "sd")
    (d / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"^tokenizer: .*tokenizer holds no vocabulary"):
        load_model(d)


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_a_component_config_that_is_not_an_object(tmp_path, sd_dir, part):
    # diffusers took a JSON list for a hub id ("We couldn't connect to 'https://huggingface.co'"), transformers
    # raised a TypeError naming no file
    d = _copy(sd_dir, tmp_path / "sd")
    (d / part / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=rf"{part}/config\.json holds a JSON list, not an object"):
        load_model(d)


@pytest.mark.parametrize(
    ("part", "entry", "message"),
    [
        ("unet", ["diffusers", "UNetNope"], "unknown diffusers class 'UNetNope'"),
        ("text_encoder", ["transformers", "CLIPNope"], "unknown transformers class 'CLIPNope'"),
        (
            "tokenizer",
            ["transformers", "CLIPNopeTokenizer"],
            "unknown transformers class 'CLIPNopeTokenizer'",
        ),
        ("unet", "UNet2DConditionModel", r"'unet' must be \[library, class name\]"),
        ("tokenizer", None, "names no 'tokenizer' component"),
        ("vae", [None, None], "names no 'vae' component"),
    ],
)
def test_model_index_entries(tmp_path, sd_dir, part, entry, message):
    # were an AttributeError / TypeError / "unknown diffusers class" naming no file, or, for a missing part,
    # "pass the pipeline directory" to someone who had
    d = _copy(sd_dir, tmp_path / "sd", lambda i: {**i, part: entry})
    with pytest.raises(ValueError, match=rf"model_index\.json:? .*{message}"):
        load_model(d)


def test_a_scheduler_config_naming_another_class(tmp_path):
    # loaded the UNet2DModel in the folder as the scheduler
    _tiny_unet().save_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match=r"scheduler_config\.json: UNet2DModel is not a diffusers scheduler"):
        load_model(tmp_path)


def test_pickled_weights_load_without_a_failed_safetensors_lookup(tmp_path, capfd):
    # a folder of .bin weights loaded fine but printed diffusers' "An error occurred while trying to fetch ...
    # no file named diffusion_pytorch_model.safetensors ... Defaulting to unsafe serialization" first
    u = _tiny_unet()
    u.save_pretrained(tmp_path / "m", safe_serialization=False)
    assert not any((tmp_path / "m").glob("*.safetensors"))
    capfd.readouterr()
    m = load_model(tmp_path / "m")
    assert capfd.readouterr().err == ""
    assert weights_sha256(m) == weights_sha256(load_model(u))
