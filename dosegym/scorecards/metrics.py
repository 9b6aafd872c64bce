"""Dose metrics of scorecard items: ``MetricSpec`` (what to compute) and ``compute_metric``.

Kinds carry the Varian PlanScoreCard ``MetricType`` names where one exists. Units:

* ``input_unit`` of a **dose** argument: ``"Gy"``, ``"cGy"`` or ``"%"`` (of ``rx_gy``);
  of a **volume** argument: ``"%"`` (of the structure volume) or ``"cc"``.
* ``output_unit`` of a dose: ``"Gy"``, ``"cGy"`` or ``"%"`` (of ``rx_gy``); of a volume:
  ``"%"`` (of the structure) or ``"cc"``; ``None`` for dimensionless indices.

Definitions (``dvh.py`` holds the one DVH rule: ``D(v)`` interpolated between sorted voxel
doses, ``V(d)`` = volume receiving ``>= d``):

==========================  ==================================================================
kind                        value
==========================  ==================================================================
MinDose/MaxDose/MeanDose    DVH min / max / volume-weighted mean (``value`` unused)
DoseAtVolume                ``D(value)``, value in % of the structure or cc
VolumeAtDose                ``V(value)``, value a dose; output % of structure or cc
DoseAtSubVolume             ``D(V - value cc)`` (dose covering all but ``value`` cc)
NearMaxDose                 ``D(0.03 cc)`` (``value`` cc overrides 0.03)
ConformationNumber          ``TV_RI**2 / (TV * V_RI)``, RI = ``value`` dose (default Rx);
PaddickConformityIndex      the same formula (``TV_RI`` = structure volume >= RI,
                            ``V_RI`` = body volume >= RI, ``TV`` = structure volume)
ConformityIndex             RTOG ``V_RI / TV`` (body volume >= RI over structure volume)
HomogeneityIndex            ``(D[hi_value %] - D[lo_value %]) / target_value``; defaults
                            ``hi_value=2``, ``lo_value=98``, ``target_value=None`` -> ``D50%``
                            (ICRU 83); ``target_value=100, input_unit="%"`` -> ``/Rx``
InhomogeneityIndex          ``(Dmax - Dmin) / Dmean``
GradientIndex               ``V_body(>= value/2) / V_body(>= value)``, value default Rx
ModifiedGradientIndex       Varian: ``V(>= lo_value) / V(>= hi_value)`` on the structure's DVH,
                            doses in ``input_unit``
VolumeOfRegret              ``V_body(>= value) - V_struct(>= value)`` in cc (or % of structure)
IntegralDose                ``sum(dose * volume)`` over the structure in **Gy·L**
==========================  ==================================================================

Ratios with a zero denominator: ``0`` when the numerator is 0 too, else ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import numpy as np

from dosegym.errors import ScorecardError
from dosegym.scorecards.dvh import VOLUME_UNITS, DVHCache

DOSE_UNITS = ("Gy", "cGy", "%")
NEAR_MAX_CC = 0.03


class MetricKind(str, Enum):
    """What a scorecard item measures; values are Varian ``MetricType`` names where one exists."""

    MIN_DOSE = "MinDose"
    MAX_DOSE = "MaxDose"
    MEAN_DOSE = "MeanDose"
    DOSE_AT_VOLUME = "DoseAtVolume"
    VOLUME_AT_DOSE = "VolumeAtDose"
    DOSE_AT_SUBVOLUME = "DoseAtSubVolume"
    CONFORMATION_NUMBER = "ConformationNumber"
    CONFORMITY_INDEX = "ConformityIndex"
    PADDICK_CI = "PaddickConformityIndex"
    HOMOGENEITY_INDEX = "HomogeneityIndex"
    INHOMOGENEITY_INDEX = "InhomogeneityIndex"
    GRADIENT_INDEX = "GradientIndex"
    MODIFIED_GRADIENT_INDEX = "ModifiedGradientIndex"
    VOLUME_OF_REGRET = "VolumeOfRegret"
    INTEGRAL_DOSE = "IntegralDose"
    NEAR_MAX_DOSE = "NearMaxDose"


K = MetricKind
#: kinds whose output is a dose (output_unit in DOSE_UNITS)
DOSE_OUTPUT = frozenset(
    {K.MIN_DOSE, K.MAX_DOSE, K.MEAN_DOSE, K.DOSE_AT_VOLUME, K.DOSE_AT_SUBVOLUME, K.NEAR_MAX_DOSE}
)
#: kinds whose output is a volume (output_unit in VOLUME_UNITS)
VOLUME_OUTPUT = frozenset({K.VOLUME_AT_DOSE, K.VOLUME_OF_REGRET})
#: kinds that need the body mask
NEEDS_BODY = frozenset(
    {K.CONFORMATION_NUMBER, K.CONFORMITY_INDEX, K.PADDICK_CI, K.GRADIENT_INDEX, K.VOLUME_OF_REGRET}
)
#: kinds whose ``value`` is a dose (input_unit in DOSE_UNITS); None allowed where marked below
DOSE_INPUT = frozenset(
    {
        K.VOLUME_AT_DOSE,
        K.CONFORMATION_NUMBER,
        K.CONFORMITY_INDEX,
        K.PADDICK_CI,
        K.GRADIENT_INDEX,
        K.VOLUME_OF_REGRET,
    }
)
#: dose-input kinds whose ``value`` may be left out (it then means 100 % of the Rx)
VALUE_DEFAULTS_TO_RX = frozenset({K.CONFORMATION_NUMBER, K.CONFORMITY_INDEX, K.PADDICK_CI, K.GRADIENT_INDEX})


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its kind, argument and units (see the module docstring).

    Attributes:
        kind: the metric.
        value: the argument (volume for DoseAtVolume, dose for VolumeAtDose, RI dose for
            CN/CI, cc for DoseAtSubVolume/NearMaxDose).
        input_unit: unit of ``value`` (and of ``target_value``/``lo_value``/``hi_value`` doses).
        output_unit: unit of the result; ``None`` for dimensionless indices.
        hi_value, lo_value: HomogeneityIndex volumes in % (D[hi] - D[lo]);
            ModifiedGradientIndex doses in ``input_unit``.
        target_value: HomogeneityIndex normalising dose in ``input_unit`` (``None``: D50%).
    """

    kind: MetricKind
    value: float | None = None
    input_unit: str | None = None
    output_unit: str | None = None
    hi_value: float | None = None
    lo_value: float | None = None
    target_value: float | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", MetricKind(self.kind))
        except ValueError as exc:
            valid = [k.value for k in MetricKind]
            raise ScorecardError(f"unknown metric kind {self.kind!r}; valid: {valid}") from exc

    @property
    def label(self) -> str:
        """A short human label, e.g. ``D95%[Gy]``, ``V20Gy[%]``, ``Mean[Gy]``."""
        k, v, iu, ou = self.kind, self.value, self.input_unit or "", self.output_unit or ""
        num = "" if v is None else f"{v:g}"
        if k is K.DOSE_AT_VOLUME:
            return f"D{num}{iu}[{ou}]"
        if k is K.VOLUME_AT_DOSE:
            return f"V{num}{iu}[{ou}]"
        if k in (K.MIN_DOSE, K.MAX_DOSE, K.MEAN_DOSE):
            return f"{k.value.replace('Dose', '')}[{ou}]"
        return f"{k.value}({num}{iu})" + (f"[{ou}]" if ou else "")

    def validate(self, where: str) -> None:
        """Raise ``ScorecardError`` naming ``where`` if units or arguments are invalid."""
        k = self.kind

        def fail(msg: str) -> ScorecardError:
            return ScorecardError(f"{where}: {k.value}: {msg}")

        def finite(name: str, x: float | None) -> None:
            if x is not None and (not isinstance(x, (int, float)) or not math.isfinite(x)):
                raise fail(f"{name} must be a finite number, got {x!r}")

        for name in ("value", "hi_value", "lo_value", "target_value"):
            finite(name, getattr(self, name))

        def unit_in(name: str, unit: str | None, valid: tuple[str, ...]) -> None:
            if unit is None:
                raise fail(f"{name} is missing; valid: {list(valid)}")
            if unit not in valid:
                raise fail(f"{name} {unit!r} is not valid here; valid: {list(valid)}")

        def no_unit(name: str, unit: str | None) -> None:
            if unit is not None:
                raise fail(f"{name} must be empty (null) for this metric, got {unit!r}")

        # output unit
        if k in DOSE_OUTPUT:
            unit_in("output_unit", self.output_unit, DOSE_UNITS)
        elif k in VOLUME_OUTPUT:
            unit_in("output_unit", self.output_unit, VOLUME_UNITS)
        else:
            no_unit("output_unit", self.output_unit)

        # argument
        if k in (K.MIN_DOSE, K.MAX_DOSE, K.MEAN_DOSE, K.INHOMOGENEITY_INDEX, K.INTEGRAL_DOSE):
            return
        if k is K.DOSE_AT_VOLUME:
            if self.value is None:
                raise fail("value (the volume) is missing")
            unit_in("input_unit", self.input_unit, VOLUME_UNITS)
            if self.value < 0 or (self.input_unit == "%" and self.value > 100):
                rng = "[0, 100] %" if self.input_unit == "%" else ">= 0 cc"
                raise fail(f"volume {self.value:g} {self.input_unit} is out of range; valid: {rng}")
            return
        if k in (K.DOSE_AT_SUBVOLUME, K.NEAR_MAX_DOSE):
            if k is K.DOSE_AT_SUBVOLUME and self.value is None:
                raise fail("value (the sub-volume in cc) is missing")
            if self.value is not None:
                unit_in("input_unit", self.input_unit, ("cc",))
                if self.value < 0:
                    raise fail(f"volume {self.value:g} cc is out of range; valid: >= 0 cc")
            else:
                no_unit("input_unit", self.input_unit)
            return
        if k in DOSE_INPUT:
            if self.value is None:
                if k not in VALUE_DEFAULTS_TO_RX:
                    raise fail("value (the dose) is missing")
                no_unit("input_unit", self.input_unit)
                return
            unit_in("input_unit", self.input_unit, DOSE_UNITS)
            if self.value < 0 or (k in VALUE_DEFAULTS_TO_RX and self.value == 0):
                raise fail(f"dose {self.value:g} {self.input_unit} is out of range; valid: > 0")
            return
        if k is K.HOMOGENEITY_INDEX:
            hi = 2.0 if self.hi_value is None else self.hi_value
            lo = 98.0 if self.lo_value is None else self.lo_value
            if not (0 <= hi <= 100 and 0 <= lo <= 100 and hi < lo):
                raise fail(
                    f"hi_value {hi:g} % and lo_value {lo:g} % must be volumes in [0, 100] % "
                    "with hi_value < lo_value (e.g. D2% - D98%)"
                )
            if self.target_value is None:
                no_unit("input_unit", self.input_unit)
            else:
                unit_in("input_unit", self.input_unit, DOSE_UNITS)
                if self.target_value <= 0:
                    raise fail(f"target_value {self.target_value:g} must be a dose > 0")
            return
        if k is K.MODIFIED_GRADIENT_INDEX:
            if self.lo_value is None or self.hi_value is None:
                raise fail("lo_value and hi_value (doses) are both required")
            unit_in("input_unit", self.input_unit, DOSE_UNITS)
            if not (0 < self.lo_value < self.hi_value):
                raise fail(
                    f"doses must satisfy 0 < lo_value < hi_value, got lo_value {self.lo_value:g}"
                    f" and hi_value {self.hi_value:g} {self.input_unit}"
                )
            return


# -- unit helpers -------------------------------------------------------------------------
def dose_to_gy(value: float, unit: str, rx_gy: float | None, where: str = "metric") -> float:
    """Convert a dose in ``unit`` ('Gy', 'cGy', '%' of ``rx_gy``) to Gy."""
    if unit == "Gy":
        return float(value)
    if unit == "cGy":
        return float(value) / 100.0
    if unit == "%":
        if rx_gy is None or not rx_gy > 0:
            raise ScorecardError(f"{where}: a dose in % needs a prescription (rx_gy > 0), got {rx_gy}")
        return float(value) / 100.0 * float(rx_gy)
    raise ScorecardError(f"{where}: dose unit {unit!r} is not valid; valid: {list(DOSE_UNITS)}")


def gy_to_dose(value_gy: Any, unit: str, rx_gy: float | None, where: str = "metric") -> Any:
    """Convert a dose in Gy to ``unit`` ('Gy', 'cGy', '%' of ``rx_gy``)."""
    if unit == "Gy":
        return value_gy
    if unit == "cGy":
        return value_gy * 100.0
    if unit == "%":
        if rx_gy is None or not rx_gy > 0:
            raise ScorecardError(f"{where}: a dose in % needs a prescription (rx_gy > 0), got {rx_gy}")
        return 100.0 * value_gy / float(rx_gy)
    raise ScorecardError(f"{where}: dose unit {unit!r} is not valid; valid: {list(DOSE_UNITS)}")


def ratio(num: float, den: float) -> float:
    """``num / den`` with ``0/0 = 0`` and ``x/0 = inf``."""
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def spec_dose_gy(spec: MetricSpec, value: float | None, rx_gy: float | None) -> float:
    """A dose argument of ``spec`` in Gy (``None`` means 100 % of ``rx_gy``)."""
    where = spec.kind.value
    if value is None:
        return dose_to_gy(100.0, "%", rx_gy, where)
    return dose_to_gy(value, spec.input_unit or "Gy", rx_gy, where)


def compute_metric(
    spec: MetricSpec,
    dose_gy: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_volume_cc: float,
    rx_gy: float | None = None,
    body: np.ndarray | None = None,
    occupancy: np.ndarray | None = None,
    cache: DVHCache | None = None,
) -> float:
    """The value of ``spec`` for ``dose_gy`` (Gy, (z, y, x)) over ``mask`` (bool).

    ``rx_gy`` is needed by '%' doses and Rx-default indices; ``body`` by CI, CN, Paddick CI,
    GI and volume of regret; ``occupancy`` weights the voxels of ``mask`` (see ``dvh.py``).
    ``cache`` (a :class:`DVHCache` built on this very ``dose_gy``) reuses sorted doses
    across items. Raises ``ScorecardError`` for a NaN dose, an empty mask, an invalid spec
    or a missing body/Rx.
    """
    where = spec.kind.value
    spec.validate(where)
    if cache is None:
        cache = DVHCache(dose_gy, voxel_volume_cc)
    elif cache.source is not dose_gy:
        raise ScorecardError(f"{where}: the DVHCache was built on another dose array")
    if not math.isclose(cache.voxel_volume_cc, voxel_volume_cc, rel_tol=1e-9):
        raise ScorecardError(
            f"{where}: voxel_volume_cc {voxel_volume_cc} differs from the cache's {cache.voxel_volume_cc}"
        )
    if spec.kind in NEEDS_BODY and body is None:
        raise ScorecardError(f"{where}: this metric needs the body (external) mask; none given")
    try:
        dvh = cache.dvh(mask, occupancy)
    except ScorecardError as exc:
        raise ScorecardError(f"{where}: structure mask: {exc}") from None
    if body is not None and spec.kind in NEEDS_BODY:
        try:
            cache.masked_doses(body)
        except ScorecardError as exc:
            raise ScorecardError(f"{where}: body mask: {exc}") from None
    body_fn = None if body is None else (lambda d: _body_volume_cc(cache, body, d))
    return float(evaluate_spec(spec, dvh, rx_gy=rx_gy, body_volume_cc=body_fn))


def _body_volume_cc(cache: DVHCache, body: np.ndarray, dose_gy: float) -> float:
    vals = cache.masked_doses(body)
    return float(np.count_nonzero(vals >= dose_gy)) * cache.voxel_volume_cc


class DVHLike(Protocol):
    """What :func:`evaluate_spec` needs of a DVH (numpy, torch batched or soft)."""

    total_volume_cc: float

    @property
    def min_gy(self) -> Any: ...
    @property
    def max_gy(self) -> Any: ...
    @property
    def mean_gy(self) -> Any: ...
    @property
    def integral_dose_gy_l(self) -> Any: ...
    def dose_at_volume(self, volume: float, unit: str = "%") -> Any: ...
    def volume_at_dose(self, dose_gy: float, unit: str = "%") -> Any: ...


def evaluate_spec(
    spec: MetricSpec,
    dvh: DVHLike,
    *,
    rx_gy: float | None,
    body_volume_cc: Callable[[float], Any] | None,
    ratio_fn: Callable[[Any, Any], Any] = ratio,
) -> Any:
    """The value of a validated ``spec`` from a structure's DVH: the one set of formulas
    shared by the numpy, torch and soft engines. ``body_volume_cc(d)`` is the body volume
    receiving ``>= d`` Gy; ``ratio_fn`` divides with ``0/0 = 0`` and ``x/0 = inf``."""
    k, where = spec.kind, spec.kind.value
    out = spec.output_unit
    if k in NEEDS_BODY and body_volume_cc is None:
        raise ScorecardError(f"{where}: this metric needs the body (external) mask; none given")
    if k in DOSE_OUTPUT:
        if k is K.MIN_DOSE:
            d = dvh.min_gy
        elif k is K.MAX_DOSE:
            d = dvh.max_gy
        elif k is K.MEAN_DOSE:
            d = dvh.mean_gy
        elif k is K.DOSE_AT_VOLUME:
            d = dvh.dose_at_volume(spec.value, spec.input_unit)  # type: ignore[arg-type]
        elif k is K.DOSE_AT_SUBVOLUME:
            d = dvh.dose_at_volume(max(dvh.total_volume_cc - spec.value, 0.0), "cc")  # type: ignore[operator]
        else:  # NEAR_MAX_DOSE
            d = dvh.dose_at_volume(NEAR_MAX_CC if spec.value is None else spec.value, "cc")
        return gy_to_dose(d, out, rx_gy, where)  # type: ignore[arg-type]
    if k is K.VOLUME_AT_DOSE:
        return dvh.volume_at_dose(spec_dose_gy(spec, spec.value, rx_gy), out)  # type: ignore[arg-type]
    if k is K.VOLUME_OF_REGRET:
        d = spec_dose_gy(spec, spec.value, rx_gy)
        regret_cc = body_volume_cc(d) - dvh.volume_at_dose(d, "cc")  # type: ignore[misc]
        return regret_cc if out == "cc" else 100.0 * regret_cc / dvh.total_volume_cc
    if k in (K.CONFORMATION_NUMBER, K.PADDICK_CI, K.CONFORMITY_INDEX):
        ri = spec_dose_gy(spec, spec.value, rx_gy)
        v_ri = body_volume_cc(ri)  # type: ignore[misc]
        tv = dvh.total_volume_cc
        if k is K.CONFORMITY_INDEX:
            return ratio_fn(v_ri, tv)
        tv_ri = dvh.volume_at_dose(ri, "cc")
        return ratio_fn(tv_ri * tv_ri, tv * v_ri)
    if k is K.GRADIENT_INDEX:
        d = spec_dose_gy(spec, spec.value, rx_gy)
        return ratio_fn(body_volume_cc(0.5 * d), body_volume_cc(d))  # type: ignore[misc]
    if k is K.MODIFIED_GRADIENT_INDEX:
        lo = spec_dose_gy(spec, spec.lo_value, rx_gy)
        hi = spec_dose_gy(spec, spec.hi_value, rx_gy)
        return ratio_fn(dvh.volume_at_dose(lo, "cc"), dvh.volume_at_dose(hi, "cc"))
    if k is K.HOMOGENEITY_INDEX:
        hi = 2.0 if spec.hi_value is None else spec.hi_value
        lo = 98.0 if spec.lo_value is None else spec.lo_value
        num = dvh.dose_at_volume(hi, "%") - dvh.dose_at_volume(lo, "%")
        if spec.target_value is None:
            den = dvh.dose_at_volume(50.0, "%")
        else:
            den = dose_to_gy(spec.target_value, spec.input_unit, rx_gy, where)  # type: ignore[arg-type]
        return ratio_fn(num, den)
    if k is K.INHOMOGENEITY_INDEX:
        return ratio_fn(dvh.max_gy - dvh.min_gy, dvh.mean_gy)
    if k is K.INTEGRAL_DOSE:
        return dvh.integral_dose_gy_l
    raise ScorecardError(f"{where}: metric kind not implemented")  # pragma: no cover
