"""Does a scorecard fit a case? :func:`card_fit` says how much of the card the case can be
scored on and whether the card's prescription is the case's.

A card whose items name structures the case lacks (with ``on_unmatched="report"``, the
default of MAAS cards) leaves those items out of both the total and the maximum, so a
normalised total of 100 % may come from a few items; a card written for 60 Gy scores a
70 Gy plan against the wrong dose levels. A fit is poor when the matched items carry less
than :data:`MIN_MATCHED_FRACTION` of the card's maximum, or when the card's prescription
differs from the case's highest one by more than :data:`RX_RTOL` (relative) and the card
was not rescaled to it (:meth:`~dosegym.scorecards.schema.CardSchema.rescaled`).
The CLI warns on a poor fit; the environments refuse it unless allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dosegym.data.case import Case
from dosegym.scorecards.bound import BoundScorecard
from dosegym.scorecards.scorecard import Scorecard

#: Below this share of the card's maximum carried by matched items, a fit is poor.
MIN_MATCHED_FRACTION = 0.5
#: Relative difference between the card's and the case's prescription that counts as a mismatch.
RX_RTOL = 1e-3


@dataclass(frozen=True)
class CardFit:
    """How a card fits a case (see the module docstring).

    ``matched_maximum`` / ``maximum``: the points the matched items / all items can earn;
    ``matched_fraction``: their ratio; ``unmatched``: ``#index structure`` of the items the
    case lacks; ``card_rx_gy`` / ``case_rx_gy``: the card's prescription (None: '%' doses
    refer to the case) and the case's highest one (None: the case has none).
    """

    card: str
    case_id: str
    n_items: int
    unmatched: tuple[str, ...]
    matched_maximum: float
    maximum: float
    card_rx_gy: float | None
    case_rx_gy: float | None

    @property
    def matched_fraction(self) -> float:
        return self.matched_maximum / self.maximum if self.maximum > 0 else 0.0

    @property
    def rx_mismatch(self) -> bool:
        """The card has a prescription that is not the case's highest one."""
        if self.card_rx_gy is None or self.case_rx_gy is None:
            return False
        return abs(self.card_rx_gy - self.case_rx_gy) > RX_RTOL * self.case_rx_gy

    @property
    def poor_match(self) -> bool:
        """Less than :data:`MIN_MATCHED_FRACTION` of the maximum is matched."""
        return self.matched_fraction < MIN_MATCHED_FRACTION

    @property
    def ok(self) -> bool:
        return not (self.poor_match or self.rx_mismatch)

    def problems(self) -> list[str]:
        """What makes the fit poor, one phrase each (empty when :attr:`ok`)."""
        out = []
        if self.poor_match:
            out.append(
                f"its matched items carry only {self.matched_maximum:g} of its {self.maximum:g} points "
                f"({100 * self.matched_fraction:.1f} % < {100 * MIN_MATCHED_FRACTION:g} %; "
                f"{len(self.unmatched)} of {self.n_items} items unmatched)"
            )
        if self.rx_mismatch:
            out.append(
                f"its prescription {self.card_rx_gy:g} Gy differs from the case's highest "
                f"prescription {self.case_rx_gy:g} Gy"
            )
        return out

    def message(self) -> str:
        """One line: ``card 'X' does not fit case 'Y': ...`` (empty when :attr:`ok`)."""
        if self.ok:
            return ""
        return f"card {self.card!r} does not fit case {self.case_id!r}: " + "; ".join(self.problems())


def card_fit(card: Scorecard, case: Case, bound: BoundScorecard | None = None) -> CardFit:
    """How ``card`` fits ``case``: the share of the card's maximum its matched items carry
    and whether its prescription is the case's (see :class:`CardFit`). ``bound``: an
    existing binding of ``card`` to ``case``; by default the card's cached binding with
    ``on_unmatched="report"`` (that ``card.score`` then reuses). Raises ``ScorecardError``
    when a structure cannot be resolved at all (an empty mask, a bad expression)."""
    if bound is None or bound.card is not card or bound.case is not case:
        bound = card._bound_for(case, "report")
    unmatched = tuple(
        f"#{i} {item.structure}"
        for i, (item, res) in enumerate(zip(card.items, bound.resolved))
        if res.mask is None
    )
    matched_max = sum(item.max_score for item, res in zip(card.items, bound.resolved) if res.mask is not None)
    return CardFit(
        card=card.name,
        case_id=case.case_id,
        n_items=len(card.items),
        unmatched=unmatched,
        matched_maximum=float(matched_max),
        maximum=float(sum(item.max_score for item in card.items)),
        card_rx_gy=card.prescription_gy,
        case_rx_gy=case.max_prescription_gy,
    )
