"""The scorecard of each case: the card given at make time, else its site's default card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dosegym.data.case import Case
from dosegym.data.sites import is_phantom, site_key
from dosegym.envs.sources import CaseSource
from dosegym.errors import DosegymError, EnvError
from dosegym.scorecards.registry import available_cards, load_card
from dosegym.scorecards.scorecard import Scorecard

#: Built-in card used when ``scorecard=None``: (site, is a dosegym phantom) -> card name.
DEFAULT_CARDS: dict[tuple[str, bool], str] = {
    ("headneck", True): "phantom_headneck",
    ("prostate", True): "phantom_prostate",
    ("lung", True): "phantom_lung",
    ("headneck", False): "headneck_rtog",
    ("prostate", False): "prostate",
}


def default_card_name(site: Any, phantom: bool) -> str:
    """The built-in card for a case of ``site`` (see :data:`DEFAULT_CARDS`)."""
    key = (site_key(site), bool(phantom))
    if key not in DEFAULT_CARDS:
        raise EnvError(
            f"no default scorecard for site {site!r} ({'phantom' if phantom else 'patient'} "
            f"case); pass scorecard= with a built-in card {available_cards()} or a card file"
        )
    return DEFAULT_CARDS[key]


class CardChooser:
    """The scorecard of each case: the one given at make time (name, file or ``Scorecard``),
    else the built-in default of the case's site (:data:`DEFAULT_CARDS`); with ``rescale``,
    rescaled to the case's highest prescription (:meth:`Scorecard.rescaled`) when the card
    has a prescription that differs from it."""

    def __init__(self, scorecard: str | Path | Scorecard | None, rescale: bool = False) -> None:
        self._cards: dict[str, Scorecard] = {}
        self._rescaled: dict[tuple[int, float, int], Scorecard] = {}
        self.rescale = bool(rescale)
        if scorecard is None or isinstance(scorecard, Scorecard):
            self.fixed = scorecard
        else:
            self.fixed = self.load(scorecard)

    def load(self, name: str | Path) -> Scorecard:
        key = str(name)
        if key not in self._cards:
            try:
                self._cards[key] = load_card(name)
            except DosegymError as exc:
                raise EnvError(f"scorecard {key!r}: {exc}") from exc
        return self._cards[key]

    def card_for(self, case: Case) -> Scorecard:
        if self.fixed is not None:
            card = self.fixed
        else:
            card = self.load(default_card_name(case.meta.get("site"), is_phantom(case)))
        rx = max(case.prescriptions, key=lambda p: p.dose_gy, default=None)
        if not self.rescale or rx is None or card.prescription_gy in (None, rx.dose_gy):
            return card
        key = (id(card), rx.dose_gy, rx.fractions)
        if key not in self._rescaled:
            self._rescaled[key] = card.rescaled(rx.dose_gy, rx.fractions)
        return self._rescaled[key]

    def fix_one_card(self, source: CaseSource, who: str) -> Scorecard:
        """Make one card score every case of ``source``: the given card or, without one, the
        default card of the source's site (``EnvError`` when its sites need several)."""
        if self.fixed is not None:
            return self.fixed
        names = set()
        for i in range(len(source)):
            site, phantom = source.site(i)
            if site is not None:
                names.add(default_card_name(site, bool(phantom)))
        if not names:
            case = source.load(0)
            names.add(default_card_name(case.meta.get("site"), is_phantom(case)))
        if len(names) > 1:
            raise EnvError(
                f"{who} scores every case with one card, but the source's sites need "
                f"{sorted(names)}; pass scorecard= or a single-site source"
            )
        self.fixed = self.load(names.pop())
        return self.fixed
