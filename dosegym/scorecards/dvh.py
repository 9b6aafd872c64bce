"""Dose-volume histograms: the exact DVH engine every dose metric of dosegym uses.

Conventions
-----------
* Doses in Gy, volumes in cc, arrays ``(z, y, x)``, masks ``bool``.
* A voxel counts with weight ``w = voxel_volume_cc`` (times its fractional occupancy in
  [0, 1] when ``occupancy`` is given). The structure is the voxels of ``mask``; occupancy
  only *weights* them, so for sub-voxel accuracy pass ``mask = occupancy > 0``. Voxels of
  zero weight are dropped.

The one definition of ``D(v)`` (dose at volume)
-----------------------------------------------
Sort the structure's voxel doses in descending order, ``d_1 >= d_2 >= ... >= d_N``, with
weights ``w_k`` in the same order, and cumulative volumes ``C_k = w_1 + ... + w_k``
(``C_N`` = total volume ``V``). The hottest ``C_k`` cc are voxels 1..k, whose minimum dose is
``d_k``: the knots ``(C_k, d_k)`` are exactly "the minimum dose received by the hottest
``C_k`` cc". Between knots ``D(v)`` is **linear in v**; below ``C_1`` it is ``d_1`` and above
``C_N`` it is ``d_N``. Hence ``D(0 %) = max`` and ``D(100 %) = min``. ``Dx%`` is
``D(x / 100 * V)`` and ``Dxcc`` is ``D(x)``. (This is ``numpy.interp(v, C, d)``; the torch
and soft versions use the same rule.)

``V(d)`` (volume at dose) is the volume of voxels receiving **at least** ``d`` Gy:
``sum(w_k for d_k >= d)``, in cc or in % of ``V``. At a knot the two agree:
``V(D(C_k)) = C_k`` when doses are distinct.

Derived indices (``metrics.py`` exposes them as scorecard items):

* near-max dose: ``D(0.03 cc)``;
* integral dose: ``sum(w_k * d_k)`` reported in **Gy·L** (Gy·cc / 1000; with unit density
  this is the energy in joules);
* RTOG conformity index ``CI = PIV / TV`` where ``PIV = V_body(>= RI)``;
  Paddick ``CI = TV_PIV**2 / (TV * PIV)`` where ``TV_PIV = V_target(>= RI)`` (Varian's
  "ConformationNumber" is the same formula);
* ICRU-83 homogeneity index ``HI = (D2% - D98%) / D50%``; its variants divide by another dose
  (e.g. the Rx); RTOG ``HI = Dmax / Rx``; inhomogeneity index ``(Dmax - Dmin) / Dmean``;
* gradient index ``GI = V_body(>= 0.5 Rx) / V_body(>= Rx)``; Varian's modified gradient
  index ``V(>= lo) / V(>= hi)`` on one structure's DVH;
* volume of regret ``V_body(>= D) - V_struct(>= D)`` (cc).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dosegym.errors import ScorecardError

VOLUME_UNITS = ("%", "cc")


def _check_dose(dose_gy: np.ndarray) -> np.ndarray:
    dose = np.asarray(dose_gy)
    if dose.ndim != 3:
        raise ScorecardError(f"dose must be a 3-D (z, y, x) array in Gy, got shape {dose.shape}")
    if not np.issubdtype(dose.dtype, np.floating):
        dose = dose.astype(np.float32)
    if np.isnan(dose).any():
        raise ScorecardError("dose contains NaN: refusing to score")
    return dose


def _check_mask(mask: np.ndarray, shape: tuple[int, ...], what: str = "mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ScorecardError(f"{what} has shape {m.shape}; it must match the dose grid {shape}")
    if m.dtype != bool:
        raise ScorecardError(f"{what} must be a bool array, got dtype {m.dtype}")
    return m


@dataclass(frozen=True)
class DVH:
    """The exact DVH of one structure (see the module docstring for the definitions).

    Attributes:
        doses_gy: voxel doses sorted descending (``d_1 >= ... >= d_N``), ``float64``.
        cum_volume_cc: ``C_k``, cumulative volume of the hottest k voxels (increasing).
        total_volume_cc: ``V = C_N``.
        weights_cc: per-voxel volume ``w_k`` in the sorted order, or ``None`` when all voxels
            weigh ``voxel_volume_cc`` (no occupancy).
    """

    doses_gy: np.ndarray
    cum_volume_cc: np.ndarray
    total_volume_cc: float
    weights_cc: np.ndarray | None = field(default=None, repr=False)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_doses(cls, doses_gy: np.ndarray, weights_cc: np.ndarray | float) -> DVH:
        """A DVH from the structure's voxel doses (any order) and their volumes in cc."""
        d = np.asarray(doses_gy, dtype=np.float64).reshape(-1)
        if np.isscalar(weights_cc) or np.ndim(weights_cc) == 0:
            w0 = float(weights_cc)
            if d.size == 0 or w0 <= 0:
                raise ScorecardError("DVH of an empty structure (no voxel of positive volume)")
            d = -np.sort(-d)
            cum = np.arange(1, d.size + 1, dtype=np.float64) * w0
            return cls(d, cum, float(cum[-1]), None)
        w = np.asarray(weights_cc, dtype=np.float64).reshape(-1)
        if w.shape != d.shape:
            raise ScorecardError(f"DVH weights shape {w.shape} differs from doses {d.shape}")
        keep = w > 0
        d, w = d[keep], w[keep]
        if d.size == 0:
            raise ScorecardError("DVH of an empty structure (no voxel of positive volume)")
        order = np.argsort(-d, kind="stable")
        d, w = d[order], w[order]
        cum = np.cumsum(w)
        return cls(d, cum, float(cum[-1]), w)

    # -- exact queries --------------------------------------------------------------------
    @property
    def min_gy(self) -> float:
        return float(self.doses_gy[-1])

    @property
    def max_gy(self) -> float:
        return float(self.doses_gy[0])

    @property
    def mean_gy(self) -> float:
        """Volume-weighted mean dose."""
        if self.weights_cc is None:
            return float(self.doses_gy.mean())
        return float(np.dot(self.doses_gy, self.weights_cc) / self.total_volume_cc)

    @property
    def integral_dose_gy_l(self) -> float:
        """Integral dose in Gy·L (sum of dose x volume, cc / 1000)."""
        return self.mean_gy * self.total_volume_cc / 1000.0

    def _volume_cc(self, volume: float, unit: str) -> float:
        if unit == "%":
            return float(volume) / 100.0 * self.total_volume_cc
        if unit == "cc":
            return float(volume)
        raise ScorecardError(f"volume unit {unit!r} is not valid; use one of {VOLUME_UNITS}")

    def dose_at_volume(self, volume: float, unit: str = "%") -> float:
        """``D(v)`` in Gy: the minimum dose of the hottest ``volume`` (``unit`` '%' or 'cc'),
        linearly interpolated between sorted voxel doses (``D0% = max``, ``D100% = min``)."""
        v = self._volume_cc(volume, unit)
        return float(np.interp(v, self.cum_volume_cc, self.doses_gy))

    def volume_at_dose(self, dose_gy: float, unit: str = "%") -> float:
        """Volume receiving ``>= dose_gy``, in '%' of the structure or 'cc'."""
        # doses are sorted descending: count of d_k >= dose_gy via a search on -d ascending
        k = int(np.searchsorted(-self.doses_gy, -float(dose_gy), side="right"))
        vol = 0.0 if k == 0 else float(self.cum_volume_cc[k - 1])
        if unit == "cc":
            return vol
        if unit == "%":
            return 100.0 * vol / self.total_volume_cc
        raise ScorecardError(f"volume unit {unit!r} is not valid; use one of {VOLUME_UNITS}")

    # -- histograms -----------------------------------------------------------------------
    def bin_edges_gy(self, bin_width_gy: float = 0.1) -> np.ndarray:
        """Dose bin edges from 0 Gy up to past the maximum dose, ``bin_width_gy`` apart."""
        if not bin_width_gy > 0:
            raise ScorecardError(f"bin_width_gy must be > 0, got {bin_width_gy}")
        n = int(np.floor(max(self.max_gy, 0.0) / bin_width_gy)) + 2
        return np.arange(n, dtype=np.float64) * bin_width_gy

    def cumulative(self, bin_width_gy: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cumulative DVH on a dose grid: ``(dose_gy, volume_cc, volume_pct)`` with
        ``volume_cc[i]`` = volume receiving ``>= dose_gy[i]``."""
        edges = self.bin_edges_gy(bin_width_gy)
        k = np.searchsorted(-self.doses_gy, -edges, side="right")
        cum = np.concatenate(([0.0], self.cum_volume_cc))[k]
        return edges, cum, 100.0 * cum / self.total_volume_cc

    def differential(self, bin_width_gy: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """Differential DVH: ``(bin_edges_gy, volume_cc per bin [edge_i, edge_{i+1}))``."""
        edges, cum, _ = self.cumulative(bin_width_gy)
        return edges, cum[:-1] - cum[1:]


def compute_dvh(
    dose_gy: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_volume_cc: float,
    occupancy: np.ndarray | None = None,
) -> DVH:
    """The DVH of ``dose_gy`` over the voxels of ``mask`` (weighted by ``occupancy``).

    Raises ``ScorecardError`` for a NaN dose, a mask of another shape or dtype, or an empty
    structure.
    """
    return DVHCache(dose_gy, voxel_volume_cc).dvh(mask, occupancy)


class DVHCache:
    """DVHs of one dose grid, computed once per mask object (for scoring many items).

    The cache holds a reference to every mask it has seen and keys on identity, so a mask
    must not be modified in place while the cache lives; nor may the dose.
    """

    def __init__(self, dose_gy: np.ndarray, voxel_volume_cc: float) -> None:
        self.source = dose_gy
        self.dose_gy = _check_dose(dose_gy)
        if not voxel_volume_cc > 0:
            raise ScorecardError(f"voxel_volume_cc must be > 0, got {voxel_volume_cc}")
        self.voxel_volume_cc = float(voxel_volume_cc)
        self._dvh: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None, DVH]] = {}
        self._vals: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def dvh(self, mask: np.ndarray, occupancy: np.ndarray | None = None) -> DVH:
        """The DVH over ``mask``, voxels weighted by ``occupancy`` (see the module docstring)."""
        key = (id(mask), id(occupancy))
        hit = self._dvh.get(key)
        if hit is not None and hit[0] is mask and hit[1] is occupancy:
            return hit[2]
        vals = self.masked_doses(mask)
        if occupancy is None:
            out = DVH.from_doses(vals, self.voxel_volume_cc)
        else:
            occ = np.asarray(occupancy)
            if occ.shape != self.dose_gy.shape:
                raise ScorecardError(
                    f"occupancy has shape {occ.shape}; it must match the dose grid {self.dose_gy.shape}"
                )
            frac = occ[mask].astype(np.float64)
            if not (np.all(np.isfinite(frac)) and frac.min() >= 0.0 and frac.max() <= 1.0):
                raise ScorecardError("occupancy must be finite and within [0, 1]")
            out = DVH.from_doses(vals, frac * self.voxel_volume_cc)
        self._dvh[key] = (mask, occupancy, out)
        return out

    def masked_doses(self, mask: np.ndarray) -> np.ndarray:
        """The unsorted doses inside ``mask``; ``ScorecardError`` if the mask is empty."""
        hit = self._vals.get(id(mask))
        if hit is not None and hit[0] is mask:
            return hit[1]
        m = _check_mask(mask, self.dose_gy.shape)
        vals = self.dose_gy[m]
        if vals.size == 0:
            raise ScorecardError("mask is empty (no voxel)")
        self._vals[id(mask)] = (mask, vals)
        return vals
