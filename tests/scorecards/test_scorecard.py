"""The Scorecard model: validation, scoring, status, unmatched structures, rescaling, torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from shared_data import LUNG_JSON, needs

from dosegym.data import Case, Grid, Prescription
from dosegym.errors import ScorecardError
from dosegym.scorecards import (
    ItemStatus,
    MetricKind,
    MetricSpec,
    Scorecard,
    ScorecardValidationError,
    ScoreItem,
    compute_metric,
    read_maas,
)


def _ball(shape, spacing, center_mm, radius_mm):
    idx = np.indices(shape).astype(float)
    return sum(((idx[a] * spacing[a]) - center_mm[a]) ** 2 for a in range(3)) <= radius_mm**2


@pytest.fixture(scope="module")
def case() -> Case:
    shape, spacing = (16, 20, 20), (2.5, 2.0, 2.0)
    body = np.zeros(shape, bool)
    body[1:-1, 1:-1, 1:-1] = True
    ptv = _ball(shape, spacing, (20.0, 20.0, 18.0), 7.0)
    ctv = _ball(shape, spacing, (20.0, 20.0, 18.0), 4.0)
    cord = np.zeros(shape, bool)
    cord[2:-2, 15:17, 9:11] = True
    dist = ndimage.distance_transform_edt(~ptv, sampling=spacing)
    dose = (60.0 * np.exp(-dist / 8.0) * body).astype(np.float32)
    dose[ptv] = np.linspace(58.0, 64.0, int(ptv.sum()), dtype=np.float32)
    return Case(
        case_id="toy",
        grid=Grid(shape, spacing),
        structures={"PTV": ptv, "CTV": ctv, "SpinalCord": cord},
        prescriptions=[Prescription("PTV", 60.0, 30)],
        dose=dose,
        body=body,
    )


def _item(**kw) -> dict:
    base = dict(
        structure="PTV",
        metric="DoseAtVolume",
        value=95,
        input_unit="%",
        output_unit="Gy",
        points=[{"x": 57.0, "score": 0}, {"x": 60.0, "score": 10}],
    )
    base.update(kw)
    return base


def _card(*items, **kw) -> Scorecard:
    return Scorecard.from_dict(
        {"name": "toy", "prescription_gy": 60.0, "fractions": 30, "items": list(items), **kw}
    )


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("item", "needle"),
    [
        (_item(metric="D95"), "unknown metric 'D95'"),
        (_item(metric="Volume"), "not implemented"),
        (_item(points=[[57, 0], [58, 5], [60, 2]]), "monotone"),
        (_item(points=[[57, 0], [57, 5]]), "x [57.0] repeats"),
        (_item(points=[]), "at least 1 point"),
        (_item(points=[[57, 0], [60, 0]]), "highest score must be > 0"),
        (_item(output_unit=None), "output_unit is missing"),
        (_item(input_unit=None), "input_unit is missing"),
        (_item(output_unit="cc"), "output_unit 'cc' is not valid"),
        (_item(value=120), "volume 120 % is out of range"),
        (_item(metric="VolumeAtDose", value=-5, input_unit="Gy", output_unit="%"), "dose -5 Gy"),
        (_item(structure="PTV + (CTV"), "expected ')'"),
        (_item(colour="red"), "unknown field 'colour'"),
    ],
)
def test_invalid_items_name_the_item(item, needle):
    good = _item(structure="CTV")
    with pytest.raises(ScorecardValidationError) as info:
        _card(good, item)
    problems = info.value.problems
    assert any(needle in p for p in problems), problems
    assert all(p.startswith("item 1 (") for p in problems), problems


def test_every_problem_is_reported_at_once():
    items = [
        _item(metric="D95"),
        _item(value=120, points=[[1, 0], [1, 2]]),
        _item(output_unit=None, colour=1),
    ]
    with pytest.raises(ScorecardValidationError) as info:
        _card(*items, fractions=0)
    text = "\n".join(info.value.problems)
    for needle in (
        "item 0",
        "unknown metric",
        "item 1",
        "out of range",
        "repeats",
        "item 2",
        "output_unit is missing",
        "unknown field 'colour'",
        "fractions",
    ):
        assert needle in text


def test_prescription_fields_fill_in_and_must_agree():
    card = _card(_item())
    assert card.dose_per_fraction_gy == pytest.approx(2.0)
    card = Scorecard.from_dict(
        {"name": "x", "dose_per_fraction_gy": 1.8, "fractions": 28, "items": [_item()]}
    )
    assert card.prescription_gy == pytest.approx(50.4)
    with pytest.raises(ScorecardValidationError, match="!= dose_per_fraction_gy"):
        _card(_item(), dose_per_fraction_gy=2.5)
    with pytest.raises(ScorecardValidationError, match="items: List should have at least 1 item"):
        Scorecard.from_dict({"name": "x", "items": []})
    with pytest.raises(ScorecardError, match="mapping"):
        Scorecard.from_dict(["not", "a", "card"])  # type: ignore[arg-type]


# -- scoring curve and status -------------------------------------------------------------------
def test_piecewise_linear_points_clamped_and_sorted():
    item = ScoreItem(**_item(points=[[66.0, 0], [63.0, 4, "good", True], [60.0, 5]]))
    assert item.score_value(55.0) == 5.0  # clamped at the good end
    assert item.score_value(61.5) == pytest.approx(4.5)
    assert item.score_value(64.5) == pytest.approx(2.0)
    assert item.score_value(70.0) == 0.0
    one = ScoreItem(**_item(points=[[60.0, 3]]))
    assert one.score_value(0.0) == one.score_value(100.0) == 3.0


def test_status_rule():
    item = ScoreItem(**_item(points=[[60.0, 5], [63.0, 4, "per protocol", True], [66.0, 0]]))
    assert item.status(5.0) is ItemStatus.IDEAL
    assert item.status(4.5) is ItemStatus.GOOD
    assert item.status(4.0) is ItemStatus.GOOD  # at the variation point
    assert item.status(2.0) is ItemStatus.VARIATION
    assert item.status(0.0) is ItemStatus.FAIL
    plain = ScoreItem(**_item(points=[[57.0, 0], [60.0, 10]]))
    assert plain.status(5.0) is ItemStatus.GOOD
    with pytest.raises(ScorecardValidationError, match="at most one point"):
        _card(_item(points=[[57, 0, "a", True], [60, 5, "b", True]]))


# -- scoring a case -------------------------------------------------------------------------
def test_score_matches_the_metric_engine(case):
    card = _card(
        _item(),
        _item(
            structure="SpinalCord", metric="MaxDose", value=None, input_unit=None, points=[[45, 5], [50, 0]]
        ),
        _item(
            structure="PTV - CTV",
            metric="MeanDose",
            value=None,
            input_unit=None,
            output_unit="%",
            points=[[100, 1], [110, 0]],
        ),
        _item(
            structure="CTV",
            metric="ConformityIndex",
            value=60,
            input_unit="Gy",
            output_unit=None,
            points=[[1.0, 2], [3.0, 0]],
        ),
    )
    report = card.score(case)  # the case's own dose
    d95 = compute_metric(
        MetricSpec(MetricKind.DOSE_AT_VOLUME, 95, "%", "Gy"),
        case.dose,
        case.structures["PTV"],
        voxel_volume_cc=case.voxel_volume_cc,
    )
    r0 = report.items[0]
    assert r0.value == pytest.approx(d95)
    assert r0.points == pytest.approx(np.interp(d95, [57, 60], [0, 10]))
    assert r0.label == "D95% [Gy]"
    ring = case.structures["PTV"] & ~case.structures["CTV"]
    mean_pct = 100 * case.dose[ring].mean() / 60.0
    assert report.items[2].value == pytest.approx(mean_pct, rel=1e-5)
    ci = (case.dose[case.body] >= 60).sum() / case.structures["CTV"].sum()
    assert report.items[3].value == pytest.approx(ci)
    assert report.total == pytest.approx(sum(r.points for r in report.items))
    assert report.maximum == 10 + 5 + 1 + 2
    assert report.normalised == pytest.approx(report.total / report.maximum)
    lower = card.score(case, case.dose * 0.9)
    assert lower.items[0].points < r0.points


def test_bad_doses_raise(case):
    card = _card(_item())
    dose = case.dose.copy()
    dose[3, 3, 3] = np.nan
    with pytest.raises(ScorecardError, match="NaN"):
        card.score(case, dose)
    with pytest.raises(ScorecardError, match="shape"):
        card.score(case, np.zeros((4, 4, 4), np.float32))
    no_dose = Case("nodose", case.grid, structures=dict(case.structures), body=case.body)
    with pytest.raises(ScorecardError, match="no dose"):
        card.score(no_dose)


def test_empty_structure_raises_naming_the_item(case):
    card = _card(_item(), _item(structure="CTV - PTV"))
    with pytest.raises(ScorecardError, match=r"item 1 \('CTV - PTV', D95% \[Gy\]\).*empty"):
        card.score(case)


def test_unmatched_structures_error_or_report(case):
    strict = _card(_item(), _item(structure="Rectum", points=[[57, 0], [60, 3]]))
    with pytest.raises(ScorecardError, match=r"item 1 \('Rectum'.*matches nothing"):
        strict.score(case)
    report = strict.score(case, on_unmatched="report")
    assert [r.status for r in report.items] == [report.items[0].status, ItemStatus.UNMATCHED]
    assert report.items[1].points is None and report.items[1].value is None
    assert report.maximum == 10  # the unmatched item is not counted
    assert [r.index for r in report.unmatched] == [1]
    optional = _card(_item(), _item(structure="Rectum", optional=True))
    assert optional.score(case).unmatched[0].structure == "Rectum"
    mapped = _card(_item(), _item(structure="Rectum"), structure_map={"rectum": "SpinalCord"})
    assert mapped.score(case).items[1].detail == "mapped: SpinalCord"


# -- rescaling (PlanScoreCard ScaleScorecard rules) ---------------------------------------------
def test_rescaled_follows_planscorecard_rules():
    card = _card(
        _item(),  # DoseAtVolume -> Gy: points scale
        _item(output_unit="%", points=[[95, 0], [100, 5]]),  # % output: unchanged
        _item(
            metric="VolumeAtDose", value=54, input_unit="Gy", output_unit="%", points=[[95, 0], [99, 4]]
        ),  # dose input scales
        _item(
            metric="VolumeAtDose", value=90, input_unit="%", output_unit="%", points=[[95, 0], [99, 4]]
        ),  # % input: unchanged
        _item(
            metric="ConformationNumber",
            value=60,
            input_unit="Gy",
            output_unit=None,
            points=[[0.5, 0], [0.9, 3]],
        ),
        _item(
            metric="HomogeneityIndex",
            value=None,
            input_unit="Gy",
            output_unit=None,
            hi_value=2,
            lo_value=98,
            target_value=60,
            points=[[0.05, 3], [0.2, 0]],
        ),
        _item(metric="DoseAtSubVolume", value=1, input_unit="cc", points=[[50, 0], [60, 2]]),
        _item(
            metric="ModifiedGradientIndex",
            value=None,
            input_unit="Gy",
            output_unit=None,
            lo_value=30,
            hi_value=60,
            points=[[2, 2], [4, 0]],
        ),
        _item(metric="VolumeOfRegret", value=60, input_unit="Gy", output_unit="cc", points=[[0, 2], [10, 0]]),
    )
    new = card.rescaled(70.0, 35)
    f = 70.0 / 60.0
    assert (new.prescription_gy, new.fractions, new.dose_per_fraction_gy) == (70.0, 35, 2.0)
    assert [p.x for p in new.items[0].points] == pytest.approx([57 * f, 60 * f])
    assert new.items[0].points[1].label == card.items[0].points[1].label
    assert new.items[1].points == card.items[1].points
    assert new.items[2].value == pytest.approx(54 * f) and new.items[2].points == card.items[2].points
    assert new.items[3].value == 90
    assert new.items[4].value == pytest.approx(70.0)
    assert new.items[5].target_value == pytest.approx(70.0)
    for i in (6, 7, 8):  # not rescaled by the tool
        assert new.items[i] == card.items[i]
    with pytest.raises(ScorecardError, match="no prescription"):
        Scorecard.from_dict({"name": "x", "items": [_item()]}).rescaled(70, 35)


@needs(LUNG_JSON)
def test_rescaled_real_maas_card():
    card = read_maas(LUNG_JSON)
    new = card.rescaled(66.0, 33)
    assert new.items[0].value == pytest.approx(66.0)  # VolumeAtDose 60 Gy -> 66 Gy
    assert [p.x for p in new.items[4].points] == pytest.approx([69.3, 70.62, 72.6])  # D0.03cc
    assert new.items[6].value == pytest.approx(22.0)  # lung V20Gy -> V22Gy
    assert new.items[1].points == card.items[1].points  # V60Gy [%]: points are volumes


# -- torch path -----------------------------------------------------------------------------------
def test_score_torch_matches_numpy_and_caches_masks(case):
    card = _card(
        _item(),
        _item(
            structure="SpinalCord", metric="MaxDose", value=None, input_unit=None, points=[[45, 5], [50, 0]]
        ),
        _item(
            structure="expand(CTV, 2mm)",
            metric="VolumeAtDose",
            value=60,
            input_unit="Gy",
            output_unit="%",
            points=[[90, 0], [100, 4]],
        ),
        _item(structure="Rectum", optional=True),
    )
    doses = np.stack([case.dose, case.dose * 0.95, case.dose * 1.1])
    out = card.score_torch(case, torch.from_numpy(doses))
    assert out.points.shape == (3, 4) and out.total.shape == (3,)
    assert out.matched.tolist() == [True, True, True, False]
    assert torch.isnan(out.points[:, 3]).all()
    for b in range(3):
        ref = card.score(case, doses[b])
        assert out.total[b].item() == pytest.approx(ref.total, abs=1e-4)
        np.testing.assert_allclose(out.points[b, :3].numpy(), ref.vector()[:3] * [10, 5, 4], atol=1e-4)
    bound = card._bound_for(case, None)
    card.score_torch(case, torch.from_numpy(doses[:1]))
    assert card._bound_for(case, None) is bound  # masks resolved once per case
    assert card == Scorecard.from_dict(card.to_dict())  # the cache is not part of the card
    single = card.score_torch(case, torch.from_numpy(case.dose))
    assert single.total.ndim == 0


def test_score_torch_soft_is_differentiable(case):
    card = _card(
        _item(),
        _item(
            structure="SpinalCord", metric="MaxDose", value=None, input_unit=None, points=[[0, 5], [100, 0]]
        ),
    )
    dose = torch.from_numpy(case.dose[None].astype(np.float64)).requires_grad_(True)
    out = card.score_torch(case, dose, temperature=0.05)
    assert out.total.item() == pytest.approx(card.score(case).total, abs=0.3)
    out.total.sum().backward()
    grad = dose.grad[0].numpy()
    assert np.isfinite(grad).all()
    assert grad[case.structures["PTV"]].sum() > 0  # more PTV dose: better coverage
    assert grad[case.structures["SpinalCord"]].sum() < 0  # more cord dose: worse
    with pytest.raises(ScorecardError, match="NaN"):
        card.score_torch(case, torch.full((1, *case.grid.shape), float("nan")))


# -- YAML -------------------------------------------------------------------------------------
def test_yaml_round_trip_is_exact(tmp_path):
    card = _card(
        _item(points=[[57.125, 0, "low"], [60.0, 10.5, "per protocol", True]], comment="x: y"),
        _item(structure='"TOTAL LUNG - GTV" - ring(PTV, 1mm, 2.5mm)', optional=True, priority=3),
        structure_map={"PTV": ["PTV_60", "PTV"]},
        references=["a", "b"],
        on_unmatched="report",
    )
    path = tmp_path / "card.yaml"
    text = card.to_yaml(path)
    assert path.read_text() == text
    again = Scorecard.from_yaml(path)
    assert again == card
    assert again.to_yaml() == text
    (tmp_path / "broken.yaml").write_text("name: x\nitems: [\n")
    with pytest.raises(ScorecardError, match="not valid YAML at line"):
        Scorecard.from_yaml(tmp_path / "broken.yaml")
