"""The card registry: built-in cards (``dosegym/scorecards/cards/*.yaml``) and
:func:`load_card`, which reads a card by name or from a file (our YAML or Varian MAAS JSON)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from dosegym.errors import ScorecardError
from dosegym.scorecards.maas import read_maas
from dosegym.scorecards.scorecard import Scorecard


def _cards_dir():
    return importlib.resources.files("dosegym.scorecards") / "cards"


def available_cards() -> list[str]:
    """Names of the built-in cards (``dosegym/scorecards/cards/*.yaml``)."""
    return sorted(p.name[: -len(".yaml")] for p in _cards_dir().iterdir() if p.name.endswith(".yaml"))


def load_card(name_or_path: str | Path) -> Scorecard:
    """A built-in card by name (``"headneck_rtog"``), or a card file: our YAML (``.yaml`` /
    ``.yml``) or a Varian MAAS PlanScoreCard ``.json``."""
    text = str(name_or_path)
    p = Path(text)
    if p.suffix.lower() == ".json":
        return read_maas(p)
    if p.suffix.lower() in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ScorecardError(f"{p}: no such scorecard file")
        return Scorecard.from_yaml(p)
    names = available_cards()
    if text not in names:
        raise ScorecardError(
            f"unknown scorecard {text!r}: not a file and not a built-in card; built-in: {names}"
        )
    with importlib.resources.as_file(_cards_dir() / f"{text}.yaml") as f:
        return Scorecard.from_yaml(f)
