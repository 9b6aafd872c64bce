"""``dosegym score``: score a dose with a scorecard, or check a card file."""

from __future__ import annotations

import tokenize
from pathlib import Path

import numpy as np
import typer

from dosegym.cli._common import console, err_console, friendly_errors
from dosegym.errors import DataError, ScorecardError


def _read_dose(path: Path, case) -> np.ndarray:
    """A dose in Gy on the case grid, checked by the dose rule (``check_dose_gy``): ``.npy``
    ``(z, y, x)``, or a NIfTI/MHA/NRRD image (resampled linearly onto the case grid when its
    geometry differs; it must then cover the case's targets and most of its body)."""
    from dosegym.data.dose import check_dose_gy

    name = path.name.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such dose file")
    where = f"{path} (--dose)"
    if name.endswith(".npy"):
        try:  # memory-mapped: a header that claims a huge array allocates nothing
            dose = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as exc:  # damaged header
            raise DataError(f"{path}: not a readable .npy array ({exc})") from exc
        if not isinstance(dose, np.ndarray):
            raise DataError(f"{path}: holds an .npz archive, not one .npy array (z, y, x) in Gy")
        if dose.shape != case.grid.shape:
            raise DataError(
                f"{path}: dose shape {dose.shape} does not match the case grid {case.grid.shape} (z, y, x)"
            )
        return check_dose_gy(np.array(dose), where=where, prescription_gy=case.max_prescription_gy)
    from dosegym.data.nifti import COVER_BODY, COVER_TARGET, IMAGE_SUFFIXES, read_image_on_grid

    if not name.endswith(IMAGE_SUFFIXES):
        raise DataError(
            f"{path}: unknown dose file type; use .npy (z, y, x) in Gy or an image "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    cover = [(t, case.structures[t], COVER_TARGET) for t in case.targets]
    if case.body is not None:
        cover.append(("the body", case.body, COVER_BODY))
    dose, resampled = read_image_on_grid(path, case.grid, dose=True, cover=cover)
    if resampled:
        err_console.print(f"note: {path} is not on the case grid; resampled (linear) onto it", soft_wrap=True)
    return check_dose_gy(dose, where=where, prescription_gy=case.max_prescription_gy)


def _validate(card_ref: str) -> None:
    from dosegym.scorecards import ScorecardValidationError, load_card

    try:
        card = load_card(card_ref)
    except ScorecardValidationError as exc:
        err_console.print(f"[bold red]{card_ref}: {len(exc.problems)} problem(s)[/]")
        for p in exc.problems:
            err_console.print(f"  - {p}")
        raise typer.Exit(1) from None
    problems = card.problems()
    if problems:
        err_console.print(f"[bold red]{card_ref}: {len(problems)} problem(s)[/]")
        for p in problems:
            err_console.print(f"  - {p}")
        raise typer.Exit(1)
    total = sum(item.max_score for item in card.items)
    rx = f", Rx {card.prescription_gy:g} Gy / {card.fractions} fx" if card.prescription_gy else ""
    console.print(f"[green]OK[/] {card.name!r}: {len(card.items)} items, maximum {total:g} points{rx}")


@friendly_errors
def score(
    case: str | None = typer.Option(
        None,
        "--case",
        help="The case: any input 'dosegym data info' reads (folder, .npz, 'phantoms:SITE/N').",
    ),
    card: str | None = typer.Option(
        None,
        "--card",
        help="A built-in card name (see --list) or a card file: our .yaml or a Varian MAAS .json.",
    ),
    dose: Path | None = typer.Option(
        None,
        "--dose",
        help="Dose to score instead of the case's own: .npy (z, y, x) in Gy, or NIfTI/MHA/NRRD.",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Where to write the JSON report: a file, or a folder that gets score_<case_id>.json "
        "(default: the current folder).",
    ),
    validate: str | None = typer.Option(
        None,
        "--validate",
        metavar="CARD",
        help="Check a card (name or file) and list every problem; exit 1 if any.",
    ),
    allow_unmatched: bool = typer.Option(
        False, "--allow-unmatched", help="Report items whose structure the case lacks instead of failing."
    ),
    rescale: bool = typer.Option(
        False,
        "--rescale",
        help="Rescale the card to the case's highest prescription first (PlanScoreCard rules).",
    ),
    list_cards: bool = typer.Option(False, "--list", help="List the built-in cards and exit."),
    trusted: bool = typer.Option(False, "--trusted", help="Allow unpickling (GDP-HMM .npz cases)."),
) -> None:
    """Score a dose with a scorecard: print the table and write the JSON report.

    Examples: 'dosegym score --case pt_108/ --card headneck_rtog',
    'dosegym score --validate my_card.yaml'.
    """
    from dosegym.scorecards import available_cards, load_card

    if list_cards:
        for name in available_cards():
            console.print(f"{name:20s} {load_card(name).name}")
        return
    if validate is not None:
        _validate(validate)
        return
    if case is None or card is None:
        raise ScorecardError("give --case and --card (or --validate CARD, or --list)")
    from dosegym.data.atomic import check_output_path

    if out is not None and not out.is_dir():  # before any work (a folder is checked with the name)
        check_output_path(out)
    from dosegym.data import read_case
    from dosegym.data.io import detect_format

    kwargs = {"trusted": trusted} if detect_format(case) == "gdphmm" else {}
    the_case = read_case(case, **kwargs)
    the_card = load_card(card)
    if rescale:
        rx = max(the_case.prescriptions, key=lambda p: p.dose_gy, default=None)
        if rx is None:
            raise ScorecardError(f"--rescale: case {the_case.case_id!r} has no prescription")
        the_card = the_card.rescaled(rx.dose_gy, rx.fractions)
    from dosegym.scorecards.fit import card_fit

    fit = card_fit(the_card, the_case)
    if not fit.ok:
        hint = " (--rescale rescales the card to the case)" if fit.rx_mismatch else ""
        err_console.print(f"warning: {fit.message()}{hint}", soft_wrap=True, markup=False)
    dose_gy = None if dose is None else _read_dose(dose, the_case)
    report = the_card.score(the_case, dose_gy, on_unmatched="report" if allow_unmatched else None)
    console.print(report.table())
    path = check_output_path(Path.cwd() if out is None else out, in_folder=f"score_{the_case.case_id}.json")
    report.to_json(path)
    console.print(
        f"total {report.total:.2f} / {report.maximum:g} ({100 * report.normalised:.1f} %) from "
        f"{100 * report.matched_fraction:.1f} % of the card's {report.card_maximum:g} points; "
        f"report written to {path}",
        soft_wrap=True,
    )
