"""``BoundScorecard``: a card bound to one case, scoring doses exactly (numpy).

Structures are resolved once per case: ``card.bind(case)`` gives a :class:`BoundScorecard`
for any number of doses (``card.score`` keeps the bindings of the last few cases). Treat
cases and cards as read-only once bound (a binding does not see later edits).

Unmatched structures are never scored as zero. By default (``on_unmatched="error"``) they
raise ``ScorecardError`` naming the item. An item marked ``optional``, or every item of a card
with ``on_unmatched="report"`` (the default of imported MAAS cards, whose structure sets
rarely all exist), gets status ``unmatched`` instead: it is left out of both the total and
the maximum and the report lists it. A structure that resolves to an empty mask always
raises, as does a dose with NaN or infinite values. Batched and differentiable scoring of a
binding is :class:`dosegym.scorecards.soft_card.SoftScorecard` (torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dosegym.data.case import Case
from dosegym.data.dose import check_dose_gy
from dosegym.errors import ScorecardError
from dosegym.scorecards.dvh import DVHCache
from dosegym.scorecards.metrics import NEEDS_BODY, compute_metric
from dosegym.scorecards.report import ItemResult, ItemStatus, ScoreReport
from dosegym.scorecards.schema import CardSchema, ScoreItem
from dosegym.scorecards.structures import StructureResolver, UnmatchedStructureError
from dosegym.scorecards.varian import parse_varian


@dataclass
class _Resolved:
    mask: np.ndarray | None
    occupancy: np.ndarray | None
    body: np.ndarray | None
    detail: str | None  # what matched (when not the item's own name), or why unmatched


class BoundScorecard:
    """A card bound to one case: masks resolved once, then any number of doses scored.

    ``reference_gy``: the dose that '%' doses refer to (the card's prescription, else the
    case's highest). Environments keep one per case and call :meth:`score` as the reward.
    """

    def __init__(self, card: CardSchema, case: Case, on_unmatched: str = "error") -> None:
        if on_unmatched not in ("error", "report"):
            raise ScorecardError(f"on_unmatched must be 'error' or 'report', got {on_unmatched!r}")
        self.card = card
        self.case = case
        self.on_unmatched = on_unmatched
        self.reference_gy = card.prescription_gy or case.max_prescription_gy
        self.resolver = StructureResolver(case, card.structure_map)
        self.resolved = [self._resolve(i, item) for i, item in enumerate(card.items)]

    def _resolve(self, index: int, item: ScoreItem) -> _Resolved:
        where = item.describe(index)
        try:
            mask, occupancy, matched = self._structure_mask(item)
            body = self.resolver.body() if item.metric in NEEDS_BODY else None
        except UnmatchedStructureError as exc:
            if item.optional or self.on_unmatched == "report":
                return _Resolved(None, None, None, str(exc))
            raise ScorecardError(f"{where}: {exc}") from None
        except ScorecardError as exc:
            raise ScorecardError(f"{where}: {exc}") from None
        if not mask.any():
            raise ScorecardError(
                f"{where}: structure {item.structure!r} is empty on case {self.case.case_id!r} "
                "(no voxel); check the expression or its margins"
            )
        return _Resolved(mask, occupancy, body, None if matched == item.structure else matched)

    def _structure_mask(self, item: ScoreItem) -> tuple[np.ndarray, np.ndarray | None, str]:
        """``(mask, occupancy, what matched)`` of an item's structure."""
        r = self.resolver
        if item.maas is None:
            names = [item.structure]
        else:  # Varian order: mapping, StructureId, TemplateStructureId, then the recipe
            s = item.maas.structure
            names = [n for n in dict.fromkeys((s.structure_id, s.template_structure_id)) if n]
        for name in names:
            mapped = r.mapped(name)
            if mapped is not None:
                return r.lookup(name), None, f"mapped: {' | '.join(mapped)}"
        for name in names:
            found = r.case_name(name)
            if found is not None:
                return r.lookup(name, use_map=False), r.occupancy(name), found
        if item.maas is None:
            return r.mask(item.structure), None, item.structure
        s = item.maas.structure
        if s.auto_generated and s.structure_comment:
            return r.mask(parse_varian(s.structure_comment)), None, f"recipe: {s.structure_comment}"
        raise UnmatchedStructureError(
            f"structure {names} matches nothing in case {self.case.case_id!r} (structures: "
            f"{sorted(self.case.structures)}) and has no recipe; add it to the card's "
            "structure_map",
            names[0] if names else item.structure,
        )

    def _check_dose(self, dose_gy: Any, allow_high: bool = False) -> np.ndarray:
        if dose_gy is None:
            if self.case.dose is None:
                raise ScorecardError(f"case {self.case.case_id!r} has no dose to score; pass dose_gy")
            dose_gy = self.case.dose
        dose = np.asarray(dose_gy)
        if dose.shape != self.case.grid.shape:
            raise ScorecardError(
                f"dose has shape {dose.shape}; it must match case {self.case.case_id!r} grid "
                f"{self.case.grid.shape} (z, y, x)"
            )
        where = f"case {self.case.case_id!r}: dose_gy"
        rx = self.case.max_prescription_gy or self.reference_gy
        return check_dose_gy(
            dose, where=where, prescription_gy=rx, allow_high=allow_high, error=ScorecardError
        )

    def structures(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """The structures the card scores on the case, by item ``structure`` (card order, once
        each): ``(mask, occupancy)`` on the case grid; unmatched items left out."""
        out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for item, res in zip(self.card.items, self.resolved):
            if res.mask is not None and item.structure not in out:
                out[item.structure] = (res.mask, res.occupancy)
        return out

    def score(self, dose_gy: np.ndarray | None = None, *, allow_high: bool = False) -> ScoreReport:
        """Score one dose (Gy, ``(z, y, x)``; default the case's) -> ``ScoreReport``.
        ``allow_high``: accept a dose above the dose rule's maximum (the environments, whose
        action spaces allow such doses)."""
        dose = self._check_dose(dose_gy, allow_high)
        cache = DVHCache(dose, self.case.voxel_volume_cc)
        results = []
        for i, (item, res) in enumerate(zip(self.card.items, self.resolved)):
            common = dict(
                index=i,
                structure=item.structure,
                metric=item.metric.value,
                label=item.label,
                unit=item.output_unit,
                max_points=item.max_score,
                comment=item.comment,
            )
            if res.mask is None:
                results.append(ItemResult(**common, status=ItemStatus.UNMATCHED, detail=res.detail))
                continue
            try:
                value = compute_metric(
                    item.spec,
                    cache.source,
                    res.mask,
                    voxel_volume_cc=self.case.voxel_volume_cc,
                    rx_gy=self.reference_gy,
                    body=res.body,
                    occupancy=res.occupancy,
                    cache=cache,
                )
            except ScorecardError as exc:
                raise ScorecardError(f"{item.describe(i)}: {exc}") from None
            if math.isnan(value):
                raise ScorecardError(f"{item.describe(i)}: the metric is undefined (NaN)")
            points = item.score_value(value)
            results.append(
                ItemResult(
                    **common, value=value, points=points, status=item.status(points), detail=res.detail
                )
            )
        return ScoreReport.build(
            card=self.card.name,
            case_id=self.case.case_id,
            prescription_gy=self.reference_gy,
            items=results,
        )
