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

    argv = ["demo", "--out", str(tmp_path), "-n", "30", "--nn-candidates", "60", "--steps", "10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "planted duplicated digits" in out and "recall" in out and "false positives" in out
    # it says what it measured, with the thresholds, and that these are not the demo's own settings
    assert "NOT the demo defaults" in out and "30 candidates per digit 0-9, 60 unconditional" in out
    assert ">= 10 candidates within tiled L2 0.1 (4x4 grid)" in out and "within L2 0.15" in out
    rep = json.loads((tmp_path / "demo.json").read_text())
    assert set(rep["found_classes"]) <= set(rep["planted_classes"])
    assert rep["settings"]["num_per_condition"] == 30 and rep["settings"]["nn_candidates"] == 60
    for sub in ("", "conditional/", "unconditional/"):
        assert (tmp_path / f"{sub}report.html").is_file()
    assert rep["resumed"] == [] and "earlier run" not in out
    # the same command again resumes the folder; other settings are refused before either attack runs
    # (the NN part's were refused only after the generate-and-filter part had run and rewritten its files)
    assert main(argv) == 0
    again = json.loads((tmp_path / "demo.json").read_text())
    assert again["found_classes"] == rep["found_classes"]
    # its time is the resume's own few seconds: it says so instead of passing them off as the demo's
    assert again["resumed"] == ["conditional", "unconditional"]
    assert "this run only: conditional and unconditional went on from an earlier run's results" in (
        capsys.readouterr().out
    )
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert main([*argv, "--nn-candidates", "80"]) == 2  # the last --nn-candidates wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nn_candidates 60 there, 80 now" in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_demo_refuses_a_folder_of_other_results(tmp_path, capsys):
    from memcore.cli import main

    (tmp_path / "report.html").write_text("someone else's report")
    (tmp_path / "results.jsonl").write_text("")
    # small sizes: run, the demo would overwrite report.html in seconds
    assert main(["demo", "--out", str(tmp_path), "-n", "12", "--nn-candidates", "12", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a memcore demo's (results.jsonl)" in err
    assert (tmp_path / "report.html").read_text() == "someone else's report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.jsonl"]


def test_demo_report_lines_at_the_defaults():
    from memcore.attacks import demo as ademo

    s = ademo._settings(carlini.ExtractConfig(num_per_condition=100), 500)
    rep = ademo.DemoReport(
        planted_classes=(0, 2),
        planted_indices=(5, 7),
        found_classes=(0,),
        recall=0.5,
        false_positive_classes=(3,),
        nn_found=(5,),
        nn_recall=0.5,
        nn_false_positives=(9,),
        seconds={"total": 1.0, "conditional": 0.5, "unconditional": 0.5},
        out="d",
        settings=s,
    )
    text = "\n".join(rep.lines())
    assert "NOT the demo defaults" not in text and "100 candidates per digit 0-9, 500 unconditional" in text
    assert "recall 0.50 (BELOW the 0.8 target" in text and "[3]" in text and "[9]" in text


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


def test_demo_runs_whole_under_a_torchrun_environment(tmp_path, monkeypatch):
    # a shard of the conditions would be scored against every planted digit: the demo is one whole run
    from memcore.attacks import demo

    seen = []

    class Stop(Exception):
        pass

    def fake_extract(*args, shard=None, **kwargs):
        seen.append(shard)
        raise Stop

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(carlini, "extract", fake_extract)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path / "d", num_per_condition=12, nn_candidates=20, steps=3)
    assert seen == [carlini._results.ShardSpec(0, 1)]
