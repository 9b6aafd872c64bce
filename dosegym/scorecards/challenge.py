"""Challenge metrics, computed exactly as the organisers' evaluation code does.

OpenKBP (Babier et al., Med. Phys. 48:5549, 2021; ``provided_code/dose_evaluation_class.py``):

* **dose score** of a patient: ``sum(|ref - pred|)`` over **all** voxels of the grid divided by
  the number of voxels in ``possible_dose_mask`` (the organisers' code does not mask the
  sum; their predictions are zero outside the mask). The data-set score is the mean over
  patients.
* **DVH metrics** on each structure present, from its voxel doses: OARs ``D_0.1_cc`` =
  ``np.percentile(doses, 100 - n / N * 100)`` with ``N`` the voxel count and
  ``n = max(1, round(100 / voxel_volume_mm3))``, and ``mean``; targets ``D_99``, ``D_95``,
  ``D_1`` = ``np.percentile`` at 1, 5 and 99 (numpy's default linear interpolation).
* **DVH score**: the mean of ``|ref - pred|`` over every (patient, metric, structure) entry
  that exists, pooled over patients (``np.nanmean`` of the whole difference table).

GDP-HMM (AAPM 2025, ``evaluation.ipynb``): the reference is rescaled so that D97 of the
high target (its ``OPTName`` mask) equals that target's ``PDose``:
``ref *= PDose / (np.percentile(ref[opt_mask], 3) + 1e-5)``; the MAE is ``mean(|ref - pred|)`` over
the voxels where the rescaled **reference > 5 Gy** (``mask="organisers"``, the default; this
is what the organisers' code computes). ``mask="union_body"`` gives the variant stated in our
issue: voxels where ``(ref > 5 Gy or pred > 5 Gy)`` inside the body. Predictions are taken as
already normalised like the reference.

Doses in Gy, arrays ``(z, y, x)``; computations in ``float64`` (the organisers read the
CSVs with pandas as float64).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dosegym.data.case import Case
from dosegym.data.openkbp import OPENKBP_OARS, OPENKBP_TARGETS
from dosegym.errors import ScorecardError

OAR_METRICS = ("D_0.1_cc", "mean")
TARGET_METRICS = ("D_99", "D_95", "D_1")
GDPHMM_THRESHOLD_GY = 5.0
#: the organisers add 1e-5 to the D97 they divide by
GDPHMM_D97_EPS_GY = 1e-5


def _as_dose(case: Case, dose: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(dose)
    if arr.shape != case.grid.shape:
        raise ScorecardError(
            f"{case.source}: {what} has shape {arr.shape}; expected the case grid {case.grid.shape}"
        )
    arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ScorecardError(f"{case.source}: {what} contains NaN: refusing to score")
    return arr


def _reference(case: Case) -> np.ndarray:
    if case.dose is None:
        raise ScorecardError(f"{case.source}: the case has no reference dose to score against")
    return _as_dose(case, case.dose, "reference dose")


def openkbp_dose_score(case: Case, pred: np.ndarray) -> float:
    """OpenKBP dose score of one patient (Gy): ``sum|ref - pred|`` over the grid divided by
    the number of voxels in the possible-dose mask (``case.body``)."""
    if case.body is None:
        raise ScorecardError(f"{case.source}: the case has no possible_dose_mask (body)")
    ref = _reference(case)
    p = _as_dose(case, pred, "prediction")
    return float(np.sum(np.abs(ref - p)) / np.sum(case.body))


def openkbp_dvh_metrics(case: Case, dose: np.ndarray) -> dict[tuple[str, str], float]:
    """The OpenKBP DVH points of ``dose`` for ``case``: ``{(metric, structure): Gy}``."""
    d = _as_dose(case, dose, "dose")
    voxel_mm3 = float(np.prod(case.grid.spacing_mm))
    voxels_in_tenth_of_cc = max(1.0, float(np.round(100.0 / voxel_mm3)))
    out: dict[tuple[str, str], float] = {}
    for roi in OPENKBP_OARS + OPENKBP_TARGETS:
        mask = case.structures.get(roi)
        if mask is None or not mask.any():
            continue
        roi_dose = d[mask]
        if roi in OPENKBP_OARS:
            fractional = 100.0 - voxels_in_tenth_of_cc / roi_dose.size * 100.0
            out[("D_0.1_cc", roi)] = float(np.percentile(roi_dose, fractional))
            out[("mean", roi)] = float(roi_dose.mean())
        else:
            out[("D_99", roi)] = float(np.percentile(roi_dose, 1))
            out[("D_95", roi)] = float(np.percentile(roi_dose, 5))
            out[("D_1", roi)] = float(np.percentile(roi_dose, 99))
    return out


def openkbp_dvh_errors(case: Case, pred: np.ndarray) -> dict[tuple[str, str], float]:
    """``|ref - pred|`` of every OpenKBP DVH point of one patient (Gy)."""
    ref = openkbp_dvh_metrics(case, _reference(case))
    new = openkbp_dvh_metrics(case, pred)
    return {key: abs(ref[key] - new[key]) for key in ref}


def openkbp_dvh_score(case: Case, pred: np.ndarray) -> float:
    """OpenKBP DVH score of one patient: mean ``|ref - pred|`` over its DVH points (Gy)."""
    errors = openkbp_dvh_errors(case, pred)
    if not errors:
        raise ScorecardError(f"{case.source}: no OpenKBP structure to compute DVH points on")
    return float(np.mean(list(errors.values())))


@dataclass(frozen=True)
class OpenKBPScores:
    """Data-set OpenKBP scores (Gy) and the per-patient pieces they come from."""

    dose_score: float
    dvh_score: float
    dose_scores: dict[str, float]
    dvh_errors: dict[str, dict[tuple[str, str], float]]


def openkbp_scores(pairs: Iterable[tuple[Case, np.ndarray]]) -> OpenKBPScores:
    """Aggregate over ``(case, prediction)`` pairs as the organisers do: dose score = mean of the
    per-patient dose scores; DVH score = mean over all (patient, metric, structure) entries."""
    dose_scores: dict[str, float] = {}
    dvh_errors: dict[str, dict[tuple[str, str], float]] = {}
    for case, pred in pairs:
        if case.case_id in dose_scores:
            raise ScorecardError(f"{case.source}: patient {case.case_id!r} appears twice")
        dose_scores[case.case_id] = openkbp_dose_score(case, pred)
        dvh_errors[case.case_id] = openkbp_dvh_errors(case, pred)
    if not dose_scores:
        raise ScorecardError("openkbp_scores needs at least one (case, prediction) pair")
    entries = [e for errs in dvh_errors.values() for e in errs.values()]
    return OpenKBPScores(
        dose_score=float(np.mean(list(dose_scores.values()))),
        dvh_score=float(np.mean(entries)) if entries else float("nan"),
        dose_scores=dose_scores,
        dvh_errors=dvh_errors,
    )


def gdphmm_normalise_reference(
    ref_gy: np.ndarray, high_target_mask: np.ndarray, high_rx_gy: float
) -> np.ndarray:
    """Rescale a GDP-HMM reference so that D97 of the high target (``OPTName`` mask) is its
    prescription: ``ref * rx / (np.percentile(ref[mask], 3) + 1e-5)`` (the organisers'
    expression, 1e-5 included)."""
    ref = np.asarray(ref_gy, dtype=np.float64)
    m = np.asarray(high_target_mask)
    if m.shape != ref.shape or m.dtype != bool:
        raise ScorecardError(
            f"high_target_mask must be a bool array of the dose shape {ref.shape}, got {m.dtype} {m.shape}"
        )
    if not m.any():
        raise ScorecardError("high_target_mask (the PTV_High OPTName structure) is empty")
    if not high_rx_gy > 0:
        raise ScorecardError(f"high_rx_gy (PTV_High PDose) must be > 0 Gy, got {high_rx_gy}")
    d97 = float(np.percentile(ref[m], 3))
    if not d97 > 0:
        raise ScorecardError("the reference D97 of the high target is 0 Gy: cannot normalise")
    return ref * (float(high_rx_gy) / (d97 + GDPHMM_D97_EPS_GY))


def gdphmm_mae(
    ref_gy: np.ndarray,
    pred_gy: np.ndarray,
    high_target_mask: np.ndarray,
    high_rx_gy: float,
    *,
    body: np.ndarray | None = None,
    mask: Literal["organisers", "union_body"] = "organisers",
) -> float:
    """GDP-HMM MAE (Gy) of a prediction against a reference (see the module docstring).

    ``mask="organisers"`` (default): voxels where the normalised reference exceeds 5 Gy.
    ``mask="union_body"``: voxels where either dose exceeds 5 Gy, inside ``body`` (required).
    """
    ref = gdphmm_normalise_reference(ref_gy, high_target_mask, high_rx_gy)
    pred = np.asarray(pred_gy, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ScorecardError(f"prediction shape {pred.shape} differs from the reference {ref.shape}")
    if np.isnan(pred).any():
        raise ScorecardError("prediction contains NaN: refusing to score")
    if mask == "organisers":
        sel = ref > GDPHMM_THRESHOLD_GY
    elif mask == "union_body":
        if body is None:
            raise ScorecardError('mask="union_body" needs the body mask')
        b = np.asarray(body)
        if b.shape != ref.shape or b.dtype != bool:
            raise ScorecardError(f"body must be a bool array of shape {ref.shape}")
        sel = ((ref > GDPHMM_THRESHOLD_GY) | (pred > GDPHMM_THRESHOLD_GY)) & b
    else:
        raise ScorecardError(f"mask must be 'organisers' or 'union_body', got {mask!r}")
    if not sel.any():
        raise ScorecardError("no voxel above 5 Gy to average over")
    return float(np.mean(np.abs(ref[sel] - pred[sel])))
