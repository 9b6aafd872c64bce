"""Plan-quality reports of alignment runs: ``report.html`` (one self-contained page) and
``report.json`` (every number on it), from a ``dosegym align`` / ``dosegym demo`` run folder.

::

    from dosegym.report import write_report
    html_path, json_path = write_report("runs/demo")     # into the run folder

A run keeps the doses of its first eval cases (:mod:`dosegym.report.saved`); the report reads
those cases again, scores each dose with the run's card and draws the pictures
(:mod:`dosegym.report.figures`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dosegym.data.atomic import atomic_path, json_text
from dosegym.report.content import ReportContent, build_content
from dosegym.report.html import render_html
from dosegym.report.saved import write_doses

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"

__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "ReportContent",
    "build_content",
    "render_html",
    "write_doses",
    "write_report",
]


def write_report(
    run_dir: str | Path, out: str | Path | None = None, progress: Callable[[str], None] | None = None
) -> tuple[Path, Path]:
    """Render the report of ``run_dir`` into ``out`` (default ``run_dir``), atomically; returns
    the paths of ``report.html`` and ``report.json``."""
    content = build_content(run_dir, progress)
    dest = Path(out) if out is not None else Path(run_dir)
    html, js = dest / REPORT_HTML, dest / REPORT_JSON
    with atomic_path(js) as tmp:
        tmp.write_text(json_text(content.to_dict()), encoding="utf-8")
    with atomic_path(html) as tmp:
        tmp.write_text(render_html(content), encoding="utf-8")
    return html, js
