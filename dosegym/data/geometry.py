"""Beam geometry channels as the GDP-HMM challenge defines them: the beam plate and the angle plate.

Gantry convention (IEC 61217, head-first supine patient, coordinates DICOM LPS stored
(z, y, x)): the source of a beam at gantry angle ``g`` lies in the axial plane of the
isocenter, in direction ``(0, -cos g, sin g)`` from it. Gantry 0° puts the source anterior
(−y), 90° at the patient's left (+x), 180° posterior (+y), 270° at the patient's right (−x).
This is the organisers' ``get_source_from_angle`` (their axis 1 = rows = y, axis 2 =
columns = x): ``(iso_y + 1000 sin(g − 90°), iso_x + 1000 cos(g − 90°))``. Only coplanar
beams (couch 0°) are supported.

**Beam plate** (``beam_plate``): for each beam, the divergent cone from a virtual source
``source_distance_mm`` from the isocenter through the target: every voxel whose ray from
the source passes through the target is lit, from where the ray enters the volume to where
it leaves it. The organisers draw discrete lines from the source through each target-surface
voxel to the volume's edge and close the result (dilate 4³, erode 3³) to fill the gaps
between lines. Here each voxel is tested exactly: its beam's-eye-view (BEV) coordinate
(divergent projection onto the plane through the isocenter perpendicular to the beam axis)
is looked up in the target's BEV silhouette. The silhouette is rasterised from the
projected target-surface voxel centres at half the finest voxel spacing, then closed (dilated
by one projected voxel, eroded by half of one): the closing fills the gaps between projected
centres and leaves the silhouette half a voxel larger than the centres, i.e. the voxels'
extent. Lit voxels are weighted by the inverse-square falloff relative to the
source-isocenter distance, ``SAD² / |p − source|²`` (1 at the isocenter distance; the
organisers compute it in voxel units, here in mm), and the per-beam plates are summed.
VMAT arcs (many control-point angles) use every other angle of the sorted angle list.

**Angle plate** (``angle_plate``): for each gantry angle, a line from the isocenter toward the
source, one in-plane voxel wide, to the edge of the axial slice (value 1 on any line, 0
elsewhere); the 2-D plate is repeated on the slices ``iso_z − half_slices`` to
``iso_z + half_slices − 1`` (the organisers' loader: ``plate[z_begin:z_end]`` with
``z_begin = iso_z − 5``, ``z_end = iso_z + 5``), clipped to the volume.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dosegym.data.case import Beams, Case
from dosegym.data.grid import Grid
from dosegym.errors import DataError

SOURCE_DISTANCE_MM = 1000.0


def _source_direction(gantry_deg: float) -> np.ndarray:
    """Unit vector (z, y, x) from the isocenter toward the source (IEC 61217, HFS)."""
    g = np.deg2rad(gantry_deg)
    return np.array([0.0, -np.cos(g), np.sin(g)])


def _coplanar(beams: Beams) -> None:
    if beams.couch_deg is not None and any(abs(((c + 180) % 360) - 180) > 1e-6 for c in beams.couch_deg):
        raise DataError(
            f"beams.couch_deg {list(beams.couch_deg)}: only coplanar beams (couch 0°) are supported"
        )


def plate_angles(beams: Beams, vmat_stride: int = 2) -> list[float]:
    """Gantry angles of the beam plate: all (IMRT), or every ``vmat_stride``-th sorted (VMAT)."""
    angles = list(beams.gantry_deg)
    if beams.technique == "VMAT":
        angles = sorted(angles)[:: max(1, int(vmat_stride))]
    return angles


def _linear_parts(grid: Grid, offset_mm: np.ndarray, vec: np.ndarray) -> list[np.ndarray]:
    """Per-axis terms whose broadcast sum is ``(p - offset) · vec`` for every voxel centre ``p``.

    ``p = origin + D (index * spacing)`` is linear in the indices, so the projection of every
    voxel onto ``vec`` is a sum of three 1-D arrays (float64).
    """
    d = np.asarray(grid.direction)
    parts = []
    for axis, (n, s) in enumerate(zip(grid.shape, grid.spacing_mm, strict=True)):
        coeff = s * float(d[:, axis] @ vec)
        parts.append(np.arange(n) * coeff)
    parts[0] = parts[0] + float((np.asarray(grid.origin_mm) - offset_mm) @ vec)
    return parts


def _broadcast_sum(parts: list[np.ndarray]) -> np.ndarray:
    z, y, x = parts
    return (z[:, None, None] + y[None, :, None] + x[None, None, :]).astype(np.float32)


def _disk(radius_px: int) -> np.ndarray:
    r = np.arange(-radius_px, radius_px + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius_px**2 + 1e-9


def _single_beam_plate(
    grid: Grid,
    surface_idx: np.ndarray,
    iso_mm: np.ndarray,
    gantry_deg: float,
    sad_mm: float,
    inverse_square: bool,
) -> np.ndarray:
    to_source = _source_direction(gantry_deg)
    source = iso_mm + sad_mm * to_source
    axis = -to_source  # beam axis, source -> isocenter
    u_dir = np.array([0.0, to_source[2], -to_source[1]])  # in the axial plane, ⟂ axis
    v_dir = np.array([1.0, 0.0, 0.0])  # superior
    t_parts = _linear_parts(grid, source, axis)
    u_parts = _linear_parts(grid, source, u_dir)
    v_parts = _linear_parts(grid, source, v_dir)

    # Target silhouette in BEV (mm at the isocenter plane), from surface-voxel centres.
    zi, yi, xi = surface_idx.T
    t_s = t_parts[0][zi] + t_parts[1][yi] + t_parts[2][xi]
    if np.any(t_s <= 0):
        raise DataError(
            f"gantry {gantry_deg}°: the virtual source ({sad_mm} mm from the isocenter) lies "
            "inside the target's extent; use a larger source_distance_mm"
        )
    mag = sad_mm / t_s
    su = (u_parts[0][zi] + u_parts[1][yi] + u_parts[2][xi]) * mag
    sv = (v_parts[0][zi] + v_parts[1][yi] + v_parts[2][xi]) * mag
    pixel = min(grid.spacing_mm) / 2.0
    step = max(grid.spacing_mm) * float(mag.max())  # largest gap between projected centres
    r_dilate = int(np.ceil(step / pixel))
    r_erode = int(np.ceil(step / 2.0 / pixel))
    pad = r_dilate + 2
    u0, v0 = su.min() - pad * pixel, sv.min() - pad * pixel
    nu = int(np.ceil((su.max() - u0) / pixel)) + pad + 1
    nv = int(np.ceil((sv.max() - v0) / pixel)) + pad + 1
    sil = np.zeros((nv, nu), dtype=bool)
    sil[np.rint((sv - v0) / pixel).astype(int), np.rint((su - u0) / pixel).astype(int)] = True
    sil = ndimage.binary_dilation(sil, _disk(r_dilate))
    sil = ndimage.binary_erosion(sil, _disk(r_erode), border_value=0)

    # Every voxel: BEV coordinate, then look-up in the silhouette.
    t = _broadcast_sum(t_parts)
    du = _broadcast_sum(u_parts)
    dv = _broadcast_sum(v_parts)
    ahead = t > 0
    scale = np.where(ahead, np.float32(sad_mm) / np.where(ahead, t, 1), 0).astype(np.float32)
    iu = np.rint((du * scale - np.float32(u0)) / np.float32(pixel)).astype(np.int64)
    iv = np.rint((dv * scale - np.float32(v0)) / np.float32(pixel)).astype(np.int64)
    inside = ahead & (iu >= 0) & (iu < nu) & (iv >= 0) & (iv < nv)
    lit = np.zeros(grid.shape, dtype=bool)
    lit[inside] = sil[iv[inside], iu[inside]]
    if not inverse_square:
        return lit.astype(np.float32)
    dist2 = t * t + du * du + dv * dv  # (t, u, v) is an orthonormal frame at the source
    return np.where(lit, np.float32(sad_mm**2) / np.maximum(dist2, np.float32(1e-6)), 0).astype(np.float32)


def beam_plate(
    case_or_grid: Case | Grid,
    target_mask: np.ndarray | None = None,
    beams: Beams | None = None,
    *,
    source_distance_mm: float = SOURCE_DISTANCE_MM,
    vmat_stride: int = 2,
    inverse_square: bool = True,
) -> np.ndarray:
    """The GDP-HMM beam plate (see module docstring): ``float32`` of ``grid.shape`` (z, y, x).

    Args:
        case_or_grid: a ``Case`` (its grid, beams and, by default, the union of its targets)
            or a ``Grid`` (then ``target_mask`` and ``beams`` are required).
        target_mask: ``bool`` mask on the grid of the volume the beams aim at.
        beams: isocenter (mm) and gantry angles (degrees, IEC 61217); coplanar only.
        source_distance_mm: source-isocenter distance of the virtual source.
        vmat_stride: for VMAT, use every ``vmat_stride``-th of the sorted angles.
        inverse_square: weight lit voxels by ``SAD² / distance²`` (else 1 where lit).
    """
    if isinstance(case_or_grid, Case):
        case = case_or_grid
        grid = case.grid
        beams = beams if beams is not None else case.beams
        if target_mask is None:
            if not case.targets:
                raise DataError(f"{case.source}: beam_plate needs a target; the case has none")
            target_mask = np.logical_or.reduce([case.structures[t] for t in case.targets])
    elif isinstance(case_or_grid, Grid):
        grid = case_or_grid
    else:
        raise DataError(f"beam_plate: expected a Case or a Grid, got {type(case_or_grid).__name__}")
    if beams is None:
        raise DataError("beam_plate: beams are required (the case has no beam geometry)")
    if target_mask is None:
        raise DataError("beam_plate: target_mask is required when a Grid is given")
    if not np.isfinite(source_distance_mm) or source_distance_mm <= 0:
        raise DataError(f"beam_plate: source_distance_mm must be > 0, got {source_distance_mm}")
    mask = np.asarray(target_mask, dtype=bool)
    if mask.shape != grid.shape:
        raise DataError(f"beam_plate: target_mask shape {mask.shape} does not match grid {grid.shape}")
    if not mask.any():
        raise DataError("beam_plate: target_mask is empty")
    _coplanar(beams)
    surface = mask & ~ndimage.binary_erosion(mask)
    surface_idx = np.argwhere(surface)
    iso = np.asarray(beams.isocenter_mm, dtype=float)
    plate = np.zeros(grid.shape, dtype=np.float32)
    for angle in plate_angles(beams, vmat_stride):
        plate += _single_beam_plate(grid, surface_idx, iso, angle, source_distance_mm, inverse_square)
    return plate


def _axial_check(grid: Grid) -> None:
    d = np.asarray(grid.direction)
    if abs(abs(d[0, 0]) - 1) > 1e-4 or abs(d[0, 1]) > 1e-4 or abs(d[0, 2]) > 1e-4:
        raise DataError(
            f"angle plate needs axial slices (index axis 0 along patient z); grid direction is {d.tolist()}"
        )


def isocenter_slice(grid: Grid, beams: Beams) -> int:
    """Index of the axial slice nearest the isocenter (may lie outside ``[0, nz)``)."""
    return int(np.rint(grid.mm_to_index(beams.isocenter_mm)[0]))


def angle_plate_axial(grid: Grid, beams: Beams, *, line_width_mm: float | None = None) -> np.ndarray:
    """The 2-D (y, x) angle plate: 1 on a line from the isocenter toward each beam's source.

    ``line_width_mm`` defaults to the larger in-plane voxel spacing (a line one voxel wide).
    Every gantry angle of ``beams`` is drawn (for VMAT too, as the organisers do).
    """
    _axial_check(grid)
    _coplanar(beams)
    width = max(grid.spacing_mm[1:]) if line_width_mm is None else float(line_width_mm)
    if width <= 0:
        raise DataError(f"angle plate: line_width_mm must be > 0, got {line_width_mm}")
    iso = np.asarray(beams.isocenter_mm, dtype=float)
    d = np.asarray(grid.direction)
    # In-plane offsets (y, x components, mm) of every pixel of a slice from the isocenter.
    rel = np.asarray(grid.origin_mm) - iso
    iy = np.arange(grid.shape[1]) * grid.spacing_mm[1]
    ix = np.arange(grid.shape[2]) * grid.spacing_mm[2]
    py = rel[1] + d[1, 1] * iy[:, None] + d[1, 2] * ix[None, :]
    px = rel[2] + d[2, 1] * iy[:, None] + d[2, 2] * ix[None, :]
    plate = np.zeros(grid.shape[1:], dtype=bool)
    for angle in beams.gantry_deg:
        s = _source_direction(angle)
        along = py * s[1] + px * s[2]
        across = np.abs(py * s[2] - px * s[1])
        plate |= (along >= -width / 2) & (across <= width / 2)
    return plate.astype(np.float32)


def stack_angle_plate(plate_2d: np.ndarray, nz: int, iso_z: int, half_slices: int = 5) -> np.ndarray:
    """Repeat a 2-D (y, x) angle plate on slices ``iso_z - half_slices .. iso_z + half_slices - 1``.

    Slices outside ``[0, nz)`` are dropped (the organisers' loader clips the same way).
    """
    plate_2d = np.asarray(plate_2d, dtype=np.float32)
    if plate_2d.ndim != 2:
        raise DataError(f"angle plate must be 2-D (y, x), got shape {plate_2d.shape}")
    out = np.zeros((int(nz), *plate_2d.shape), dtype=np.float32)
    lo, hi = max(0, iso_z - half_slices), min(int(nz), iso_z + half_slices)
    if lo < hi:
        out[lo:hi] = plate_2d
    return out


def angle_plate(
    grid: Grid, beams: Beams, *, half_slices: int = 5, line_width_mm: float | None = None
) -> np.ndarray:
    """The 3-D angle plate (see module docstring): ``float32`` of ``grid.shape`` (z, y, x)."""
    if half_slices < 0:
        raise DataError(f"angle plate: half_slices must be >= 0, got {half_slices}")
    plate = angle_plate_axial(grid, beams, line_width_mm=line_width_mm)
    return stack_angle_plate(plate, grid.shape[0], isocenter_slice(grid, beams), half_slices)
