"""DVH metrics of a plan without its CT: dosegym (on the RTDOSE grid) against dicompyler-core.

A real OpenKBP patient (default pt_108) is written as a DICOM RT set by
``write_dicom_case`` (CT, RTSTRUCT with the 0.5 iso-contours of the masks, RTPLAN, RTDOSE on
the case grid); with ``--dose-spacing MM`` the RTDOSE is replaced by the dose resampled
(trilinear) onto an MM-isotropic grid around the structures, as a planning system would
export it. Then the CT series is dropped (variant ``no-ct``) or cut to its middle slice
(``one-slice``). dosegym reads each folder (``read_dicom``: RTDOSE grid, ``ct`` None) and
computes, per structure, the volume and mean, max, D98, D95, D2 of its DVH (voxels weighted
by their occupancy, as scorecards do). dicompyler-core's ``dvhcalc.get_dvh(RS, RD, roi)``
computes the same from the files; it needs ``pydicom<3``, so it runs in its own venv
(``--python``), or its results come from ``--dicompyler-json``. Timings: dosegym per
structure = rasterising its contours (measured inside the read) + its DVH and metrics;
dicompyler per structure = one ``get_dvh`` call (which parses RS and RD each time).

    python -m venv /work/venv-dicompyler
    /work/venv-dicompyler/bin/pip install dicompyler-core 'pydicom<3'
    python benchmarks/dvh_vs_dicompyler.py [--case PATIENT] [--dose-spacing MM]
        [--python /work/venv-dicompyler/bin/python | --dicompyler-json FILE] [--keep DIR]

Not a test: it prints the table (dosegym / dicompyler ratios for volumes, differences in
Gy for doses) and both tools' times. Volume columns (cc): ``exact`` the contours' own
volume (even-odd polygon areas x plane gap, from the RTSTRUCT alone); ``dg occ`` dosegym's
contoured volume (sum of the fractional occupancy, what ``data info`` prints); ``dg DVH``
the volume of the DVH scorecards use (the mask, occupancy >= 0.5, weighted by occupancy);
``dc`` dicompyler's (dose-grid pixels whose centre lies inside the contour x plane gap).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from data_paths import PT_108
from matplotlib.path import Path as Path2D
from scipy import ndimage

import dosegym.data.dicom as dicom
import dosegym.data.dicom.rtstruct as rtstruct
from dosegym.data import Case, Grid, read_case
from dosegym.scorecards.dvh import DVHCache

CASE = PT_108
STATS = ("D98", "D95", "D2")

#: run inside the dicompyler-core venv: argv = RS, RD, JSON {name: roi number}; prints JSON
DICOMPYLER = r"""
import json, sys, time
from dicompylercore import dvhcalc
from dicompylercore import dicomparser
rs, rd, rois = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t = time.perf_counter()
dicomparser.DicomParser(rs).GetStructures()
dicomparser.DicomParser(rd).GetDoseData()
out = {"_parse_seconds": time.perf_counter() - t}
for name, number in rois.items():
    t = time.perf_counter()
    d = dvhcalc.get_dvh(rs, rd, number)
    seconds = time.perf_counter() - t
    out[name] = {"volume_cc": float(d.volume), "mean_gy": float(d.mean), "max_gy": float(d.max),
                 "seconds": seconds, **{s: float(d.statistic(s).value) for s in ("D98", "D95", "D2")}}
print(json.dumps(out))
"""


def regridded_dose(case: Case, spacing_mm: float, margin_mm: float = 10.0) -> tuple[np.ndarray, Grid]:
    """The case's dose resampled (trilinear) onto an isotropic grid around its structures."""
    union = np.any(np.stack(list(case.structures.values())), axis=0)
    idx = np.argwhere(union)
    lo = case.grid.index_to_mm(idx.min(axis=0)) - margin_mm
    hi = case.grid.index_to_mm(idx.max(axis=0)) + margin_mm
    shape = tuple(int(n) for n in np.floor((hi - lo) / spacing_mm) + 1)
    grid = Grid(shape, (spacing_mm,) * 3, tuple(lo))
    mm = grid.index_to_mm(np.moveaxis(np.indices(shape), 0, -1).reshape(-1, 3))
    coords = case.grid.mm_to_index(mm).T
    dose = ndimage.map_coordinates(case.dose.astype(np.float64), coords, order=1, mode="nearest")
    return dose.reshape(shape), grid


def write_folders(case: Case, root: Path, dose_spacing_mm: float | None) -> dict[str, Path]:
    """The full set and its two CT-less variants under ``root``."""
    full = dicom.write_dicom_case(case, root / "full")
    if dose_spacing_mm:
        dose, grid = regridded_dose(case, dose_spacing_mm)
        dicom.write_rtdose(dose, grid, full / "RD.dcm", ct_folder=full)
    slices = sorted(full.glob("CT.*.dcm"))
    out = {}
    for variant, keep in (("no-ct", set()), ("one-slice", {slices[len(slices) // 2].name})):
        folder = Path(shutil.copytree(full, root / variant))
        for p in folder.glob("CT.*.dcm"):
            if p.name not in keep:
                p.unlink()
        out[variant] = folder
    return out


def dosegym_metrics(folder: Path) -> tuple[Case, dict[str, dict[str, float]], float]:
    """Read ``folder`` and compute the metrics; also the read's wall time (s)."""
    raster: dict[str, float] = defaultdict(float)
    original = rtstruct._rasterise_roi

    def timed(contours, grid, axis, supersample, half, where):
        t = time.perf_counter()
        try:
            return original(contours, grid, axis, supersample, half, where)
        finally:
            raster[where.split("ROI ", 1)[1].split("'")[1]] += time.perf_counter() - t

    rtstruct._rasterise_roi = timed  # measure each structure's share of the read
    try:
        t = time.perf_counter()
        case = dicom.read_dicom(folder)
        read_s = time.perf_counter() - t
    finally:
        rtstruct._rasterise_roi = original
    out = {}
    named = {
        **case.structures,
        **({case.meta["dicom"]["body_roi"]: case.body} if case.body is not None else {}),
    }
    for name, mask in named.items():
        t = time.perf_counter()
        dvh = DVHCache(case.dose, case.voxel_volume_cc).dvh(mask, case.occupancy.get(name))
        row = {
            "occ_cc": case.volume_cc(name)
            if name in case.structures
            else float(mask.sum()) * case.voxel_volume_cc,
            "volume_cc": dvh.total_volume_cc,
            "mean_gy": dvh.mean_gy,
            "max_gy": dvh.max_gy,
            **{s: dvh.dose_at_volume(float(s[1:]), "%") for s in STATS},
        }
        row["seconds"] = raster[name] + time.perf_counter() - t
        out[name] = row
    return case, out, read_s


def polygon_volumes(rtstruct: Path, slab_mm: float) -> dict[str, float]:
    """Exact contour volumes (cc) per ROI name: even-odd polygon areas on each plane x slab."""
    ds = pydicom.dcmread(rtstruct)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    out = {}
    for item in ds.ROIContourSequence:
        planes: dict[float, list[np.ndarray]] = defaultdict(list)
        for c in item.get("ContourSequence") or []:
            pts = np.asarray(c.ContourData, dtype=np.float64).reshape(-1, 3)
            planes[round(float(pts[:, 2].mean()), 2)].append(pts[:, :2])
        area = 0.0
        for polys in planes.values():
            for i, q in enumerate(polys):
                x, y = q[:, 0], q[:, 1]
                a = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
                depth = sum(Path2D(r).contains_point(q[0]) for j, r in enumerate(polys) if j != i)
                area += a if depth % 2 == 0 else -a
        out[names[int(item.ReferencedROINumber)]] = area * slab_mm / 1000.0
    return out


def dicompyler_metrics(folder: Path, rois: dict[str, int], python: str) -> tuple[dict, float]:
    t = time.perf_counter()
    done = subprocess.run(
        [python, "-c", DICOMPYLER, str(folder / "RS.dcm"), str(folder / "RD.dcm"), json.dumps(rois)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout), time.perf_counter() - t


def table(ours: dict, theirs: dict, exact: dict[str, float]) -> str:
    """dosegym (dg) against dicompyler-core (dc): volume ratio, dose differences (Gy), times."""
    cols = [
        f"{'structure':13s}",
        f"{'exact':>8s} {'dg occ':>8s} {'dg DVH':>8s} {'dc':>8s} {'occ/ex':>6s} {'dc/ex':>6s} {'DVH/dc':>6s}",
    ]
    cols += [f"{k + ' dg':>7s} {'dc':>6s} {'diff':>6s}" for k in ("mean", "max", *STATS)]
    cols.append(f"{'t dg ms':>7s} {'t dc ms':>7s}")
    head = " | ".join(cols)
    lines = [head, "-" * len(head)]
    for name, a in ours.items():
        b = theirs.get(name)
        if b is None:
            continue
        ex = exact.get(name, float("nan"))
        cells = [
            f"{name:13s}",
            f"{ex:8.2f} {a['occ_cc']:8.2f} {a['volume_cc']:8.2f} {b['volume_cc']:8.2f} "
            f"{a['occ_cc'] / ex:6.3f} {b['volume_cc'] / ex:6.3f} {a['volume_cc'] / b['volume_cc']:6.3f}",
        ]
        for key in ("mean_gy", "max_gy", *STATS):
            cells.append(f"{a[key]:7.2f} {b[key]:6.2f} {a[key] - b[key]:+6.2f}")
        cells.append(f"{1e3 * a['seconds']:7.1f} {1e3 * b['seconds']:7.1f}")
        lines.append(" | ".join(cells))
    total_a = sum(r["seconds"] for r in ours.values())
    total_b = sum(theirs[n]["seconds"] for n in ours if n in theirs)
    parse = theirs.get("_parse_seconds", float("nan"))
    lines.append(
        f"all structures: dosegym {1e3 * total_a:.0f} ms, dicompyler-core {1e3 * total_b:.0f} ms "
        f"(each get_dvh parses RS + RD again: {1e3 * parse:.0f} ms once)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--case", type=Path, default=CASE, help="an OpenKBP patient folder (or any case)")
    parser.add_argument("--dose-spacing", type=float, default=None, help="write the RTDOSE on this grid (mm)")
    parser.add_argument(
        "--python", default="/work/venv-dicompyler/bin/python", help="dicompyler-core's python"
    )
    parser.add_argument("--dicompyler-json", type=Path, default=None, help="dicompyler results instead")
    parser.add_argument("--keep", type=Path, default=None, help="write the DICOM folders here and keep them")
    args = parser.parse_args()

    case = read_case(args.case)
    root = args.keep or Path(tempfile.mkdtemp(prefix="dvh_vs_dicompyler_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        folders = write_folders(case, root, args.dose_spacing)
        given = json.loads(args.dicompyler_json.read_text()) if args.dicompyler_json else None
        for variant, folder in folders.items():
            read, ours, read_s = dosegym_metrics(folder)
            rois = {n: read.meta["dicom"]["roi_numbers"][n] for n in read.structures}
            body = read.meta["dicom"]["body_roi"]
            if body:
                numbers = {
                    str(r.ROIName): int(r.ROINumber)
                    for r in pydicom.dcmread(folder / "RS.dcm").StructureSetROISequence
                }
                rois[body] = numbers[body]
            if given is not None:
                theirs, call_s = given, float("nan")
            else:
                theirs, call_s = dicompyler_metrics(folder, rois, args.python)
            print(
                f"\n== {case.case_id}, variant {variant}: {read.meta['grid_source']} grid {read.grid.shape} "
                f"spacing {tuple(round(v, 3) for v in read.grid.spacing_mm)} mm, ct={read.ct is not None}; "
                f"dosegym read {1e3 * read_s:.0f} ms; dicompyler subprocess {1e3 * call_s:.0f} ms"
            )
            print(f"   reason: {read.meta['grid_reason']}")
            for note in read.meta["notes"]:
                print(f"   note: {note}")
            exact = polygon_volumes(folder / "RS.dcm", read.meta["dicom"]["contour_slab_mm"])
            print(table(ours, theirs, exact))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
