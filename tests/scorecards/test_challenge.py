"""OpenKBP dose/DVH scores on real patients; GDP-HMM MAE on a fixture in the organisers' form."""

from __future__ import annotations

import numpy as np
import pytest
from shared_data import OPENKBP, OPENKBP_PATIENTS, need

from dosegym.errors import ScorecardError
from dosegym.scorecards.challenge import (
    gdphmm_mae,
    gdphmm_normalise_reference,
    openkbp_dose_score,
    openkbp_dvh_metrics,
    openkbp_dvh_score,
    openkbp_scores,
)

PATIENTS = OPENKBP_PATIENTS


@pytest.fixture(scope="module")
def cases():
    need(*(OPENKBP / p for p in PATIENTS))
    from dosegym.data import read_case

    return [read_case(OPENKBP / p) for p in PATIENTS]


def test_reference_against_itself_scores_zero(cases):
    for case in cases:
        assert openkbp_dose_score(case, case.dose) == 0.0
        assert openkbp_dvh_score(case, case.dose) == 0.0


def test_one_gray_inside_the_possible_dose_mask_gives_dose_score_one(cases):
    for case in cases:
        pred = case.dose.astype(np.float64) + case.body  # +1 Gy on every voxel of the mask
        assert openkbp_dose_score(case, pred) == 1.0


def test_dose_score_sums_over_the_whole_grid_like_the_organisers(cases):
    case = cases[0]
    pred = case.dose.astype(np.float64) + 1.0  # +1 Gy everywhere, also outside the mask
    assert openkbp_dose_score(case, pred) == pytest.approx(case.grid.size / case.body.sum(), rel=1e-12)
    # every DVH point moves by exactly 1 Gy
    assert openkbp_dvh_score(case, pred) == pytest.approx(1.0, abs=1e-9)


def test_dvh_points_follow_the_organisers_definitions(cases):
    case = cases[0]
    metrics = openkbp_dvh_metrics(case, case.dose)
    voxel_mm3 = float(np.prod(case.grid.spacing_mm))
    n = max(1, round(100 / voxel_mm3))
    assert n == 3  # 3.906 x 3.906 x 2.5 mm voxels: 38.1 mm3
    present = set(case.structures)
    oars = {"Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible"}
    expected = {(m, r) for r in present & oars for m in ("D_0.1_cc", "mean")}
    expected |= {(m, r) for r in present - oars for m in ("D_99", "D_95", "D_1")}
    assert set(metrics) == expected
    cord = np.sort(case.dose[case.structures["SpinalCord"]].astype(np.float64))
    # D_0.1cc = percentile(100 - 3/N*100): between the 4th and 3rd hottest voxel
    assert cord[-4] <= metrics[("D_0.1_cc", "SpinalCord")] <= cord[-3]
    assert metrics[("mean", "SpinalCord")] == pytest.approx(cord.mean())
    ptv = case.dose[case.structures["PTV70"]].astype(np.float64)
    assert metrics[("D_95", "PTV70")] == np.percentile(ptv, 5)
    assert metrics[("D_99", "PTV70")] < metrics[("D_95", "PTV70")] < metrics[("D_1", "PTV70")]


def test_aggregate_pools_dvh_entries_and_averages_dose_scores(cases):
    rng = np.random.default_rng(0)
    preds = [c.dose * rng.uniform(0.9, 1.1, c.dose.shape).astype(np.float32) * c.body for c in cases]
    scores = openkbp_scores(zip(cases, preds, strict=True))
    per_patient = [openkbp_dose_score(c, p) for c, p in zip(cases, preds, strict=True)]
    assert scores.dose_score == pytest.approx(np.mean(per_patient))
    entries = [e for errs in scores.dvh_errors.values() for e in errs.values()]
    assert len(entries) == sum(len(openkbp_dvh_metrics(c, c.dose)) for c in cases)
    assert scores.dvh_score == pytest.approx(np.mean(entries))
    # pooled, not the mean of per-patient means (patients have different structure counts)
    per_patient_dvh = [openkbp_dvh_score(c, p) for c, p in zip(cases, preds, strict=True)]
    assert len({len(e) for e in scores.dvh_errors.values()}) > 1
    assert scores.dvh_score != pytest.approx(np.mean(per_patient_dvh), rel=1e-9)
    assert 0.0 < scores.dose_score < 5.0


def test_openkbp_errors(cases):
    case = cases[0]
    with pytest.raises(ScorecardError, match="shape"):
        openkbp_dose_score(case, case.dose[:10])
    bad = case.dose.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ScorecardError, match="NaN"):
        openkbp_dvh_score(case, bad)
    with pytest.raises(ScorecardError, match="twice"):
        openkbp_scores([(case, case.dose), (case, case.dose)])


# -- GDP-HMM ----------------------------------------------------------------------------


@pytest.fixture
def gdphmm_plan():
    """A plan dict as the organisers ship it (``dose`` x ``dose_scale``, masks per name)."""
    rng = np.random.default_rng(5)
    shape = (20, 24, 24)
    zz, yy, xx = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    dose_gy = np.clip(75.0 - 8.0 * r, 0.0, None) + rng.uniform(0, 1, shape)
    body = r < 11.5
    dose_gy *= body
    opt = r < 3.5
    scale = 0.01
    return {"dose": (dose_gy / scale).astype(np.float32), "dose_scale": scale, "PTV70OPT": opt, "Body": body}


def test_gdphmm_normalisation_sets_d97_to_the_prescription(gdphmm_plan):
    ref = gdphmm_plan["dose"] * gdphmm_plan["dose_scale"]
    norm = gdphmm_normalise_reference(ref, gdphmm_plan["PTV70OPT"], 70.0)
    assert np.percentile(norm[gdphmm_plan["PTV70OPT"]], 3) == pytest.approx(70.0, rel=1e-6)


def test_gdphmm_mae_on_the_reference_isodose(gdphmm_plan):
    ref = gdphmm_plan["dose"] * gdphmm_plan["dose_scale"]
    opt, body = gdphmm_plan["PTV70OPT"], gdphmm_plan["Body"]
    norm = gdphmm_normalise_reference(ref, opt, 70.0)
    assert gdphmm_mae(ref, norm, opt, 70.0) == 0.0
    assert gdphmm_mae(ref, norm + 2.0, opt, 70.0) == pytest.approx(2.0)
    # the organisers' mask is ref > 5 Gy only: a prediction's spill elsewhere is not counted
    spill = norm.copy()
    spill[(norm <= 5.0) & body] = 30.0
    assert gdphmm_mae(ref, spill, opt, 70.0) == 0.0
    union = gdphmm_mae(ref, spill, opt, 70.0, body=body, mask="union_body")
    sel = ((norm > 5) | (spill > 5)) & body
    assert union == pytest.approx(np.mean(np.abs(norm - spill)[sel]))
    assert union > 0.0
    with pytest.raises(ScorecardError, match="body"):
        gdphmm_mae(ref, spill, opt, 70.0, mask="union_body")
    with pytest.raises(ScorecardError, match="organisers"):
        gdphmm_mae(ref, spill, opt, 70.0, mask="both")
