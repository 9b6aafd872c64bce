"""Sites, phantom ids, the phantom test and body names: one definition each."""

from __future__ import annotations

import pytest

from dosegym.data.case import is_body_name
from dosegym.data.phantoms import generate_anatomy, shipped_phantom_ids
from dosegym.data.sites import SITES, PhantomId, is_phantom, is_phantom_ref, parse_phantom_ref, site_key
from dosegym.errors import DataError


def test_site_key_folds_spellings():
    assert [site_key(s) for s in ("Head & Neck", "HN", "headneck", "Prostate", None)] == [
        "headneck",
        "headneck",
        "headneck",
        "prostate",
        None,
    ]


def test_phantom_id_forms_round_trip():
    pid = PhantomId.parse("phantoms:headneck/28")
    assert pid == PhantomId("headneck", 28) == PhantomId.parse("headneck_028")
    assert str(pid) == "phantoms:headneck/28" and pid.case_id == "headneck_028"
    assert all(str(PhantomId.parse(i)) == i for i in shipped_phantom_ids())


@pytest.mark.parametrize("text", ["phantoms:headneck", "phantoms", "phantoms:liver/1", "hn_28", "pt_108"])
def test_phantom_id_refuses_other_forms(text):
    with pytest.raises(DataError, match="phantom"):
        PhantomId.parse(text)


def test_phantom_refs():
    assert parse_phantom_ref("phantoms") == (None, None)
    assert parse_phantom_ref("phantoms:lung") == ("lung", None)
    assert parse_phantom_ref("phantoms:lung/3") == ("lung", 3)
    assert parse_phantom_ref("phantoms:Lung/3") is None and is_phantom_ref("phantoms:Lung/3")
    assert not is_phantom_ref("phantomsX") and not is_phantom_ref("case/phantoms:lung")


def test_is_phantom_and_sites():
    case = generate_anatomy("lung", index=0)
    assert is_phantom(case) and case.meta["site"] in SITES
    case.meta["format"] = "openkbp"
    assert not is_phantom(case)


def test_body_names():
    assert all(is_body_name(n) for n in ("BODY", "External", "possible_dose_mask", "Outline", "skin"))
    assert not any(is_body_name(n) for n in ("PTV70", "SpinalCord", "Bodyguard"))
