"""The NIfTI case folder: one image per volume plus ``case.json``, readable by any ITK tool.

Layout (``ext`` is ``.nii.gz``, ``.mha`` or ``.nrrd``; every image read by SimpleITK)::

    case.json                 format, format_version, case_id, image_ext, grid, volumes,
                              structures [{name, file}], occupancy [names], prescriptions,
                              beams (Beams.to_dict), meta, meta_arrays [keys]
    ct<ext>                   CT, float32, HU                      (if the case has a CT)
    dose<ext>                 dose, float32, Gy                    (if the case has a dose)
    body<ext>                 body / possible-dose mask, uint8     (if the case has one)
    structures/<file><ext>    one uint8 mask per structure
    occupancy/<file><ext>     float32 fractional occupancy in [0, 1] (where present)
    meta_arrays.npz           numpy arrays found in ``case.meta`` (compressed npz, no pickle)

Structure names that are not safe file names (anything but letters, digits, ``_`` and
``-``, or names equal up to case, which clash on case-insensitive file systems) are stored
under an encoded ``file`` stem; ``case.json`` maps each stem back to its name.

Axes: SimpleITK images are (x, y, z). Arrays come out of SimpleITK already indexed
``[z, y, x]``; spacing and origin triples are reversed; the direction matrix ``D`` (columns =
index axes, rows = LPS components) becomes ``D[::-1, ::-1]`` in (z, y, x). These
conversions happen only here.

Image files are read through :func:`~dosegym.data.checked_image.read_checked_image`
(truncated or damaged files and NaN/inf voxels refused; re-exported here).

``case.json`` keeps the grid in double precision; the images' own geometry (NIfTI stores
it in float32) must agree with it within ``GEOMETRY_TOL_MM``. A folder without ``grid``,
``volumes`` or ``structures`` in ``case.json`` (hand-made) takes the grid from the CT
(else the first image found), reads whichever of ``ct``/``dose``/``body`` exist and every
image in ``structures/``, named after its file stem.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from dosegym.data.atomic import atomic_folder, atomic_path, check_output_path, json_text
from dosegym.data.case import Beams, Case, Prescription
from dosegym.data.checked_image import read_checked_image, read_nifti_voxels
from dosegym.data.dose import check_dose_gy
from dosegym.data.grid import Grid
from dosegym.errors import DataError

FORMAT_NAME = "dosegym-nifti"
FORMAT_VERSION = 1
CASE_WRITER = "dosegym case folder"  # the writer name in the output marker (see dosegym.data.atomic)
IMAGE_EXTENSIONS = (".nii.gz", ".mha", ".nrrd")
VOLUMES = ("ct", "dose", "body")
#: Largest disagreement (mm, and unitless for direction cosines) between images' geometry.
GEOMETRY_TOL_MM = 1e-3
_SAFE_STEM = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")


# -- SimpleITK <-> Grid ------------------------------------------------------------------
def check_image_ext(ext: str) -> str:
    """Return ``ext`` if it is a supported image extension, else raise ``DataError``."""
    if ext not in IMAGE_EXTENSIONS:
        raise DataError(f"image extension {ext!r} is not supported; valid: {list(IMAGE_EXTENSIONS)}")
    return ext


IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


def write_image(array: np.ndarray, grid: Grid, path: str | Path) -> Path:
    """Write one ``(z, y, x)`` volume on ``grid`` as a NIfTI/MHA/NRRD image (compressed,
    atomically); the extension of ``path`` picks the format."""
    path = Path(path)
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise DataError(f"{path}: unknown image extension; valid: {', '.join(IMAGE_SUFFIXES)}")
    arr = np.asarray(array)
    if arr.shape != grid.shape:
        raise DataError(f"{path}: array shape {arr.shape} does not match the grid {grid.shape} (z, y, x)")
    with atomic_path(path) as tmp:
        # SimpleITK picks the writer from the extension: write under it, then take the temp name.
        suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
        target = tmp.with_name(tmp.name + suffix)
        try:
            _sitk_write(_to_image(arr, grid), target, path)
            target.rename(tmp)
        finally:
            target.unlink(missing_ok=True)
    return path


def _sitk_write(image: sitk.Image, file: Path, dest: Path) -> None:
    """``sitk.WriteImage`` (compressed); a failure (full disk, no permission) is a DataError on ``dest``."""
    try:
        sitk.WriteImage(image, str(file), True)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][-200:]
        raise DataError(f"{dest}: could not be written ({reason}); nothing was written there") from exc


#: Default share of each structure an external image must cover after resampling (see
#: :func:`read_image_on_grid`): all targets, most of the body (a dose grid may stop short of
#: a long scan).
COVER_TARGET, COVER_BODY = 0.99, 0.5


def read_image_on_grid(
    path: str | Path,
    grid: Grid,
    *,
    dose: bool = False,
    cover: Sequence[tuple[str, np.ndarray, float]] = (),
) -> tuple[np.ndarray, bool]:
    """A ``float32`` ``(z, y, x)`` volume from a NIfTI/MHA/NRRD image, on ``grid``; resampled
    linearly (0 outside the image) when the image's geometry differs. Returns the array and
    whether it was resampled.

    The file is read by :func:`read_checked_image` (truncation, NaN/inf refused). ``dose``:
    the file's own voxels must follow the dose rule (:func:`~dosegym.data.dose.check_dose_gy`:
    floating, finite, >= 0; the maximum is the caller's to check). ``cover``: ``(name, mask on
    grid, minimum share)`` triples; when the image is resampled, each mask must lie within
    the image's non-zero region by at least that share, else ``DataError`` saying the shares
    and where the image and the masks lie (mm).
    """
    path = Path(path)
    img, arr = read_checked_image(path)
    if img.GetDimension() != 3:
        raise DataError(f"{path}: a 3-D image is needed, got {img.GetDimension()}-D")
    if dose:
        check_dose_gy(arr, where=str(path), allow_high=True)
    ref = _to_image(np.zeros(grid.shape, np.float32), grid)
    same = (
        img.GetSize() == ref.GetSize()
        and np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-3)
        and np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3)
        and np.allclose(img.GetDirection(), ref.GetDirection(), atol=1e-4)
    )
    if same:
        return arr.astype(np.float32), False
    if cover:
        _check_cover(path, _grid_of(img), arr, grid, cover)
    img = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(img).astype(np.float32), True


def _box_mm(grid: Grid, lo, hi) -> np.ndarray:
    """``(2, 3)`` min and max (z, y, x) mm of the voxel-index box ``lo..hi`` on ``grid``."""
    corners = np.array([[(lo, hi)[b >> k & 1][k] for k in range(3)] for b in range(8)], dtype=float)
    mm = grid.index_to_mm(corners)
    return np.stack([mm.min(axis=0), mm.max(axis=0)])


def _fmt_box(box: np.ndarray) -> str:
    return ", ".join(f"{a} [{box[0, k]:.0f}, {box[1, k]:.0f}]" for k, a in enumerate("zyx")) + " mm"


def _check_cover(
    path: Path, image_grid: Grid, arr: np.ndarray, grid: Grid, cover: Sequence[tuple[str, np.ndarray, float]]
) -> None:
    support = np.argwhere(arr != 0)
    if not len(support):
        raise DataError(f"{path}: every voxel is 0; the image holds nothing to resample onto the case")
    lo, hi = support.min(axis=0) - 0.5, support.max(axis=0) + 0.5
    short, boxes = [], []
    for name, mask, need in cover:
        voxels = np.argwhere(mask)
        if not len(voxels):
            continue
        at = image_grid.mm_to_index(grid.index_to_mm(voxels))
        share = float(np.mean(np.all((at >= lo) & (at <= hi), axis=1)))
        if share < need:
            short.append(f"{100 * share:.1f} % of {name} (needs {100 * need:g} %)")
            boxes.append(f"{name} at {_fmt_box(_box_mm(grid, voxels.min(axis=0), voxels.max(axis=0)))}")
    if short:

        def rounded(values, digits: int) -> tuple[float, ...]:
            return tuple(round(float(v), digits) for v in values)

        raise DataError(
            f"{path}: after resampling onto the case, the image's non-zero voxels cover only "
            f"{'; '.join(short)}. The image's non-zero region lies at "
            f"{_fmt_box(_box_mm(image_grid, lo, hi))}; {'; '.join(boxes)}. Check the image's origin "
            f"{rounded(image_grid.origin_mm, 1)} and spacing {rounded(image_grid.spacing_mm, 3)} mm "
            f"(z, y, x) against the case's {rounded(grid.origin_mm, 1)} and {rounded(grid.spacing_mm, 3)}"
        )


def _to_image(array: np.ndarray, grid: Grid) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(reversed(grid.spacing_mm)))
    img.SetOrigin(tuple(reversed(grid.origin_mm)))
    img.SetDirection(tuple(np.asarray(grid.direction)[::-1, ::-1].ravel().tolist()))
    return img


def _grid_of(img: sitk.Image) -> Grid:
    if img.GetDimension() != 3:
        raise DataError(f"image has {img.GetDimension()} dimensions; a 3-D image is needed")
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)[::-1, ::-1]
    return Grid(
        tuple(reversed(img.GetSize())),
        tuple(reversed(img.GetSpacing())),
        tuple(reversed(img.GetOrigin())),
        tuple(map(tuple, direction)),
    )


def _geometry_mismatch(a: Grid, b: Grid) -> str | None:
    """Describe how grid ``a`` differs from reference ``b`` (shape, spacing, origin, direction)."""
    if a.shape != b.shape:
        return f"size (z, y, x) {a.shape} differs from {b.shape}"
    for fld in ("spacing_mm", "origin_mm", "direction"):
        va, vb = np.asarray(getattr(a, fld)), np.asarray(getattr(b, fld))
        if not np.allclose(va, vb, rtol=0, atol=GEOMETRY_TOL_MM):
            va, vb = np.round(va, 4).tolist(), np.round(vb, 4).tolist()
            return f"{fld} (z, y, x) {va} differs from {vb}"
    return None


# -- names and meta ------------------------------------------------------------------------
def _file_stems(names: list[str]) -> list[str]:
    """A safe, case-insensitively unique file stem for each structure name."""
    stems: list[str] = []
    used: set[str] = set()
    for name in names:
        stem = name
        if not _SAFE_STEM.match(name) or name.lower() in used:
            digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
            stem = f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:80]}~{digest}"
            n = 2
            while stem.lower() in used:
                stem = f"{stem}~{n}"
                n += 1
        used.add(stem.lower())
        stems.append(stem)
    return stems


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise DataError(
        f"{where}: a {type(value).__name__} cannot be stored in case.json; "
        "valid meta values are numbers, strings, lists, dicts and numpy arrays"
    )


def _split_meta(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """JSON part of ``meta`` (without ``source``) and its top-level numpy arrays (ndim >= 1)."""
    arrays = {k: v for k, v in meta.items() if isinstance(v, np.ndarray) and v.ndim >= 1}
    plain = {k: v for k, v in meta.items() if k not in arrays and k != "source"}
    if plain.get("format") not in (None, "nifti"):
        plain.setdefault("source_format", plain["format"])
    plain.pop("format", None)
    if any(a.dtype == object for a in arrays.values()):
        bad = [k for k, a in arrays.items() if a.dtype == object]
        raise DataError(f"meta{bad}: object arrays cannot be stored; use numeric arrays")
    return _jsonable(plain, "meta"), arrays


# -- writer --------------------------------------------------------------------------------
def write_nifti_folder(case: Case, path: str | Path, ext: str = ".nii.gz") -> Path:
    """Write ``case`` as a NIfTI/MHA/NRRD case folder at ``path`` (atomically) and return it.

    ``path`` may be new, empty or a case folder this writer wrote before: there its earlier
    files are replaced and files others added are kept; anything else is refused (see
    :mod:`dosegym.data.atomic`).
    """
    check_image_ext(ext)
    dest = check_output_path(path, writer=CASE_WRITER)
    names = list(case.structures)
    stems = _file_stems(names)
    meta_json, meta_arrays = _split_meta(case.meta)
    volumes = [v for v in VOLUMES if getattr(case, v) is not None]
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "case_id": case.case_id,
        "image_ext": ext,
        "grid": case.grid.to_dict(),
        "volumes": volumes,
        "structures": [{"name": n, "file": s} for n, s in zip(names, stems, strict=True)],
        "occupancy": [n for n in names if n in case.occupancy],
        "prescriptions": [
            {"target": p.target, "dose_gy": p.dose_gy, "fractions": p.fractions} for p in case.prescriptions
        ],
        "beams": None if case.beams is None else case.beams.to_dict(),
        "meta": meta_json,
        "meta_arrays": sorted(meta_arrays),
    }
    text = json_text(doc)
    grid = case.grid

    def put(array: np.ndarray, file: Path, dtype) -> None:
        _sitk_write(_to_image(np.asarray(array).astype(dtype, copy=False), grid), file, dest)

    with atomic_folder(dest, CASE_WRITER) as tmp:
        for v in volumes:
            put(getattr(case, v), tmp / f"{v}{ext}", np.uint8 if v == "body" else np.float32)
        if names:
            (tmp / "structures").mkdir()
        for name, stem in zip(names, stems, strict=True):
            put(case.structures[name], tmp / "structures" / f"{stem}{ext}", np.uint8)
            if name in case.occupancy:
                (tmp / "occupancy").mkdir(exist_ok=True)
                put(case.occupancy[name], tmp / "occupancy" / f"{stem}{ext}", np.float32)
        if meta_arrays:
            np.savez_compressed(tmp / "meta_arrays.npz", **meta_arrays)
        (tmp / "case.json").write_text(text, encoding="utf-8")
    return dest


# -- reader --------------------------------------------------------------------------------
def _field(doc: dict, key: str, kind: type | tuple[type, ...], where: Path, default: Any) -> Any:
    value = doc.get(key, default)
    if value is not None and not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be {kind}, got {type(value).__name__}")
    return value


def _detect_ext(folder: Path) -> str:
    for ext in IMAGE_EXTENSIONS:
        if any((folder / f"{v}{ext}").is_file() for v in VOLUMES):
            return ext
        if (folder / "structures").is_dir() and any((folder / "structures").glob(f"*{ext}")):
            return ext
    raise DataError(
        f"{folder / 'case.json'}: no 'image_ext' and no ct/dose/body/structures image found; "
        f"valid extensions: {list(IMAGE_EXTENSIONS)}"
    )


def read_nifti_folder(path: str | Path) -> Case:
    """Read a NIfTI/MHA/NRRD case folder (see module docstring) into a :class:`Case`."""
    folder = Path(path)
    cj = folder / "case.json"
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (a NIfTI case is a folder with case.json)")
    if not cj.is_file():
        raise DataError(f"{cj}: missing; a NIfTI case folder needs case.json")
    try:
        doc = json.loads(cj.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{cj}: not readable JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DataError(f"{cj}: must hold a JSON object")
    version = doc.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise DataError(f"{cj}: format_version {version!r} is not supported; valid: {FORMAT_VERSION}")
    ext = check_image_ext(_field(doc, "image_ext", str, cj, None) or _detect_ext(folder))

    grid: Grid | None = None
    if doc.get("grid") is not None:
        try:
            grid = Grid.from_dict(doc["grid"])
        except (KeyError, TypeError, ValueError) as exc:  # DataError is a ValueError: named here
            raise DataError(
                f"{cj}: field 'grid': {exc}; it needs shape (3 sizes), spacing_mm (3 numbers > 0) "
                "and origin_mm (3 numbers), each (z, y, x)"
            ) from exc

    def load(file: Path, what: str, dtype) -> np.ndarray:
        nonlocal grid
        if not file.is_file():
            raise DataError(f"{file}: missing; case.json lists {what}")
        img, arr = read_checked_image(file, f"{ext} image")
        try:
            g = _grid_of(img)
        except DataError as exc:
            raise DataError(f"{file}: {exc}") from exc
        if grid is None:
            grid = g
        else:
            bad = _geometry_mismatch(g, grid)
            if bad:
                raise DataError(f"{file}: {what} geometry does not match the case grid: {bad}")
        return arr.astype(dtype, copy=False)

    listed = _field(doc, "volumes", list, cj, None)
    volumes = listed if listed is not None else [v for v in VOLUMES if (folder / f"{v}{ext}").is_file()]
    unknown = [v for v in volumes if v not in VOLUMES]
    if unknown:
        raise DataError(f"{cj}: field 'volumes' has {unknown}; valid: {list(VOLUMES)}")
    arrays = {
        v: load(folder / f"{v}{ext}", f"volume {v!r}", bool if v == "body" else np.float32)
        for v in sorted(volumes, key=VOLUMES.index)
    }

    entries = _field(doc, "structures", list, cj, None)
    if entries is None:
        sdir = folder / "structures"
        files = sorted(sdir.glob(f"*{ext}")) if sdir.is_dir() else []
        entries = [{"name": f.name[: -len(ext)], "file": f.name[: -len(ext)]} for f in files]
    structures: dict[str, np.ndarray] = {}
    stem_of: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or not isinstance(entry.get("file"), str)
        ):
            raise DataError(f"{cj}: structures[{i}] must be {{'name': str, 'file': str}}, got {entry!r}")
        name, stem = entry["name"], entry["file"]
        if "/" in stem or "\\" in stem or stem.startswith("."):
            raise DataError(f"{cj}: structures[{i}].file {stem!r} must be a plain file stem")
        stem_of[name] = stem
        structures[name] = load(folder / "structures" / f"{stem}{ext}", f"structure {name!r}", bool)
    occupancy: dict[str, np.ndarray] = {}
    for name in _field(doc, "occupancy", list, cj, []):
        if name not in stem_of:
            raise DataError(f"{cj}: occupancy names {name!r}, which is not a structure of this case")
        file = folder / "occupancy" / f"{stem_of[name]}{ext}"
        occupancy[name] = load(file, f"occupancy of {name!r}", np.float32)
    if grid is None:
        raise DataError(f"{folder}: no grid in case.json and no image to take it from")

    prescriptions = []
    for i, p in enumerate(_field(doc, "prescriptions", list, cj, [])):
        try:
            prescriptions.append(Prescription(p["target"], p["dose_gy"], p["fractions"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{cj}: prescriptions[{i}] needs target, dose_gy and fractions ({exc!r})"
            ) from exc
    beams = None
    if doc.get("beams") is not None:
        try:
            beams = Beams.from_dict(doc["beams"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{cj}: field 'beams' needs isocenter_mm and gantry_deg ({exc!r})") from exc
    meta = dict(_field(doc, "meta", dict, cj, {}))
    for key in _field(doc, "meta_arrays", list, cj, []):
        npz = folder / "meta_arrays.npz"
        try:
            with np.load(npz, allow_pickle=False) as z:
                meta[key] = z[key]
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{npz}: cannot read meta array {key!r} listed in case.json ({exc})") from exc
    meta.update(source=str(folder), format="nifti")
    return Case(
        case_id=str(doc.get("case_id") or folder.name),
        grid=grid,
        ct=arrays.get("ct"),
        structures=structures,
        prescriptions=prescriptions,
        beams=beams,
        dose=arrays.get("dose"),
        body=arrays.get("body"),
        occupancy=occupancy,
        meta=meta,
    )


__all__ = [
    "CASE_WRITER",
    "COVER_BODY",
    "COVER_TARGET",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GEOMETRY_TOL_MM",
    "IMAGE_EXTENSIONS",
    "IMAGE_SUFFIXES",
    "VOLUMES",
    "check_image_ext",
    "read_checked_image",
    "read_image_on_grid",
    "read_nifti_folder",
    "read_nifti_voxels",
    "write_image",
    "write_nifti_folder",
]
