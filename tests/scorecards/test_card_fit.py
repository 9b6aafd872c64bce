"""Issue 15, rule 4: a scorecard that does not fit the case says so (card_fit, the matched
share in ScoreReport and the CLI); rule 5: a card file in another encoding is a ScorecardError."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from shared_data import LUNG_JSON, PT_108, need
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.data import read_case
from dosegym.errors import ScorecardError
from dosegym.scorecards import ScoreReport, card_fit, load_card
from dosegym.scorecards.fit import MIN_MATCHED_FRACTION

runner = CliRunner()


@pytest.fixture(scope="module")
def lung_card():
    return load_card(need(LUNG_JSON))


@pytest.fixture(scope="module")
def pt108():
    return read_case(need(PT_108))


@pytest.fixture(scope="module")
def headneck():
    return read_case("phantoms:headneck/28")


def test_lung_card_on_a_headneck_phantom_is_a_poor_fit(lung_card, headneck):
    fit = card_fit(lung_card, headneck)
    assert fit.maximum == 120 and fit.matched_maximum == 15
    assert fit.matched_fraction == pytest.approx(0.125) and fit.matched_fraction < MIN_MATCHED_FRACTION
    assert len(fit.unmatched) == 17 and fit.n_items == 20
    assert fit.rx_mismatch and (fit.card_rx_gy, fit.case_rx_gy) == (60.0, 70.0)
    assert not fit.ok
    msg = fit.message()
    for needle in ("'Lung 60Gy'", "'headneck_028'", "12.5 %", "60 Gy", "70 Gy"):
        assert needle in msg


def test_lung_card_on_openkbp_patient(lung_card, pt108):
    fit = card_fit(lung_card, pt108)
    assert (fit.matched_maximum, fit.maximum) == (15.0, 120.0)
    assert fit.poor_match and fit.rx_mismatch
    rescaled = card_fit(lung_card.rescaled(70.0, 35), pt108)
    assert not rescaled.rx_mismatch and rescaled.poor_match


def test_matching_cards_fit(pt108, headneck):
    assert card_fit(load_card("headneck_rtog"), pt108).ok  # 91 of 96 points (Mandible missing)
    fit = card_fit(load_card("phantom_headneck"), headneck)  # this phantom has no PTV63
    assert fit.ok and fit.matched_fraction == pytest.approx(84 / 96) and not fit.message()


def test_report_shows_the_matched_share(lung_card, headneck):
    report = lung_card.score(headneck)
    assert report.card_maximum == 120 and report.maximum == 15
    assert report.matched_fraction == pytest.approx(0.125)
    data = json.loads(report.to_json())
    assert data["matched_fraction"] == pytest.approx(0.125) and data["card_maximum"] == 120
    assert ScoreReport.from_json(report.to_json()) == report
    console = Console(record=True, width=200)
    console.print(report)
    text = console.export_text()
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()]
    assert ["", "matched", "", "", "15", "120", "12.5 %", ""] in rows  # the footer row


def test_cli_warns_and_shows_the_matched_share(pt108, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["score", "--case", str(PT_108), "--card", str(LUNG_JSON), "--out", str(out)])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and len(result.stderr.strip().splitlines()) == 1
    for needle in ("'Lung 60Gy'", "'pt_108'", "15 of its 120 points (12.5 %", "60 Gy", "70 Gy", "--rescale"):
        assert needle in warning[0]
    assert "from 12.5 % of the card's 120 points" in " ".join(result.stdout.split())
    assert json.loads(out.read_text())["matched_fraction"] == pytest.approx(0.125)
    rescaled = runner.invoke(
        app, ["score", "--case", str(PT_108), "--card", str(LUNG_JSON), "--out", str(out), "--rescale"]
    )
    assert rescaled.exit_code == 0 and "70 Gy" not in rescaled.stderr and "12.5 %" in rescaled.stderr


def test_cli_is_quiet_when_the_card_fits(pt108, tmp_path):
    result = runner.invoke(
        app, ["score", "--case", str(PT_108), "--card", "headneck_rtog", "--out", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    assert "from 94.8 % of the card's 96 points" in " ".join(result.stdout.split())


# -- rule 5: encodings -----------------------------------------------------------------------
def test_utf16_cards_with_a_byte_order_mark_load(lung_card, tmp_path):
    text = LUNG_JSON.read_text(encoding="utf-8")
    for enc in ("utf-16", "utf-16-be", "utf-32"):
        path = tmp_path / f"card_{enc}.json"
        bom = {"utf-16-be": b"\xfe\xff"}.get(enc, b"")
        path.write_bytes(bom + text.encode(enc))
        assert load_card(path) == lung_card
    yaml_text = load_card("phantom_lung").to_yaml()
    path = tmp_path / "card.yaml"
    path.write_bytes(yaml_text.encode("utf-16"))
    assert load_card(path) == load_card("phantom_lung")


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("nobom.json", "utf-16-le", "NUL byte at offset 1"),
        ("latin1.yaml", "latin-1", "not UTF-8 text (byte 0xf6"),
        ("binary.json", b"\x89PNG\r\n\x1a\n\xff\xfe\xfd", "not UTF-8 text"),
    ],
)
def test_other_encodings_are_a_scorecard_error(tmp_path, name, data, needle):
    path = tmp_path / name
    text = load_card("phantom_lung").to_yaml().replace("Phantom", "Phant\u00f6m")
    if name.endswith(".json"):
        text = json.dumps({"TemplateName": "Lung \u00f6", "ScoreTemplates": []})
    path.write_bytes(data if isinstance(data, bytes) else text.encode(data))
    with pytest.raises(ScorecardError, match="must be UTF-8") as info:
        load_card(path)
    assert str(path) in str(info.value) and needle in str(info.value)
    result = runner.invoke(app, ["score", "--validate", str(path)])
    assert result.exit_code > 0 and isinstance(result.exception, SystemExit)  # a message, no traceback
    assert needle in " ".join(result.stderr.split())
