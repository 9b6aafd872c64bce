"""The ``Scorecard``: items that turn a dose into points, as in Varian's PlanScoreCard.

A card has a prescription (``prescription_gy`` = ``dose_per_fraction_gy`` x ``fractions``;
any two given fill in the third) and a list of :class:`ScoreItem`. Each item names a
structure (a name or an expression, see :mod:`dosegym.scorecards.structures`), a metric
(:class:`~dosegym.scorecards.metrics.MetricKind` with its argument ``value`` and units) and a
piecewise-linear curve of :class:`ScorePoint` ``(x, score)``.

Scoring (as PlanScoreCard's ``GetScore``): the points are sorted by ``x``; the score is linear
between points and clamped beyond the ends; one point gives its score. A card's total is
the sum of its items' points, its maximum the sum of each item's highest score, and the
normalised total their ratio. '%' doses are relative to ``prescription_gy``, or to the
case's highest prescription when the card has none.

Item status, from the points an item earned (``max``/``min``: its highest/lowest score):

* ``ideal``: ``points == max``;
* ``fail``: ``points == min`` (nothing earned);
* with a point flagged ``variation`` (the protocol's "variation acceptable" point, score
  ``s_v``): ``good`` when ``s_v <= points < max``, ``variation`` when ``min < points < s_v``;
* without one: ``good`` for ``min < points < max``;
* ``unmatched``: the structure matches nothing in the case.

Unmatched structures are never scored as zero. By default (``on_unmatched="error"``) they
raise ``ScorecardError`` naming the item. An item marked ``optional``, or every item of a card
with ``on_unmatched="report"`` (the default of imported MAAS cards, whose structure sets
rarely all exist), gets status ``unmatched`` instead: it is left out of both the total and
the maximum and the report lists it. A structure that resolves to an empty mask always
raises, as does a dose with NaN or infinite values.

Structures are resolved once per case: ``card.bind(case)`` gives a :class:`BoundScorecard`
for any number of doses, and ``card.score`` / ``card.score_torch`` keep the bindings of the
last ``BIND_CACHE_SIZE`` cases. Treat cases and cards as read-only once scored (a binding
does not see later edits); environments with many cases keep their own bindings.

Validation collects every problem with its location (``item 3 ('PTV70', DoseAtVolume):
points: ...``) and raises :class:`ScorecardValidationError`: unknown metric, invalid or
missing unit, argument out of range (``D120%``, ``V-5Gy``), no points, points whose ``x``
repeat or scores that are not monotone in ``x``, a highest score not above 0, and structure
expressions that do not parse.
"""

from __future__ import annotations

import codecs
import importlib.resources
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from dosegym.data.atomic import atomic_path
from dosegym.data.case import Case, canonical_name
from dosegym.data.dose import check_dose_gy
from dosegym.errors import ScorecardError
from dosegym.scorecards.dvh import DVHCache
from dosegym.scorecards.metrics import NEEDS_BODY, MetricKind, MetricSpec, compute_metric
from dosegym.scorecards.soft import piecewise_linear
from dosegym.scorecards.structures import (
    StructureResolver,
    StructureSyntaxError,
    UnmatchedStructureError,
    normalise_structure_map,
    parse_expression,
    parse_varian,
)

if TYPE_CHECKING:
    from dosegym.scorecards.report import ScoreReport

K = MetricKind
_UNITS = {"gy": "Gy", "cgy": "cGy", "%": "%", "cc": "cc", "cm3": "cc", "cm³": "cc"}
_NOT_IMPLEMENTED = {"Volume", "Undefined"}


#: how many cases a card keeps bound (masks resolved) for ``score`` / ``score_torch``
BIND_CACHE_SIZE = 4


class _BindCache(dict):
    """Bindings of a card to recent cases (``(id(case), on_unmatched) -> BoundScorecard``; the
    binding holds the case, so an id is not reused while cached). A cache, not state: it
    never makes two cards unequal and is not copied."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BindCache)

    __hash__ = None  # type: ignore[assignment]

    def __deepcopy__(self, memo: dict) -> _BindCache:
        return _BindCache()


class ScorecardValidationError(ScorecardError):
    """A card with problems; ``problems`` lists each one with its location."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        head = f"{source}: " if source else ""
        n = len(self.problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}invalid scorecard ({n} problem{'s' * (n != 1)}):\n{body}")


class ItemStatus(str, Enum):
    """How well an item did (see the module docstring for the rule)."""

    IDEAL = "ideal"
    GOOD = "good"
    VARIATION = "variation"
    FAIL = "fail"
    UNMATCHED = "unmatched"


def canonical_unit(unit: str | None) -> str | None:
    """``'CC'``/``'cm3'`` -> ``'cc'``, ``'gy'`` -> ``'Gy'``...; unknown units pass unchanged."""
    if unit is None:
        return None
    return _UNITS.get(str(unit).strip().lower(), str(unit).strip())


# -- Varian-only fields, kept so that a MAAS card round-trips --------------------------------
class MaasStructure(BaseModel):
    """PlanScoreCard ``Structure`` fields. ``None`` for the last two means "key absent"."""

    model_config = ConfigDict(extra="forbid")

    structure_id: str | None = None
    structure_comment: str | None = None
    template_structure_id: str | None = None
    structure_code: str | None = None
    auto_generated: bool = False
    is_contoured: bool | None = None
    make_visible_in_patient_search: bool | None = None

    @property
    def display_id(self) -> str | None:
        """``StructureId``, or ``TemplateStructureId`` when it is empty (as the tool does)."""
        return self.structure_id or self.template_structure_id


class MaasItem(BaseModel):
    """PlanScoreCard metric fields with no counterpart in :class:`ScoreItem`."""

    model_config = ConfigDict(extra="forbid")

    structure: MaasStructure = Field(default_factory=MaasStructure)
    rank: int = 0
    template_number: int | None = None
    acceptable_level: float | str | None = None
    variation_level: float | str | None = None
    fail_level: float | str | None = None
    hi_target_unit: str | None = None


class ScorePoint(BaseModel):
    """One point of an item's curve: metric value ``x`` (in the item's output unit) -> ``score``.

    ``variation`` flags the protocol's "variation acceptable" point (at most one per item);
    ``colors`` ([R, G, B], 0-255) and ``color_value`` are PlanScoreCard display fields.
    YAML also accepts the short forms ``[x, score]``, ``[x, score, label]`` and
    ``[x, score, label, variation]``.
    """

    model_config = ConfigDict(extra="forbid")

    x: float
    score: float
    label: str | None = None
    variation: bool = False
    colors: list[float] | None = None
    color_value: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if isinstance(data, (list, tuple)):
            if not 2 <= len(data) <= 4:
                raise ValueError(
                    f"a short point is [x, score], [x, score, label] or [x, score, label, "
                    f"variation], got {data!r}"
                )
            return dict(zip(("x", "score", "label", "variation"), data))
        return data


class ScoreItem(BaseModel):
    """One scored metric on one structure (see the module docstring).

    Attributes:
        structure: a structure name or expression (``"Lung_L + Lung_R - GTV"``). For MAAS
            items it is the Varian structure ID, matched by the Varian rules (``maas``).
        metric: the metric kind; ``value`` its argument in ``input_unit``.
        output_unit: unit of the metric value and of the points' ``x``.
        hi_value, lo_value, target_value: HomogeneityIndex / ModifiedGradientIndex parameters.
        points: the scoring curve (any order; sorted by ``x`` when scoring).
        optional: report the item as ``unmatched`` instead of failing when its structure is
            missing from a case.
        priority: an ordering hint for agents and reports (1 = first); PlanScoreCard has none.
        maas: PlanScoreCard-only fields (``None`` for our own cards).
    """

    model_config = ConfigDict(extra="forbid")

    structure: str
    optional: bool = False
    metric: MetricKind
    value: float | None = None
    input_unit: str | None = None
    output_unit: str | None = None
    hi_value: float | None = None
    lo_value: float | None = None
    target_value: float | None = None
    points: list[ScorePoint]
    comment: str | None = None
    priority: int = 1
    maas: MaasItem | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ScorecardValidationError(
                [line for e in exc.errors() for line in _error_line(e).split("\n")]
            ) from None

    @field_validator("metric", mode="before")
    @classmethod
    def _metric(cls, v: Any) -> Any:
        if isinstance(v, MetricKind):
            return v
        valid = [k.value for k in MetricKind]
        if isinstance(v, str):
            for k in MetricKind:
                if v.strip().lower() in (k.value.lower(), k.name.lower()):
                    return k
            if v in _NOT_IMPLEMENTED:
                raise ValueError(
                    f"metric {v!r} is not implemented (PlanScoreCard computes no value for it "
                    f"either); valid: {valid}"
                )
        raise ValueError(f"unknown metric {v!r}; valid: {valid}")

    @field_validator("input_unit", "output_unit", mode="before")
    @classmethod
    def _unit(cls, v: Any) -> Any:
        return canonical_unit(v) if isinstance(v, str) else v

    @field_validator("points")
    @classmethod
    def _points(cls, points: list[ScorePoint]) -> list[ScorePoint]:
        problems = _point_problems(points)
        if problems:
            raise ValueError("\n".join(problems))
        return points

    @model_validator(mode="after")
    def _check(self) -> ScoreItem:
        problems = self.problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: Any) -> ScoreItem:
        """Report field errors *and* the metric/structure checks, which pydantic would skip
        once a field fails: those are re-run on a probe without the failing fields."""
        try:
            return handler(data)
        except ValidationError as exc:
            errors = exc.errors()
            lines = [_error_line(e) for e in errors]
            bad = {e["loc"][0] for e in errors if e["loc"]}
            if bad and isinstance(data, dict) and not bad & {"metric", "structure", "maas"}:
                probe = {k: v for k, v in data.items() if k not in bad and k in cls.model_fields}
                probe["points"] = [{"x": 0.0, "score": 1.0}]
                try:
                    cls.model_validate(probe)
                except ValidationError as inner:
                    lines += [_error_line(e) for e in inner.errors() if not e["loc"]]
            raise ValueError("\n".join(dict.fromkeys(lines))) from None

    def problems(self) -> list[str]:
        """The problems of this item's metric and structure (empty when valid); the points
        are checked on their own (:func:`_point_problems`) so that both are reported."""
        out: list[str] = []
        try:
            self.spec.validate("metric")
        except ScorecardError as exc:
            out.append(str(exc))
        if self.maas is None:
            try:
                parse_expression(self.structure)
            except StructureSyntaxError as exc:
                out.append(f"structure: {exc}")
        return out

    # -- derived ----------------------------------------------------------------------------
    @property
    def spec(self) -> MetricSpec:
        """The metric as :class:`MetricSpec`."""
        return MetricSpec(
            self.metric,
            self.value,
            self.input_unit,
            self.output_unit,
            self.hi_value,
            self.lo_value,
            self.target_value,
        )

    @property
    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(xs, scores)`` sorted by ``x`` (ascending)."""
        pts = sorted(self.points, key=lambda p: p.x)
        return np.array([p.x for p in pts]), np.array([p.score for p in pts])

    @property
    def max_score(self) -> float:
        return max(p.score for p in self.points)

    @property
    def min_score(self) -> float:
        return min(p.score for p in self.points)

    @property
    def label(self) -> str:
        """A short metric label: ``D95% [Gy]``, ``V20Gy [%]``, ``Dmean [Gy]``, ``CN(60Gy)``."""
        k, v = self.metric, self.value
        iu, ou = self.input_unit or "", self.output_unit
        arg = "" if v is None else f"{v:g}{iu}"
        unit = f" [{ou}]" if ou else ""
        names = {K.MIN_DOSE: "Dmin", K.MAX_DOSE: "Dmax", K.MEAN_DOSE: "Dmean"}
        if k in names:
            return names[k] + unit
        if k is K.DOSE_AT_VOLUME:
            return f"D{arg}{unit}"
        if k is K.VOLUME_AT_DOSE:
            return f"V{arg}{unit}"
        if k is K.NEAR_MAX_DOSE:
            return f"D{arg or '0.03cc'} (near-max){unit}"
        if k is K.DOSE_AT_SUBVOLUME:
            return f"D(V-{arg}){unit}"
        if k in (K.HOMOGENEITY_INDEX, K.MODIFIED_GRADIENT_INDEX):
            lo = "" if self.lo_value is None else f"{self.lo_value:g}"
            hi = "" if self.hi_value is None else f"{self.hi_value:g}"
            return f"{k.value}({hi},{lo})" if lo or hi else k.value
        return f"{k.value}({arg}){unit}" if arg else f"{k.value}{unit}"

    def describe(self, index: int) -> str:
        """``item 3 ('PTV70', D95% [Gy])``: how messages name this item."""
        return f"item {index} ({self.structure!r}, {self.label})"

    def status(self, points: float) -> ItemStatus:
        """The status earned by ``points`` (see the module docstring)."""
        hi, lo = self.max_score, self.min_score
        tol = 1e-9 * max(1.0, abs(hi), abs(lo))
        if points >= hi - tol:
            return ItemStatus.IDEAL
        if points <= lo + tol:
            return ItemStatus.FAIL
        flagged = [p.score for p in self.points if p.variation]
        if flagged and points < flagged[0] - tol:
            return ItemStatus.VARIATION
        return ItemStatus.GOOD

    def score_value(self, value: float) -> float:
        """Points for a metric value (piecewise linear through the sorted points, clamped)."""
        xs, ys = self.curve
        return float(piecewise_linear(value, xs, ys))


def _point_problems(points: list[ScorePoint]) -> list[str]:
    """Problems of a scoring curve: no point, non-finite values, a repeated x, scores not
    monotone in x, a highest score <= 0, more than one variation point."""
    if not points:
        return ["needs at least 1 point (x, score)"]
    xs = [p.x for p in points]
    ys = [p.score for p in points]
    if not all(math.isfinite(v) for v in xs + ys):
        return ["x and score must be finite numbers"]
    out = []
    order = np.argsort(xs, kind="stable")
    sx, sy = np.asarray(xs)[order], np.asarray(ys)[order]
    dup = sorted({float(a) for a, b in zip(sx[:-1], sx[1:]) if a == b})
    if dup:
        out.append(f"x must be strictly increasing once sorted; x {dup} repeats")
    dy = np.diff(sy)
    if np.any(dy > 0) and np.any(dy < 0):
        pairs = ", ".join(f"({a:g}, {b:g})" for a, b in zip(sx, sy))
        out.append(f"scores must be monotone in x (all rising or all falling), got {pairs}")
    if max(ys) <= 0:
        out.append(f"the highest score must be > 0, got {max(ys):g}")
    if sum(p.variation for p in points) > 1:
        out.append("at most one point may be flagged variation")
    return out


# -- the card --------------------------------------------------------------------------------
class Scorecard(BaseModel):
    """A scorecard (see the module docstring). Build with :meth:`from_dict`,
    :meth:`from_yaml`, :func:`dosegym.scorecards.maas.read_maas` or :func:`load_card`.

    Attributes:
        name, site, description, creator: identification (``creator`` from MAAS files).
        prescription_gy, fractions, dose_per_fraction_gy: the card's Rx (Gy total over
            ``fractions``); ``None`` when the card has none ('%' doses then refer to the case).
        references: sources of the constraints.
        structure_map: template structure name -> case structure expression, or a list of
            alternatives tried in order (see :mod:`~dosegym.scorecards.structures`).
        on_unmatched: ``"error"`` (default) or ``"report"`` (see the module docstring).
        items: the scored metrics, in card order.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    site: str | None = None
    description: str | None = None
    creator: str | None = None
    prescription_gy: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    fractions: int | None = Field(default=None, ge=1)
    dose_per_fraction_gy: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    references: list[str] = Field(default_factory=list)
    structure_map: dict[str, str | list[str]] = Field(default_factory=dict)
    on_unmatched: Literal["error", "report"] = "error"
    items: list[ScoreItem] = Field(min_length=1)

    _bound: _BindCache = PrivateAttr(default_factory=lambda: _BindCache())

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ScorecardValidationError(_format_errors(exc, data)) from None

    @field_validator("structure_map")
    @classmethod
    def _map(cls, v: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        try:
            normalise_structure_map(v)
        except ScorecardError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _rx(self) -> Scorecard:
        rx, fx, dpf = self.prescription_gy, self.fractions, self.dose_per_fraction_gy
        if rx is None and dpf is not None and fx is not None:
            self.prescription_gy = dpf * fx
        elif dpf is None and rx is not None and fx is not None:
            self.dose_per_fraction_gy = rx / fx
        elif rx is not None and dpf is not None and fx is None:
            self.fractions = round(rx / dpf)
            if abs(self.fractions * dpf - rx) > 1e-6 * rx:
                raise ValueError(
                    f"prescription_gy {rx:g} is not a whole number of fractions of "
                    f"dose_per_fraction_gy {dpf:g}"
                )
        elif rx is not None and dpf is not None and fx is not None:
            if abs(dpf * fx - rx) > 1e-6 * max(1.0, rx):
                raise ValueError(f"prescription_gy {rx:g} != dose_per_fraction_gy {dpf:g} x fractions {fx}")
        return self

    # -- construction and files -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> Scorecard:
        """Validate a plain dict (our YAML schema); problems raise ``ScorecardValidationError``."""
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ScorecardValidationError(
                ["a scorecard must be a mapping of field names ('name', 'items', ...) to values"],
                source,
            )
        try:
            return cls(**data)
        except ScorecardValidationError as exc:
            raise ScorecardValidationError(exc.problems, source) from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready dict (defaults left out); ``from_dict`` restores an equal card."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Scorecard:
        """Read a card in our YAML schema."""
        p = Path(path)
        text = read_card_text(p)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ScorecardError(f"{p}: not valid YAML{where}: {exc}") from None
        return cls.from_dict(data, source=str(p))

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The card as YAML text (written atomically to ``path`` when given)."""
        text = "# dosegym scorecard (see dosegym.scorecards.scorecard for the schema)\n"
        text += yaml.dump(
            _flow_points(self.to_dict()), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
        )
        if path is not None:
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return text

    # -- prescription -----------------------------------------------------------------------
    def rescaled(self, dose_gy: float, fractions: int) -> Scorecard:
        """A copy for another prescription, as PlanScoreCard's ``ScaleScorecard`` does.

        With ``f = dose_gy / prescription_gy``: the points' ``x`` of MinDose, MaxDose,
        MeanDose and DoseAtVolume (and our NearMaxDose, IntegralDose) scale by ``f`` unless the
        output unit is '%'; the ``value`` of VolumeAtDose, ConformationNumber and
        ConformityIndex (and our PaddickConformityIndex, GradientIndex) scales unless its
        unit is '%'; HomogeneityIndex's ``target_value`` scales unless '%'. DoseAtSubVolume,
        ModifiedGradientIndex and VolumeOfRegret doses and the labels are left alone. The
        copy gets ``prescription_gy = dose_gy`` over ``fractions``. (Linear scaling, not EQD2.)
        """
        if self.prescription_gy is None:
            raise ScorecardError(f"card {self.name!r} has no prescription to rescale from")
        if not (math.isfinite(dose_gy) and dose_gy > 0) or int(fractions) < 1:
            raise ScorecardError(
                f"rescaled(): need a dose > 0 Gy and fractions >= 1, got {dose_gy} / {fractions}"
            )
        f = float(dose_gy) / self.prescription_gy
        items = []
        for item in self.items:
            upd: dict[str, Any] = {}
            k = item.metric
            if (
                k in (K.MIN_DOSE, K.MAX_DOSE, K.MEAN_DOSE, K.DOSE_AT_VOLUME, K.NEAR_MAX_DOSE, K.INTEGRAL_DOSE)
                and item.output_unit != "%"
            ):
                upd["points"] = [p.model_copy(update={"x": p.x * f}) for p in item.points]
            elif (
                k
                in (
                    K.VOLUME_AT_DOSE,
                    K.CONFORMATION_NUMBER,
                    K.CONFORMITY_INDEX,
                    K.PADDICK_CI,
                    K.GRADIENT_INDEX,
                )
                and item.input_unit != "%"
                and item.value is not None
            ):
                upd["value"] = item.value * f
            elif k is K.HOMOGENEITY_INDEX and item.input_unit != "%" and item.target_value:
                upd["target_value"] = item.target_value * f
            items.append(item.model_copy(update=upd, deep=True))
        return Scorecard(
            **{
                **self.model_dump(exclude={"items"}),
                "prescription_gy": float(dose_gy),
                "fractions": int(fractions),
                "dose_per_fraction_gy": float(dose_gy) / int(fractions),
                "items": [i.model_dump() for i in items],
            }
        )

    # -- checks that need no case -----------------------------------------------------------
    def problems(self) -> list[str]:
        """Problems that make items unscorable on every case, though the card is valid:
        an auto-generated MAAS structure whose recipe does not parse (e.g. asymmetric
        margins) and that ``structure_map`` does not map."""
        out = []
        mapped = {canonical_name(k) for k in self.structure_map}
        for i, item in enumerate(self.items):
            m = item.maas
            if m is None or not m.structure.auto_generated or not m.structure.structure_comment:
                continue
            ids = (m.structure.structure_id, m.structure.template_structure_id)
            if any(n and canonical_name(n) in mapped for n in ids):
                continue
            try:
                parse_varian(m.structure.structure_comment)
            except StructureSyntaxError as exc:
                out.append(f"{item.describe(i)}: structure recipe: {exc}")
        return out

    # -- scoring ----------------------------------------------------------------------------
    def bind(self, case: Case, *, on_unmatched: str | None = None) -> BoundScorecard:
        """Resolve every item's structure on ``case`` once (see :class:`BoundScorecard`)."""
        return BoundScorecard(self, case, on_unmatched=on_unmatched or self.on_unmatched)

    def _bound_for(self, case: Case, on_unmatched: str | None) -> BoundScorecard:
        """The binding to ``case`` from the cache of the ``BIND_CACHE_SIZE`` most recently
        scored cases (least recently used dropped first), else a new one."""
        mode = on_unmatched or self.on_unmatched
        key = (id(case), mode)
        bound = self._bound.pop(key, None)
        if bound is None or bound.case is not case:
            bound = self.bind(case, on_unmatched=mode)
        self._bound[key] = bound  # most recent last
        while len(self._bound) > BIND_CACHE_SIZE:
            self._bound.pop(next(iter(self._bound)))
        return bound

    def score(
        self, case: Case, dose_gy: np.ndarray | None = None, *, on_unmatched: str | None = None
    ) -> ScoreReport:
        """Score ``dose_gy`` (Gy, ``case.grid.shape``; default ``case.dose``) -> ``ScoreReport``.

        Structures are resolved once per case and cached on the card.
        """
        return self._bound_for(case, on_unmatched).score(dose_gy)

    def score_torch(
        self,
        case: Case,
        dose_gy,
        *,
        temperature: float | None = None,
        on_unmatched: str | None = None,
    ) -> TorchScores:
        """Batched scoring in torch: ``dose_gy`` ``(B, Z, Y, X)`` (or ``(Z, Y, X)``) in Gy.

        Returns :class:`TorchScores` (totals ``(B,)``, points ``(B, n_items)``). With
        ``temperature`` (Gy) the metrics are the smooth ones of :mod:`~dosegym.scorecards.soft`.
        """
        return self._bound_for(case, on_unmatched).score_torch(dose_gy, temperature=temperature)


class TorchScores(NamedTuple):
    """Batched scores: ``total`` ``(B,)``, ``points`` ``(B, n_items)`` (NaN columns for
    unmatched items, left out of ``total``), ``max_points`` ``(n_items,)``, ``matched``
    ``(n_items,)`` bool."""

    total: Any
    points: Any
    max_points: Any
    matched: Any


@dataclass
class _Resolved:
    mask: np.ndarray | None
    occupancy: np.ndarray | None
    body: np.ndarray | None
    detail: str | None  # what matched (when not the item's own name), or why unmatched


class BoundScorecard:
    """A card bound to one case: masks resolved once, then any number of doses scored.

    Environments keep one per case and call :meth:`score` (numpy, exact) or
    :meth:`score_torch` (batched) as the reward.
    """

    def __init__(self, card: Scorecard, case: Case, on_unmatched: str = "error") -> None:
        if on_unmatched not in ("error", "report"):
            raise ScorecardError(f"on_unmatched must be 'error' or 'report', got {on_unmatched!r}")
        self.card = card
        self.case = case
        self.on_unmatched = on_unmatched
        self.rx_gy = card.prescription_gy or case.max_prescription_gy
        self.resolver = StructureResolver(case, card.structure_map)
        self.resolved = [self._resolve(i, item) for i, item in enumerate(card.items)]
        self._torch: dict[Any, list[tuple[Any, Any, Any] | None]] = {}

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
        rx = self.case.max_prescription_gy or self.rx_gy
        return check_dose_gy(
            dose, where=where, prescription_gy=rx, allow_high=allow_high, error=ScorecardError
        )

    def score(self, dose_gy: np.ndarray | None = None, *, allow_high: bool = False) -> ScoreReport:
        """Score one dose (Gy, ``(z, y, x)``; default the case's) -> ``ScoreReport``.
        ``allow_high``: accept a dose above the dose rule's maximum (the environments, whose
        action spaces allow such doses)."""
        from dosegym.scorecards.report import ItemResult, ScoreReport

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
                    rx_gy=self.rx_gy,
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
            prescription_gy=self.rx_gy,
            items=results,
        )

    def _torch_masks(self, device: Any) -> list[tuple[Any, Any, Any] | None]:
        import torch

        key = str(device)
        if key not in self._torch:

            def t(a: np.ndarray | None):
                return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

            self._torch[key] = [
                None if r.mask is None else (t(r.mask), t(r.body), t(r.occupancy)) for r in self.resolved
            ]
        return self._torch[key]

    def score_torch(self, dose_gy, *, temperature: float | None = None) -> TorchScores:
        """Batched scores of ``dose_gy`` ``(B, Z, Y, X)`` (or ``(Z, Y, X)``) in Gy (torch)."""
        import torch

        from dosegym.scorecards.metrics_torch import compute_metric_torch
        from dosegym.scorecards.soft import soft_metric_torch, soft_piecewise_linear

        if not isinstance(dose_gy, torch.Tensor):
            raise ScorecardError(f"score_torch needs a torch tensor, got {type(dose_gy).__name__}")
        dose = dose_gy if dose_gy.ndim == 4 else dose_gy.unsqueeze(0)
        if dose.ndim != 4 or tuple(dose.shape[1:]) != self.case.grid.shape:
            raise ScorecardError(
                f"dose has shape {tuple(dose_gy.shape)}; need (B, *{self.case.grid.shape}) in Gy"
            )
        if not bool(torch.isfinite(dose).all()):
            raise ScorecardError("dose contains NaN or infinite values: refusing to score")
        columns = []
        for i, (item, masks) in enumerate(zip(self.card.items, self._torch_masks(dose.device))):
            if masks is None:
                columns.append(torch.full((dose.shape[0],), math.nan, dtype=dose.dtype, device=dose.device))
                continue
            mask, body, occ = masks
            kw = dict(voxel_volume_cc=self.case.voxel_volume_cc, rx_gy=self.rx_gy, body=body, occupancy=occ)
            try:
                if temperature is None:
                    value = compute_metric_torch(item.spec, dose, mask, **kw)
                else:
                    value = soft_metric_torch(item.spec, dose, mask, temperature=temperature, **kw)
            except ScorecardError as exc:
                raise ScorecardError(f"{item.describe(i)}: {exc}") from None
            if bool(torch.isnan(value).any()):
                raise ScorecardError(f"{item.describe(i)}: the metric is undefined (NaN)")
            xs, ys = item.curve
            columns.append(soft_piecewise_linear(value, xs, ys).to(dose.dtype))
        points = torch.stack(columns, dim=1)
        matched = torch.tensor([r.mask is not None for r in self.resolved], device=dose.device)
        max_points = torch.tensor(
            [it.max_score for it in self.card.items], dtype=dose.dtype, device=dose.device
        )
        total = torch.where(matched, points, torch.zeros_like(points)).sum(dim=1)
        if dose_gy.ndim == 3:
            return TorchScores(total[0], points[0], max_points, matched)
        return TorchScores(total, points, max_points, matched)


# -- error formatting ------------------------------------------------------------------------
def _item_name(index: int, raw: Any) -> str:
    if isinstance(raw, dict):
        return f"item {index} ({raw.get('structure')!r}, {raw.get('metric')})"
    return f"item {index}"


def _error_line(err: Any) -> str:
    """One pydantic error as ``field.sub: message`` (multi-line messages kept)."""
    loc = list(err["loc"])
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    nested = (err.get("ctx") or {}).get("error")
    if isinstance(nested, ScorecardValidationError):
        msg = "\n".join(nested.problems)
    if err["type"] == "extra_forbidden":
        msg = f"unknown field {loc[-1]!r}"
        loc = loc[:-1]
    elif err["type"] == "missing":
        msg = f"required field {loc[-1]!r} is missing"
        loc = loc[:-1]
    where = ".".join(str(p) for p in loc)
    return "\n".join(f"{where}: {line}" if where else line for line in msg.split("\n"))


def _format_errors(exc: ValidationError, data: Any) -> list[str]:
    """One line per problem, each prefixed with its location (item index, field)."""
    items = data.get("items") if isinstance(data, dict) else None
    out: list[str] = []
    for err in exc.errors():
        loc = list(err["loc"])
        if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int):
            raw = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else None
            head = _item_name(loc[1], raw)
            err = {**err, "loc": tuple(loc[2:])}
        else:
            head = "card"
        out += [f"{head}: {line}" for line in _error_line(err).split("\n")]
    return out


# -- YAML output -----------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    pass


class _FlowDict(dict):
    pass


class _FlowList(list):
    pass


_Dumper.add_representer(
    _FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True)
)
_Dumper.add_representer(
    _FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


def _flow_points(card: dict[str, Any]) -> dict[str, Any]:
    for item in card.get("items", []):
        pts = []
        for p in item.get("points", []):
            p = dict(p)
            if "colors" in p:
                p["colors"] = _FlowList(p["colors"])
            pts.append(_FlowDict(p))
        item["points"] = pts
    return card


# -- card files ------------------------------------------------------------------------------
#: Byte-order marks of the encodings read besides UTF-8 (UTF-32 first: its LE mark starts with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_card_text(path: Path) -> str:
    """The text of a card file: UTF-8 (with or without a byte-order mark), or UTF-16/32 with
    one (what Windows tools such as PowerShell's ``Out-File`` write). A NUL byte (UTF-16
    without its mark, a binary file) or bytes that do not decode raise ``ScorecardError``
    naming the file and the offset."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ScorecardError(f"{path}: cannot read ({exc.strerror})") from exc
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8-sig")
    if encoding == "utf-8-sig" and b"\x00" in raw:
        raise ScorecardError(
            f"{path}: NUL byte at offset {raw.index(0)}: UTF-16 without a byte-order mark, or not a "
            "text file; a card file must be UTF-8 text (UTF-16 only with a byte-order mark)"
        )
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ScorecardError(
            f"{path}: not {encoding.replace('-sig', '').upper()} text (byte 0x{raw[exc.start]:02x} at "
            f"offset {exc.start} cannot be decoded); a card file must be UTF-8 text (UTF-16 only with "
            "a byte-order mark)"
        ) from None


# -- built-in cards --------------------------------------------------------------------------
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
        from dosegym.scorecards.maas import read_maas

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
