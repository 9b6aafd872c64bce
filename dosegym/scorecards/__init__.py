"""Scorecards: DVH metrics, structure expressions, the ``Scorecard`` model, card formats
(our YAML and Varian MAAS PlanScoreCard JSON), built-in cards, score reports, whether a card
fits a case (:func:`card_fit`) and the batched, differentiable :class:`SoftScorecard`.

Conventions: doses in Gy (total over all fractions), volumes in cc, arrays (z, y, x),
masks ``bool``; '%' doses are relative to the card's (else the case's) prescription.

Modules, one job each: ``schema`` (the pydantic models and their validation), ``bound`` (a
card bound to a case, numpy scoring), ``scorecard`` (the public ``Scorecard``: binding,
scoring, YAML files), ``registry`` (built-in cards, ``load_card``), ``maas`` (MAAS I/O),
``report`` (``ScoreReport``, ``ItemStatus``), ``varian`` (Varian structure recipes),
``curve`` (scoring curves), ``groups``
(objective groups), ``model_grid`` (a case's structures on another grid), ``soft_card`` (torch
scoring of a binding), ``soft`` / ``metrics_torch`` (torch metrics). Importing this package
does not import torch: :class:`SoftScorecard` and :class:`TorchScores` load it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dosegym.scorecards.bound import BoundScorecard
from dosegym.scorecards.fit import CardFit, card_fit
from dosegym.scorecards.groups import GROUP_NAMES, objective_group
from dosegym.scorecards.maas import read_maas, write_maas
from dosegym.scorecards.metrics import MetricKind, MetricSpec, compute_metric
from dosegym.scorecards.model_grid import model_grid_case
from dosegym.scorecards.registry import available_cards, load_card
from dosegym.scorecards.report import ItemResult, ItemStatus, ScoreReport
from dosegym.scorecards.schema import CardSchema, ScorecardValidationError, ScoreItem, ScorePoint
from dosegym.scorecards.scorecard import Scorecard
from dosegym.scorecards.structures import (
    StructureResolver,
    StructureSyntaxError,
    UnmatchedStructureError,
    parse_expression,
)
from dosegym.scorecards.varian import parse_varian, to_varian

_LAZY = {"SoftScorecard": "dosegym.scorecards.soft_card", "TorchScores": "dosegym.scorecards.soft_card"}


def __getattr__(name: str) -> Any:
    """The torch scorer, imported on first use (it imports torch)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dosegym.scorecards' has no attribute {name!r}")


__all__ = [
    "GROUP_NAMES",
    "BoundScorecard",
    "CardFit",
    "CardSchema",
    "ItemResult",
    "ItemStatus",
    "MetricKind",
    "MetricSpec",
    "ScoreItem",
    "ScorePoint",
    "ScoreReport",
    "Scorecard",
    "ScorecardValidationError",
    "SoftScorecard",
    "StructureResolver",
    "StructureSyntaxError",
    "TorchScores",
    "UnmatchedStructureError",
    "available_cards",
    "card_fit",
    "compute_metric",
    "load_card",
    "model_grid_case",
    "objective_group",
    "parse_expression",
    "parse_varian",
    "read_maas",
    "to_varian",
    "write_maas",
]
