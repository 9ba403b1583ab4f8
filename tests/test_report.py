"""report.html and the PNG pairs: counts, escaping, missing images, size at scale, bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from memcore.metrics import precision_recall
from memcore.report import html as H
from memcore.report.html import pr_svg, render_report, write_report
from memcore.report.images import pair_image, save_pair


def rec(i: int, flagged: bool, dist: float | None, extracted: bool | None = None, **kw) -> dict:
    r = {
        "condition_id": i,
        "condition": f"prompt {i}",
        "flagged": flagged,
        "clique_size": 12 if flagged else 2,
        "medoid_seed": 1000 + i,
        "mean_clique_distance": dist,
        "nearest_train_index": None if extracted is None else i,
        "nearest_train_distance": None if extracted is None else 0.05,
        "extracted": extracted,
        "eidetic_count": None if extracted is None else 1,
        "image": None,
    }
    r.update(kw)
    return r


def results_dir(tmp_path: Path, records: list[dict]) -> Path:
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_counts_come_from_the_records(tmp_path):
    # no summary.json (a run killed before its end, or write_report(dir) on a copied directory): the
    # headline said "0 flagged" above a table of flagged conditions and left the extractions out
    d = results_dir(
        tmp_path, [rec(0, True, 0.02, True), rec(1, False, 0.01, True), rec(2, True, 0.03, False)]
    )
    text = write_report(d).read_text("utf-8")
    head = re.search(r"<h1>.*?</h1><p>(.*?)</p>", text).group(1)
    assert "3 conditions; 2 flagged" in head
    assert "2 verified extractions" in head and "1 extraction at zero false positives" in head
    # a partial run says so, from the summary's total
    text = render_report([rec(0, True, 0.02)], {"counts": {"conditions_total": 10}}, tmp_path)
    assert "1 of 10 conditions done" in text and "no training data" in text


def test_prompts_are_escaped_and_long_ones_cut(tmp_path):
    evil = "<script>alert(\"x\")</script> & 'q' \u00fc\u6f22\U0001f600"
    long = "a" * 100_000
    text = render_report(
        [rec(0, True, 0.01, condition=evil), rec(1, True, 0.02, condition=long)], {}, tmp_path
    )
    assert "<script>" not in text
    assert (
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27; \u00fc\u6f22\U0001f600" in text
    )
    text.encode("utf-8")  # non-ASCII survives as UTF-8 (the page declares it)
    assert "a" * H.MAX_CONDITION_CHARS + "…" in text and "a" * (H.MAX_CONDITION_CHARS + 1) not in text
    assert "100000 characters" in text
    assert len(text) < 20_000
    # an empty condition (an unconditional model) is named, not an empty cell
    assert "(empty)" in render_report([rec(0, True, 0.01, condition="")], {}, tmp_path)


def test_missing_and_unreadable_images_are_named(tmp_path, monkeypatch):
    save_pair(tmp_path / "images" / "ok.png", torch.zeros(1, 8, 8, dtype=torch.uint8))
    rows = [
        rec(0, True, 0.01, image="images/gone.png"),
        rec(1, True, 0.02, image="images/ok.png"),
        rec(2, True, 0.03, image="images/bad.png"),
    ]
    (tmp_path / "images" / "bad.png").write_bytes(b"x")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "bad.png":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    text = render_report(rows, {}, tmp_path)
    assert "missing: images/gone.png" in text
    assert "unreadable: images/bad.png (PermissionError)" in text
    assert text.count("data:image/png;base64,") == 1


def test_a_huge_run_stays_a_usable_size(tmp_path):
    # every PNG pair embedded made 150 MB of HTML for 100k 8x8 digit conditions (gigabytes at 512x512)
    save_pair(tmp_path / "images" / "p.png", torch.zeros(1, 8, 8, dtype=torch.uint8))
    n = H.MAX_ROWS + 500
    rows = [rec(i, i % 3 == 0, i / n, i % 2 == 0, image="images/p.png") for i in range(n)]
    text = render_report(rows, {}, tmp_path)
    assert text.count("data:image/png;base64,") == H.MAX_IMAGES
    assert text.count('<a href="images/p.png">') == H.MAX_ROWS - H.MAX_IMAGES
    assert text.count("<tr class=") == H.MAX_ROWS
    assert f"The first {H.MAX_ROWS} of {n} conditions" in text
    # the counts still cover every record
    assert f"{n} conditions; {sum(r['flagged'] for r in rows)} flagged" in text
    assert len(text) < 2_000_000
    small = render_report(rows[:10], {}, tmp_path, max_rows=4, max_images=2)
    assert small.count("data:image/png;base64,") == 2 and small.count("<tr class=") == 4


def test_pr_plot_says_why_there_is_no_curve(tmp_path):
    # the plot said "no verified extraction" for a run with no training data or nothing flagged
    assert "no training data" in pr_svg(None)
    text = render_report([rec(0, False, 0.01, True)], {}, tmp_path)
    assert "no condition flagged" in text
    assert "no verified extraction" in render_report([rec(0, True, 0.01, False)], {}, tmp_path)
    assert "<polyline" in render_report([rec(0, True, 0.01, True)], {}, tmp_path)


def test_pr_plot_of_a_long_ranking_is_small_and_faithful():
    rng = np.random.default_rng(0)
    keys = rng.random(8_000)
    curve = precision_recall(keys, rng.random(8_000) < 1.2 - keys)
    svg = pr_svg(curve)
    assert len(svg) < 200_000 and "<circle" not in svg  # 16k vertices and 8k markers before
    pts = np.array(
        [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]*)"', svg).group(1).split()]
    )
    assert len(pts) < len(curve.cutoffs)  # merged: a vertex per 0.1 px at most
    a, b = pts[:-1], pts[1:]
    assert ((a[:, 0] == b[:, 0]) | (a[:, 1] == b[:, 1])).all()  # a step plot: axis-aligned segments
    # every point of the curve lies on the drawn line (to the 0.1 px it is rounded to): no dip was cut off
    m, w, h = 40, 280, 200
    x = np.round(m + np.array(curve.recall) * w, 1)[:, None]
    y = np.round(m + (1 - np.array(curve.precision)) * h, 1)[:, None]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    on_v = (
        (a[:, 0] == b[:, 0]) & (np.abs(x - a[:, 0]) < 1e-6) & (y >= lo[:, 1] - 1e-6) & (y <= hi[:, 1] + 1e-6)
    )
    on_h = (
        (a[:, 1] == b[:, 1]) & (np.abs(y - a[:, 1]) < 1e-6) & (x >= lo[:, 0] - 1e-6) & (x <= hi[:, 0] + 1e-6)
    )
    assert (on_v | on_h).any(axis=1).all()


def test_numbers_and_missing_fields(tmp_path):
    summary = {
        "params": {"alpha": 0.123456789, "scheduler": {"beta_end": 0.012}},
        "timings": {"total": 12345.6},
    }
    rows = [rec(0, True, math.nan, True, nearest_train_distance=None), rec(1, True, None, False)]
    rows[1].pop("eidetic_count")
    text = render_report(rows, summary, tmp_path)
    assert "<th>alpha</th><td>0.123456789</td>" in text  # run parameters whole, not 0.1235
    assert "<th>scheduler.beta_end</th><td>0.012</td>" in text
    assert "<th>total</th><td>12346</td>" in text  # not 1.235e+04
    assert ">nan<" not in text.lower()
    assert text.count("<td>–</td>") >= 3


def test_bad_directories_are_refused_and_nothing_written(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        write_report(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()  # it was created, holding the report of an empty run
    with pytest.raises(ValueError, match="not a memcore results directory"):
        write_report(tmp_path)
    d = results_dir(tmp_path, [rec(0, True, 0.01)])
    (d / "summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"summary.json is corrupt \(not a JSON object\)"):
        write_report(d)
    assert not (d / "report.html").exists()


def test_pair_images_refuse_integer_images_other_than_uint8():
    a = torch.full((3, 8, 8), 200, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"uint8 .* or float in \[0, 1\], got torch.int64"):
        pair_image(a)  # it came out white: clamped to [0, 1] as if float
    p = pair_image(a.to(torch.uint8), torch.ones(1, 8, 8))
    assert p.shape == (128, 16 * 8 + 16 * 4 + 16 * 8, 3)
    assert p[0, 0].tolist() == [200] * 3 and p[0, -1].tolist() == [255] * 3
