"""The self-contained ``report.html`` of an extraction run.

Everything is inline (PNG pairs as data URIs, the precision–recall plot as SVG, CSS in a style element), so
the file can be mailed or archived alone. Input is plain data: the records of ``results.jsonl`` and the
``summary.json`` dict, so a report can be rebuilt from any results directory (``write_report(dir)``).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memcore.io.results import atomic_write_bytes, load_results, read_json_file
from memcore.metrics.pr import PRCurve, pr_from_records, ranking_key

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle;font-size:14px}
th{background:#f3f3f3} tr.flag{background:#fff6e0} tr.ext{background:#e6f6e6}
img{image-rendering:pixelated;max-height:160px} .small{color:#666;font-size:12px}
"""


def pr_svg(curve: PRCurve | None, *, width: int = 360, height: int = 280) -> str:
    """The precision–recall curve as an inline SVG (step plot, recall on x, precision on y)."""
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
    if curve is None or not curve.cutoffs or curve.num_positive == 0:
        parts.append(
            f'<text x="{m + w / 2}" y="{m + h / 2}" font-size="12" text-anchor="middle">'
            "no verified extraction: no curve</text>"
        )
    else:
        pts = [(0.0, 1.0)]
        for p, r in zip(curve.precision, curve.recall):
            pts.append((r, pts[-1][1]))
            pts.append((r, p))
        path = " ".join(f"{m + r * w:.1f},{m + (1 - p) * h:.1f}" for r, p in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#c33" stroke-width="2"/>')
        for p, r in zip(curve.precision, curve.recall):
            parts.append(f'<circle cx="{m + r * w:.1f}" cy="{m + (1 - p) * h:.1f}" r="2.5" fill="#c33"/>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v)
        return html.escape(s if len(s) < 120 else s[:117] + "...")
    return html.escape(str(v))


def _img_tag(path: Path) -> str:
    if not path.is_file():
        return '<span class="small">not written</span>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested objects as dotted keys (``scheduler.beta_end``), so none is cut short like a long value."""
    out: list[tuple[str, Any]] = []
    for k, v in sorted(d.items()):
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]
    return out


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in _flat(d))
    return f"<table>{rows}</table>"


def render_report(
    records: Sequence[dict[str, Any]], summary: dict[str, Any], out_dir: str | os.PathLike
) -> str:
    """The report as an HTML string. ``out_dir`` is where image paths in records are relative to."""
    out_dir = Path(out_dir)
    ranked = sorted(
        records, key=lambda r: ranking_key(r.get("flagged", False), r.get("mean_clique_distance"))
    )
    curve = pr_from_records(records)
    counts = summary.get("counts", {})
    head = [
        "<!doctype html><html><head><meta charset='utf-8'><title>memcore extraction report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>memcore extraction report</h1>",
        f"<p>{len(records)} conditions; {counts.get('flagged', 0)} flagged as memorized "
        f"(clique ≥ min_clique)",
    ]
    if counts.get("extracted") is not None:
        head.append(
            f"; {counts.get('extracted')} verified extractions (nearest training image within delta); "
            f"{counts.get('extractions_at_zero_fp', 0)} extractions at zero false positives"
        )
    head.append(".</p>")
    body = ["<h2>Ranked conditions</h2>", "<table><tr>"]
    cols = ["rank", "condition", "flagged", "clique_size", "mean_clique_distance", "medoid_seed"]
    verified = any(r.get("extracted") is not None for r in records)
    if verified:
        cols += ["nearest_train_index", "nearest_train_distance", "extracted", "eidetic_count"]
    body.append("".join(f"<th>{c}</th>" for c in cols) + "<th>generation | training match</th></tr>")
    for i, r in enumerate(ranked):
        cls = "ext" if r.get("extracted") else ("flag" if r.get("flagged") else "")
        cells = [str(i + 1)] + [_fmt(r.get(c)) for c in cols[1:]]
        img = _img_tag(out_dir / r["image"]) if r.get("image") else ""
        body.append(f"<tr class='{cls}'>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{img}</td></tr>")
    body.append("</table>")
    nn = summary.get("nn_extraction")
    if nn:
        body.append("<h2>Unconditional nearest-neighbour extraction (SPEC §3)</h2>")
        body.append(
            f"<p>{nn.get('num_candidates')} candidates against {nn.get('num_train')} training images; "
            f"{len(nn.get('extracted_train_indices', []))} unique training images extracted "
            f"(ratio ≤ 1 with k={nn.get('k')}, alpha={nn.get('alpha')}).</p><table><tr><th>training index</th>"
            "<th>seed</th><th>ratio</th><th>l2</th><th>generation | training image</th></tr>"
        )
        for e in nn.get("extracted", []):
            img = _img_tag(out_dir / e["image"]) if e.get("image") else ""
            body.append(
                f"<tr><td>{e['train_index']}</td><td>{e['seed']}</td><td>{_fmt(e.get('ratio'))}</td>"
                f"<td>{_fmt(e.get('distance'))}</td><td>{img}</td></tr>"
            )
        body.append("</table>")
    elif summary.get("nn_progress"):
        prog = summary["nn_progress"]
        body.append(
            "<h2>Unconditional nearest-neighbour extraction (SPEC §3)</h2>"
            f"<p>In progress: {prog.get('candidates_done')} of {prog.get('candidates_total')} candidates folded in "
            "by the parts present (other shards/ranks still running); <code>memcore merge</code> finishes it "
            "once every part is in.</p>"
        )
    body.append("<h2>Precision–recall of flagged vs extracted over the ranking</h2>")
    body.append(pr_svg(curve))
    if curve is not None:
        body.append(
            f"<p>average precision {_fmt(curve.average_precision)}, {curve.num_positive} extracted conditions, "
            f"{curve.extractions_at_zero_fp} extractions at zero false positives.</p>"
        )
    body.append("<h2>Run parameters</h2>" + _kv_table(summary.get("params", {})))
    if summary.get("timings"):
        body.append("<h2>Timings (seconds)</h2>" + _kv_table(summary["timings"]))
    if summary.get("environment"):
        body.append("<h2>Environment</h2>" + _kv_table(summary["environment"]))
    return "".join(head + body) + "</body></html>\n"


def write_report(
    out_dir: str | os.PathLike,
    records: Sequence[dict[str, Any]] | None = None,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (atomically) from the given or the stored records and summary."""
    out_dir = Path(out_dir)
    if records is None:
        records = load_results(out_dir)
    if summary is None:
        sp = out_dir / "summary.json"
        summary = read_json_file(sp) if sp.exists() else {}
    path = out_dir / "report.html"
    atomic_write_bytes(path, render_report(records, summary, out_dir).encode("utf-8"))
    return path
