"""Procedural phantoms: anatomy, file format, generation modes, the shipped set, pyradplan."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import warnings

import numpy as np
import pytest

from dosegym.data import Beams, Case, Grid, Prescription, read_case, write_case
from dosegym.data.io import detect_format
from dosegym.data.phantoms import (
    GRID_SHAPE,
    SITES,
    d95_gy,
    generate_anatomy,
    generate_phantom_set,
    load_shipped_phantom,
    phantom_rng,
    plan_quality,
    quantize_dose,
    read_phantom,
    shipped_manifest,
    shipped_phantom_dir,
    shipped_phantom_ids,
    write_phantom,
)
from dosegym.errors import DataError

EXPECTED = {
    "headneck": {
        "targets": {"PTV70", "PTV56"},
        "oars": {"SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Larynx", "Esophagus", "Mandible"},
        "fractions": 35,
        "bone": ["Mandible"],
    },
    "prostate": {
        "targets": set(),
        "oars": {"Rectum", "Bladder", "FemoralHead_L", "FemoralHead_R"},
        "fractions": None,
        "bone": ["FemoralHead_L", "FemoralHead_R"],
    },
    "lung": {
        "targets": {"PTV60"},
        "oars": {"Lung_L", "Lung_R", "Heart", "Esophagus", "SpinalCord"},
        "fractions": 30,
        "bone": [],
    },
}


@pytest.fixture(scope="module")
def anatomies() -> dict[str, Case]:
    return {site: generate_anatomy(site, index=0) for site in SITES}


def centroid_mm(case: Case, name: str) -> np.ndarray:
    """Patient position (z, y, x) in mm of a structure's centroid."""
    return case.grid.index_to_mm(np.argwhere(case.structures[name]).mean(axis=0))


# -- anatomy -----------------------------------------------------------------------------
@pytest.mark.parametrize("site", SITES)
def test_anatomy_names_targets_and_beams(anatomies, site):
    case = anatomies[site]
    exp = EXPECTED[site]
    assert case.grid.shape == GRID_SHAPE
    assert exp["oars"] <= set(case.oars)
    assert exp["targets"] <= {p.target for p in case.prescriptions}
    assert 1 <= len(case.prescriptions) <= 3
    fx = {p.fractions for p in case.prescriptions}
    assert len(fx) == 1 and (exp["fractions"] is None or fx == {exp["fractions"]})
    for p in case.prescriptions:
        ptv = case.structures[p.target]
        assert p.target.startswith("PTV") and ptv.any()
        assert not (ptv & ~case.body).any(), f"{p.target} leaves the body"
    # isocenter: the centroid of the PTV union, inside the body
    union = np.zeros(case.grid.shape, bool)
    for p in case.prescriptions:
        union |= case.structures[p.target]
    expected_iso = case.grid.index_to_mm(np.argwhere(union).mean(axis=0))
    np.testing.assert_allclose(case.beams.isocenter_mm, expected_iso, atol=1e-6)
    iso_idx = tuple(np.round(case.grid.mm_to_index(case.beams.isocenter_mm)).astype(int))
    assert case.body[iso_idx]
    n = len(case.beams.gantry_deg)
    assert (case.beams.technique == "IMRT" and 7 <= n <= 9) or case.beams.technique == "VMAT"
    steps = np.diff(sorted(case.beams.gantry_deg) + [sorted(case.beams.gantry_deg)[0] + 360])
    np.testing.assert_allclose(steps, 360.0 / n, atol=1e-6)  # equispaced, coplanar


def test_anatomy_orientation_lps(anatomies):
    hn, pr, lu = anatomies["headneck"], anatomies["prostate"], anatomies["lung"]
    z, y, x = 0, 1, 2
    # +x is patient left
    assert centroid_mm(hn, "Parotid_L")[x] > 20 > -20 > centroid_mm(hn, "Parotid_R")[x]
    assert centroid_mm(pr, "FemoralHead_L")[x] > 40 > -40 > centroid_mm(pr, "FemoralHead_R")[x]
    assert centroid_mm(lu, "Lung_L")[x] > 30 > -30 > centroid_mm(lu, "Lung_R")[x]
    # +y is posterior
    assert centroid_mm(hn, "SpinalCord")[y] > centroid_mm(hn, "Esophagus")[y]
    assert centroid_mm(hn, "Esophagus")[y] > centroid_mm(hn, "Larynx")[y]
    assert centroid_mm(pr, "Rectum")[y] > centroid_mm(pr, "Bladder")[y]
    assert centroid_mm(lu, "SpinalCord")[y] > centroid_mm(lu, "Heart")[y]
    # +z is superior
    assert centroid_mm(hn, "Brainstem")[z] > centroid_mm(hn, "Parotid_L")[z]
    assert centroid_mm(hn, "Parotid_R")[z] > centroid_mm(hn, "Larynx")[z]
    assert centroid_mm(pr, "Bladder")[z] > centroid_mm(pr, pr.prescriptions[0].target)[z]
    assert centroid_mm(lu, "Lung_L")[z] > centroid_mm(lu, "Heart")[z]


@pytest.mark.parametrize("site", SITES)
def test_anatomy_ct_densities(anatomies, site):
    case = anatomies[site]
    ct, body = case.ct, case.body
    assert np.array_equal(ct, np.round(ct)), "CT must be whole HU"
    assert np.all(ct[~body] < -900), "outside the body is air"
    soft = np.median(ct[body])
    assert -150 < soft < 80, f"median body HU {soft}"
    assert (ct[body] > 500).sum() * case.voxel_volume_cc > 20, "bone is missing"
    for name in EXPECTED[site]["bone"]:
        assert ct[case.structures[name]].mean() > 500 > soft
    if site == "lung":
        for name in ("Lung_L", "Lung_R"):
            assert ct[case.structures[name]].mean() < -650
    if site == "headneck":
        assert (ct[body] < -900).sum() > 20, "no airway"
        assert ct[case.structures["SpinalCord"]].mean() < 100  # cord is not bone


def test_anatomy_determinism_by_seed():
    a = generate_anatomy("headneck", index=3, seed=5)
    b = generate_anatomy("headneck", rng=phantom_rng("headneck", 3, 5), index=3, seed=5)
    c = generate_anatomy("headneck", index=4, seed=5)
    d = generate_anatomy("headneck", index=3, seed=6)
    assert np.array_equal(a.ct, b.ct) and a.structures.keys() == b.structures.keys()
    assert all(np.array_equal(a.structures[k], b.structures[k]) for k in a.structures)
    assert a.beams == b.beams and a.prescriptions == b.prescriptions
    assert not np.array_equal(a.ct, c.ct) and not np.array_equal(a.ct, d.ct)


def test_anatomy_varies_across_indices():
    volumes = {generate_anatomy("prostate", index=i).volume_cc("Bladder") for i in range(4)}
    assert len(volumes) == 4


# -- file format ---------------------------------------------------------------------------
def test_write_read_round_trip_exact(anatomies, tmp_path):
    z = anatomies["lung"].grid.axis_coords_mm(0)[:, None, None]
    dose = quantize_dose(np.where(anatomies["lung"].body, 30.0 + 0.1 * z + 0.01, 0.0))
    case = dataclasses.replace(anatomies["lung"], dose=dose)
    path = write_phantom(case, tmp_path / "lung.npz")
    assert detect_format(path) == "phantom"
    back = read_case(path)
    assert back.case_id == case.case_id and back.grid == case.grid
    assert np.array_equal(back.ct, case.ct) and back.ct.dtype == np.float32
    assert np.array_equal(back.body, case.body)
    assert list(back.structures) == list(case.structures)
    assert all(np.array_equal(back.structures[k], case.structures[k]) for k in case.structures)
    assert back.prescriptions == case.prescriptions and back.beams == case.beams
    assert np.array_equal(back.dose, dose) and back.dose.dtype == np.float32
    assert {k: v for k, v in back.meta.items() if k != "source"} == {
        k: v for k, v in case.meta.items() if k != "source"
    }
    assert back.meta["source"] == str(path)
    # re-writing what was read gives the same arrays again
    again = read_phantom(write_phantom(back, tmp_path / "again.npz"))
    assert np.array_equal(again.dose, back.dose) and np.array_equal(again.ct, back.ct)


def test_write_case_dispatch_and_lossy_fields(tmp_path):
    grid = Grid((4, 5, 6), (2.0, 2.5, 3.0), (-3.0, 1.0, 7.0))
    mask = np.zeros(grid.shape, bool)
    mask[1:3, 1:4, 2:5] = True
    occ = np.where(mask, 0.3, 0.0).astype(np.float32)
    dose = np.linspace(0.0, 71.3, grid.size, dtype=np.float32).reshape(grid.shape)
    case = Case(
        "tiny",
        grid,
        ct=np.full(grid.shape, 12.4, np.float32),
        structures={"PTV": mask},
        prescriptions=[Prescription("PTV", 50.0, 25)],
        beams=Beams((1.0, 2.0, 3.0), (0.0, 90.0), "IMRT", couch_deg=(0.0, 10.0)),
        dose=dose,
        body=np.ones(grid.shape, bool),
        occupancy={"PTV": occ},
    )
    path = write_case(case, tmp_path / "tiny.npz", format="phantom")
    back = read_case(path)
    assert back.beams.couch_deg == (0.0, 10.0)
    assert np.all(back.ct == 12.0)  # stored as whole HU
    assert np.abs(back.dose - dose).max() <= 0.001  # uint16 on a power-of-two step
    assert np.abs(back.occupancy["PTV"] - occ).max() <= 0.5 / 255 + 1e-7


def test_bad_inputs_raise_data_errors(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, something=np.zeros(3))
    with pytest.raises(DataError, match="other.npz"):
        read_phantom(other)
    with pytest.raises(DataError, match="no such phantom file"):
        read_phantom(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="valid sites"):
        read_case("phantoms:pelvis/0")
    with pytest.raises(DataError, match="phantoms:SITE/N"):
        read_phantom("phantoms:lung/x")
    with pytest.raises(DataError, match="no such shipped phantom"):
        load_shipped_phantom("lung", 9999)
    with pytest.raises(DataError, match=r"\.npz"):
        write_phantom(generate_anatomy("lung"), tmp_path / "case.nii")
    with pytest.raises(DataError, match="dose="):
        generate_phantom_set(tmp_path, sites=["lung"], n=1, dose="monte-carlo")
    with pytest.raises(DataError, match="valid sites"):
        generate_phantom_set(tmp_path, sites=["brain"], n=1, dose="none")


# -- generation modes ----------------------------------------------------------------------
def test_generate_set_anatomy_only(tmp_path):
    paths = generate_phantom_set(tmp_path, sites=["lung", "headneck"], n=2, seed=3, dose="none")
    assert [p.name for p in paths] == ["lung_000.npz", "lung_001.npz", "headneck_000.npz", "headneck_001.npz"]
    case = read_case(paths[1])
    ref = generate_anatomy("lung", index=1, seed=3)
    assert case.dose is None and np.array_equal(case.ct, ref.ct)
    assert case.meta["site"] == "lung" and case.meta["seed"] == 3


def test_generate_set_auto_without_pyradplan(tmp_path, monkeypatch):
    from dosegym.data import phantoms

    monkeypatch.setattr(phantoms, "_pyradplan_available", lambda: False)
    seed = shipped_manifest()["settings"]["seed"]
    (path,) = generate_phantom_set(tmp_path / "a", sites=["prostate"], n=1, seed=seed)
    shipped = shipped_phantom_dir() / "prostate" / "prostate_000.npz"
    assert path.read_bytes() == shipped.read_bytes()
    with pytest.warns(UserWarning, match="no reference dose"):
        (path,) = generate_phantom_set(tmp_path / "b", sites=["prostate"], n=1, seed=seed + 1)
    assert read_case(path).dose is None
    with pytest.raises(DataError, match="not shipped"):
        generate_phantom_set(tmp_path / "c", sites=["prostate"], n=1, seed=seed + 1, dose="shipped")
    with pytest.raises(DataError, match="physics"):
        generate_phantom_set(tmp_path / "d", sites=["prostate"], n=1, dose="pyradplan")


# -- the shipped set -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest() -> dict:
    return shipped_manifest()


@pytest.fixture(scope="module")
def shipped(manifest) -> dict[str, Case]:
    return {entry["id"]: read_case(entry["id"]) for entry in manifest["cases"]}


def test_manifest_lists_every_file(manifest):
    root = shipped_phantom_dir()
    on_disk = {str(p.relative_to(root)) for p in root.glob("*/*.npz")}
    assert {e["file"] for e in manifest["cases"]} == on_disk
    for site in SITES:
        indices = sorted(e["index"] for e in manifest["cases"] if e["site"] == site)
        assert indices == list(range(manifest["settings"]["n_per_site"])), site
        assert len(indices) >= 32
    split = manifest["split"]
    assert set(split["train"]).isdisjoint(split["test"]) and split["test"]
    assert sorted(split["train"] + split["test"]) == list(range(manifest["settings"]["n_per_site"]))
    assert shipped_phantom_ids("lung", split="test") == [f"phantoms:lung/{i}" for i in split["test"]]
    assert len(shipped_phantom_ids()) == len(manifest["cases"])
    assert manifest["settings"]["dose_engine"]["engine"] == "pyradplan"


def test_shipped_cases_load_and_plans_are_sane(manifest, shipped):
    for entry in manifest["cases"]:
        case = shipped[entry["id"]]
        assert case.meta["site"] == entry["site"] and case.dose is not None, entry["id"]
        assert case.grid.shape == GRID_SHAPE
        primary = max(case.prescriptions, key=lambda p: p.dose_gy)
        d95 = d95_gy(case.dose, case.structures[primary.target])
        assert abs(d95 - primary.dose_gy) <= 1.0, (entry["id"], d95)
        ptv_mean = case.dose[case.structures[primary.target]].mean()
        for oar in case.oars:
            assert case.dose[case.structures[oar]].mean() < ptv_mean, (entry["id"], oar)
        # max 105-114 % Rx in 94 of 96 cases; lung_009 (119.6 %) and headneck_029 (120.6 %) are hotter
        assert case.dose.max() <= 1.25 * primary.dose_gy, entry["id"]
        assert not case.dose[~case.body].any(), entry["id"]
        quality = plan_quality(case)
        assert quality["targets"][primary.target]["d95_gy"] == pytest.approx(
            entry["plan_quality"]["targets"][primary.target]["d95_gy"], abs=0.01
        )
        assert quality["targets"][primary.target]["v95_pct"] >= 90.0, entry["id"]


def test_shipped_set_matches_the_generator(manifest, shipped):
    seed = manifest["settings"]["seed"]
    for site in SITES:
        case = shipped[f"phantoms:{site}/1"]
        ref = generate_anatomy(site, index=1, seed=seed)
        assert np.array_equal(case.ct, ref.ct), site
        assert all(np.array_equal(case.structures[k], ref.structures[k]) for k in ref.structures)


def test_shipped_folder_is_small():
    root = shipped_phantom_dir()
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 40e6, f"{total / 1e6:.1f} MB"


def test_cli_info_on_shipped_and_file(tmp_path):
    from typer.testing import CliRunner

    from dosegym.cli.data import app

    runner = CliRunner()
    result = runner.invoke(app, ["info", "phantoms:headneck/0"])
    assert result.exit_code == 0, result.output
    assert "PTV70" in result.output and "Parotid_L" in result.output
    path = write_phantom(load_shipped_phantom("lung", 2), tmp_path / "lung_002.npz")
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "phantom" and summary["dose_gy"]["max"] > 60


# -- pyradplan (the physics extra) ---------------------------------------------------------
HAS_PYRADPLAN = importlib.util.find_spec("pyRadPlan") is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_PYRADPLAN,
    reason="pyradplan is not installed (physics extra: pip install 'dosegym[physics]')",
)
def test_pyradplan_reference_dose_on_a_cropped_phantom():
    from dosegym.data._physics import reference_dose

    full = generate_anatomy("prostate", index=0)
    sl = (slice(8, 32), slice(12, 52), slice(12, 52))
    grid = Grid(
        full.ct[sl].shape,
        full.grid.spacing_mm,
        tuple(full.grid.index_to_mm([s.start for s in sl])),
    )
    case = Case(
        "cropped",
        grid,
        ct=full.ct[sl],
        body=full.body[sl],
        structures={k: v[sl] for k, v in full.structures.items() if v[sl].any()},
        prescriptions=full.prescriptions[:1],
        beams=full.beams,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dose, info = reference_dose(case)
    rx = case.prescriptions[0]
    ptv = case.structures[rx.target]
    assert dose.shape == grid.shape and dose.dtype == np.float32
    assert d95_gy(dose, ptv) == pytest.approx(rx.dose_gy, abs=0.01)
    assert not dose[~case.body].any()
    assert dose.max() <= 1.2 * rx.dose_gy
    for oar in case.oars:
        assert dose[case.structures[oar]].mean() < dose[ptv].mean()
    assert info["engine"] == "pyradplan" and info["n_bixels"] > 0
