"""The one rule for dose values, applied on every path a dose enters by.

A dose is total physical dose in Gy over all fractions: a floating-point array (``bool``,
integer, complex and object arrays are refused, never reinterpreted), every value finite
and ``>= 0``, and at most ``HIGH_DOSE_FACTOR`` times the highest prescription (or
``HIGH_DOSE_CAP_GY`` when there is none) unless the caller allows a higher dose.
"""

from __future__ import annotations

import numpy as np

from dosegym.errors import DataError, DosegymError

#: A dose above this multiple of the highest prescription is refused unless allowed.
HIGH_DOSE_FACTOR = 10.0
#: The highest dose (Gy) accepted, unless allowed, when no prescription is known.
HIGH_DOSE_CAP_GY = 1000.0


def _has_rx(prescription_gy: float | None) -> bool:
    return prescription_gy is not None and bool(np.isfinite(prescription_gy)) and prescription_gy > 0


def max_dose_gy(prescription_gy: float | None) -> float:
    """The highest dose (Gy) :func:`check_dose_gy` accepts without ``allow_high``."""
    return HIGH_DOSE_FACTOR * float(prescription_gy) if _has_rx(prescription_gy) else HIGH_DOSE_CAP_GY


def _first_index(mask: np.ndarray) -> str:
    idx = np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape) if mask.ndim else ()
    return "(" + ", ".join(str(int(i)) for i in idx) + ")"


def check_dose_gy(
    dose,
    *,
    where: str,
    prescription_gy: float | None = None,
    allow_high: bool = False,
    error: type[DosegymError] = DataError,
) -> np.ndarray:
    """Check ``dose`` against the dose rule (module docstring); return it as ``float32`` Gy.

    ``where`` names the source in messages (file, field, case). ``prescription_gy`` is the
    highest prescription (Gy, total) the maximum is measured against. Raises ``error``
    (``DataError`` unless the caller's layer has its own, e.g. ``ModelError``) saying what is
    wrong, where (the first offending index, in array order (z, y, x)) and what would be valid.
    """
    arr = np.asarray(dose)
    kind = arr.dtype.kind
    if kind == "b":
        raise error(f"{where}: dose is a bool array (a mask?); a dose is floating-point Gy")
    if kind in "iu":
        top = int(arr.max()) if arr.size else 0
        # more than twice the prescription (or 100 Gy) as a whole number: most likely cGy
        cgy = top > (2 * prescription_gy if _has_rx(prescription_gy) else 100)
        hint = (
            f" Its maximum {top} looks like cGy: use dose.astype(np.float32) / 100."
            if cgy
            else " If it holds Gy, convert it with dose.astype(np.float32)."
        )
        raise error(f"{where}: dose has integer dtype {arr.dtype}; a dose is floating-point Gy.{hint}")
    if kind == "c":
        raise error(f"{where}: dose has complex dtype {arr.dtype}; a dose is real, floating-point Gy")
    if kind != "f":
        raise error(f"{where}: dose has dtype {arr.dtype}; a dose is a floating-point array in Gy")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = ~finite
        raise error(
            f"{where}: dose has {int(bad.sum())} non-finite values (NaN or inf), the first at index "
            f"{_first_index(bad)}; every dose value must be finite Gy"
        )
    if arr.size == 0:
        return arr.astype(np.float32, copy=False)
    low = float(arr.min())
    if low < 0:
        raise error(
            f"{where}: negative dose {low:.4g} Gy at index {_first_index(arr == low)}; dose must be >= 0 Gy"
        )
    high = float(arr.max())
    limit = max_dose_gy(prescription_gy)
    if high > np.finfo(np.float32).max:
        raise error(f"{where}: dose {high:.4g} Gy does not fit float32; a dose is float32 Gy")
    if high > limit and not allow_high:
        basis = (
            f"{HIGH_DOSE_FACTOR:g} x the highest prescription {prescription_gy:g} Gy"
            if _has_rx(prescription_gy)
            else "the cap when no prescription is known"
        )
        raise error(
            f"{where}: dose {high:.4g} Gy at index {_first_index(arr == high)} exceeds {limit:g} Gy "
            f"({basis}); is it in cGy (divide by 100)? Allow it explicitly if it is real"
        )
    return arr.astype(np.float32, copy=False)
