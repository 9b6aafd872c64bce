"""The scorecard schema: the pydantic models of a card and their validation.

A card has a prescription (``prescription_gy`` = ``dose_per_fraction_gy`` x ``fractions``;
any two given fill in the third) and a list of :class:`ScoreItem`. Each item names a
structure (a name or an expression, see :mod:`dosegym.scorecards.structures`), a metric
(:class:`~dosegym.scorecards.metrics.MetricKind` with its argument ``value`` and units) and a
piecewise-linear curve of :class:`ScorePoint` ``(x, score)``.

Scoring (as PlanScoreCard's ``GetScore``, :mod:`dosegym.scorecards.curve`): the points are
sorted by ``x``; the score is linear between points and clamped beyond the ends; one point
gives its score. A card's total is the sum of its items' points, its maximum the sum of each
item's highest score, and the normalised total their ratio. '%' doses are relative to
``prescription_gy``, or to the case's highest prescription when the card has none. An item's
status follows :class:`~dosegym.scorecards.report.ItemStatus`.

Items whose structure a case lacks: ``on_unmatched="error"`` (default) raises, an item marked
``optional`` or every item of a card with ``on_unmatched="report"`` (the default of imported
MAAS cards) is reported as unmatched (see :mod:`dosegym.scorecards.bound`).

Validation collects every problem with its location (``item 3 ('PTV70', DoseAtVolume):
points: ...``) and raises :class:`ScorecardValidationError`: unknown metric, invalid or
missing unit, argument out of range (``D120%``, ``V-5Gy``), no points, points whose ``x``
repeat or scores that are not monotone in ``x``, a highest score not above 0, and structure
expressions that do not parse. :class:`CardSchema` is the card's fields and their checks;
:class:`~dosegym.scorecards.scorecard.Scorecard` adds binding, scoring and YAML files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from dosegym.data.case import canonical_name
from dosegym.errors import ScorecardError
from dosegym.scorecards.curve import piecewise_linear
from dosegym.scorecards.metrics import MetricKind, MetricSpec
from dosegym.scorecards.report import ItemStatus
from dosegym.scorecards.structures import StructureSyntaxError, normalise_structure_map, parse_expression
from dosegym.scorecards.varian import parse_varian

K = MetricKind
_UNITS = {"gy": "Gy", "cgy": "cGy", "%": "%", "cc": "cc", "cm3": "cc", "cm³": "cc"}
_NOT_IMPLEMENTED = {"Volume", "Undefined"}


class ScorecardValidationError(ScorecardError):
    """A card with problems; ``problems`` lists each one with its location."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        head = f"{source}: " if source else ""
        n = len(self.problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}invalid scorecard ({n} problem{'s' * (n != 1)}):\n{body}")


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
class CardSchema(BaseModel):
    """A card's fields and their validation (see the module docstring); the public card is
    :class:`~dosegym.scorecards.scorecard.Scorecard`.

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
    def _rx(self) -> CardSchema:
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

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> Self:
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

    # -- prescription -----------------------------------------------------------------------
    def rescaled(self, dose_gy: float, fractions: int) -> Self:
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
        return type(self)(
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
