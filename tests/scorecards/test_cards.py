"""Built-in cards: they load, cite their sources, match their structure sets and score sensibly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from shared_data import LUNG_JSON, PT_108, needs

from dosegym.data import read_case
from dosegym.data.phantoms import generate_anatomy
from dosegym.errors import ScorecardError
from dosegym.scorecards import ItemStatus, Scorecard, available_cards, load_card, read_maas

CARDS = ["headneck_rtog", "lung_maas", "phantom_headneck", "phantom_lung", "phantom_prostate", "prostate"]


def _plan(case, falloff_mm: float = 10.0) -> np.ndarray:
    """A crude plan: each target at 102 % of its Rx, dose falling off exponentially outside."""
    dose = np.zeros(case.grid.shape, np.float32)
    for p in sorted(case.prescriptions, key=lambda p: p.dose_gy):
        target = case.structures[p.target]
        dist = ndimage.distance_transform_edt(~target, sampling=case.grid.spacing_mm)
        dose = np.maximum(dose, 1.02 * p.dose_gy * np.exp(-dist / falloff_mm))
    return (dose * case.body).astype(np.float32)


def test_every_card_loads_and_cites_its_sources(tmp_path):
    assert available_cards() == CARDS
    for name in CARDS:
        card = load_card(name)
        assert card.references and card.description and card.items
        assert card.problems() == []
        card.to_yaml(tmp_path / f"{name}.yaml")  # the files themselves are hand-written
        assert Scorecard.from_yaml(tmp_path / f"{name}.yaml") == card
    with pytest.raises(ScorecardError, match="built-in: \\['headneck_rtog'"):
        load_card("no_such_card")


@needs(LUNG_JSON)
def test_lung_maas_is_the_genuine_card_plus_a_mapping():
    card = load_card("lung_maas")
    genuine = read_maas(LUNG_JSON)
    assert card.items == genuine.items
    assert (card.name, card.prescription_gy, card.fractions) == ("Lung 60Gy", 60.0, 30)
    assert set(card.structure_map) == {"PTV", "TOTAL LUNG - GTV", "Ring_PTV", "BODY_RING"}


@needs(PT_108)
def test_headneck_rtog_on_a_real_openkbp_plan():
    case = read_case(PT_108)
    card = load_card("headneck_rtog")
    report = card.score(case)
    assert report.normalised > 0.9
    coverage = [r for r in report.items if r.structure == "PTV70" and r.label.startswith("D9")]
    assert len(coverage) == 2 and all(r.points == r.max_points for r in coverage)
    assert 69.5 < coverage[0].value < 72.0  # PTV70 D95% of the clinical plan
    assert [r.structure for r in report.unmatched] == ["Mandible"]  # pt_108 has no mandible
    left = next(r for r in report.items if r.structure == "Parotid_L")
    assert left.detail == "LeftParotid"
    bad = card.score(case, case.dose * 0.5)
    assert bad.normalised < report.normalised - 0.3
    assert all(r.points == 0 for r in bad.items if r.structure.startswith("PTV") and r.label.startswith("D9"))


@pytest.mark.parametrize(
    ("site", "card_name"),
    [
        ("headneck", "phantom_headneck"),
        ("prostate", "phantom_prostate"),
        ("lung", "phantom_lung"),
        ("lung", "lung_maas"),
    ],
)
def test_phantom_cards_match_the_phantom_structures(site, card_name):
    card = load_card(card_name)
    for index in (0, 1, 2):
        case = generate_anatomy(site, index=index)
        dose = _plan(case)
        report = card.score(case, dose)
        unmatched = {r.structure for r in report.unmatched}
        if card_name == "lung_maas":
            assert unmatched == {"CTV", "LAD", "BRACHIALPLEXUS", "GREATVESSELS", "TRACHEA"}
        elif card_name == "phantom_headneck":
            assert unmatched == (set() if "PTV63" in case.structures else {"PTV63"})
        else:
            assert unmatched == set()
        assert 0.0 < report.normalised <= 1.0
        worse = card.score(case, dose * 0.8)
        assert worse.total < report.total


def test_phantom_prostate_uses_the_case_prescription():
    card = load_card("phantom_prostate")
    assert card.prescription_gy is None
    for index in (0, 2):  # 60 Gy / 20 fx and 70 Gy / 28 fx phantoms
        case = generate_anatomy("prostate", index=index)
        report = card.score(case, _plan(case))
        assert report.prescription_gy == case.max_prescription_gy
        d95 = report.items[0]
        assert d95.unit == "%" and 95.0 < d95.value < 105.0


def test_prostate_card_on_a_phantom_with_a_mapping_and_rescaling():
    case = generate_anatomy("prostate", index=0)
    rx = case.prescriptions[0]
    card = load_card("prostate")
    with pytest.raises(ScorecardError, match=r"item 0 \('PTV'.*matches nothing"):
        card.score(case, _plan(case))
    mapped = Scorecard(**{**card.model_dump(), "structure_map": {"PTV": rx.target}})
    scaled = mapped.rescaled(rx.dose_gy, rx.fractions)
    report = scaled.score(case, _plan(case))
    assert report.items[0].status is ItemStatus.IDEAL  # D95% of a 102 % plan
    assert [r.structure for r in report.unmatched] == ["PenileBulb"]  # optional, not contoured
