"""GDP-HMM challenge plans: one ``.npz`` per plan holding a pickled dict (AAPM 2025 GDP-HMM).

The layout, as the organisers' ``DICOM2NPZ.py`` writes it and their ``data_loader.py``
reads it (``np.load(path, allow_pickle=True)['arr_0'].item()``):

* ``img`` (CT, HU), ``dose`` (dose = ``dose * dose_scale`` Gy), ``dose_scale``: 3-D arrays
  in numpy (z, y, x) order, straight from ``sitk.GetArrayFromImage``;
* one 3-D 0/1 mask per structure (e.g. ``PTV70``, ``PTV70OPT``, ``SpinalCord``), ``Body``
  (any other key, e.g. a 3-D array that is not 0/1, is kept in ``meta['extra_<key>']``);
  ``all_mask``: the structure names of the plan (masks may be empty after the crop);
* ``isVMAT``, ``angle_list`` (gantry angles, degrees; for VMAT the control points),
  ``isocenter``: voxel indices in **array-axis order (z, y, x)**. ``DICOM2NPZ.py`` builds it
  as ``[iso[2], iso[1], iso[0]]  # z, y, x as in numpy array`` from DICOM (x, y, z), and the
  crop shifts ``isocenter[1]`` by the row (y) start. (The organisers' geometry notebook calls
  the array axes "(z, x, y)"; its "x" is array axis 1, i.e. rows, i.e. DICOM y. Whatever the
  names, ``isocenter[k]`` indexes array axis ``k``, and that is what this module implements.)
* ``beam_plate`` (3-D) and ``angle_plate`` (2-D axial), see :mod:`dosegym.data.geometry`;
* ``origin``, ``spacing``, ``direction``: SimpleITK (x, y, z) order (``CT.GetOrigin()`` ...);
  ``size``: the array shape (z, y, x) in the released (cropped) files, SimpleITK (x, y, z)
  before the crop: either order is accepted.

Reading: the plan becomes a ``Case`` on the file's grid (spacing ``DEFAULT_SPACING_MM`` =
(2, 2.5, 2.5) mm (z, y, x) when the file has none, origin 0, identity direction). Empty masks
are dropped (their names go to ``meta['empty_structures']``); ``Body`` becomes ``case.body``.
The organisers' ``beam_plate`` and ``angle_plate`` arrays are kept as they are in
``meta['beam_plate']`` and ``meta['angle_plate']`` (2-D); recompute them with
:func:`dosegym.data.geometry.beam_plate` / ``angle_plate`` if needed.

Prescriptions come from the organisers' ``PTV_DICT.json``,
``{patient: {"PTV_High": {"OPTName", "PDose", ...}, "PTV_Mid": {...}, "PTV_Low": {...}}}``,
keyed by the patient id (file name before the first ``+``, zero-padded to 3 characters).
``PTV_High`` names its ``OPTName`` structure; ``PTV_Mid``/``PTV_Low`` their ``StructName``
(else ``OPTName``); ``PDose`` is the total dose in Gy. The data hold no fraction numbers:
``fractions`` defaults to 35 for head-and-neck and 30 for lung (an argument).

Site: the ``site`` argument, else a ``HaN``/``Lung`` folder in the path (the organisers'
layout), else the patient id (``LUNG1-*`` and ``0617-*`` are lung cohorts), else head-and-neck.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dosegym.data.atomic import atomic_path
from dosegym.data.case import Beams, Case, Prescription
from dosegym.data.geometry import angle_plate_axial, beam_plate
from dosegym.data.grid import Grid
from dosegym.errors import DataError

DEFAULT_SPACING_MM = (2.0, 2.5, 2.5)
DEFAULT_FRACTIONS = {"headneck": 35, "lung": 30}
PTV_LEVELS = ("PTV_High", "PTV_Mid", "PTV_Low")
#: Keys of the plan dict that are not structure masks.
NON_MASK_KEYS = frozenset(
    {
        "img",
        "dose",
        "dose_scale",
        "Body",
        "isVMAT",
        "isocenter",
        "angle_list",
        "beam_plate",
        "angle_plate",
        "origin",
        "spacing",
        "direction",
        "size",
        "all_mask",
    }
)
_LUNG_ID_PREFIXES = ("lung", "0617-")


def patient_id(path: str | Path) -> str:
    """The GDP-HMM patient id of a plan file: name before the first ``+``, zero-padded to 3."""
    pid = Path(path).name.removesuffix(".npz").split("+")[0]
    return f"{pid:0>3}"


def _site(path: Path, pid: str, site: str | None) -> tuple[str, str]:
    if site is not None:
        if site not in DEFAULT_FRACTIONS:
            raise DataError(f"site {site!r} is not a GDP-HMM site; valid: {sorted(DEFAULT_FRACTIONS)}")
        return site, "argument"
    folders = {p.lower() for p in path.resolve().parent.parts}
    if "lung" in folders:
        return "lung", "folder"
    if "han" in folders:
        return "headneck", "folder"
    if pid.lower().startswith(_LUNG_ID_PREFIXES):
        return "lung", "patient id"
    return "headneck", "default"


def _load_dict(path: Path, trusted: bool) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (a GDP-HMM plan is a .npz file)")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    if files != ["arr_0"]:
        raise DataError(f"{path}: a GDP-HMM .npz holds exactly one entry 'arr_0', found {files[:8]}")
    if not trusted:
        raise DataError(
            f"{path}: GDP-HMM files store the plan as a pickled Python dict, and unpickling can "
            "run arbitrary code. Load only files from a source you trust, with "
            "read_case(path, trusted=True) / read_gdphmm(path, trusted=True), or "
            "`--trusted` on the command line (dosegym data info / data convert / predict / score)."
        )
    try:
        with np.load(path, allow_pickle=True) as z:
            obj = z["arr_0"]
            plan = obj.item() if obj.dtype == object and obj.shape == () else obj
    except Exception as exc:  # noqa: BLE001 - unpickling garbled bytes can raise any exception
        raise DataError(
            f"{path}: cannot unpickle 'arr_0' ({type(exc).__name__}: {str(exc)[:200]}); the file is "
            "damaged or not a GDP-HMM plan"
        ) from exc
    if not isinstance(plan, dict):
        raise DataError(f"{path}: 'arr_0' must hold a dict of arrays, got {type(plan).__name__}")
    return plan


def _triple(plan: dict, key: str, path: Path, default) -> tuple[float, ...] | None:
    value = plan.get(key)
    if value is None:
        return default
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: '{key}' must be 3 finite numbers (SimpleITK x, y, z), got {arr.tolist()}")
    return tuple(arr[::-1].tolist())


def _grid(plan: dict, shape: tuple[int, int, int], path: Path) -> Grid:
    spacing = _triple(plan, "spacing", path, DEFAULT_SPACING_MM)
    origin = _triple(plan, "origin", path, (0.0, 0.0, 0.0))
    direction = np.eye(3)
    if plan.get("direction") is not None:
        d = np.asarray(plan["direction"], dtype=float).reshape(-1)
        if d.shape != (9,):
            raise DataError(f"{path}: 'direction' must have 9 values (SimpleITK row-major), got {d.size}")
        direction = d.reshape(3, 3)[::-1, ::-1]
    if plan.get("size") is not None:
        size = tuple(int(v) for v in np.asarray(plan["size"]).reshape(-1))
        if size not in (shape, shape[::-1]):
            raise DataError(
                f"{path}: 'size' {size} matches neither the image shape {shape} (z, y, x) nor its reverse"
            )
    try:
        return Grid(shape, spacing, origin, tuple(map(tuple, direction)))
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc


def _prescriptions(
    pid: str,
    prescriptions_json: Path,
    structures: dict[str, np.ndarray],
    fractions: int,
    path: Path,
) -> list[Prescription]:
    try:
        table = json.loads(Path(prescriptions_json).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{prescriptions_json}: not a readable PTV_DICT.json ({exc})") from exc
    if not isinstance(table, dict) or pid not in table:
        some = sorted(table)[:5] if isinstance(table, dict) else []
        raise DataError(
            f"{prescriptions_json}: no entry for patient {pid!r} (from {path.name}); ids look like {some}"
        )
    entry = table[pid]
    if not isinstance(entry, dict) or "PTV_High" not in entry:
        raise DataError(f"{prescriptions_json}: patient {pid!r} has no 'PTV_High' entry")
    out = []
    for level in PTV_LEVELS:
        if level not in entry:
            continue
        item = entry[level]
        name = item.get("OPTName") if level == "PTV_High" else item.get("StructName") or item.get("OPTName")
        if not name or "PDose" not in item:
            raise DataError(
                f"{prescriptions_json}: {pid}.{level} needs 'OPTName' (or 'StructName') and 'PDose'"
            )
        if name not in structures:
            raise DataError(
                f"{prescriptions_json}: {pid}.{level} names structure {name!r}, which {path.name} "
                f"does not contain (non-empty structures: {sorted(structures)})"
            )
        try:
            out.append(Prescription(name, float(item["PDose"]), fractions))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{prescriptions_json}: {pid}.{level}.PDose must be a number ({exc})") from exc
    return out


def read_gdphmm(
    path: str | Path,
    *,
    trusted: bool = False,
    prescriptions_json: str | Path | None = None,
    site: str | None = None,
    fractions: int | None = None,
) -> Case:
    """Read one GDP-HMM plan ``.npz`` into a :class:`Case` (see module docstring).

    Args:
        path: the plan file, ``PATIENTID+PLANINFO+....npz``.
        trusted: must be True: the file is a pickle, and unpickling can run code.
        prescriptions_json: the organisers' ``PTV_DICT.json``; without it the case has no
            prescriptions (``meta['prescriptions_missing']`` says so).
        site: ``'headneck'`` or ``'lung'``; inferred when None (module docstring).
        fractions: number of fractions of every prescription; default by site (35 / 30).
    """
    p = Path(path)
    plan = _load_dict(p, trusted)
    try:
        return _plan_case(p, plan, prescriptions_json, site, fractions)
    except DataError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise DataError(
            f"{p}: damaged GDP-HMM plan: a value has the wrong type or size ({type(exc).__name__}: "
            f"{str(exc)[:200]})"
        ) from exc


def _plan_case(
    p: Path, plan: dict, prescriptions_json: str | Path | None, site: str | None, fractions: int | None
) -> Case:
    """The case of an unpickled plan dict ``plan`` read from ``p`` (see :func:`read_gdphmm`)."""
    if "img" not in plan:
        raise DataError(f"{p}: the plan dict has no 'img' (CT); keys: {sorted(map(str, plan))[:12]}")
    ct = np.asarray(plan["img"])
    if ct.ndim != 3:
        raise DataError(f"{p}: 'img' must be a 3-D (z, y, x) array, got shape {ct.shape}")
    shape = tuple(int(s) for s in ct.shape)
    grid = _grid(plan, shape, p)

    def volume(key: str) -> np.ndarray:
        arr = np.asarray(plan[key])
        if arr.shape != shape:
            raise DataError(f"{p}: '{key}' has shape {arr.shape}; it must match 'img' {shape} (z, y, x)")
        return arr

    dose = None
    if "dose" in plan:
        if "dose_scale" not in plan:
            raise DataError(f"{p}: 'dose' is present without 'dose_scale' (Gy per stored unit)")
        scale = float(np.asarray(plan["dose_scale"]).reshape(()))
        if not np.isfinite(scale) or scale <= 0:
            raise DataError(f"{p}: 'dose_scale' must be > 0, got {scale}")
        dose = (volume("dose").astype(np.float64) * scale).astype(np.float32)

    body = None
    if "Body" in plan:
        body = volume("Body") > 0.5
    structures: dict[str, np.ndarray] = {}
    empty: list[str] = []
    extra: dict[str, Any] = {}
    for key, value in plan.items():
        if key in NON_MASK_KEYS:
            continue
        arr = np.asarray(value)
        if arr.ndim != 3:
            extra[str(key)] = value
            continue
        arr = volume(key)
        if not ((arr == 0) | (arr == 1)).all():
            extra[str(key)] = arr  # a 3-D array that is not a 0/1 mask: kept, not a structure
            continue
        mask = arr.astype(bool)
        if mask.any():
            structures[str(key)] = mask
        else:
            empty.append(str(key))
    listed = [str(n) for n in np.asarray(plan.get("all_mask", []), dtype=object).reshape(-1)]
    empty += [n for n in listed if n not in structures and n not in empty and n != "Body"]

    pid = patient_id(p)
    site_name, site_from = _site(p, pid, site)
    n_fx = DEFAULT_FRACTIONS[site_name] if fractions is None else int(fractions)
    prescriptions: list[Prescription] = []
    if prescriptions_json is not None:
        prescriptions = _prescriptions(pid, Path(prescriptions_json), structures, n_fx, p)

    beams = None
    is_vmat = bool(np.asarray(plan.get("isVMAT", False)).reshape(()))
    if "isocenter" in plan:
        iso = np.asarray(plan["isocenter"], dtype=float).reshape(-1)
        if iso.shape != (3,) or not np.all(np.isfinite(iso)):
            raise DataError(f"{p}: 'isocenter' must be 3 voxel indices (z, y, x), got {iso.tolist()}")
        angles = np.asarray(plan.get("angle_list", []), dtype=float).reshape(-1)
        if angles.size == 0:
            raise DataError(f"{p}: 'isocenter' is present but 'angle_list' is empty or missing")
        iso_mm = tuple(grid.index_to_mm(iso).tolist())
        beams = Beams(iso_mm, tuple(angles.tolist()), "VMAT" if is_vmat else "IMRT")

    meta: dict[str, Any] = {
        "source": str(p),
        "format": "gdphmm",
        "site": site_name,
        "site_from": site_from,
        "patient_id": pid,
        "plan": p.name.removesuffix(".npz").split("+")[1] if "+" in p.name else "",
        "isVMAT": is_vmat,
        "empty_structures": empty,
    }
    if dose is not None:
        meta["dose_scale"] = float(np.asarray(plan["dose_scale"]).reshape(()))
    if prescriptions_json is None:
        meta["prescriptions_missing"] = "no PTV_DICT.json given: the case has no prescriptions"
    for key in ("beam_plate", "angle_plate"):
        if key in plan:
            meta[key] = np.asarray(plan[key], dtype=np.float32)
    meta.update({f"extra_{k}": v for k, v in extra.items()})
    return Case(  # its errors name meta['source'], i.e. this file
        case_id=p.name.removesuffix(".npz"),
        grid=grid,
        ct=ct.astype(np.float32),
        structures=structures,
        prescriptions=prescriptions,
        beams=beams,
        dose=dose,
        body=body,
        meta=meta,
    )


def write_gdphmm(
    case: Case,
    path: str | Path,
    *,
    dose_scale: float | None = None,
    source_distance_mm: float = 1000.0,
) -> Path:
    """Write ``case`` as a GDP-HMM plan ``.npz`` in exactly the challenge layout (for fixtures).

    ``dose`` is stored as ``uint32`` counts of ``dose_scale`` Gy (default: 1e-5 Gy, or larger
    if the maximum would not fit); ``img`` as ``int16`` when the CT is integral and fits, else
    ``float32``; masks ``uint8``; ``isocenter`` as float32 voxel indices (z, y, x);
    ``beam_plate``/``angle_plate`` computed by :mod:`dosegym.data.geometry` from the case's
    targets and beams; ``origin``/``spacing``/``direction`` in SimpleITK (x, y, z) order,
    ``size`` the array shape (z, y, x), as in the released files. Written atomically.
    """
    out = Path(path)
    if out.suffix != ".npz":
        raise DataError(f"{out}: a GDP-HMM plan file name must end in .npz")
    if case.ct is None:
        raise DataError(f"{case.source}: a GDP-HMM plan needs a CT ('img')")
    grid = case.grid
    ct = case.ct
    integral = np.array_equal(ct, np.rint(ct)) and ct.min() >= -32768 and ct.max() <= 32767
    plan: dict[str, Any] = {"img": ct.astype(np.int16 if integral else np.float32)}
    if case.dose is not None:
        peak = float(case.dose.max())
        scale = float(dose_scale) if dose_scale is not None else max(1e-5, peak / (2**32 - 1))
        if not np.isfinite(scale) or scale <= 0 or peak / scale > 2**32 - 1:
            raise DataError(f"dose_scale {dose_scale}: must be > 0 and keep {peak:.4g} Gy within uint32")
        plan["dose"] = np.rint(case.dose.astype(np.float64) / scale).astype(np.uint32)
        plan["dose_scale"] = scale
    for name, mask in case.structures.items():
        if name in NON_MASK_KEYS:
            raise DataError(f"{case.source}: structure name {name!r} clashes with a GDP-HMM key")
        plan[name] = mask.astype(np.uint8)
    if case.body is not None:
        plan["Body"] = case.body.astype(np.uint8)
    plan["all_mask"] = list(case.structures) + (["Body"] if case.body is not None else [])
    if case.beams is not None:
        plan["isVMAT"] = case.beams.technique == "VMAT"
        plan["isocenter"] = grid.mm_to_index(case.beams.isocenter_mm).astype(np.float32)
        plan["angle_list"] = np.asarray(case.beams.gantry_deg, dtype=np.float32)
        if case.targets:
            plan["beam_plate"] = beam_plate(case, source_distance_mm=source_distance_mm)
        plan["angle_plate"] = angle_plate_axial(grid, case.beams)
    plan["origin"] = tuple(reversed(grid.origin_mm))
    plan["spacing"] = tuple(reversed(grid.spacing_mm))
    plan["direction"] = tuple(np.asarray(grid.direction)[::-1, ::-1].ravel().tolist())
    plan["size"] = tuple(grid.shape)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, arr_0=plan)
    return out
