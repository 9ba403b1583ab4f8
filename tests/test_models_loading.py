"""load_model: local directories, .safetensors files, loaded objects; clear errors for hub ids and bad files."""

from __future__ import annotations

import json

import pytest
import torch

from memcore.models import LoadedModel, load_model


def _tiny_unet(**kw):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **kw,
    )


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    from diffusers import DDIMScheduler

    d = tmp_path_factory.mktemp("unet")
    _tiny_unet().save_pretrained(d)
    DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(d)
    return d


def test_unet_directory(unet_dir):
    lm = load_model(unet_dir)
    assert isinstance(lm, LoadedModel)
    assert lm.kind == "unet" and not lm.latent and lm.vae is None
    assert lm.sample_shape == (3, 8, 8) and lm.image_shape == (3, 8, 8)
    assert type(lm.scheduler).__name__ == "DDIMScheduler"
    assert lm.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    # eval mode; parameters keep requires_grad as the stock pipelines leave them (it changes matmul kernels)
    assert not lm.unet.training and all(p.requires_grad for p in lm.unet.parameters())
    ref = _tiny_unet()
    for (k, a), (_, b) in zip(lm.unet.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_class_conditional_and_dtype(tmp_path):
    _tiny_unet(num_class_embeds=5).save_pretrained(tmp_path)
    lm = load_model(tmp_path, dtype=torch.float64)
    assert lm.kind == "class_unet" and lm.num_classes == 5
    assert lm.dtype == torch.float64
    assert type(lm.scheduler).__name__ == "DDPMScheduler"  # no scheduler config: DDPM defaults


def test_safetensors_file_with_config(unet_dir):
    lm = load_model(unet_dir / "diffusion_pytorch_model.safetensors")
    assert lm.kind == "unet"
    assert torch.equal(
        next(iter(lm.unet.state_dict().values())), next(iter(_tiny_unet().state_dict().values()))
    )


def test_loaded_objects():
    from diffusers import DDIMPipeline, DDPMScheduler

    lm = load_model(_tiny_unet())
    assert lm.kind == "unet"
    pipe = DDIMPipeline(_tiny_unet(), DDPMScheduler())
    lm2 = load_model(pipe)
    assert lm2.unet is pipe.unet and type(lm2.scheduler).__name__ == "DDIMScheduler"
    assert load_model(lm2) is lm2


def test_hub_id_is_a_clear_error():
    with pytest.raises(ValueError, match="not a local path; memcore never downloads"):
        load_model("google/ddpm-cifar10-32")
    with pytest.raises(ValueError, match="not a local path"):
        load_model("CompVis/stable-diffusion-v1-4")


def test_missing_paths(tmp_path, unet_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"neither model_index\.json"):
        load_model(tmp_path)
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text((unet_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_model(d)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "w.safetensors").write_bytes((unet_dir / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"config\.json next to it"):
        load_model(lone / "w.safetensors")
    p = tmp_path / "pipe"
    p.mkdir()
    (p / "model_index.json").write_text(
        json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]})
    )
    with pytest.raises(FileNotFoundError, match="unet"):
        load_model(p)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupt_safetensors(tmp_path, unet_dir, damage):
    data = (unet_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"\x00" * 64 + data[64:]
    else:
        data = data[:8] + b"{not json" + data[17:]
    (tmp_path / "config.json").write_text((unet_dir / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model(tmp_path / "diffusion_pytorch_model.safetensors")


def test_bad_arguments(unet_dir):
    with pytest.raises(TypeError, match="dtype"):
        load_model(unet_dir, dtype=torch.int32)
    with pytest.raises(TypeError, match="cannot sample"):
        load_model(object())
    with pytest.raises(ValueError, match=r"\.safetensors"):
        load_model(unet_dir / "config.json")


@pytest.mark.parametrize(
    "change",
    [{"block_out_channels": [8, 32]}, {"num_class_embeds": 5}, {"layers_per_block": 2}],
    ids=["other-shapes", "missing-keys", "other-layers"],
)
def test_config_that_does_not_match_the_weights(tmp_path, unet_dir, change):
    # used to be a raw RuntimeError (size mismatch) or, for keys the weights lack, uninitialised weights
    cfg = json.loads((unet_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes((unet_dir / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"do not match .*config\.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=r"safetensors does not match .*config\.json"):
        load_model(weights)


def test_config_json_must_be_an_object(tmp_path, unet_dir):
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / name).write_bytes((unet_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(
        "[1]"
    )  # raised AttributeError: 'list' object has no attribute 'get'
    with pytest.raises(ValueError, match=r"config\.json holds a JSON list, not an object"):
        load_model(tmp_path)


def test_scheduler_argument_must_be_a_scheduler(unet_dir):
    from diffusers import DDIMScheduler

    with pytest.raises(TypeError, match=r"diffusers scheduler instance .* got str 'ddim'.*SamplerConfig"):
        load_model(unet_dir, scheduler="ddim")
    with pytest.raises(TypeError, match="got type"):  # the class, not an instance
        load_model(_tiny_unet(), scheduler=DDIMScheduler)
    assert type(load_model(unet_dir, scheduler=DDIMScheduler()).scheduler).__name__ == "DDIMScheduler"


@pytest.mark.parametrize("damage", ["missing-key", "unexpected-key", "other-shapes"])
def test_text_encoder_that_does_not_match_its_config(tmp_path, damage):
    # transformers, like diffusers, only warned about keys the file lacks (randomly initialised) or has extra
    import shutil
    import sys
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from test_sampling import save_tiny_sd_pipeline

    d = save_tiny_sd_pipeline(tmp_path / "sd")
    assert load_model(d).text_encoder is not None
    te = d / "text_encoder"
    (f,) = te.glob("*.safetensors")
    state = load_file(f)
    if damage == "missing-key":
        state.pop(next(k for k in state if k.endswith("final_layer_norm.weight")))
    elif damage == "unexpected-key":
        state["extra.weight"] = torch.zeros(3)
    else:
        cfg = json.loads((te / "config.json").read_text())
        (te / "config.json").write_text(
            json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 4})
        )
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"^text_encoder: the weights in .*text_encoder do not match .*config"
    ):
        load_model(d)
    shutil.rmtree(d)
