"""``dosegym report RUN_DIR``: render ``report.html`` and ``report.json`` of a saved run.

``RUN_DIR`` is a ``dosegym align`` or ``dosegym demo`` folder (its ``result.json`` and the
doses it kept under ``doses/``). The report goes into ``RUN_DIR`` unless ``--out`` names
another folder.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dosegym.cli._common import console, err_console, friendly_errors


@friendly_errors
def report(
    run_dir: Path = typer.Argument(..., help="A dosegym align / demo run folder."),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for report.html and report.json (default RUN_DIR)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Say which case is being drawn."),
) -> None:
    """Re-render the plan-quality report of a saved run."""
    from dosegym.report import write_report

    def say(case_id: str) -> None:
        if progress:
            err_console.print(f"drawing {case_id}", highlight=False)

    html, js = write_report(run_dir, out, say)
    console.print(f"report: {html} ({js.name} beside it)", soft_wrap=True)
