"""Varian MAAS PlanScoreCard JSON: the two genuine cards, lossless round trips, scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from shared_data import LUNG_JSON, PROSTATE_JSON, needs

from dosegym.data import Case, Grid, Prescription
from dosegym.errors import ScorecardError
from dosegym.scorecards import ItemStatus, Scorecard, ScorecardValidationError, read_maas, write_maas
from dosegym.scorecards.maas import maas_dict

LUNG = LUNG_JSON
PROSTATE = PROSTATE_JSON
needs_data = needs(LUNG, PROSTATE)


def _ball(shape, spacing, center_mm, radius_mm):
    idx = np.indices(shape).astype(float)
    return sum(((idx[a] * spacing[a]) - center_mm[a]) ** 2 for a in range(3)) <= radius_mm**2


def _case(names_to_balls: dict, rx: tuple[str, float, int], spacing=(3.0, 3.0, 3.0)) -> Case:
    shape = (22, 40, 40)
    body = _ball(shape, spacing, (33.0, 60.0, 60.0), 58.0)
    structures = {n: _ball(shape, spacing, c, r) & body for n, (c, r) in names_to_balls.items()}
    target = structures[rx[0]]
    dist = ndimage.distance_transform_edt(~target, sampling=spacing)
    dose = (rx[1] * 1.03 * np.exp(-dist / 12.0) * body).astype(np.float32)
    return Case(
        "synthetic",
        Grid(shape, spacing),
        structures=structures,
        prescriptions=[Prescription(rx[0], rx[1], rx[2])],
        dose=dose,
        body=body,
    )


# -- the genuine files ------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize(
    ("path", "n", "rx", "max_total"), [(LUNG, 20, 60.0, 120.0), (PROSTATE, 36, 40.0, 246.0)]
)
def test_read_genuine_cards(path, n, rx, max_total):
    card = read_maas(path)
    assert len(card.items) == n
    assert card.prescription_gy == pytest.approx(rx)
    assert sum(item.max_score for item in card.items) == pytest.approx(max_total)
    assert card.on_unmatched == "report"
    assert card.problems() == []


@needs_data
def test_prostate_oddities():
    card = read_maas(PROSTATE)
    first = card.items[0]
    # Score, not the label's number: 'GOOD[1.5]' is worth 7.5 points
    assert [(p.score, p.label) for p in first.points][1] == (7.5, "GOOD[1.5]")
    assert first.max_score == 10.0
    femur = card.items[31]
    assert femur.structure == "Femur_Heads" and femur.maas.structure.structure_id is None
    assert femur.maas.structure.structure_code == "FemoralHeads"
    assert card.items[3].maas.structure.structure_comment == "{<PTV>} SUB {<CTV>}"
    plus = card.items[7]
    assert plus.structure == "PTV+Urethra" and not plus.maas.structure.auto_generated
    assert card.items[34].input_unit == "%" and card.items[12].output_unit == "cc"  # 'CC'


@needs_data
@pytest.mark.parametrize("path", [LUNG, PROSTATE])
def test_write_reproduces_the_file_byte_for_byte(path, tmp_path):
    card = read_maas(path)
    out = write_maas(card, tmp_path / "card.json")
    assert out.read_bytes() == path.read_bytes()
    assert read_maas(out) == card
    # through our YAML and back: still the same card and the same bytes
    card.to_yaml(tmp_path / "card.yaml")
    again = Scorecard.from_yaml(tmp_path / "card.yaml")
    assert again == card
    assert write_maas(again, tmp_path / "again.json").read_bytes() == path.read_bytes()


# -- scoring with the MAAS matching rules -------------------------------------------------------
@needs_data
def test_prostate_card_scores_with_generated_structures():
    sp = (3.0, 3.0, 3.0)
    case = _case(
        {
            "PTV": ((33.0, 60.0, 60.0), 16.0),
            "CTV": ((33.0, 60.0, 60.0), 11.0),
            "Urethra": ((33.0, 60.0, 60.0), 3.5),
            "Rectum": ((33.0, 84.0, 60.0), 8.0),
            "Bladder": ((54.0, 45.0, 60.0), 12.0),
            "Bowel_Small": ((60.0, 30.0, 60.0), 6.0),
            "Bowel_Large": ((60.0, 30.0, 90.0), 6.0),
        },
        ("PTV", 40.0, 5),
        sp,
    )
    card = read_maas(PROSTATE)
    report = card.score(case)
    by_name = {}
    for r in report.items:
        by_name.setdefault(r.structure, r)
    assert by_name["PTV-CTV"].detail == "recipe: {<PTV>} SUB {<CTV>}"
    unmatched = {r.structure for r in report.unmatched}
    assert unmatched == {"PTV+Urethra", "Femur_Heads", "Fiducials"}  # no recipe / not contoured
    ptv_ctv = case.structures["PTV"] & ~case.structures["CTV"]
    top = np.sort(case.dose[ptv_ctv])[::-1]
    d01 = by_name["PTV-CTV"].value
    assert top[-1] <= d01 <= top[0]
    assert report.maximum == pytest.approx(246.0 - sum(r.max_points for r in report.unmatched))
    assert 0.0 < report.normalised < 1.0
    assert all(r.status is not ItemStatus.UNMATCHED for r in report.items if r.points is not None)
    # the user can map what the card cannot build, and must then get it scored
    mapped = Scorecard(
        **{**card.model_dump(), "structure_map": {"PTV+Urethra": "PTV + Urethra", "Femur_Heads": "Bladder"}}
    )
    assert {r.structure for r in mapped.score(case).unmatched} == {"Fiducials"}


@needs_data
def test_lung_card_scores_a_synthetic_case():
    case = _case(
        {
            "PTV": ((33.0, 50.0, 40.0), 12.0),
            "CTV": ((33.0, 50.0, 40.0), 7.0),
            "Lung_L": ((33.0, 55.0, 90.0), 22.0),
            "Lung_R": ((33.0, 55.0, 30.0), 22.0),
            "Heart": ((20.0, 40.0, 65.0), 13.0),
            "Esophagus": ((33.0, 75.0, 60.0), 4.0),
            "SpinalCord": ((33.0, 90.0, 60.0), 4.0),
        },
        ("PTV", 60.0, 30),
    )
    card = Scorecard(
        **{
            **read_maas(LUNG).model_dump(),
            "structure_map": {
                "TOTAL LUNG - GTV": "Lung_L + Lung_R - CTV",
                "Ring_PTV": "ring(PTV, 3mm, 30mm)",
            },
        }
    )
    report = card.score(case)
    assert {r.structure for r in report.unmatched} == {
        "LAD",
        "BRACHIALPLEXUS",
        "GREATVESSELS",
        "TRACHEA",
        "BODY_RING",
    }
    assert report.items[9].detail == "SpinalCord"  # SPINAL_CORD by alias
    lungs = (case.structures["Lung_L"] | case.structures["Lung_R"]) & ~case.structures["CTV"]
    assert report.items[8].value == pytest.approx(float(case.dose[lungs].mean()), rel=1e-5)
    assert report.items[0].status is ItemStatus.IDEAL  # V60Gy of a 103 % plateau


# -- writing our own cards ---------------------------------------------------------------------
def test_our_card_to_maas_and_back(tmp_path):
    card = Scorecard.from_dict(
        {
            "name": "ours",
            "site": "lung",
            "prescription_gy": 60,
            "fractions": 30,
            "items": [
                {
                    "structure": "PTV - CTV",
                    "metric": "NearMaxDose",
                    "output_unit": "Gy",
                    "points": [[63, 5], [66, 0]],
                },
                {
                    "structure": "ring(PTV, 3mm, 30mm)",
                    "metric": "MeanDose",
                    "output_unit": "Gy",
                    "points": [[20, 2, "ok", True], [30, 0]],
                },
                {
                    "structure": "Heart",
                    "metric": "PaddickConformityIndex",
                    "value": 60,
                    "input_unit": "Gy",
                    "points": [[0.5, 0], [0.9, 1]],
                },
            ],
        }
    )
    data = maas_dict(card)
    t0, t1, t2 = data["ScoreTemplates"]
    assert (t0["MetricType"], t0["InputValue"], t0["InputUnit"]) == ("DoseAtVolume", 0.03, "CC")
    assert t0["Structure"]["StructureComment"] == "{<PTV>} SUB {<CTV>}"
    assert t0["Structure"]["AutoGenerated"] is True
    assert t1["Structure"]["StructureComment"] == "{<PTV>|30} SUB {<PTV>|3}"
    assert t1["ScorePoints"][0]["Variation"] is True and t1["ScorePoints"][0]["Label"] == "ok"
    assert t2["MetricType"] == "ConformationNumber" and t2["Structure"]["AutoGenerated"] is False
    assert (data["DosePerFraction"], data["NumberOfFractions"]) == (2.0, 30)
    back = read_maas(write_maas(card, tmp_path / "ours.json"))
    assert back.items[0].metric.value == "DoseAtVolume" and back.items[0].value == 0.03
    case = _case(
        {
            "PTV": ((33.0, 60.0, 60.0), 14.0),
            "CTV": ((33.0, 60.0, 60.0), 8.0),
            "Heart": ((33.0, 60.0, 80.0), 10.0),
        },
        ("PTV", 60.0, 30),
    )
    ours, theirs = card.score(case), back.score(case)
    assert [r.value for r in theirs.items] == pytest.approx([r.value for r in ours.items])
    bad = Scorecard.from_dict(
        {"name": "gi", "items": [{"structure": "PTV", "metric": "GradientIndex", "points": [[3, 1], [5, 0]]}]}
    )
    with pytest.raises(ScorecardError, match=r"item 0 .*GradientIndex has no PlanScoreCard"):
        maas_dict(bad)


# -- bad files ---------------------------------------------------------------------------------
def _template(**over) -> dict:
    t = {
        "Structure": {
            "StructureId": "PTV",
            "StructureComment": "",
            "TemplateStructureId": "PTV",
            "StructureCode": None,
            "AutoGenerated": False,
        },
        "Rank": 0,
        "MetricType": "VolumeAtDose",
        "InputValue": 60.0,
        "InputUnit": "Gy",
        "OutputUnit": "%",
        "AcceptableLevel": None,
        "VariationLevel": None,
        "FailLevel": None,
        "HI_HiValue": 0.0,
        "HI_LowValue": 0.0,
        "HI_Target": 0.0,
        "HI_TargetUnit": None,
        "MetricComment": None,
        "ScorePoints": [
            {
                "PointX": 95.0,
                "Score": 0.0,
                "Variation": False,
                "Colors": [0, 0, 0],
                "Label": "A[0]",
                "ColorValue": 0.0,
            },
            {
                "PointX": 100.0,
                "Score": 5.0,
                "Variation": False,
                "Colors": [0, 0, 0],
                "Label": "B[5]",
                "ColorValue": 5.0,
            },
        ],
    }
    t.update(over)
    return t


def test_bad_maas_files_list_every_problem(tmp_path):
    doc = {
        "TemplateName": "bad",
        "Site": "x",
        "Creator": "me",
        "DosePerFraction": 2.0,
        "NumberOfFractions": 30,
        "ScoreTemplates": [_template(), _template(MetricType="Volume"), _template(InputUnit=None, Extra=1)],
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ScorecardValidationError) as info:
        read_maas(path)
    text = str(info.value)
    assert str(path) in text
    assert "item 2 (ScoreTemplates[2]): unknown field 'Extra'" in text
    doc["ScoreTemplates"][2].pop("Extra")
    path.write_text(json.dumps(doc))
    with pytest.raises(ScorecardValidationError) as info:
        read_maas(path)
    problems = info.value.problems
    assert any(p.startswith("item 1 ('PTV', Volume)") and "not implemented" in p for p in problems)
    assert any(
        p.startswith("item 2 ('PTV', VolumeAtDose)") and "input_unit is missing" in p for p in problems
    )
    path.write_text("{not json")
    with pytest.raises(ScorecardError, match="not valid JSON at line 1"):
        read_maas(path)
    path.write_text(json.dumps({"name": "no templates"}))
    with pytest.raises(ScorecardError, match="not a PlanScoreCard scorecard"):
        read_maas(path)
    path.write_text(json.dumps([_template()]))  # a bare list of metrics is accepted
    assert read_maas(path).name == "bad"
