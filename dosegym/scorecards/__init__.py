"""Scorecards: DVH metrics, structure expressions, the ``Scorecard`` model, card formats
(our YAML and Varian MAAS PlanScoreCard JSON), built-in cards, score reports and whether a
card fits a case (:func:`card_fit`).

Conventions: doses in Gy (total over all fractions), volumes in cc, arrays (z, y, x),
masks ``bool``; '%' doses are relative to the card's (else the case's) prescription.
"""

from dosegym.scorecards.fit import CardFit, card_fit
from dosegym.scorecards.maas import read_maas, write_maas
from dosegym.scorecards.metrics import MetricKind, MetricSpec, compute_metric
from dosegym.scorecards.report import ItemResult, ScoreReport
from dosegym.scorecards.scorecard import (
    BoundScorecard,
    ItemStatus,
    Scorecard,
    ScorecardValidationError,
    ScoreItem,
    ScorePoint,
    TorchScores,
    available_cards,
    load_card,
)
from dosegym.scorecards.structures import (
    StructureResolver,
    StructureSyntaxError,
    UnmatchedStructureError,
    parse_expression,
    parse_varian,
)

__all__ = [
    "BoundScorecard",
    "CardFit",
    "ItemResult",
    "ItemStatus",
    "MetricKind",
    "MetricSpec",
    "ScoreItem",
    "ScorePoint",
    "ScoreReport",
    "Scorecard",
    "ScorecardValidationError",
    "StructureResolver",
    "StructureSyntaxError",
    "TorchScores",
    "UnmatchedStructureError",
    "available_cards",
    "card_fit",
    "compute_metric",
    "load_card",
    "parse_expression",
    "parse_varian",
    "read_maas",
    "write_maas",
]
