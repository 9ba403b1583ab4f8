"""The self-contained ``report.html`` of an extraction run.

Everything is inline (PNG pairs as data URIs, the precision–recall plot as SVG, CSS in a style element), so
the top of the report can be mailed or archived alone. Input is plain data: the records of ``results.jsonl``
and the ``summary.json`` dict, so a report can be rebuilt from any results directory (``write_report(dir)``).

A run can hold 100k conditions or more, and a 512×512 PNG pair weighs about a megabyte: embedding every
pair would make a report of gigabytes that no browser opens (100k 8×8 digit pairs alone made 150 MB). So
the report lists the first ``max_rows`` conditions of the ranking (:data:`MAX_ROWS`), embeds the pairs of the
first ``max_images`` of them (:data:`MAX_IMAGES`) and links the later ones (``images/…``, relative to the
report, so they open beside it in the results directory). The counts, the precision–recall curve and its
figures always cover every record; ``results.jsonl`` holds every record and ``summary.json`` the whole
ranking.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memcore.io.results import atomic_write_bytes, load_results, read_json_file
from memcore.metrics.pr import PRCurve, flagged_precision_recall, pr_from_records, ranking_key

#: Conditions (and NN extractions) listed in the report's tables, from the top of the ranking.
MAX_ROWS = 1000
#: Rows whose PNG pair is embedded as a data URI; later rows link the file instead.
MAX_IMAGES = 100
#: Characters of a prompt shown in the table (the whole prompt is in results.jsonl).
MAX_CONDITION_CHARS = 300
#: Points of the precision–recall curve drawn as markers (beyond that, the step line alone).
MAX_MARKERS = 200

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle;font-size:14px}
td{max-width:40em;overflow-wrap:anywhere}
th{background:#f3f3f3} tr.flag{background:#fff6e0} tr.ext{background:#e6f6e6}
img{image-rendering:pixelated;max-height:160px} .small{color:#666;font-size:12px}
"""


def _no_curve_reason(curve: PRCurve | None) -> str | None:
    if curve is None:
        return "no training data: nothing verified, no curve"
    if not curve.cutoffs:
        return "no condition flagged: no ranking, no curve"
    if curve.num_positive == 0:
        return "no verified extraction: no curve"
    return None


def _straight(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> bool:
    """b lies on the segment a–c, which is vertical or horizontal (not a turn back: its end is a point)."""
    for i, j in ((0, 1), (1, 0)):
        if a[i] == b[i] == c[i] and (b[j] - a[j]) * (c[j] - b[j]) >= 0:
            return True
    return False


def _step_points(curve: PRCurve, m: int, w: int, h: int) -> list[tuple[float, float]]:
    """Pixel vertices of the step plot, rounded to 0.1 px, without repeats or the middle of straight runs:
    a ranking of 100k conditions draws in a few thousand points instead of 200k."""
    pts = [(0.0, 1.0)]
    for p, r in zip(curve.precision, curve.recall):
        pts.append((r, pts[-1][1]))
        pts.append((r, p))
    out: list[tuple[float, float]] = []
    for r, p in pts:
        q = (round(m + r * w, 1), round(m + (1 - p) * h, 1))
        if out and q == out[-1]:
            continue
        if len(out) >= 2 and _straight(out[-2], out[-1], q):
            out[-1] = q  # the middle of a straight run adds nothing
            continue
        out.append(q)
    return out


def pr_svg(curve: PRCurve | None, *, width: int = 360, height: int = 280) -> str:
    """The precision–recall curve as an inline SVG (step plot, recall on x, precision on y).

    With no curve to draw, the plot says why: no verification (``curve`` None), no flagged condition, or no
    extraction. Markers are drawn for at most :data:`MAX_MARKERS` points.
    """
    m = 40
    w, h = width - 2 * m, height - 2 * m
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="precision-recall curve">',
        f'<rect x="{m}" y="{m}" width="{w}" height="{h}" fill="none" stroke="#888"/>',
    ]
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x, y = m + t * w, m + (1 - t) * h
        parts.append(f'<text x="{x:.1f}" y="{m + h + 14}" font-size="10" text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{m - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{m + w / 2}" y="{height - 6}" font-size="12" text-anchor="middle">recall</text>')
    parts.append(
        f'<text x="12" y="{m + h / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 12 {m + h / 2})">precision</text>'
    )
    reason = _no_curve_reason(curve)
    if reason is not None:
        parts.append(
            f'<text x="{m + w / 2}" y="{m + h / 2}" font-size="12" text-anchor="middle">{reason}</text>'
        )
    else:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in _step_points(curve, m, w, h))
        parts.append(f'<polyline points="{path}" fill="none" stroke="#c33" stroke-width="2"/>')
        if len(curve.cutoffs) <= MAX_MARKERS:
            for p, r in zip(curve.precision, curve.recall):
                parts.append(f'<circle cx="{m + r * w:.1f}" cy="{m + (1 - p) * h:.1f}" r="2.5" fill="#c33"/>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: Any, *, exact: bool = False) -> str:
    """A value for a table cell, HTML-escaped. Floats: 4 significant digits, without the exponent that
    ``:.4g`` gives from 10,000 on (a timing of 3 hours read ``1.08e+04``); ``exact``: every digit (run
    parameters, which a reader copies to repeat the run)."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if exact:
            return repr(v)
        return f"{v:.0f}" if 1e4 <= abs(v) < 1e16 else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v, ensure_ascii=False)
        return html.escape(s if len(s) < 120 else s[:117] + "...")
    return html.escape(str(v))


def _condition(v: Any) -> str:
    """A condition for the table: escaped, an empty prompt named, a long prompt cut (the record holds it)."""
    if isinstance(v, str):
        if not v:
            return '<span class="small">(empty)</span>'
        if len(v) > MAX_CONDITION_CHARS:
            return (
                html.escape(v[:MAX_CONDITION_CHARS])
                + f'… <span class="small">({len(v)} characters; whole in results.jsonl)</span>'
            )
    return _fmt(v)


def _img_cell(out_dir: Path, rel: Any, embed: bool) -> str:
    """The PNG pair at ``out_dir / rel``: embedded, linked, or a note naming it when it cannot be read."""
    if not rel:
        return ""
    rel = str(rel)
    path = out_dir / rel
    name = html.escape(rel)
    if not path.is_file():
        return f'<span class="small">missing: {name}</span>'
    if not embed:
        return f'<a href="{html.escape(urllib.parse.quote(rel))}">{name}</a>'
    try:
        data = base64.b64encode(path.read_bytes()).decode()
    except OSError as exc:  # unreadable (permissions, a vanished network file): say so, write the rest
        return f'<span class="small">unreadable: {name} ({html.escape(type(exc).__name__)})</span>'
    return f'<img alt="{name}" src="data:image/png;base64,{data}">'


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested objects as dotted keys (``scheduler.beta_end``), so none is cut short like a long value."""
    out: list[tuple[str, Any]] = []
    for k, v in sorted(d.items()):
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]
    return out


def _kv_table(d: dict[str, Any], *, exact: bool = False) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v, exact=exact)}</td></tr>" for k, v in _flat(d)
    )
    return f"<table>{rows}</table>"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _more(shown: int, total: int, what: str, where: str) -> str:
    if total <= shown:
        return ""
    return f"<p class='small'>The first {shown} of {total} {what} are listed; the other {total - shown} are in {where}.</p>"


def _headline(records: Sequence[dict[str, Any]], summary: dict[str, Any], curve: PRCurve | None) -> str:
    """The counts, from the records themselves (a missing or stale summary cannot make them disagree with
    the table), and the run's progress when the summary knows how many conditions it has."""
    n = len(records)
    total = (summary.get("counts") or {}).get("conditions_total")
    if isinstance(total, int) and total > n:
        done = f"{n} of {total} conditions done (the run is partial: still running, stopped, or a shard)"
    else:
        done = f"{n} conditions"
    flagged = sum(bool(r.get("flagged")) for r in records)
    s = f"<p>{done}; {flagged} flagged as memorized (clique ≥ min_clique)"
    if curve is None:
        s += "; no training data, so nothing verified as extracted"
    else:
        s += (
            f"; {_n(curve.num_positive, 'verified extraction')} (nearest training image within delta); "
            f"{_n(curve.extractions_at_zero_fp, 'extraction')} at zero false positives"
        )
    return s + ".</p>"


def render_report(
    records: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    max_rows: int = MAX_ROWS,
    max_images: int = MAX_IMAGES,
) -> str:
    """The report as an HTML string.

    Args:
        records: the run's condition records (``results.jsonl``).
        summary: the run's ``summary.json`` dict (may be empty: the counts come from ``records``).
        out_dir: where image paths in records are relative to.
        max_rows: conditions (and NN extractions) listed, from the top of the ranking.
        max_images: of those, the rows whose PNG pair is embedded; later rows link it.
    """
    out_dir = Path(out_dir)
    ranked = sorted(
        records, key=lambda r: ranking_key(r.get("flagged", False), r.get("mean_clique_distance"))
    )
    curve = pr_from_records(records)
    head = [
        "<!doctype html><html><head><meta charset='utf-8'><title>memcore extraction report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>memcore extraction report</h1>",
        _headline(records, summary, curve),
    ]
    body = ["<h2>Ranked conditions</h2>", "<table><tr>"]
    cols = ["rank", "condition", "flagged", "clique_size", "mean_clique_distance", "medoid_seed"]
    if curve is not None:
        cols += ["nearest_train_index", "nearest_train_distance", "extracted", "eidetic_count"]
    body.append("".join(f"<th>{c}</th>" for c in cols) + "<th>generation | training match</th></tr>")
    for i, r in enumerate(ranked[:max_rows]):
        cls = "ext" if r.get("extracted") else ("flag" if r.get("flagged") else "")
        cells = [str(i + 1), _condition(r.get("condition"))] + [_fmt(r.get(c)) for c in cols[2:]]
        img = _img_cell(out_dir, r.get("image"), i < max_images)
        body.append(f"<tr class='{cls}'>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{img}</td></tr>")
    body.append("</table>")
    body.append(
        _more(
            min(max_rows, len(ranked)),
            len(ranked),
            "conditions of the ranking",
            "results.jsonl (summary.json holds the whole ranking)",
        )
    )
    nn = summary.get("nn_extraction")
    if nn:
        ext = nn.get("extracted") or []
        body.append("<h2>Unconditional nearest-neighbour extraction (SPEC §3)</h2>")
        body.append(
            f"<p>{_fmt(nn.get('num_candidates'))} candidates against {_fmt(nn.get('num_train'))} training "
            f"images; {len(nn.get('extracted_train_indices') or [])} unique training images extracted "
            f"(ratio ≤ 1 with k={_fmt(nn.get('k'))}, alpha={_fmt(nn.get('alpha'))}).</p><table><tr>"
            "<th>training index</th><th>seed</th><th>ratio</th><th>l2</th><th>generation | training image</th></tr>"
        )
        for i, e in enumerate(ext[:max_rows]):
            img = _img_cell(out_dir, e.get("image"), i < max_images)
            body.append(
                f"<tr><td>{_fmt(e.get('train_index'))}</td><td>{_fmt(e.get('seed'))}</td>"
                f"<td>{_fmt(e.get('ratio'))}</td><td>{_fmt(e.get('distance'))}</td><td>{img}</td></tr>"
            )
        body.append("</table>")
        body.append(_more(min(max_rows, len(ext)), len(ext), "extracted training images", "summary.json"))
    elif summary.get("nn_progress"):
        prog = summary["nn_progress"]
        body.append(
            "<h2>Unconditional nearest-neighbour extraction (SPEC §3)</h2>"
            f"<p>In progress: {_fmt(prog.get('candidates_done'))} of {_fmt(prog.get('candidates_total'))} "
            "candidates folded in by the parts present (other shards/ranks still running); "
            "<code>memcore merge</code> finishes it once every part is in.</p>"
        )
    body.append("<h2>Precision–recall of flagged vs extracted over the ranking</h2>")
    body.append(pr_svg(curve))
    if curve is not None:
        fp, fr = flagged_precision_recall(
            [bool(r.get("flagged")) for r in records if r.get("extracted") is not None],
            [bool(r["extracted"]) for r in records if r.get("extracted") is not None],
        )
        body.append(
            f"<p>Flagged conditions ranked by mean clique distance (lower first), against every verified "
            f"condition: precision {_fmt(fp)} and recall {_fmt(fr)} of the flagged set; average precision "
            f"{_fmt(curve.average_precision)}; {_n(curve.num_positive, 'extracted condition')}; "
            f"{_n(curve.extractions_at_zero_fp, 'extraction')} at zero false positives.</p>"
        )
    body.append("<h2>Run parameters</h2>" + _kv_table(summary.get("params") or {}, exact=True))
    if summary.get("timings"):
        body.append("<h2>Timings (seconds)</h2>" + _kv_table(summary["timings"]))
    if summary.get("environment"):
        body.append("<h2>Environment</h2>" + _kv_table(summary["environment"]))
    return "".join(head + body) + "</body></html>\n"


def write_report(
    out_dir: str | os.PathLike,
    records: Sequence[dict[str, Any]] | None = None,
    summary: dict[str, Any] | None = None,
    *,
    max_rows: int = MAX_ROWS,
    max_images: int = MAX_IMAGES,
) -> Path:
    """Write ``out_dir/report.html`` (atomically) from the given or the stored records and summary.

    Raises:
        ValueError: ``out_dir`` is not an existing directory, or (records not given) holds no results, or its
            ``summary.json`` is not a JSON object; nothing is written then.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is not a results directory (no such directory)")
    if records is None:
        if not any((out_dir / f).exists() for f in ("results.jsonl", "params.json", "parts")):
            raise ValueError(
                f"{out_dir} is not a memcore results directory (no results.jsonl or params.json)"
            )
        records = load_results(out_dir)
    if summary is None:
        sp = out_dir / "summary.json"
        summary = read_json_file(sp) if sp.exists() else {}
        if not isinstance(summary, dict):
            raise ValueError(f"{sp} is corrupt (not a JSON object); restore it or remove it")
    path = out_dir / "report.html"
    html_text = render_report(records, summary, out_dir, max_rows=max_rows, max_images=max_images)
    atomic_write_bytes(path, html_text.encode("utf-8"))
    return path
