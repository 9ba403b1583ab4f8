"""The bundled demo: weights load, the training-set recipe rebuilds deterministically, training runs end to end.

Memorization quality is the end-to-end demo test's business (branch ``extract``); no slow training here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from memcore.io.data import load_images
from memcore.models import demo
from memcore.models.train_demo import (
    _class_report,
    _max_clique,
    _tiled_l2,
    make_scheduler,
    train_demo,
    unet_config,
    validate_demo,
)


@pytest.fixture(scope="module")
def ts() -> demo.DemoTrainingSet:
    return demo.demo_training_set("cond")


def test_bundled_weights_are_a_few_mb():
    sizes = [
        (demo.demo_model_dir(v) / "diffusion_pytorch_model.safetensors").stat().st_size for v in demo.VARIANTS
    ]
    assert sum(sizes) < 4 * 2**20  # "a few MB at most" for both variants together


@pytest.mark.parametrize("variant", demo.VARIANTS)
def test_bundled_weights_load_and_run(variant):
    d = demo.demo_model_dir(variant)
    unet, sched = demo.load_demo(variant)
    assert next(unet.parameters()).dtype == torch.float32 and not unet.training
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    assert unet.config.num_class_embeds == (10 if variant == "cond" else None)
    x = torch.randn(3, 1, 16, 16)
    labels = torch.tensor([0, 4, 9]) if variant == "cond" else None
    with torch.no_grad():
        out = unet(x, torch.tensor([999, 500, 1]), class_labels=labels).sample
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
    # The saved DDIM scheduler carries the training betas.
    assert type(sched).__name__ == "DDIMScheduler"
    torch.testing.assert_close(sched.betas, make_scheduler().betas)
    info = json.loads((d / "train_info.json").read_text())
    assert info["variant"] == variant


def test_training_set_recipe(ts):
    assert ts.images.shape == (1797, 1, 16, 16) and ts.images.dtype == torch.uint8
    assert ts.labels.shape == (1797,)
    assert len(ts.planted) == 5 and ts.planted_classes == (0, 2, 4, 6, 8)
    counts = torch.bincount(ts.train_index, minlength=1797)
    assert len(ts.train_index) == 1797 + 5 * (ts.copies - 1)
    for i, c in zip(ts.planted, ts.planted_classes):
        assert counts[i] == ts.copies and int(ts.labels[i]) == c
        assert ts.planted_of_class(c) == i
    assert ts.planted_of_class(1) is None
    others = torch.ones(1797, dtype=torch.bool)
    others[list(ts.planted)] = False
    assert (counts[others] == 1).all()
    assert ts.training_images().shape == (len(ts.train_index), 1, 16, 16)


def test_training_set_is_deterministic_and_matches_the_weights(ts):
    again = demo.build_training_set(demo.load_recipe(demo.demo_model_dir("cond")))
    assert again.sha256() == ts.sha256()
    assert torch.equal(again.images, ts.images)
    # The hash recorded when the bundled weights were trained: the recipe rebuilds exactly that set.
    for variant in demo.VARIANTS:
        info = json.loads((demo.demo_model_dir(variant) / "train_info.json").read_text())
        assert info["training_set_sha256"] == ts.sha256()
    # Choosing the planted images again from the seed gives the stored choice.
    fresh = demo.build_training_set(demo.DemoRecipe())
    assert fresh.planted == ts.planted and fresh.sha256() == ts.sha256()


def test_upsampling_matches_torch_bilinear():
    from sklearn.datasets import load_digits

    imgs, labels = demo.digits_16()
    raw = torch.from_numpy(load_digits().images[:20]).double()[:, None] / 16
    ref = torch.nn.functional.interpolate(raw, scale_factor=2, mode="bilinear", align_corners=False)
    got = imgs[:20].double() / 255
    assert (got - ref).abs().max() <= 0.5 / 255 + 1e-12  # only the uint8 rounding differs
    assert labels[:20].tolist() == load_digits().target[:20].tolist()


def test_recipe_and_variant_errors(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        demo.load_demo("big")
    with pytest.raises(ValueError, match="planted_classes"):
        demo.DemoRecipe(planted_classes=(1, 1))
    with pytest.raises(ValueError, match="planted_classes"):
        demo.DemoRecipe(planted_classes=(10,))
    with pytest.raises(ValueError, match="copies"):
        demo.DemoRecipe(copies=0)
    with pytest.raises(ValueError, match="class 3"):
        demo.build_training_set(demo.DemoRecipe(planted_classes=(3,), planted_indices=(0,)))  # image 0 is a 0
    with pytest.raises(FileNotFoundError, match=r"recipe\.json"):
        demo.demo_training_set(model_dir=tmp_path)
    with pytest.raises(ValueError, match="steps"):
        train_demo(tmp_path / "x", steps=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        unet_config("cond", (12, 16))


def test_save_training_images_round_trip(tmp_path, ts):
    p = demo.save_training_images(tmp_path / "digits.npz")
    assert torch.equal(load_images(p, expected_shape=(1, 16, 16)), ts.images)


@pytest.mark.parametrize("variant", demo.VARIANTS)
def test_tiny_train_end_to_end(tmp_path, variant):
    recipe = demo.DemoRecipe(planted_classes=(3,), copies=4)
    res = train_demo(
        tmp_path / variant,
        variant=variant,
        steps=3,
        batch_size=8,
        block_out_channels=(8, 16),
        recipe=recipe,
        log_every=0,
    )
    assert res.steps == 3 and res.final_loss == res.final_loss  # finite, not NaN
    for f in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "recipe.json"):
        assert (res.out_dir / f).is_file()
    unet, _ = demo.load_demo(model_dir=res.out_dir)
    assert tuple(unet.config.block_out_channels) == (8, 16)
    tset = demo.demo_training_set(model_dir=res.out_dir)
    assert tset.planted_classes == (3,) and len(tset.train_index) == 1797 + 3
    assert tset.sha256() == res.training_set_sha256
    rep = validate_demo(variant, model_dir=res.out_dir, num_per_class=3, num_uncond=6, steps=2)
    if variant == "cond":
        assert len(rep.classes) == 10 and rep.num_samples == 30
        assert rep.classes[3].planted_index == tset.planted[0] and rep.classes[0].planted_index is None
        assert 0.0 <= rep.classes[3].frac_near_planted <= 1.0
    else:
        assert rep.num_samples == 6 and len(rep.classes) == 1
    json.dumps(rep.to_json())  # serializable


def test_tiled_l2_helper_against_a_loop(rng):
    x = torch.rand(5, 1, 16, 16, generator=rng, dtype=torch.float64)
    x[1, :, 4:8, 8:12] = 1.0  # one tile that differs a lot
    got = _tiled_l2(x, (4, 4))
    for i in range(5):
        for j in range(5):
            per_tile = [
                ((x[i, :, r : r + 4, c : c + 4] - x[j, :, r : r + 4, c : c + 4]) ** 2).mean().sqrt()
                for r in range(0, 16, 4)
                for c in range(0, 16, 4)
            ]
            assert abs(float(got[i, j]) - float(max(per_tile))) < 1e-12
    plain = ((x[:, None] - x[None]) ** 2).mean(dim=(2, 3, 4)).sqrt()
    assert (got >= plain - 1e-12).all()


def test_max_clique_helper():
    adj = torch.zeros(8, 8, dtype=torch.bool)
    for a, b in [(0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (4, 5), (3, 5), (2, 4), (2, 5)]:
        adj[a, b] = adj[b, a] = True
    assert _max_clique(adj) == [2, 3, 4, 5]
    assert len(_max_clique(torch.zeros(4, 4, dtype=torch.bool))) == 1


def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    kw = {"variant": "cond", "steps": 2, "batch_size": 4, "block_out_channels": (8, 16), "log_every": 0}
    a = train_demo(tmp_path / "a", seed=3, **kw)
    b = train_demo(tmp_path / "b", seed=3, **kw)
    c = train_demo(tmp_path / "c", seed=4, **kw)
    wa, wb, wc = (load_file(str(r.out_dir / "diffusion_pytorch_model.safetensors")) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_train_demo_main_cli(tmp_path, capsys):
    from memcore.models.train_demo import main

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    # a copied folder's validation of other weights: it would describe the new ones wrongly
    (tmp_path / "uncond").mkdir()
    (tmp_path / "uncond" / "validation.json").write_text('{"variant": "uncond", "old": true}')
    try:
        assert main(["--out", str(tmp_path), "--variant", "uncond", "--steps", "2", "--batch-size", "4"]) == 0
        assert not (tmp_path / "uncond" / "validation.json").exists()
        # trained with one thread, as the bundled weights (two give other weights), and the setting restored
        assert json.loads((tmp_path / "uncond" / "train_info.json").read_text())["threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert "wrote" in capsys.readouterr().out
    unet, _ = demo.load_demo(model_dir=tmp_path / "uncond")
    assert unet.config.num_class_embeds is None
    assert not (tmp_path / "cond").exists()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--variant", "huge"])


def test_train_demo_refuses_a_bad_variant_folder_before_training(tmp_path, capsys):
    from memcore.models.train_demo import main

    (tmp_path / "uncond").write_text("not a folder")
    # "both" trains cond first: the file in uncond's place must stop the run before that, not after it
    with pytest.raises(ValueError, match="uncond exists and is not a directory"):
        main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "4"])
    assert not (tmp_path / "cond").exists() and "step" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="threads"):
        train_demo(tmp_path / "x", threads=0)
    assert not (tmp_path / "x").exists()


def test_validation_counts_a_class_only_on_its_own_planted_image(ts):
    # twelve identical samples of class 2's planted digit: a clique of twelve on a planted image
    two = ts.planted_of_class(2)
    x = (ts.images[two : two + 1].float() / 255).repeat(12, 1, 1, 1)
    for cond, want in ((2, True), (None, True), (0, False), (1, False)):
        r = _class_report(x, cond, ts, 0.1, 0.15, 10, (4, 4))  # the SPEC defaults
        assert r.flagged and r.medoid_nearest_index == two and r.medoid_is_planted is want, cond


def test_train_demo_validate_writes_its_report_beside_the_weights(tmp_path, monkeypatch, capsys):
    import memcore.models.train_demo as td

    class Report:
        def to_json(self):
            return {"variant": "uncond", "recall": 1.0}

    seen = []

    def fake_validate(variant, *, model_dir, device):
        seen.append((variant, model_dir))
        return Report()

    monkeypatch.setattr(td, "validate_demo", fake_validate)
    args = ["--out", str(tmp_path), "--variant", "uncond", "--steps", "2", "--batch-size", "4", "--validate"]
    assert td.main(args) == 0
    assert seen == [("uncond", tmp_path / "uncond")]
    assert json.loads((tmp_path / "uncond" / "validation.json").read_text()) == Report().to_json()


def test_an_interrupted_save_is_not_taken_for_a_model(tmp_path, monkeypatch):
    kw = dict(variant="uncond", steps=1, batch_size=4, block_out_channels=(8, 16), log_every=0)
    out = tmp_path / "m"
    train_demo(out, **kw)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no staging folder left
    demo.load_recipe(out)
    moved = []
    real = os.replace

    def replace(src, dst):  # the save killed after its second file is in place
        if len(moved) == 2:
            raise OSError(28, "No space left on device")
        moved.append(Path(dst).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        train_demo(out, seed=1, **kw)
    # new weights beside the old recipe would load as a model: the recipe goes first and comes back last
    assert "recipe.json" not in moved and not (out / "recipe.json").exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        demo.load_recipe(out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
