"""3-D gamma index (Low et al. 1998) with sub-voxel search, vectorised numpy.

For each reference voxel ``p`` above the lower dose cutoff,

    gamma(p) = min over offsets o, |o| <= max_search_mm, of
               sqrt((|o| / distance_mm)**2 + ((D_eval(p + o) - D_ref(p)) / dD)**2)

with ``dD = dose_percent / 100 * norm`` (global: ``norm`` = ``global_norm_gy``, by default
the reference maximum) or ``dose_percent / 100 * D_ref(p)`` (local). ``D_eval`` is
interpolated trilinearly (``scipy.ndimage.map_coordinates``, order 1) at offsets ``o`` on a
cubic lattice of step ``distance_mm / interp_fraction`` mm; points outside the evaluated
grid count as an infinite dose difference. Offsets are visited in shells of increasing
radius, and a voxel stops searching once its gamma cannot improve (``gamma <= |o| /
distance_mm`` for every offset left), as pymedphys does. Voxels below
``lower_cutoff_percent`` of ``norm`` are not evaluated (``NaN`` in the gamma map). The pass
rate is the percentage of evaluated voxels with ``gamma <= 1``. A voxel whose true gamma
exceeds ``max_search_mm / distance_mm`` gets an upper bound (or ``inf``), which still fails.
Both doses lie on one grid (arrays ``(z, y, x)``, ``spacing_mm`` per axis, doses in Gy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from dosegym.errors import ScorecardError

_CHUNK_POINTS = 1 << 20


@dataclass(frozen=True)
class GammaResult:
    """A gamma map (``NaN`` where not evaluated) and its pass rate in %."""

    gamma: np.ndarray
    pass_rate_pct: float
    n_evaluated: int


def _offsets_mm(step_mm: float, radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice offsets ``(m, 3)`` in mm within ``radius_mm``, sorted by length, and lengths."""
    n = int(np.floor(radius_mm / step_mm + 1e-9))
    ax = np.arange(-n, n + 1, dtype=np.float64) * step_mm
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3)
    r = np.sqrt((grid**2).sum(axis=1))
    keep = r <= radius_mm + 1e-9
    grid, r = grid[keep], r[keep]
    order = np.argsort(r, kind="stable")
    return grid[order], r[order]


def gamma_index(
    reference_gy: np.ndarray,
    evaluated_gy: np.ndarray,
    spacing_mm: tuple[float, float, float],
    *,
    dose_percent: float = 3.0,
    distance_mm: float = 2.0,
    lower_cutoff_percent: float = 10.0,
    local: bool = False,
    interp_fraction: int = 10,
    max_search_mm: float | None = None,
    global_norm_gy: float | None = None,
) -> GammaResult:
    """Gamma of ``evaluated_gy`` against ``reference_gy`` (see the module docstring).

    Defaults follow AAPM TG-218 (3 %, 2 mm, global, 10 % cutoff). ``max_search_mm`` defaults
    to twice ``distance_mm`` (enough for the pass rate; gamma values above 2 are bounds).
    """
    ref = np.asarray(reference_gy, dtype=np.float64)
    ev = np.asarray(evaluated_gy, dtype=np.float64)
    if ref.ndim != 3 or ev.shape != ref.shape:
        raise ScorecardError(f"gamma needs two 3-D doses on one grid, got {ref.shape} and {ev.shape}")
    if np.isnan(ref).any() or np.isnan(ev).any():
        raise ScorecardError("dose contains NaN: refusing to compute gamma")
    sp = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if sp.shape != (3,) or not np.all(sp > 0):
        raise ScorecardError(f"spacing_mm must be 3 positive mm values (z, y, x), got {spacing_mm}")
    if not (dose_percent > 0 and distance_mm > 0):
        raise ScorecardError(
            f"dose_percent and distance_mm must be > 0, got {dose_percent} and {distance_mm}"
        )
    if not (0 <= lower_cutoff_percent < 100):
        raise ScorecardError(f"lower_cutoff_percent must be in [0, 100), got {lower_cutoff_percent}")
    if int(interp_fraction) < 1:
        raise ScorecardError(f"interp_fraction must be >= 1, got {interp_fraction}")
    search = 2.0 * distance_mm if max_search_mm is None else float(max_search_mm)
    if not search >= 0:
        raise ScorecardError(f"max_search_mm must be >= 0, got {max_search_mm}")
    norm = float(ref.max()) if global_norm_gy is None else float(global_norm_gy)
    if not norm > 0:
        raise ScorecardError(f"the normalisation dose must be > 0 Gy, got {norm}")

    valid = ref >= lower_cutoff_percent / 100.0 * norm
    points = np.argwhere(valid).astype(np.float64)  # (n, 3) voxel indices
    ref_p = ref[valid]
    with np.errstate(divide="ignore"):
        inv_dd = 1.0 / (dose_percent / 100.0 * (ref_p if local else np.full_like(ref_p, norm)))
    best = np.full(ref_p.shape, np.inf)

    step = distance_mm / int(interp_fraction)
    offsets, radii = _offsets_mm(step, search)
    shell = np.ceil(radii / step - 1e-9).astype(np.int64)
    bounds = np.searchsorted(shell, np.arange(shell[-1] + 2))
    active = np.arange(ref_p.size)
    for s in range(int(shell[-1]) + 1):
        lo, hi = bounds[s], bounds[s + 1]
        if lo == hi or active.size == 0:
            continue
        off_idx = offsets[lo:hi] / sp  # in voxel units
        dist2 = (radii[lo:hi] / distance_mm) ** 2
        per_chunk = max(1, _CHUNK_POINTS // (hi - lo))
        for c in range(0, active.size, per_chunk):
            idx = active[c : c + per_chunk]
            coords = points[idx][:, None, :] + off_idx[None, :, :]
            vals = map_coordinates(
                ev, coords.reshape(-1, 3).T, order=1, mode="constant", cval=np.nan
            ).reshape(idx.size, hi - lo)
            diff = (vals - ref_p[idx][:, None]) * inv_dd[idx][:, None]
            g2 = np.where(np.isnan(diff), np.inf, diff * diff + dist2[None, :])
            best[idx] = np.minimum(best[idx], g2.min(axis=1))
        # every offset left is farther than s * step: stop where gamma cannot improve
        active = active[best[active] > (s * step / distance_mm) ** 2]

    gamma = np.full(ref.shape, np.nan)
    gamma[valid] = np.sqrt(best)
    n = int(ref_p.size)
    rate = float(100.0 * np.count_nonzero(gamma[valid] <= 1.0) / n) if n else float("nan")
    return GammaResult(gamma=gamma, pass_rate_pct=rate, n_evaluated=n)


def gamma_pass_rate(
    reference_gy: np.ndarray,
    evaluated_gy: np.ndarray,
    spacing_mm: tuple[float, float, float],
    **kwargs,
) -> float:
    """The gamma pass rate in % (``gamma <= 1`` among evaluated voxels); see :func:`gamma_index`."""
    return gamma_index(reference_gy, evaluated_gy, spacing_mm, **kwargs).pass_rate_pct
