"""DICOM RT reading and writing (dosegym.data.dicom) on pydicom's files and our own sets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import (
    BOX_COLS,
    BOX_ROWS,
    BOX_SLICES,
    CT_GRID,
    DOSE_GRID,
    GANTRY_DEG,
    RING_CENTRE_YX,
    RING_RADII,
    RING_SLICES,
    SPHERE_CENTRE,
    SPHERE_RADIUS,
    analytic_case,
    analytic_contours,
    ct_hu,
    dose_gy,
    patient_mm,
    write_test_set,
)
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.data import Beams, Case, Grid, read_case, write_case
from dosegym.data.dicom import (
    read_dicom,
    read_rtdose,
    read_rtplan,
    read_rtstruct,
    write_dicom_case,
    write_rtdose,
    write_rtstruct,
)
from dosegym.data.dicom.raster import fill_polygons, plane_contours, select_planes
from dosegym.errors import DataError


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_test_set(tmp_path_factory.mktemp("dicom") / "set")


@pytest.fixture(scope="module")
def case(written) -> Case:
    return read_dicom(written)


@pytest.fixture
def copy(written, tmp_path) -> Path:
    """A private copy of the written set, for tests that damage it."""
    return Path(shutil.copytree(written, tmp_path / "set"))


def within(grid: Grid, z, y, x) -> np.ndarray:
    """Where patient points (mm) lie within the span of the grid's voxel centres."""
    idx = grid.mm_to_index(np.stack([z, y, x], axis=-1))
    return np.all((idx >= -1e-9) & (idx <= np.asarray(grid.shape) - 1 + 1e-9), axis=-1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# -- rasteriser -------------------------------------------------------------------------
def test_fill_polygons_area_and_even_odd_hole():
    t = np.linspace(0.0, 2.0 * np.pi, 256, endpoint=False)
    outer = np.column_stack([40.2 + 25 * np.sin(t), 39.7 + 25 * np.cos(t)])
    inner = np.column_stack([40.2 + 10 * np.sin(t), 39.7 + 10 * np.cos(t)])
    disc = fill_polygons([outer], (80, 80), 4)
    ring = fill_polygons([outer, inner], (80, 80), 4)
    assert disc.dtype == np.float32 and 0.0 <= ring.min() and ring.max() <= 1.0
    assert disc.sum() == pytest.approx(np.pi * 25**2, rel=2e-3)
    assert ring.sum() == pytest.approx(np.pi * (25**2 - 10**2), rel=2e-3)
    assert ring[40, 40] == 0.0 and ring[40, 58] == 1.0
    # A square on pixel edges is exact; one that leaves the plane is clipped to it.
    square = np.array([[1.5, 1.5], [1.5, 4.5], [4.5, 4.5], [4.5, 1.5]])
    assert fill_polygons([square], (7, 7), 4).sum() == 9.0
    assert fill_polygons([square - [0.0, 3.0]], (7, 7), 4).sum() == 6.0
    assert fill_polygons([square + 100.0], (7, 7), 4).sum() == 0.0


def test_plane_contours_round_trip_a_mask_with_a_hole():
    mask = np.zeros((12, 12), bool)
    mask[2:10, 3:11] = True
    mask[4:7, 5:8] = False
    polys = plane_contours(mask)
    assert len(polys) == 2
    assert np.array_equal(fill_polygons(polys, mask.shape, 4) >= 0.5, mask)


def test_select_planes_nearest_plane_within_half_a_slice():
    slices = np.arange(6) * 2.5
    # planes on slices 0 and 1, one 0.75 mm above slice 3, one exactly between 4 and 5
    chosen = select_planes(np.array([0.0, 2.5, 8.25, 11.25]), slices, 1.25)
    assert chosen.tolist() == [0, 1, -1, 2, -1, 3]
    # a grid finer than the planes repeats the nearest plane; gaps stay empty
    fine = select_planes(np.array([0.0, 5.0]), np.arange(6) * 1.0, 1.25)
    assert fine.tolist() == [0, 0, -1, -1, 1, 1]


# -- pydicom's bundled RT files ---------------------------------------------------------
def test_rtplan_dcm_beams_isocenter_and_prescription():
    path = get_testdata_file("rtplan.dcm")
    beams, rx = read_rtplan(path, rois={1: "Body", 7: "PTV"})
    assert beams.technique == "IMRT" and beams.gantry_deg == (0.0,) and beams.couch_deg == (0.0,)
    # IsocenterPosition (x, y, z) LPS -> (z, y, x)
    assert beams.isocenter_mm == pytest.approx((-724.97815409918, 244.135437110782, 235.711172833292))
    # DoseReferenceDescription 'PTV' names the target; FractionGroup: 30 fractions
    assert [(p.target, p.fractions) for p in rx] == [("PTV", 30)]
    assert rx[0].dose_gy == pytest.approx(30.826203)
    assert read_rtplan(path)[1] == []  # nothing to match without the structure set


def test_rtdose_dcm_grid_scaling_and_units(tmp_path):
    src = get_testdata_file("rtdose.dcm")
    with pytest.raises(DataError, match=r"rtdose\.dcm: DoseUnits 'RELATIVE'"):
        read_rtdose(src)
    ds = pydicom.dcmread(src)
    ds.DoseUnits = "GY"
    ds.save_as(tmp_path / "gy.dcm")
    dose, grid = read_rtdose(tmp_path / "gy.dcm")
    assert grid.shape == (15, 10, 10) and grid.spacing_mm == (5.0, 10.0, 10.0)
    assert grid.origin_mm == pytest.approx((-761.87, 199.43125, 189.43125))
    raw = ds.pixel_array * float(ds.DoseGridScaling)
    assert np.allclose(dose, raw, rtol=1e-6) and dose.max() == pytest.approx(1.254)
    ds.DoseUnits = "CGY"
    ds.save_as(tmp_path / "cgy.dcm")
    assert read_rtdose(tmp_path / "cgy.dcm")[0].max() == pytest.approx(0.01254)


def test_rtstruct_dcm_contours():
    path = get_testdata_file("rtstruct.dcm")  # no preamble: read without the DICM marker
    grid = Grid((5, 34, 44), (10.0, 10.0, 10.0), (-220.0, -165.0, -215.0))
    rois = {r.name: r for r in read_rtstruct(path, grid)}
    assert set(rois) == {"patient", "Isocenter 1", "Isocenter 2"}
    assert rois["Isocenter 1"].occupancy is None  # POINT contours are not volumes
    body = rois["patient"]
    assert body.interpreted_type == "EXTERNAL"
    # a 400 x 300 mm rectangle on the planes z = -200, -190, -180 mm (slices 2, 3, 4)
    assert body.occupancy.sum() * grid.voxel_volume_cc == pytest.approx(3 * 400 * 300 * 10 / 1000)
    assert body.occupancy[:2].sum() == 0 and body.occupancy[2:].reshape(3, -1).sum(1).tolist() == [1200.0] * 3


# -- our own series ---------------------------------------------------------------------
def test_grid_and_orientation_match_the_dicom_geometry(written, case):
    assert case.grid == CT_GRID
    # every CT voxel holds HU = 5x - 2y + 4z of its own position
    assert np.abs(case.ct - ct_hu(*patient_mm(case.grid))).max() < 1e-3
    # independently: pixel (i, j) of a slice sits at IPP + j dc r + i dr c (DICOM PS3.3)
    for name, i, j in (("CT.0001.dcm", 0, 0), ("CT.0007.dcm", 3, 29), ("CT.0020.dcm", 30, 5)):
        ds = pydicom.dcmread(written / name)
        r, c = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
        lps = np.array(ds.ImagePositionPatient) + j * ds.PixelSpacing[1] * r + i * ds.PixelSpacing[0] * c
        hu = ds.pixel_array[i, j] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        index = np.rint(case.grid.mm_to_index(lps[::-1])).astype(int)
        assert case.ct[tuple(index)] == hu == pytest.approx(ct_hu(*lps[::-1]), abs=1e-3)
    # the sphere at +x (patient left) lies at larger x index than the ring at -x
    sphere_x = np.argwhere(case.structures["PTV_60"])[:, 2].mean()
    ring_x = np.argwhere(case.structures["Ring"])[:, 2].mean()
    assert sphere_x > ring_x
    centre = np.rint(case.grid.mm_to_index(SPHERE_CENTRE)).astype(int)
    assert case.structures["PTV_60"][tuple(centre)]


def test_feet_first_series_is_reoriented_to_identity(tmp_path):
    flipped = Grid((6, 8, 10), (3.0, 2.0, 1.5), (40.0, -5.0, 12.0), ((-1, 0, 0), (0, 1, 0), (0, 0, -1)))
    ct = np.arange(flipped.size, dtype=np.float32).reshape(flipped.shape)
    mask = np.zeros(flipped.shape, bool)
    mask[1:3, 2:6, 1:4] = True
    src = Case("ffs", flipped, ct=ct, structures={"Cube": mask})
    back = read_dicom(write_dicom_case(src, tmp_path / "ffs"))
    ds = pydicom.dcmread(tmp_path / "ffs" / "CT.0001.dcm")
    assert [float(v) for v in ds.ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    assert np.allclose(back.grid.direction, np.eye(3))
    assert back.grid.origin_mm == pytest.approx(flipped.index_to_mm([5, 0, 9]))
    assert np.array_equal(back.ct, np.flip(ct, (0, 2)))
    assert np.array_equal(back.structures["Cube"], np.flip(mask, (0, 2)))


def test_sphere_volume_from_occupancy(case):
    exact_cc = 4.0 / 3.0 * np.pi * SPHERE_RADIUS**3 / 1000.0
    assert case.volume_cc("PTV_60") == pytest.approx(exact_cc, rel=0.03)
    occ = case.occupancy["PTV_60"]
    assert occ.dtype == np.float32 and 0 < occ.max() <= 1.0 and ((occ > 0) & (occ < 1)).any()
    assert np.array_equal(case.structures["PTV_60"], occ >= 0.5)


def test_ring_hole_is_empty(case):
    ring = case.occupancy["Ring"]
    k = RING_SLICES[3]
    cy, cx = RING_CENTRE_YX
    near = case.grid.mm_to_index((case.grid.axis_coords_mm(0)[k], cy, cx + 1.0))
    zi, yi, xi = np.rint(near).astype(int)
    assert ring[zi, yi, xi] == 0.0  # voxel within 2.3 mm of the centre: XOR leaves a hole
    assert ring[zi, yi + 3, xi] == 1.0  # voxel 5 to 7.3 mm from the centre: in the ring
    exact_cc = np.pi * (RING_RADII[0] ** 2 - RING_RADII[1] ** 2) * len(RING_SLICES) * 2.5 / 1000
    assert case.volume_cc("Ring") == pytest.approx(exact_cc, rel=0.01)


def test_end_capping_half_a_slice_beyond_the_outer_planes(case):
    # 5 contoured planes of a 12 x 10.8 mm rectangle: 5 full slabs of 2.5 mm, nothing beyond
    assert case.volume_cc("Box") == pytest.approx(5 * 12 * 10.8 * 2.5 / 1000, rel=1e-6)
    slices = np.flatnonzero(case.occupancy["Box"].reshape(CT_GRID.shape[0], -1).any(1))
    assert slices.tolist() == list(BOX_SLICES)
    box = case.structures["Box"][BOX_SLICES.start]
    assert np.argwhere(box).min(0).tolist() == [BOX_ROWS.start, BOX_COLS.start]


def test_contours_between_slices_go_to_the_nearest_slice(copy):
    zs = CT_GRID.axis_coords_mm(0)
    square = np.array([[0.0, -5.0, -5.0], [0.0, -5.0, 5.0], [0.0, 5.0, 5.0], [0.0, 5.0, -5.0]])
    planes = [zs[5] + 0.75, zs[6] + 0.75, zs[9] - 1.0]
    write_rtstruct({"Shifted": [square + [z, 0.0, 0.0] for z in planes]}, copy / "RS.dcm", ct_folder=copy)
    shifted = read_dicom(copy).structures["Shifted"]
    assert np.flatnonzero(shifted.any(axis=(1, 2))).tolist() == [5, 6, 9]


def test_dose_resampled_trilinearly_and_zero_outside(case):
    z, y, x = patient_mm(case.grid)
    inside = within(DOSE_GRID, z, y, x)
    assert inside.any() and (~inside).any()
    scaling = float(pydicom.dcmread(Path(case.source) / "RD.dcm").DoseGridScaling)
    # trilinear interpolation is exact for a linear field: only quantisation and float32 remain
    tol = scaling + 4 * np.finfo(np.float32).eps * 70.0
    assert np.abs(case.dose[inside] - dose_gy(z, y, x)[inside]).max() <= tol
    assert np.all(case.dose[~inside] == 0.0)


def test_read_on_the_dose_grid(written):
    on_dose = read_dicom(written, grid="dose")
    assert on_dose.grid.shape == DOSE_GRID.shape
    assert on_dose.grid.origin_mm == pytest.approx(DOSE_GRID.origin_mm)
    z, y, x = patient_mm(on_dose.grid)
    assert np.abs(on_dose.dose - dose_gy(z, y, x)).max() < 1e-5
    in_ct = within(CT_GRID, z, y, x)
    assert in_ct.any() and (~in_ct).any()  # the dose grid reaches beyond the CT along x
    assert np.abs(on_dose.ct - ct_hu(z, y, x))[in_ct].max() < 1e-3  # trilinear: exact, linear HU
    assert np.all(on_dose.ct[~in_ct] == -1000.0)  # air beyond the CT
    # through-plane nearest-plane sampling of 5 mm slabs: within 5 % of the sphere
    exact_cc = 4.0 / 3.0 * np.pi * SPHERE_RADIUS**3 / 1000.0
    assert on_dose.volume_cc("PTV_60") == pytest.approx(exact_cc, rel=0.05)


def test_oblique_dose_grid(copy):
    c, s = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
    rotated = ((1, 0, 0), (0, c, -s), (0, s, c))  # 10° about z: through map_coordinates
    oblique = Grid((9, 18, 18), (5.0, 3.0, 3.0), (-22.0, -28.0, -26.0), rotated)
    write_rtdose(dose_gy(*patient_mm(oblique)), oblique, copy / "RD.dcm", ct_folder=copy)
    dose, grid = read_rtdose(copy / "RD.dcm")
    assert np.allclose(grid.direction, rotated) and grid.origin_mm == pytest.approx(oblique.origin_mm)
    case = read_dicom(copy)
    z, y, x = patient_mm(case.grid)
    idx = oblique.mm_to_index(np.stack([z, y, x], axis=-1))
    margin = np.minimum(idx, np.asarray(oblique.shape) - 1 - idx).min(axis=-1)
    inside, outside = margin > 1e-3, margin < -1e-3
    assert inside.sum() > 100 and outside.sum() > 100
    assert np.abs(case.dose[inside] - dose_gy(z, y, x)[inside]).max() < 1e-4
    assert np.all(case.dose[outside] == 0.0)
    on_dose = read_dicom(copy, grid="dose")
    assert np.allclose(on_dose.grid.direction, rotated)
    zo, yo, xo = patient_mm(oblique)
    in_ct = within(CT_GRID, zo, yo, xo)
    assert in_ct.any() and (~in_ct).any()
    assert np.abs(on_dose.ct - ct_hu(zo, yo, xo))[in_ct].max() < 1e-3  # trilinear, linear HU
    assert np.all(on_dose.ct[~in_ct] == -1000.0)  # air beyond the CT
    exact_cc = 4.0 / 3.0 * np.pi * SPHERE_RADIUS**3 / 1000.0
    assert on_dose.volume_cc("PTV_60") == pytest.approx(exact_cc, rel=0.05)


def test_body_and_plan(case):
    assert case.body is not None and "Body" not in case.structures
    assert case.meta["dicom"]["body_roi"] == "Body"
    assert case.structure("Body") is case.body and case.body.sum() > case.structures["PTV_60"].sum()
    assert case.beams.gantry_deg == GANTRY_DEG and case.beams.technique == "IMRT"
    assert case.beams.isocenter_mm == pytest.approx(SPHERE_CENTRE)
    assert [(p.target, p.dose_gy, p.fractions) for p in case.prescriptions] == [("PTV_60", 60.0, 30)]


def test_body_by_name_and_tiny_structures(copy):
    zs = CT_GRID.axis_coords_mm(0)
    contours = analytic_contours()
    tiny = np.array([[zs[12], 0.2, 0.1], [zs[12], 0.2, 1.1], [zs[12], 1.0, 0.6]])  # 0.1 voxel
    write_rtstruct(
        {"BODY": contours["Body"], "PTV_60": contours["PTV_60"], "Seed": [tiny]},
        copy / "RS.dcm",
        ct_folder=copy,
        interpreted_types={"BODY": "ORGAN"},
    )
    case = read_dicom(copy)
    assert case.meta["dicom"]["body_roi"] == "BODY" and set(case.structures) == {"PTV_60", "Seed"}
    # thinner than half a voxel: the voxel of highest occupancy stands for it
    assert case.structures["Seed"].sum() == 1 and case.occupancy["Seed"].max() < 0.5
    assert case.structures["Seed"][12].any()


def test_beam_doses_are_summed_and_a_plan_dose_wins(copy):
    (copy / "RP.dcm").unlink()  # its 5 beams would need 5 BEAM doses (test_dicom_no_ct.py)
    half = dose_gy(*patient_mm(DOSE_GRID)) / 2
    for name in ("RD.dcm", "RD.2.dcm"):
        write_rtdose(half, DOSE_GRID, copy / name, ct_folder=copy)
        ds = pydicom.dcmread(copy / name)
        ds.DoseSummationType = "BEAM"
        ds.save_as(copy / name)
    summed = read_dicom(copy)
    assert summed.meta["dicom"]["files"]["rtdose"] == ["RD.2.dcm", "RD.dcm"]
    z, y, x = patient_mm(CT_GRID)
    inside = summed.dose > 0
    assert np.abs(summed.dose[inside] - dose_gy(z, y, x)[inside]).max() < 1e-4
    write_rtdose(half, DOSE_GRID, copy / "RD.plan.dcm", ct_folder=copy)
    assert read_dicom(copy).dose.max() == pytest.approx(summed.dose.max() / 2, rel=1e-5)
    write_rtdose(half, DOSE_GRID, copy / "RD.plan2.dcm", ct_folder=copy)
    with pytest.raises(DataError, match=r"several RTDOSE files .*RD\.plan2\.dcm \(PLAN\)"):
        read_dicom(copy)


def test_prescription_matching_by_description_then_highest_ptv(copy):
    plan = pydicom.dcmread(copy / "RP.dcm")
    ref = plan.DoseReferenceSequence[0]
    del ref.ReferencedROINumber
    ref.DoseReferenceDescription = "box"
    plan.save_as(copy / "RP.dcm")
    assert [p.target for p in read_dicom(copy).prescriptions] == ["Box"]
    ref.DoseReferenceDescription = "boost"
    plan.save_as(copy / "RP.dcm")
    assert [p.target for p in read_dicom(copy).prescriptions] == ["PTV_60"]
    names = {1: "PTV_50", 2: "PTV_66", 3: "Box"}
    assert [p.target for p in read_rtplan(copy / "RP.dcm", names)[1]] == ["PTV_66"]
    assert read_rtplan(copy / "RP.dcm", {3: "Box"})[1] == []


def test_vmat_arcs_and_setup_fields(tmp_path):
    src = analytic_case()
    arc = tuple(float(a) for a in np.arange(181.0, 181.0 + 360.0, 30.0) % 360.0)
    src.beams = Beams(SPHERE_CENTRE, arc, "VMAT", (10.0,))
    folder = write_dicom_case(src, tmp_path / "vmat")
    back = read_dicom(folder)
    assert back.beams.technique == "VMAT" and back.beams.gantry_deg == arc
    assert back.beams.couch_deg == (10.0,) * len(arc)
    plan = pydicom.dcmread(folder / "RP.dcm")
    plan.BeamSequence[0].TreatmentDeliveryType = "SETUP"
    plan.save_as(folder / "RP.dcm")
    assert read_dicom(folder).beams is None


def test_write_rtdose_references_the_ct_and_round_trips(case, written, tmp_path):
    predicted = (case.dose * 0.9 + 1.5 * case.body).astype(np.float32)
    out = write_rtdose(predicted, case, tmp_path / "pred" / "RD.pred.dcm")
    ds = pydicom.dcmread(out)
    ct = pydicom.dcmread(written / "CT.0001.dcm")
    plan = pydicom.dcmread(written / "RP.dcm")
    assert ds.Modality == "RTDOSE" and ds.BitsAllocated == 32 and ds.PixelRepresentation == 0
    assert ds.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.PatientID == ct.PatientID
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    dose, grid = read_rtdose(out)
    assert grid == case.grid
    tol = float(ds.DoseGridScaling) + 4 * np.finfo(np.float32).eps * float(predicted.max())
    assert np.abs(dose - predicted).max() <= tol
    # the same references from the CT folder, and the case reader picks the new dose up
    again = write_rtdose(predicted, case.grid, tmp_path / "RD2.dcm", ct_folder=written)
    assert pydicom.dcmread(again).FrameOfReferenceUID == ct.FrameOfReferenceUID
    folder = Path(shutil.copytree(written, tmp_path / "set"))
    shutil.copy(out, folder / "RD.dcm")
    assert np.abs(read_dicom(folder).dose - predicted).max() <= tol


def test_write_dicom_case_round_trip(tmp_path):
    src = analytic_case()
    src.dose = dose_gy(*patient_mm(src.grid)).astype(np.float32)
    back = read_dicom(write_dicom_case(src, tmp_path / "rt"))
    assert set(back.structures) == set(src.structures)
    for name, mask in src.structures.items():
        assert dice(mask, back.structures[name]) > 0.95, name
    assert dice(src.body, back.body) > 0.95
    assert np.array_equal(back.ct, src.ct)
    scaling = float(pydicom.dcmread(tmp_path / "rt" / "RD.dcm").DoseGridScaling)
    assert np.abs(back.dose - src.dose).max() <= scaling + 1e-5
    assert back.beams == src.beams and back.prescriptions == src.prescriptions


def test_io_registry_and_cli(written, tmp_path):
    assert read_case(written / "CT.0003.dcm").grid == CT_GRID  # a file means its folder
    case = read_case(written)
    out = write_case(case, tmp_path / "export", format="dicom")
    assert out.parent == tmp_path / "export" and pydicom.dcmread(out).Modality == "RTDOSE"
    result = CliRunner().invoke(app, ["data", "info", str(written)])
    assert result.exit_code == 0, result.output
    assert "PTV_60" in result.output and "60 / 30" in result.output and "IMRT" in result.output


# -- bad input --------------------------------------------------------------------------
def test_corrupt_file(copy):
    (copy / "junk.dcm").write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(DataError, match=r"junk\.dcm: not a readable DICOM file"):
        read_dicom(copy)


def test_truncated_pixel_data(copy):
    data = (copy / "CT.0005.dcm").read_bytes()
    (copy / "CT.0005.dcm").write_bytes(data[: len(data) - 300])
    with pytest.raises(DataError, match=r"CT\.0005\.dcm"):
        read_dicom(copy)


@pytest.mark.parametrize("name", ["RS.dcm", "RD.dcm"])
def test_mismatched_frame_of_reference(copy, name):
    ds = pydicom.dcmread(copy / name)
    if name == "RS.dcm":
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.4"
    else:
        ds.FrameOfReferenceUID = "1.2.3.4"
    ds.save_as(copy / name)
    with pytest.raises(DataError, match=rf"{name}: .*mismatched frames of reference"):
        read_dicom(copy)


def test_missing_ct(copy):
    for p in copy.glob("CT.*.dcm"):
        p.unlink()
    with pytest.raises(DataError, match=r"missing CT.*RS\.dcm.*needs its planning CT$"):
        read_dicom(copy, grid="ct")
    assert read_dicom(copy).meta["grid_source"] == "rtdose"  # more: test_dicom_no_ct.py
    (copy / "RD.dcm").unlink()
    with pytest.raises(DataError, match=r"missing CT.*and no RTDOSE.*RS\.dcm"):
        read_dicom(copy)


def test_missing_slice(copy):
    (copy / "CT.0010.dcm").unlink()
    with pytest.raises(DataError, match=r"CT\.0011\.dcm: .*not equally spaced.*slice may be missing"):
        read_dicom(copy, grid="ct")
    (copy / "RD.dcm").unlink()  # grid="auto" would read on the RTDOSE grid; without one it refuses
    with pytest.raises(DataError, match=r"CT\.0011\.dcm: .*slice may be missing\); and there is no RTDOSE"):
        read_dicom(copy)


def test_structure_outside_the_grid(copy):
    square = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 9.0], [0.0, 9.0, 9.0], [0.0, 9.0, 0.0]])
    write_rtstruct({"Far": [square + [0.0, 0.0, 500.0]]}, copy / "RS.dcm", ct_folder=copy)
    with pytest.raises(DataError, match=r"RS\.dcm: ROI 'Far' .*outside"):
        read_dicom(copy)


def test_failed_writes_leave_nothing(tmp_path):
    src = analytic_case()
    src.beams = Beams(SPHERE_CENTRE, GANTRY_DEG, "IMRT", (0.0, 90.0))  # 2 couch for 5 beams
    with pytest.raises(DataError, match="couch_deg"):
        write_dicom_case(src, tmp_path / "rt")
    with pytest.raises(DataError, match="dose_gy"):
        write_rtdose(-np.ones(CT_GRID.shape), CT_GRID, tmp_path / "RD.dcm")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(written):
    with pytest.raises(DataError, match="grid must be 'auto', 'ct' or 'dose'"):
        read_dicom(written, grid="mri")
    with pytest.raises(DataError, match="supersample"):
        read_dicom(written, supersample=0)
