"""weights_sha256: the weights' digest a results directory records (memcore.models.fingerprint)."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from memcore.models import fingerprint as F
from memcore.models import load_model


def _unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip


def _cond_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip


def test_same_weights_same_digest_any_change_another():
    a = _unet()
    d = F.weights_sha256({"unet": a})
    assert len(d) == 64 and int(d, 16) >= 0
    assert F.weights_sha256({"unet": copy.deepcopy(a)}) == d  # another object, the same weights
    assert F.weights_sha256({"unet": _unet(seed=0)}) == d
    assert F.weights_sha256({"unet": _unet(seed=1)}) != d  # same architecture, other weights
    # one weight written in place (as an optimizer step or load_state_dict does): the cached digest is stale
    with torch.no_grad():
        a.conv_out.bias[0] += 1e-3
    changed = F.weights_sha256({"unet": a})
    assert changed != d
    with torch.no_grad():
        a.conv_out.bias[0] -= 1e-3
    # float rounding may not return the exact bits: compare with a fresh copy of what it holds now
    assert F.weights_sha256({"unet": a}) == F.weights_sha256({"unet": copy.deepcopy(a)})
    # the dtype the run samples in is part of what is hashed
    assert F.weights_sha256({"unet": _unet().to(torch.bfloat16)}) != d


def test_layout_and_memcore_fusions_do_not_change_it():
    from memcore.ops.norm import fuse_groupnorm_silu

    a = _unet()
    d = F.weights_sha256({"unet": a})
    a.to(memory_format=torch.channels_last)
    assert F.weights_sha256({"unet": a}) == d
    assert fuse_groupnorm_silu(a) > 0  # patched forwards, same state dict
    assert F.weights_sha256({"unet": a}) == d
    c = _cond_unet()
    dc = F.weights_sha256({"unet": c})
    c.fuse_qkv_projections()  # adds to_qkv / to_kv copies; to_q, to_k, to_v stay
    assert any(".to_qkv." in k for k in c.state_dict()) and any(".to_kv." in k for k in c.state_dict())
    assert F.weights_sha256({"unet": c}) == dc
    with torch.no_grad():  # ... but the weights they are copies of still count
        next(m for n, m in c.named_modules() if n.endswith("to_q")).weight[0, 0] += 1
    assert F.weights_sha256({"unet": c}) != dc


def test_loaded_from_disk_equals_the_saved_model(tmp_path):
    a = _unet(seed=3)
    a.save_pretrained(tmp_path / "m")
    lm = load_model(tmp_path / "m")
    assert F.weights_sha256({"unet": lm.unet}) == F.weights_sha256({"unet": a})


def test_names_and_entries():
    a, b = _unet(), _unet(seed=1)
    assert F.weights_sha256({"unet": a}) != F.weights_sha256({"vae": a})
    assert F.weights_sha256({"unet": a, "vae": None}) == F.weights_sha256({"unet": a})
    assert F.weights_sha256({"unet": a, "vae": b}) == F.weights_sha256({"vae": b, "unet": a})
    assert F.weights_sha256({"unet": a, "vae": b}) != F.weights_sha256({"unet": b, "vae": a})
    with pytest.raises(TypeError, match=r"vae must be a torch\.nn\.Module, got Tensor"):
        F.weights_sha256({"unet": a, "vae": torch.zeros(2)})


def test_a_module_is_hashed_once_while_unchanged(monkeypatch):
    made = []

    def sha256(*args):
        made.append(1)
        import hashlib

        return hashlib.sha256(*args)

    monkeypatch.setattr(F, "hashlib", types.SimpleNamespace(sha256=sha256))
    a = _unet(seed=5)
    first = F.weights_sha256({"unet": a})
    assert len(made) == 2  # the module's digest and the combined one
    assert F.weights_sha256({"unet": a}) == first and len(made) == 3  # only the combined one again
    a.to(torch.float64)  # new tensors: hashed again
    F.weights_sha256({"unet": a})
    assert len(made) == 5


def test_inference_mode_weights_are_hashed_every_call():
    with torch.inference_mode():
        a = _unet(seed=6)
        d = F.weights_sha256({"unet": a})
        a.conv_out.bias.add_(1.0)  # no version counter to see this by
        assert F.weights_sha256({"unet": a}) != d


@pytest.mark.cuda
def test_the_digest_does_not_depend_on_the_device():
    a = _unet(seed=7).to(torch.bfloat16)
    on_cpu = F.weights_sha256({"unet": a})
    b = copy.deepcopy(a).to("cuda").to(memory_format=torch.channels_last)
    assert F.weights_sha256({"unet": b}) == on_cpu


def test_a_single_module_or_a_loaded_model():
    lin = torch.nn.Linear(3, 2)
    # a bare module is the denoiser: the digest an extraction of a pixel UNet records
    assert F.weights_sha256(lin) == F.weights_sha256({"unet": lin})
    a = _unet(seed=2)
    lm = load_model(a)
    assert F.weights_sha256(lm) == F.weights_sha256({"unet": a, "text_encoder": None, "vae": None})
    assert F.weights_sha256(lm) == F.weights_sha256(a)
    with pytest.raises(
        TypeError, match=r"takes a mapping of component name -> torch.nn.Module, a LoadedModel"
    ):
        F.weights_sha256([lin])
    with pytest.raises(TypeError, match="component names must be str"):
        F.weights_sha256({0: lin})
