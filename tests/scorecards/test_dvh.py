"""DVH engine: definitions on hand-made cases, analytic phantoms, caching, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq

from dosegym.errors import ScorecardError
from dosegym.scorecards.dvh import DVH, DVHCache, compute_dvh

# -- the definitions on four voxels ---------------------------------------------------------


def _four() -> DVH:
    return DVH.from_doses(np.array([10.0, 40.0, 20.0, 30.0]), 1.0)


def test_dose_at_volume_interpolates_between_sorted_voxel_doses():
    dvh = _four()  # knots (1 cc, 40), (2, 30), (3, 20), (4, 10)
    assert dvh.dose_at_volume(0, "%") == 40.0  # D0% = max
    assert dvh.dose_at_volume(100, "%") == 10.0  # D100% = min
    assert dvh.dose_at_volume(0.5, "cc") == 40.0  # below the first knot: the max
    assert dvh.dose_at_volume(1.5, "cc") == pytest.approx(35.0)
    assert dvh.dose_at_volume(50, "%") == pytest.approx(30.0)
    assert dvh.dose_at_volume(62.5, "%") == pytest.approx(25.0)
    assert dvh.dose_at_volume(10, "cc") == 10.0  # beyond the volume: the min


def test_volume_at_dose_counts_voxels_at_or_above():
    dvh = _four()
    assert dvh.volume_at_dose(30.0, "cc") == 2.0
    assert dvh.volume_at_dose(30.0001, "cc") == 1.0
    assert dvh.volume_at_dose(30.0, "%") == 50.0
    assert dvh.volume_at_dose(0.0, "%") == 100.0
    assert dvh.volume_at_dose(41.0, "%") == 0.0
    # Dx and Vx agree at the knots
    for k in range(1, 5):
        assert dvh.volume_at_dose(dvh.dose_at_volume(k, "cc"), "cc") == k


def test_mean_min_max_and_integral_dose():
    dvh = _four()
    assert (dvh.min_gy, dvh.max_gy, dvh.mean_gy) == (10.0, 40.0, 25.0)
    assert dvh.integral_dose_gy_l == pytest.approx(25.0 * 4.0 / 1000.0)


def test_occupancy_weights_voxels():
    dose = np.zeros((1, 1, 4), np.float32)
    dose[0, 0] = [10, 20, 30, 40]
    mask = np.ones(dose.shape, bool)
    occ = np.array([[[1.0, 1.0, 0.5, 0.0]]], np.float32)  # the 40 Gy voxel weighs nothing
    dvh = compute_dvh(dose, mask, voxel_volume_cc=2.0, occupancy=occ)
    assert dvh.total_volume_cc == pytest.approx(5.0)
    assert dvh.max_gy == 30.0
    assert dvh.mean_gy == pytest.approx((10 * 2 + 20 * 2 + 30 * 1) / 5)
    assert dvh.volume_at_dose(20, "cc") == pytest.approx(3.0)
    assert dvh.dose_at_volume(2.0, "cc") == pytest.approx(25.0)  # knots (1, 30), (3, 20)


def test_histograms_are_consistent():
    rng = np.random.default_rng(3)
    dose = rng.uniform(0, 60, (8, 8, 8)).astype(np.float32)
    mask = np.zeros(dose.shape, bool)
    mask[2:6, 1:7, 3:8] = True
    dvh = compute_dvh(dose, mask, voxel_volume_cc=0.027)
    edges, cum_cc, cum_pct = dvh.cumulative(0.5)
    assert edges[0] == 0.0 and edges[-1] > dvh.max_gy
    assert cum_pct[0] == pytest.approx(100.0) and cum_cc[-1] == 0.0
    assert np.all(np.diff(cum_cc) <= 0)
    assert cum_cc[20] == pytest.approx(np.count_nonzero(dose[mask] >= edges[20]) * 0.027)
    _, diff_cc = dvh.differential(0.5)
    assert diff_cc.sum() == pytest.approx(dvh.total_volume_cc)
    assert np.all(diff_cc >= 0)


def test_errors_name_the_problem():
    dose = np.ones((4, 4, 4), np.float32)
    mask = np.zeros((4, 4, 4), bool)
    with pytest.raises(ScorecardError, match="empty"):
        compute_dvh(dose, mask, voxel_volume_cc=1.0)
    mask[1, 1, 1] = True
    bad = dose.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ScorecardError, match="NaN"):
        compute_dvh(bad, mask, voxel_volume_cc=1.0)
    with pytest.raises(ScorecardError, match="shape"):
        compute_dvh(dose, mask[:3], voxel_volume_cc=1.0)
    with pytest.raises(ScorecardError, match="bool"):
        compute_dvh(dose, mask.astype(np.uint8), voxel_volume_cc=1.0)
    with pytest.raises(ScorecardError, match="volume unit"):
        compute_dvh(dose, mask, voxel_volume_cc=1.0).dose_at_volume(5, "ml")
    with pytest.raises(ScorecardError, match="voxel_volume_cc"):
        compute_dvh(dose, mask, voxel_volume_cc=0.0)


def test_cache_reuses_the_dvh_of_the_same_mask_object():
    rng = np.random.default_rng(0)
    dose = rng.uniform(0, 10, (6, 6, 6)).astype(np.float32)
    a = np.zeros(dose.shape, bool)
    a[1:4, 1:4, 1:4] = True
    b = a.copy()
    cache = DVHCache(dose, 0.1)
    first = cache.dvh(a)
    assert cache.dvh(a) is first
    other = cache.dvh(b)
    assert other is not first
    np.testing.assert_array_equal(other.doses_gy, first.doses_gy)


# -- analytic phantoms --------------------------------------------------------------------

R_MM, DC_GY, G_GY_PER_MM = 15.0, 50.0, 1.0
DIRECTION = np.array([1.0, 1.0, 1.0]) / np.sqrt(3.0)  # oblique to every voxel axis


def _frac_at_or_above(d: float) -> float:
    """Fraction of a sphere (radius R) above the plane where a linear field equals d."""
    h = float(np.clip(R_MM - (d - DC_GY) / G_GY_PER_MM, 0.0, 2.0 * R_MM))
    return h * h * (3.0 * R_MM - h) / (4.0 * R_MM**3)


def _exact_dose_at(pct: float) -> float:
    lo, hi = DC_GY - G_GY_PER_MM * R_MM - 1, DC_GY + G_GY_PER_MM * R_MM + 1
    return brentq(lambda d: _frac_at_or_above(d) - pct / 100.0, lo, hi)


def _sphere_phantom(spacing_mm, supersample: int = 5):
    sp = np.asarray(spacing_mm, float)
    shape = tuple(int(np.ceil(2 * R_MM / s)) + 5 for s in sp)
    shape = tuple(n + 1 - n % 2 for n in shape)  # odd: the centre is a voxel centre
    centre = (np.array(shape) - 1) / 2.0
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    pos = (idx - centre) * sp
    dose = (DC_GY + G_GY_PER_MM * (pos @ DIRECTION)).astype(np.float32)
    mask = (pos**2).sum(-1) <= R_MM**2
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    occ = np.zeros(shape)
    for a in sub:
        for b in sub:
            for c in sub:
                occ += ((pos + np.array([a, b, c]) * sp) ** 2).sum(-1) <= R_MM**2
    return dose, mask, (occ / supersample**3).astype(np.float32), float(np.prod(sp)) / 1000.0


@pytest.mark.parametrize("spacing_mm", [(1, 1, 1), (2, 2, 2), (3, 3, 3), (3, 2, 2), (2.5, 1, 1)])
def test_sphere_in_linear_field_matches_closed_form(spacing_mm):
    dose, mask, occ, vox = _sphere_phantom(spacing_mm)
    sphere_cc = 4.0 / 3.0 * np.pi * R_MM**3 / 1000.0
    for m, o in ((mask, None), (occ > 0, occ)):
        dvh = compute_dvh(dose, m, voxel_volume_cc=vox, occupancy=o)
        # symmetry: mean and median are the centre dose
        assert dvh.mean_gy == pytest.approx(DC_GY, abs=1e-6)
        assert dvh.dose_at_volume(50, "%") == pytest.approx(DC_GY, abs=1e-6)
        xs = np.arange(1, 100)
        rel = np.array([abs(dvh.dose_at_volume(x, "%") / _exact_dose_at(x) - 1) for x in xs])
        assert np.mean(rel <= 0.03) >= 0.95, rel.max()
        if max(spacing_mm) <= 2.5:
            doses = np.linspace(DC_GY - R_MM + 0.5, DC_GY + R_MM - 0.5, 60)
            err_pp = np.array([abs(dvh.volume_at_dose(d) - 100 * _frac_at_or_above(d)) for d in doses])
            assert np.mean(err_pp <= 3.0) >= 0.95, err_pp.max()
    # sub-voxel occupancy gets the volume right within 0.5 %, better than the binary mask
    occ_err = abs(
        compute_dvh(dose, occ > 0, voxel_volume_cc=vox, occupancy=occ).total_volume_cc / sphere_cc - 1
    )
    mask_err = abs(compute_dvh(dose, mask, voxel_volume_cc=vox).total_volume_cc / sphere_cc - 1)
    assert occ_err <= 0.005
    if max(spacing_mm) >= 2:
        assert occ_err < mask_err


@pytest.mark.parametrize("spacing_mm", [(1, 1, 1), (3, 2, 2)])
def test_cylinder_in_uniform_field_is_flat(spacing_mm):
    shape = (20, 24, 24)
    sp = np.asarray(spacing_mm, float)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    pos = (idx - (np.array(shape) - 1) / 2.0) * sp
    mask = (pos[..., 1] ** 2 + pos[..., 2] ** 2 <= 8.0**2) & (np.abs(pos[..., 0]) <= 9.0)
    dose = np.full(shape, 42.5, np.float32)
    dvh = compute_dvh(dose, mask, voxel_volume_cc=float(np.prod(sp)) / 1000)
    for x in (0, 2, 50, 95, 98, 100):
        assert dvh.dose_at_volume(x) == 42.5
    assert dvh.volume_at_dose(42.5) == 100.0
    assert dvh.volume_at_dose(42.51) == 0.0
    assert dvh.mean_gy == pytest.approx(42.5)


def test_sphere_from_dicom_contours_matches_closed_form(tmp_path):
    """Analytic circles per CT slice -> RTSTRUCT -> read back with sub-voxel occupancy."""
    dicom = pytest.importorskip("dosegym.data.dicom", reason="the DICOM RT module is not available")
    from dosegym.data import Case, Grid

    spacing = (2.5, 2.0, 2.0)
    dose, _, occ, vox = _sphere_phantom(spacing, supersample=1)
    shape = dose.shape
    grid = Grid(shape, spacing, tuple(-(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)))
    circles = []
    for z in grid.axis_coords_mm(0):
        if abs(z) < R_MM:
            rho = np.sqrt(R_MM**2 - z**2)
            t = np.linspace(0.0, 2 * np.pi, 180, endpoint=False)
            circles.append(np.stack([np.full_like(t, z), rho * np.sin(t), rho * np.cos(t)], axis=1))
    body = np.ones(shape, bool)
    case = Case("sphere", grid, structures={"Sphere": occ >= 0.5}, dose=dose, body=body)
    back = dicom.read_dicom(dicom.write_dicom_case(case, tmp_path / "rt", contours={"Sphere": circles}))
    occ_back = back.occupancy["Sphere"]
    dvh = compute_dvh(back.dose, occ_back > 0, voxel_volume_cc=back.voxel_volume_cc, occupancy=occ_back)
    assert dvh.total_volume_cc == pytest.approx(4.0 / 3.0 * np.pi * R_MM**3 / 1000.0, rel=0.03)
    xs = np.arange(1, 100)
    rel = np.array([abs(dvh.dose_at_volume(x, "%") / _exact_dose_at(x) - 1) for x in xs])
    assert np.mean(rel <= 0.03) >= 0.95, rel.max()
