"""End to end on the bundled demo model: the planted duplicated digits are flagged and verified, the
unconditional NN extraction finds the planted images, and memcore agrees with the reference path."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from memcore.attacks import carlini

demo = pytest.importorskip("memcore.models.demo")


def _weights_or_skip(variant: str):
    try:
        return demo.demo_model_dir(variant)
    except FileNotFoundError as exc:  # the weights are committed by the demo branch
        pytest.skip(str(exc))


# Fewer candidates and steps than `memcore demo` (100 per digit, 50 steps) to keep CI time low; the
# thresholds are the SPEC defaults (alpha 0.1 on a 4x4 tiled L2, min_clique 10, delta 0.15).
N, STEPS = 40, 25


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    d = _weights_or_skip("cond")
    ts = demo.demo_training_set("cond")
    planted = dict(zip(ts.planted_classes, ts.planted))
    others = [c for c in range(10) if c not in planted][:2]
    conds = others[:1] + sorted(planted) + others[1:]  # the first two: one non-planted, one planted
    cfg = carlini.ExtractConfig(num_per_condition=N, num_inference_steps=STEPS, batch_size=N)
    out = tmp_path_factory.mktemp("demo_cond")
    res = carlini.extract(d, conds, config=cfg, train=ts.images, out=out, device="cpu")
    return res, planted, others, cfg, d, ts, conds


def test_planted_digits_flagged_and_verified(cond_run):
    res, planted, others, *_ = cond_run
    by_class = {int(r.condition): r for r in res.conditions}
    found = [c for c in planted if by_class[c].flagged and by_class[c].extracted
             and by_class[c].nearest_train_index == planted[c]]  # fmt: skip
    assert len(found) / len(planted) >= 0.8, {
        c: (r.clique_size, r.nearest_train_distance) for c, r in by_class.items()
    }
    false_pos = [c for c in others if by_class[c].flagged]
    assert not false_pos
    s = res.summary
    assert s["counts"]["flagged"] >= len(found)
    assert s["precision_recall"]["flagged_precision"] > 0.5


def test_reference_path_agrees_on_flagged_set(cond_run):
    res, _, _, cfg, d, ts, conds = cond_run
    # the reference path (diffusers loop + naive torch distances + networkx) on the first two conditions:
    # same positions, hence the same seeds
    ref_cfg = dataclasses.replace(cfg, sampler="reference", backend="reference")
    ref = carlini.extract(d, conds[:2], config=ref_cfg, train=ts.images, device="cpu")
    for r, m in zip(ref.conditions, res.conditions[:2]):
        assert (m.flagged, m.clique_size, m.clique_members, m.medoid_index, m.nearest_train_index) == (
            r.flagged,
            r.clique_size,
            r.clique_members,
            r.medoid_index,
            r.nearest_train_index,
        )
    assert [r.flagged for r in ref.conditions] == [False, True]


def test_unconditional_nn_extraction_finds_planted(tmp_path):
    d = _weights_or_skip("uncond")
    ts = demo.demo_training_set("uncond")
    cfg = carlini.ExtractConfig(
        num_per_condition=N, nn_candidates=150, num_inference_steps=STEPS, batch_size=50
    )
    res = carlini.extract(d, None, config=cfg, train=ts.images, out=tmp_path, device="cpu")
    ext = set(res.nn.extracted_train_indices)
    planted = set(ts.planted)
    assert len(ext & planted) / len(planted) >= 0.6, (sorted(ext), sorted(planted))
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["extracted_train_indices"]) == ext
    assert torch.is_tensor(ts.images)


def test_demo_command_small(tmp_path, capsys):
    """`memcore demo` end to end at small sizes (the full-size run is the README's 3-minute main job)."""
    _weights_or_skip("cond")
    from memcore.cli import main

    assert main(["demo", "--out", str(tmp_path), "-n", "30", "--nn-candidates", "60", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "planted duplicated digits" in out and "recall" in out and "false positives" in out
    rep = json.loads((tmp_path / "demo.json").read_text())
    assert set(rep["found_classes"]) <= set(rep["planted_classes"])
    for sub in ("", "conditional/", "unconditional/"):
        assert (tmp_path / f"{sub}report.html").is_file()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--steps", "0"], "num_inference_steps must be an integer >= 1, got 0"),  # 0 is not "the default"
        (["-n", "0"], "num_per_condition must be an integer >= 1, got 0"),
        (["--nn-candidates", "0"], "nn_candidates must be an integer >= 1, got 0"),  # before the first attack
    ],
)
def test_demo_bad_options_write_nothing(tmp_path, capsys, extra, match):
    from memcore.cli import main

    out = tmp_path / "d"
    assert main(["demo", "--out", str(out), *extra]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()
    afile = tmp_path / "f"
    afile.write_text("")
    assert main(["demo", "--out", str(afile)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
