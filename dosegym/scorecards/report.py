"""``ScoreReport``: what a scorecard says about one dose.

Per item: structure, metric label (``D95% [Gy]``), value (in the item's output unit), points,
maximum points, status (:class:`ItemStatus`) and comment. The card's ``total`` and ``maximum`` sum
the matched items only; ``normalised = total / maximum`` (NaN when no item matched);
``unmatched`` lists the items whose structure the case lacks, and ``matched_fraction`` (=
``maximum / card_maximum``) says how much of the card the total stands for: 100 % from 3 of
20 items is no 100 % plan (see :mod:`dosegym.scorecards.fit`). A report prints as a rich
table, round-trips through JSON and gives RL a fixed-order vector (:meth:`ScoreReport.vector`).
"""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from rich.table import Table
from rich.text import Text

from dosegym.data.atomic import atomic_path, check_output_path, json_text
from dosegym.errors import ScorecardError


class ItemStatus(str, Enum):
    """How well an item did, from the points it earned (``max``/``min``: its highest/lowest
    score):

    * ``ideal``: ``points == max``;
    * ``fail``: ``points == min`` (nothing earned);
    * with a point flagged ``variation`` (the protocol's "variation acceptable" point, score
      ``s_v``): ``good`` when ``s_v <= points < max``, ``variation`` when ``min < points < s_v``;
    * without one: ``good`` for ``min < points < max``;
    * ``unmatched``: the structure matches nothing in the case (left out of the totals).
    """

    IDEAL = "ideal"
    GOOD = "good"
    VARIATION = "variation"
    FAIL = "fail"
    UNMATCHED = "unmatched"


_STYLE = {
    ItemStatus.IDEAL: "bold green",
    ItemStatus.GOOD: "green",
    ItemStatus.VARIATION: "yellow",
    ItemStatus.FAIL: "bold red",
    ItemStatus.UNMATCHED: "magenta",
}


#: Keys :meth:`ScoreReport.to_dict` adds (derived from the items, dropped on reading).
_DERIVED = ("unmatched", "card_maximum", "matched_fraction")


class ItemResult(BaseModel):
    """The result of one card item (``value``/``points`` are ``None`` when unmatched)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    index: int
    structure: str
    metric: str
    label: str
    unit: str | None = None
    value: float | None = None
    points: float | None = None
    max_points: float
    status: ItemStatus
    comment: str | None = None
    detail: str | None = None


class ScoreReport(BaseModel):
    """Scores of one dose on one case (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    card: str
    case_id: str
    prescription_gy: float | None = None
    items: list[ItemResult]
    total: float
    maximum: float
    normalised: float

    @classmethod
    def build(
        cls, *, card: str, case_id: str, prescription_gy: float | None, items: list[ItemResult]
    ) -> ScoreReport:
        """A report whose totals are computed from ``items``."""
        scored = [r for r in items if r.status is not ItemStatus.UNMATCHED]
        total = float(sum(r.points for r in scored))  # type: ignore[misc]
        maximum = float(sum(r.max_points for r in scored))
        return cls(
            card=card,
            case_id=case_id,
            prescription_gy=prescription_gy,
            items=items,
            total=total,
            maximum=maximum,
            normalised=total / maximum if maximum > 0 else math.nan,
        )

    @property
    def unmatched(self) -> list[ItemResult]:
        """Items whose structure the case lacks (not counted in total or maximum)."""
        return [r for r in self.items if r.status is ItemStatus.UNMATCHED]

    @property
    def card_maximum(self) -> float:
        """The maximum of every item of the card, matched or not."""
        return float(sum(r.max_points for r in self.items))

    @property
    def matched_fraction(self) -> float:
        """The share of the card's maximum that the matched items carry (``maximum /
        card_maximum``; 1.0 when every item matched)."""
        full = self.card_maximum
        return self.maximum / full if full > 0 else 0.0

    # -- vector form for RL --------------------------------------------------------------
    def vector(self, unmatched: float = math.nan) -> np.ndarray:
        """Per-item ``points / max_points`` in card order (``float64``, ``(n_items,)``);
        unmatched items get ``unmatched`` (NaN by default, so they are never read as 0)."""
        return np.array(
            [unmatched if r.points is None else r.points / r.max_points for r in self.items],
            dtype=np.float64,
        )

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``unmatched`` (item indices), ``card_maximum`` and
        ``matched_fraction`` are added for readers."""
        out = self.model_dump(mode="json")
        out["unmatched"] = [r.index for r in self.unmatched]
        out["card_maximum"] = self.card_maximum
        out["matched_fraction"] = self.matched_fraction
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreReport:
        """The inverse of :meth:`to_dict`."""
        if not isinstance(data, dict):
            raise ScorecardError(f"a score report must be a mapping, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in _DERIVED}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ScorecardError(f"invalid score report: {exc}") from None

    def to_json(self, path: str | Path | None = None) -> str:
        """Strict JSON text (NaN and infinities as the strings ``"NaN"``, ``"Infinity"``), written
        atomically to ``path`` when given: a file (new or a regular file), or an existing folder,
        which gets ``score_<case_id>.json``."""
        text = json_text(self.to_dict(), spell_nonfinite=True)
        if path is not None:
            with atomic_path(check_output_path(path, in_folder=f"score_{self.case_id}.json")) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ScoreReport:
        """Read a report from JSON text or a ``.json`` file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text).read_text(encoding="utf-8")
            except OSError as exc:
                raise ScorecardError(f"{text_or_path}: cannot read ({exc.strerror})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScorecardError(f"score report is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # -- display -----------------------------------------------------------------------------
    def table(self) -> Table:
        """A rich table: one row per item, then the totals and the matched share of the card."""
        rx = f", Rx {self.prescription_gy:g} Gy" if self.prescription_gy else ""
        t = Table(title=f"{self.card} on {self.case_id}{rx}", title_justify="left")
        for col, just in (
            ("#", "right"),
            ("structure", "left"),
            ("metric", "left"),
            ("value", "right"),
            ("points", "right"),
            ("max", "right"),
            ("status", "left"),
            ("comment", "left"),
        ):
            t.add_column(col, justify=just)  # type: ignore[arg-type]
        for r in self.items:
            structure = r.structure
            if r.detail and r.status is not ItemStatus.UNMATCHED and ":" not in r.detail:
                structure += f" ({r.detail})"  # the case's own name, e.g. an alias match
            value = "" if r.value is None else f"{r.value:.4g}"
            points = "" if r.points is None else f"{r.points:.2f}"
            t.add_row(
                str(r.index),
                structure,
                r.label,
                value,
                points,
                f"{r.max_points:g}",
                Text(r.status.value, style=_STYLE[r.status]),
                r.comment or "",
            )
        t.add_section()
        t.add_row(
            "",
            "total",
            "",
            "",
            f"{self.total:.2f}",
            f"{self.maximum:g}",
            f"{100 * self.normalised:.1f} %",
            "",
        )
        t.add_row(
            "",
            "matched",
            "",
            "",
            f"{self.maximum:g}",
            f"{self.card_maximum:g}",
            f"{100 * self.matched_fraction:.1f} %",
            "",
        )
        if self.unmatched:
            t.caption = f"{len(self.unmatched)} unmatched item(s) not counted: " + ", ".join(
                f"#{r.index} {r.structure}" for r in self.unmatched
            )
        return t

    def __rich__(self) -> Table:
        return self.table()
