"""A small DICOM RT set with analytic contents, written by the tests themselves.

CT grid: 24 slices of 32 x 32, 2.5 mm slices, 2 x 1.8 mm pixels (y, x), origin (z, y, x) (-27.5, -33, -29)
mm, HU = 5x - 2y + 4z (patient mm, so every voxel says where it is). Structures are analytic
polygons: a sphere ``PTV_60`` (radius 12 mm, at +x), an annulus ``Ring`` (outer 8, inner 4 mm,
at -x), a square prism ``Box`` aligned to voxel edges on 5 planes, and a ``Body`` ellipse
(EXTERNAL). RTDOSE: the linear dose 40 + 0.5x - 0.3y + 0.2z Gy on a coarser, offset grid.
RTPLAN: 5 IMRT beams at the sphere's centre, 60 Gy in 30 fractions to ``PTV_60``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dosegym.data import Beams, Case, Grid, Prescription
from dosegym.data.dicom import write_dicom_case, write_rtdose

CT_GRID = Grid((24, 32, 32), (2.5, 2.0, 1.8), (-27.5, -33.0, -29.0))
DOSE_GRID = Grid((9, 18, 19), (5.0, 3.0, 3.0), (-21.3, -27.7, -24.4))
SPHERE_CENTRE = (1.65, -2.3, 9.7)  # (z, y, x) mm
SPHERE_RADIUS = 12.0
RING_CENTRE_YX = (-1.0, -14.0)
RING_RADII = (8.0, 4.0)
RING_SLICES = range(10, 18)
BOX_SLICES = range(3, 8)
BOX_ROWS, BOX_COLS = range(20, 26), range(4, 10)  # voxels fully inside the box
BODY_CENTRE_YX, BODY_AXES_YX = (-2.0, 2.0), (26.0, 28.0)
GANTRY_DEG = (0.0, 72.0, 144.0, 216.0, 288.0)


def ct_hu(z, y, x):
    return 5.0 * x - 2.0 * y + 4.0 * z


def dose_gy(z, y, x):
    return 40.0 + 0.5 * x - 0.3 * y + 0.2 * z


def patient_mm(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, y, x) mm of every voxel centre of ``grid`` (any direction)."""
    mm = grid.index_to_mm(np.moveaxis(np.indices(grid.shape), 0, -1))
    return mm[..., 0], mm[..., 1], mm[..., 2]


def ellipse(z: float, centre_yx, axes_yx, n: int = 96) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    y = centre_yx[0] + axes_yx[0] * np.sin(t)
    x = centre_yx[1] + axes_yx[1] * np.cos(t)
    return np.column_stack([np.full(n, z), y, x])


def analytic_contours(grid: Grid = CT_GRID) -> dict[str, list[np.ndarray]]:
    """(z, y, x) mm polygons of the analytic structures on the grid's slice planes."""
    zs = grid.axis_coords_mm(0)
    cz, cy, cx = SPHERE_CENTRE
    sphere = [
        ellipse(z, (cy, cx), (r, r))
        for z in zs
        if (r := np.sqrt(max(SPHERE_RADIUS**2 - (z - cz) ** 2, 0.0))) > 0.5
    ]
    ring = [ellipse(zs[k], RING_CENTRE_YX, (rad, rad)) for k in RING_SLICES for rad in RING_RADII]
    dy, dx = grid.spacing_mm[1:]
    y0, x0 = grid.axis_coords_mm(1)[BOX_ROWS[0]] - dy / 2, grid.axis_coords_mm(2)[BOX_COLS[0]] - dx / 2
    y1, x1 = y0 + dy * len(BOX_ROWS), x0 + dx * len(BOX_COLS)
    box = [np.array([[zs[k], y0, x0], [zs[k], y0, x1], [zs[k], y1, x1], [zs[k], y1, x0]]) for k in BOX_SLICES]
    body = [ellipse(z, BODY_CENTRE_YX, BODY_AXES_YX) for z in zs]
    return {"PTV_60": sphere, "Ring": ring, "Box": box, "Body": body}


def analytic_case(grid: Grid = CT_GRID) -> Case:
    """The case whose DICOM export ``write_test_set`` writes (masks voxelised roughly)."""
    z, y, x = patient_mm(grid)
    sphere = (z - SPHERE_CENTRE[0]) ** 2 + (y - SPHERE_CENTRE[1]) ** 2 + (
        x - SPHERE_CENTRE[2]
    ) ** 2 <= SPHERE_RADIUS**2
    rr = np.hypot(y - RING_CENTRE_YX[0], x - RING_CENTRE_YX[1])
    ring = (rr <= RING_RADII[0]) & (rr >= RING_RADII[1])
    ring &= np.isin(np.arange(grid.shape[0]), list(RING_SLICES))[:, None, None]
    box = np.zeros(grid.shape, bool)
    box[
        BOX_SLICES.start : BOX_SLICES.stop,
        BOX_ROWS.start : BOX_ROWS.stop,
        BOX_COLS.start : BOX_COLS.stop,
    ] = True
    body = ((y - BODY_CENTRE_YX[0]) / BODY_AXES_YX[0]) ** 2 + (
        (x - BODY_CENTRE_YX[1]) / BODY_AXES_YX[1]
    ) ** 2 <= 1.0
    return Case(
        case_id="dicom_analytic",
        grid=grid,
        ct=np.rint(ct_hu(z, y, x)),  # integers already, up to float round-off
        structures={"PTV_60": sphere, "Ring": ring, "Box": box},
        prescriptions=[Prescription("PTV_60", 60.0, 30)],
        beams=Beams(SPHERE_CENTRE, GANTRY_DEG, "IMRT", (0.0,) * 5),
        body=body,
    )


def write_test_set(folder: Path) -> Path:
    """Write CT, RTSTRUCT (analytic contours), RTPLAN and the coarse linear RTDOSE."""
    write_dicom_case(analytic_case(), folder, contours=analytic_contours())
    write_rtdose(dose_gy(*patient_mm(DOSE_GRID)), DOSE_GRID, folder / "RD.dcm", ct_folder=folder)
    return folder
