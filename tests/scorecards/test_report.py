"""ScoreReport: totals, JSON round trip, rich table and the RL vector."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rich.console import Console

from dosegym.data import Case, Grid, Prescription
from dosegym.errors import ScorecardError
from dosegym.scorecards import ItemResult, ItemStatus, Scorecard, ScoreReport


@pytest.fixture(scope="module")
def report() -> ScoreReport:
    shape = (8, 10, 10)
    body = np.ones(shape, bool)
    ptv = np.zeros(shape, bool)
    ptv[3:5, 4:6, 4:6] = True
    oar = np.zeros(shape, bool)
    oar[3:5, 1:3, 1:3] = True
    dose = np.where(ptv, 60.0, 20.0).astype(np.float32)
    case = Case(
        "r1",
        Grid(shape, (2.0, 2.0, 2.0)),
        structures={"PTV": ptv, "Cord": oar},
        prescriptions=[Prescription("PTV", 60.0, 30)],
        dose=dose,
        body=body,
    )
    card = Scorecard.from_dict(
        {
            "name": "report card",
            "prescription_gy": 60,
            "fractions": 30,
            "items": [
                {
                    "structure": "PTV",
                    "metric": "DoseAtVolume",
                    "value": 95,
                    "input_unit": "%",
                    "output_unit": "Gy",
                    "points": [[57, 0], [60, 10]],
                    "comment": "coverage",
                },
                {
                    "structure": "Rectum",
                    "optional": True,
                    "metric": "MeanDose",
                    "output_unit": "Gy",
                    "points": [[20, 4], [30, 0]],
                },
                {
                    "structure": "Cord",
                    "metric": "MeanDose",
                    "output_unit": "Gy",
                    "points": [[10, 4], [30, 0]],
                },
                {
                    "structure": "Cord",
                    "metric": "ConformityIndex",
                    "value": 60,
                    "input_unit": "Gy",
                    "points": [[0.2, 2], [0.5, 0]],
                },
            ],
        }
    )
    return card.score(case)


def test_totals_statuses_and_unmatched(report):
    assert [r.status for r in report.items] == [
        ItemStatus.IDEAL,
        ItemStatus.UNMATCHED,
        ItemStatus.GOOD,
        ItemStatus.FAIL,
    ]
    assert report.items[2].points == pytest.approx(2.0)  # mean 20 Gy on [10, 30] -> 4..0
    assert report.items[3].value == pytest.approx(1.0)  # V_body(>= 60 Gy) = PTV = Cord volume
    assert report.total == pytest.approx(12.0)
    assert report.maximum == pytest.approx(16.0)  # the unmatched item's 4 points are left out
    assert report.normalised == pytest.approx(0.75)
    assert [r.structure for r in report.unmatched] == ["Rectum"]
    assert "matches nothing" in report.unmatched[0].detail


def test_vector_is_in_card_order_and_marks_unmatched(report):
    v = report.vector()
    assert v.shape == (4,) and v.dtype == np.float64
    np.testing.assert_allclose(v[[0, 2, 3]], [1.0, 0.5, 0.0])
    assert np.isnan(v[1])
    assert report.vector(unmatched=-1.0)[1] == -1.0


def test_json_round_trip(report, tmp_path):
    path = tmp_path / "report.json"
    text = report.to_json(path)
    assert path.read_text() == text
    data = json.loads(text)
    assert data["unmatched"] == [1] and data["items"][0]["label"] == "D95% [Gy]"
    assert ScoreReport.from_json(path) == report
    assert ScoreReport.from_json(text) == report
    assert ScoreReport.from_dict(report.to_dict()) == report
    with pytest.raises(ScorecardError, match="invalid score report"):
        ScoreReport.from_dict({"card": "x"})
    with pytest.raises(ScorecardError, match="not valid JSON"):
        ScoreReport.from_json("{oops")


def test_rich_table(report):
    console = Console(record=True, width=140)
    console.print(report)
    text = console.export_text()
    for needle in (
        "report card on r1",
        "D95% [Gy]",
        "Dmean [Gy]",
        "unmatched",
        "coverage",
        "75.0 %",
        "1 unmatched item(s) not counted: #1 Rectum",
    ):
        assert needle in text


def test_build_computes_totals_and_infinite_values_round_trip():
    items = [
        ItemResult(
            index=0,
            structure="A",
            metric="MaxDose",
            label="Dmax [Gy]",
            value=50.0,
            points=1.5,
            max_points=3.0,
            status=ItemStatus.GOOD,
        ),
        ItemResult(
            index=1,
            structure="B",
            metric="ConformityIndex",
            label="CI(60Gy)",
            value=math.inf,
            points=0.0,
            max_points=1.0,
            status=ItemStatus.FAIL,
        ),
    ]
    built = ScoreReport.build(card="c", case_id="x", prescription_gy=None, items=items)
    assert (built.total, built.maximum, built.normalised) == (1.5, 4.0, 0.375)
    assert ScoreReport.from_json(built.to_json()) == built


def test_a_report_with_nothing_matched_is_not_a_zero():
    items = [
        ItemResult(
            index=0,
            structure="A",
            metric="MaxDose",
            label="Dmax [Gy]",
            max_points=3.0,
            status=ItemStatus.UNMATCHED,
        )
    ]
    built = ScoreReport.build(card="c", case_id="x", prescription_gy=None, items=items)
    assert built.maximum == 0.0 and math.isnan(built.normalised)
    assert math.isnan(ScoreReport.from_json(built.to_json()).normalised)
