"""Reports of an extraction run: PNG pairs (generation | training match) and a self-contained report.html."""

from __future__ import annotations

from memcore.report.html import pr_svg, render_report, write_report
from memcore.report.images import pair_image, save_pair

__all__ = ["pair_image", "pr_svg", "render_report", "save_pair", "write_report"]
