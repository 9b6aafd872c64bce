"""What a run's report shows, as numbers (``report.json``) and pictures (PNG bytes).

Built from a run folder of ``dosegym align`` or ``dosegym demo``: its ``result.json``
(:func:`dosegym.agents.read_result`) and the doses it kept (:mod:`dosegym.report.saved`).
Each kept case is read again from its reference and scored with the run's card (the exact
card, as the evaluation scores it) for its dose before and after alignment and for its
reference plan. DVHs are cumulative, volume in % of the structure, on a 0.1 Gy dose grid
thinned to at most :data:`DVH_POINTS` points for the JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dosegym.agents.evaluate import mae_to_reference_gy
from dosegym.agents.result import read_result
from dosegym.data.case import Case
from dosegym.envs.cards import CardChooser
from dosegym.envs.sources import CaseSource
from dosegym.report import figures
from dosegym.report.saved import PHASES, read_dose, saved_cases
from dosegym.scorecards.dvh import compute_dvh
from dosegym.scorecards.report import ScoreReport

REPORT_SCHEMA_VERSION = 1
#: Most points of one DVH curve in ``report.json``.
DVH_POINTS = 200
#: The keys of ``result.json`` that ``report.json`` repeats under ``run``.
RUN_KEYS = ("agent", "seed", "samples_trained", "iterations", "wall_s", "device", "scorecard",
            "base_checkpoint", "created_utc", "git_revision")  # fmt: skip
#: The doses of a case, in column order: the two phases, then the reference plan.
DOSE_LABELS = (*PHASES, "reference")


@dataclass
class CaseContent:
    """One kept case: the reports, DVHs and MAE of each dose, and its pictures."""

    case_id: str
    ref: str
    card: str
    scores: dict[str, ScoreReport]
    mae_gy: dict[str, float | None]
    dvh: dict[str, dict[str, dict[str, list[float]]]]
    pictures: dict[str, bytes] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Every number of the case's section of the page."""
        return {
            "case_id": self.case_id,
            "ref": self.ref,
            "card": self.card,
            "scores": {k: v.to_dict() for k, v in self.scores.items()},
            "mae_gy": dict(self.mae_gy),
            "status_changes": status_changes(self.scores.get("before"), self.scores.get("after")),
            "dvh": self.dvh,
        }


@dataclass
class ReportContent:
    """A run's report: the result document, the kept cases and the run's pictures."""

    result: dict[str, Any]
    cases: list[CaseContent]
    pictures: dict[str, bytes] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """``report.json``: every number on the page."""
        r = self.result
        return {
            "report_schema_version": REPORT_SCHEMA_VERSION,
            "run": {k: r.get(k) for k in RUN_KEYS},
            "config": r["config"],
            "packages": r["packages"],
            "summary": {"before": r["before"]["summary"], "after": r["after"]["summary"]},
            "per_case": per_case_rows(r),
            "curves": r["curves"],
            "eval_history": r["eval_history"],
            "cases": [c.to_dict() for c in self.cases],
        }  # fmt: skip


def status_changes(before: ScoreReport | None, after: ScoreReport | None) -> list[dict[str, Any]]:
    """The items whose status differs between two reports of one card: ``{"item", "before", "after"}``."""
    if before is None or after is None:
        return []
    out = []
    for a, b in zip(before.items, after.items, strict=True):
        if a.status != b.status:
            out.append(
                {"item": f"{a.structure} {a.label}", "before": a.status.value, "after": b.status.value}
            )
    return out


def per_case_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per eval case (first seed): points and normalised score before and after, MAE before and
    after, and the items whose status changed (from the result's evaluation entries)."""
    seed = result["after"]["seeds"][0]
    before = {e["case_id"]: e for e in result["before"]["cases"] if e["seed"] == seed}
    rows = []
    for e in result["after"]["cases"]:
        if e["seed"] != seed or e["case_id"] not in before:
            continue
        b = before[e["case_id"]]
        changed = [
            {"item": name, "before": b["items"].get(name), "after": status}
            for name, status in e["items"].items()
            if b["items"].get(name) != status
        ]
        rows.append({
            "case_id": e["case_id"],
            "points_before": b["points"], "points_after": e["points"], "maximum": e["maximum"],
            "score_before": b["normalised"], "score_after": e["normalised"],
            "mae_before_gy": b["mae_gy"], "mae_after_gy": e["mae_gy"],
            "status_changes": changed,
        })  # fmt: skip
    return rows


def _thin(dose: np.ndarray, volume: np.ndarray) -> dict[str, list[float]]:
    step = max(1, int(np.ceil(len(dose) / DVH_POINTS)))
    keep = np.r_[np.arange(0, len(dose), step), len(dose) - 1] if len(dose) else np.arange(0)
    keep = np.unique(keep)
    return {
        "dose_gy": [round(float(v), 3) for v in dose[keep]],
        "volume_pct": [round(float(v), 3) for v in volume[keep]],
    }


def case_content(case: Case, ref: str, card: Any, doses: Mapping[str, np.ndarray]) -> CaseContent:
    """Scores, MAE, DVHs and pictures of one case's ``doses`` (label -> Gy, case grid)."""
    scores = {label: card.score(case, dose) for label, dose in doses.items()}
    structures = card.bind(case, on_unmatched="report").structures()
    dvh: dict[str, dict[str, dict[str, list[float]]]] = {}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for name, (mask, occupancy) in structures.items():
        curves[name] = {}
        for label, dose in doses.items():
            d, _, pct = compute_dvh(
                dose, mask, voxel_volume_cc=case.voxel_volume_cc, occupancy=occupancy
            ).cumulative()
            curves[name][label] = (d, pct)
        dvh[name] = {label: _thin(*c) for label, c in curves[name].items()}
    rx = case.max_prescription_gy or float(max(np.max(d) for d in doses.values()))
    main = max(case.prescriptions, key=lambda p: p.dose_gy).target if case.prescriptions else None
    centre = figures.slice_centre(case.structures.get(main) if main else None, next(iter(doses.values())))
    outlines = {name: mask for name, (mask, _) in structures.items()}
    pictures = {
        "wash": figures.dose_wash(
            doses, outlines, case.grid.spacing_mm, rx, ct=case.ct, body=case.body, centre=centre
        ),
        "dvh": figures.dvh_plot(curves),
    }
    mae = {
        label: (mae_to_reference_gy(case, dose) if label != "reference" else 0.0)
        for label, dose in doses.items()
    }
    return CaseContent(case.case_id, ref, card.name, scores, mae, dvh, pictures)


def build_content(run_dir: str | Path, progress: Callable[[str], None] | None = None) -> ReportContent:
    """The report of the run in ``run_dir`` (its ``result.json`` and kept doses)."""
    run = Path(run_dir)
    result = read_result(run)
    before = {s.case_id: s for s in saved_cases(run, "before")}
    after = {s.case_id: s for s in saved_cases(run, "after")}
    cards = CardChooser(result.get("scorecard"))
    cases = []
    for case_id, saved in before.items():
        if progress is not None:
            progress(case_id)
        case = CaseSource(saved.ref).load(0)
        doses = {"before": read_dose(saved, case)}
        if case_id in after:
            doses["after"] = read_dose(after[case_id], case)
        if case.dose is not None:
            doses["reference"] = case.dose
        cases.append(case_content(case, saved.ref, cards.card_for(case), doses))
    pictures = {
        "curves": figures.run_curves(result["curves"], result["eval_history"]),
        "fidelity": figures.score_vs_fidelity(result["eval_history"]),
    }
    return ReportContent(result, cases, pictures)
