"""Beam plate and angle plate against geometry worked out by hand (IEC 61217, HFS, LPS)."""

from __future__ import annotations

import numpy as np
import pytest

from dosegym.data import Beams, Case, Grid, Prescription
from dosegym.data.geometry import angle_plate, angle_plate_axial, beam_plate, stack_angle_plate
from dosegym.errors import DataError

# 1 mm voxels, 21 x 41 x 41, voxel (10, 20, 20) at the origin = isocenter.
N = (21, 41, 41)
GRID = Grid(N, (1.0, 1.0, 1.0), (-10.0, -20.0, -20.0))
ISO_IDX = (10, 20, 20)
ISO = (0.0, 0.0, 0.0)


def cube(half: int = 1) -> np.ndarray:
    """A (2 half + 1)^3 voxel cube centred on the isocenter."""
    m = np.zeros(N, bool)
    z, y, x = ISO_IDX
    m[z - half : z + half + 1, y - half : y + half + 1, x - half : x + half + 1] = True
    return m


def beams(*angles: float, technique: str = "IMRT") -> Beams:
    return Beams(ISO, angles, technique)  # type: ignore[arg-type]


def coords() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = np.meshgrid(*(GRID.axis_coords_mm(a) for a in range(3)), indexing="ij")
    return z, y, x


def test_lateral_beam_lights_the_target_columns_through_the_whole_volume() -> None:
    # Gantry 270: source at the patient's right (-x), beam along +x. With SAD 1000 mm the
    # divergence over 40 mm is < 1 voxel: exactly the target's (z, y) columns are lit, at
    # every x, entrance and exit alike.
    lit = beam_plate(GRID, cube(2), beams(270.0)) > 0
    expected = np.zeros(N, bool)
    expected[8:13, 18:23, :] = True
    assert np.array_equal(lit, expected)
    # Gantry 90 (source at +x) lights the same columns; gantry 0 the (z, x) columns along y.
    assert np.array_equal(beam_plate(GRID, cube(2), beams(90.0)) > 0, expected)
    along_y = np.zeros(N, bool)
    along_y[8:13, :, 18:23] = True
    assert np.array_equal(beam_plate(GRID, cube(2), beams(0.0)) > 0, along_y)


@pytest.mark.parametrize(
    ("gantry", "axis", "source_side"),
    [(0.0, 1, -1), (90.0, 2, +1), (180.0, 1, +1), (270.0, 2, -1)],
)
def test_inverse_square_weights_follow_the_iec_source_position(gantry, axis, source_side) -> None:
    """IEC 61217, HFS: 0° source anterior (-y), 90° left (+x), 180° posterior, 270° right."""
    plate = beam_plate(GRID, cube(1), beams(gantry))
    line = [
        slice(ISO_IDX[0], ISO_IDX[0] + 1),
        slice(ISO_IDX[1], ISO_IDX[1] + 1),
        slice(ISO_IDX[2], ISO_IDX[2] + 1),
    ]
    line[axis] = slice(None)
    profile = plate[tuple(line)].ravel()
    assert np.all(profile > 0)
    # weights fall away from the source: decreasing along +axis iff the source is on the - side
    steps = np.diff(profile) * -source_side
    assert np.all(steps < 0)
    assert plate[ISO_IDX] == pytest.approx(1.0, abs=1e-5)  # at the source-isocenter distance


def test_weights_are_inverse_square_in_mm() -> None:
    sad = 1000.0
    plate = beam_plate(GRID, cube(2), beams(270.0), source_distance_mm=sad)
    z, y, x = coords()
    dist2 = z**2 + y**2 + (x + sad) ** 2  # source at (0, 0, -1000)
    lit = plate > 0
    assert np.allclose(plate[lit], (sad**2 / dist2)[lit], rtol=1e-5)
    unweighted = beam_plate(GRID, cube(2), beams(270.0), inverse_square=False)
    assert set(np.unique(unweighted)) == {0.0, 1.0}
    assert np.array_equal(unweighted > 0, lit)


def test_shadow_diverges_from_a_near_source() -> None:
    # Source 40 mm to the right of the isocenter (x = -40), 20 mm outside the volume; target
    # extent +-1.5 mm. A voxel at distance t from the source along the beam, offset r from
    # the axis, projects to r * 40 / t on the isocenter plane: the target's shadow there is
    # about +-1.5 mm (+-1.56 for its near face), so offsets up to 1.2 mm (projected) are lit
    # and offsets of 2 mm or more are not.
    sad = 40.0
    plate = beam_plate(GRID, cube(1), beams(270.0), source_distance_mm=sad)
    z, y, x = coords()
    t = x + sad
    projected = np.maximum(np.abs(y), np.abs(z)) * sad / t
    lit = plate > 0
    assert lit[projected <= 1.2].all()
    assert not lit[projected >= 2.0].any()
    width = lit[ISO_IDX[0]].sum(axis=0)  # lit voxels in y, per x
    assert np.all(np.diff(width) >= 0)
    assert width[0] < width[-1]
    assert width[0] == 1 and width[-1] == 5  # |y| <= 1.5 * t / 40 at t = 20 and t = 60


def test_beams_sum_and_vmat_uses_every_other_angle() -> None:
    target = cube(2)
    both = beam_plate(GRID, target, beams(90.0, 270.0))
    assert np.allclose(both, beam_plate(GRID, target, beams(90.0)) + beam_plate(GRID, target, beams(270.0)))
    assert both[ISO_IDX] == pytest.approx(2.0, abs=1e-5)
    vmat = beam_plate(GRID, target, beams(50.0, 0.0, 30.0, 10.0, 40.0, 20.0, technique="VMAT"))
    imrt = beam_plate(GRID, target, beams(0.0, 20.0, 40.0))
    assert np.allclose(vmat, imrt)


def test_case_input_uses_its_targets_and_beams() -> None:
    ptv = cube(2)
    cord = np.zeros(N, bool)
    cord[:, 35, 20] = True
    case = Case(
        "c",
        GRID,
        structures={"PTV60": ptv, "Cord": cord},
        prescriptions=[Prescription("PTV60", 60.0, 30)],
        beams=beams(0.0, 120.0, 240.0),
    )
    assert np.array_equal(beam_plate(case), beam_plate(GRID, ptv, case.beams))
    assert beam_plate(case).dtype == np.float32


def test_non_identity_direction_is_physical() -> None:
    # Rows run posterior -> anterior (index y along -y): gantry 0 (source anterior) must give
    # weights that grow with the row index, the mirror image of the identity grid's plate.
    flipped = Grid(N, (1.0, 1.0, 1.0), (-10.0, 20.0, -20.0), ((1, 0, 0), (0, -1, 0), (0, 0, 1)))
    plate = beam_plate(flipped, cube(2), beams(0.0))
    assert np.allclose(plate, beam_plate(GRID, cube(2), beams(0.0))[:, ::-1, :])
    ap = angle_plate_axial(flipped, beams(0.0))
    assert np.array_equal(ap, angle_plate_axial(GRID, beams(0.0))[::-1, :])


def test_beam_plate_errors() -> None:
    with pytest.raises(DataError, match="couch"):
        beam_plate(GRID, cube(), Beams(ISO, (0.0,), "IMRT", (10.0,)))
    with pytest.raises(DataError, match="empty"):
        beam_plate(GRID, np.zeros(N, bool), beams(0.0))
    with pytest.raises(DataError, match="shape"):
        beam_plate(GRID, np.ones((3, 3, 3), bool), beams(0.0))
    with pytest.raises(DataError, match="beams are required"):
        beam_plate(GRID, cube())
    with pytest.raises(DataError, match="source_distance_mm"):
        beam_plate(GRID, cube(), beams(0.0), source_distance_mm=0.0)


@pytest.mark.parametrize(
    ("gantry", "dy", "dx"), [(0.0, -1, 0), (90.0, 0, +1), (180.0, +1, 0), (270.0, 0, -1)]
)
def test_angle_plate_line_points_to_the_source(gantry, dy, dx) -> None:
    plate = angle_plate(GRID, beams(gantry))
    iz, iy, ix = ISO_IDX
    assert plate.dtype == np.float32 and plate.shape == N
    ys, xs = np.nonzero(plate[iz])
    # one voxel wide, from the isocenter to the edge, on the source's side only
    expected = {(iy + k * dy, ix + k * dx) for k in range(0, 21)}
    assert set(zip(ys.tolist(), xs.tolist(), strict=True)) == expected
    assert set(np.unique(plate)) == {0.0, 1.0}


def test_angle_plate_slices_follow_the_organisers_loader() -> None:
    plate = angle_plate(GRID, beams(0.0, 90.0))
    lit_slices = np.nonzero(plate.any(axis=(1, 2)))[0]
    assert lit_slices.tolist() == list(range(ISO_IDX[0] - 5, ISO_IDX[0] + 5))
    assert all(np.array_equal(plate[z], plate[ISO_IDX[0]]) for z in lit_slices)
    two = angle_plate(GRID, beams(0.0), half_slices=2)
    assert np.nonzero(two.any(axis=(1, 2)))[0].tolist() == [8, 9, 10, 11]
    near_top = stack_angle_plate(np.ones((4, 4)), nz=6, iso_z=4, half_slices=5)
    assert near_top.any(axis=(1, 2)).tolist() == [True] * 6
    diagonal = angle_plate_axial(GRID, beams(45.0))
    assert diagonal[ISO_IDX[1] - 10, ISO_IDX[2] + 10] == 1  # anterior-left at 45 degrees
    assert diagonal[ISO_IDX[1] + 10, ISO_IDX[2] - 10] == 0
