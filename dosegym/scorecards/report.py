"""``ScoreReport``: what a scorecard says about one dose.

Per item: structure, metric label (``D95% [Gy]``), value (in the item's output unit), points,
maximum points, status (``ideal``/``good``/``variation``/``fail``/``unmatched``, rule in
:mod:`dosegym.scorecards.scorecard`) and comment. The card's ``total`` and ``maximum`` sum
the matched items only; ``normalised = total / maximum`` (NaN when no item matched);
``unmatched`` lists the items whose structure the case lacks. A report prints as a rich
table, round-trips through JSON and gives RL a fixed-order vector (:meth:`ScoreReport.vector`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from rich.table import Table
from rich.text import Text

from dosegym.data.atomic import atomic_path
from dosegym.errors import ScorecardError
from dosegym.scorecards.scorecard import ItemStatus

_STYLE = {
    ItemStatus.IDEAL: "bold green",
    ItemStatus.GOOD: "green",
    ItemStatus.VARIATION: "yellow",
    ItemStatus.FAIL: "bold red",
    ItemStatus.UNMATCHED: "magenta",
}


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
        """A JSON-ready dict; ``unmatched`` (item indices) is added for readers."""
        out = self.model_dump(mode="json")
        out["unmatched"] = [r.index for r in self.unmatched]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreReport:
        """The inverse of :meth:`to_dict`."""
        if not isinstance(data, dict):
            raise ScorecardError(f"a score report must be a mapping, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "unmatched"}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ScorecardError(f"invalid score report: {exc}") from None

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (written atomically to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            with atomic_path(path) as tmp:
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
        """A rich table: one row per item, then the totals."""
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
        if self.unmatched:
            t.caption = f"{len(self.unmatched)} unmatched item(s) not counted: " + ", ".join(
                f"#{r.index} {r.structure}" for r in self.unmatched
            )
        return t

    def __rich__(self) -> Table:
        return self.table()
