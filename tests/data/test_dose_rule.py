"""Issue 15, rule 6: one rule for dose values (``check_dose_gy``) on every entry path:
``Case``, ``Scorecard.score``, ``dosegym score --dose`` (``.npy``)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.data import read_case
from dosegym.data.dose import HIGH_DOSE_CAP_GY, check_dose_gy, max_dose_gy
from dosegym.errors import DataError, ModelError, ScorecardError
from dosegym.scorecards import load_card

CASE = "phantoms:headneck/28"


@pytest.fixture(scope="module")
def case():
    return read_case(CASE)


def bad_doses(case) -> dict[str, tuple[np.ndarray, str]]:
    """Doses the rule refuses, each with a word its message must hold."""
    d = case.dose
    rx = case.max_prescription_gy
    negative = d.copy()
    negative[3, 4, 5] = -0.5
    nan = d.copy()
    nan[1, 2, 3] = np.nan
    inf = d.copy()
    inf[1, 2, 3] = np.inf
    return {
        "negative": (negative, "negative dose -0.5 Gy at index (3, 4, 5)"),
        "nan": (nan, "non-finite values (NaN or inf), the first at index (1, 2, 3)"),
        "inf": (inf, "non-finite"),
        "int32 cGy": (np.round(d * 100).astype(np.int32), "looks like cGy"),
        "uint8": (np.round(d).astype(np.uint8), "integer dtype uint8"),
        "bool": (d > 1, "bool array"),
        "complex": (d.astype(np.complex64), "complex dtype"),
        "huge": (np.full_like(d, 1e30, dtype=np.float64), f"exceeds {10 * rx:g} Gy"),
        "11 x Rx": (d * 0 + np.float32(11 * rx), "10 x the highest prescription"),
    }


def test_the_rule(case) -> None:
    rx = case.max_prescription_gy
    ok = check_dose_gy(case.dose.astype(np.float64), where="x", prescription_gy=rx)
    assert ok.dtype == np.float32 and np.array_equal(ok, case.dose)
    for dose, words in bad_doses(case).values():
        with pytest.raises(DataError, match=r"^here: .*" + re.escape(words)):
            check_dose_gy(dose, where="here", prescription_gy=rx)
        with pytest.raises(ModelError):  # the caller's layer picks the error class
            check_dose_gy(dose, where="here", prescription_gy=rx, error=ModelError)
    # the maximum: 10 x the highest prescription, else an absolute cap; allow_high lifts it
    assert max_dose_gy(rx) == 10 * rx and max_dose_gy(None) == HIGH_DOSE_CAP_GY
    high = np.full((2, 2, 2), 5 * HIGH_DOSE_CAP_GY, np.float32)
    with pytest.raises(DataError, match="cap when no prescription is known"):
        check_dose_gy(high, where="x")
    assert check_dose_gy(high, where="x", allow_high=True).max() == 5 * HIGH_DOSE_CAP_GY
    with pytest.raises(DataError, match="integer .* If it holds Gy"):  # small integers: maybe Gy
        check_dose_gy(np.ones((2, 2, 2), np.int64), where="x", prescription_gy=70.0)


def test_case_applies_the_rule(case) -> None:
    for dose, words in bad_doses(case).values():
        with pytest.raises(DataError, match=re.escape(f"{case.source}: dose: ") + ".*" + re.escape(words)):
            dataclasses.replace(case, dose=dose)


def test_scorecard_applies_the_rule(case) -> None:
    card = load_card("phantom_headneck")
    card.score(case, case.dose.astype(np.float64))  # floating doses are fine
    for dose, words in bad_doses(case).values():
        with pytest.raises(ScorecardError, match=re.escape(words)):
            card.score(case, dose)


def test_cli_score_dose_npy_applies_the_rule(case, tmp_path) -> None:
    runner = CliRunner()
    for name, (dose, words) in bad_doses(case).items():
        path = tmp_path / f"{name.replace(' ', '_')}.npy"
        np.save(path, dose)
        out = tmp_path / "r.json"
        args = ["score", "--case", CASE, "--card", "phantom_headneck", "--dose", path, "--out", out]
        result = runner.invoke(app, [str(a) for a in args])
        text = " ".join(result.output.split())
        assert result.exit_code == 2, (name, text)
        assert words in text and str(path) in text, (name, text)
        assert not out.exists()
