"""The dosegym phantom file (``.npz``, plain arrays, no pickle): :func:`write_phantom`,
:func:`read_phantom_file`.

Arrays: ``dosegym_phantom`` (format version), ``case_id``, ``grid_shape``, ``spacing_mm``,
``origin_mm``, ``direction``, ``ct_hu`` (int16), ``body_packed`` and ``masks_packed``
(``np.packbits`` of the flattened boolean masks), ``structure_names``, ``rx_target``,
``rx_dose_gy``, ``rx_fractions``, beam arrays (``beam_*``), ``dose_u16`` with
``dose_step_gy`` (dose = ``dose_u16 * dose_step_gy``, the step a power of two so that a
decoded dose re-encodes identically; error at most half a step, < 0.001 Gy up to 128 Gy),
optional ``occupancy_u8`` (occupancy = value / 255) and ``meta_json``.
"""

from __future__ import annotations

import json
import math
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from dosegym.data.atomic import atomic_path, json_text
from dosegym.data.case import Beams, Case, Prescription
from dosegym.data.grid import Grid
from dosegym.data.sites import PHANTOM_FORMAT
from dosegym.errors import DataError

FORMAT_VERSION = 1


def _dose_step_gy(max_gy: float) -> float:
    """The smallest power-of-two step (Gy) with ``max_gy`` <= 65535 steps."""
    return float(2.0 ** math.ceil(math.log2(max(max_gy, 1e-6) / 65535.0)))


def quantize_dose(dose_gy: np.ndarray) -> np.ndarray:
    """``dose_gy`` rounded to the lattice the file format stores (float32, exact round trip)."""
    step = _dose_step_gy(float(np.max(dose_gy)))
    return (np.round(np.asarray(dose_gy, dtype=np.float64) / step) * step).astype(np.float32)


def _pack(masks: list[np.ndarray]) -> np.ndarray:
    if not masks:
        return np.zeros(0, np.uint8)
    return np.packbits(np.stack(masks).reshape(-1))


def write_phantom(case: Case, path: str | Path) -> Path:
    """Write ``case`` as a dosegym phantom ``.npz`` (compressed, no pickle), atomically.

    CT is stored as int16 HU (values rounded to whole HU, clipped to the int16 range), masks
    bit-packed, dose as uint16 on a power-of-two step (see module docstring). Returns the path.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"{path}: a phantom file must end in .npz")
    g = case.grid
    names = list(case.structures)
    arrays: dict[str, np.ndarray] = {
        "dosegym_phantom": np.array(FORMAT_VERSION, np.int32),
        "case_id": np.array(case.case_id),
        "grid_shape": np.array(g.shape, np.int32),
        "spacing_mm": np.array(g.spacing_mm, np.float64),
        "origin_mm": np.array(g.origin_mm, np.float64),
        "direction": np.array(g.direction, np.float64),
        "structure_names": np.array(names, dtype=str),
        "masks_packed": _pack([case.structures[n] for n in names]),
        "rx_target": np.array([p.target for p in case.prescriptions], dtype=str),
        "rx_dose_gy": np.array([p.dose_gy for p in case.prescriptions], np.float64),
        "rx_fractions": np.array([p.fractions for p in case.prescriptions], np.int32),
        "meta_json": np.array(json_text(case.meta, indent=None, default=str, sort_keys=True)),
    }
    if case.ct is not None:
        arrays["ct_hu"] = np.clip(np.round(case.ct), -32768, 32767).astype(np.int16)
    if case.body is not None:
        arrays["body_packed"] = _pack([case.body])
    if case.dose is not None:
        step = _dose_step_gy(float(case.dose.max()))
        arrays["dose_u16"] = np.round(case.dose.astype(np.float64) / step).astype(np.uint16)
        arrays["dose_step_gy"] = np.array(step, np.float64)
    if case.occupancy:
        onames = list(case.occupancy)
        arrays["occupancy_names"] = np.array(onames, dtype=str)
        arrays["occupancy_u8"] = np.stack(
            [np.round(case.occupancy[n] * 255.0).astype(np.uint8) for n in onames]
        )
    if case.beams is not None:
        b = case.beams
        arrays["beam_isocenter_mm"] = np.array(b.isocenter_mm, np.float64)
        arrays["beam_gantry_deg"] = np.array(b.gantry_deg, np.float64)
        arrays["beam_technique"] = np.array(b.technique)
        if b.couch_deg is not None:
            arrays["beam_couch_deg"] = np.array(b.couch_deg, np.float64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path


#: The largest phantom grid read (voxels); a header claiming more is refused before allocating.
MAX_PHANTOM_VOXELS = 256**3
_VOLUME_KEYS = ("ct_hu", "dose_u16", "occupancy_u8", "masks_packed", "body_packed")
_SMALL_BYTES = 1 << 20


def _declared(z: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of member ``key`` from its npy header, without reading its data."""
    with z.zip.open(f"{key}.npy") as fh:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(fh)
    return tuple(shape), dtype


def _check_declared_sizes(z: Any, path: Path) -> None:
    """Every member but the volumes declares at most ``_SMALL_BYTES`` (checked from headers)."""
    for key in z.files:
        if key in _VOLUME_KEYS:
            continue
        shape, dtype = _declared(z, key)
        if math.prod(shape) * dtype.itemsize > _SMALL_BYTES:
            raise DataError(f"{path}: array {key!r} claims shape {shape} of {dtype}; it should be small")


def _check_volume_sizes(z: Any, path: Path, grid: Grid, n_structures: int) -> None:
    """The volumes' declared shapes fit ``grid`` (checked from headers, before any is read)."""
    n_vox = grid.size
    expected = {
        "ct_hu": [grid.shape],
        "dose_u16": [grid.shape],
        "masks_packed": [((n_vox * n_structures + 7) // 8,)],
        "body_packed": [((n_vox + 7) // 8,)],
        "occupancy_u8": [(k, *grid.shape) for k in range(n_structures + 1)],
    }
    for key, valid in expected.items():
        if key in z.files:
            shape, _ = _declared(z, key)
            if shape not in valid:
                need = valid[0] if len(valid) == 1 else f"(k, *{grid.shape}) with k <= {n_structures}"
                raise DataError(
                    f"{path}: array {key!r} claims shape {shape}; the grid {grid.shape} (z, y, x) with "
                    f"{n_structures} structures needs {need}"
                )


def _require(z: Any, key: str, path: Any) -> np.ndarray:
    if key not in z.files:
        raise DataError(f"{path}: phantom file lacks the array {key!r}; is it a dosegym phantom?")
    return z[key]


def read_phantom_file(path: str | Path) -> Case:
    """Read a phantom ``.npz`` (see module docstring) into a validated :class:`Case`."""
    p = Path(path)
    try:
        z = np.load(p, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{p}: no such phantom file") from exc
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable npz
        raise DataError(f"{p}: not a readable .npz file ({exc})") from exc
    try:
        with z:
            _check_declared_sizes(z, p)
            version = int(_require(z, "dosegym_phantom", p))
            if version > FORMAT_VERSION:
                raise DataError(
                    f"{p}: phantom format version {version} is newer than this dosegym reads "
                    f"({FORMAT_VERSION}); upgrade dosegym"
                )
            grid = Grid(
                tuple(int(v) for v in _require(z, "grid_shape", p)),
                tuple(_require(z, "spacing_mm", p)),
                tuple(_require(z, "origin_mm", p)),
                tuple(map(tuple, _require(z, "direction", p))),
            )
            n_vox = grid.size
            if n_vox > MAX_PHANTOM_VOXELS:
                raise DataError(
                    f"grid_shape {grid.shape} has {n_vox} voxels; a phantom has at most {MAX_PHANTOM_VOXELS}"
                )
            names = [str(n) for n in _require(z, "structure_names", p)]
            _check_volume_sizes(z, p, grid, len(names))
            packed = _require(z, "masks_packed", p)
            if packed.size * 8 < n_vox * len(names):
                raise DataError(f"{p}: masks_packed holds too few bits for {len(names)} masks")
            bits = np.unpackbits(packed, count=n_vox * len(names)).astype(bool)
            structures = {n: m.reshape(grid.shape) for n, m in zip(names, bits.reshape(-1, n_vox))}
            body = None
            if "body_packed" in z.files:
                body = np.unpackbits(z["body_packed"], count=n_vox).astype(bool).reshape(grid.shape)
            ct = z["ct_hu"].astype(np.float32) if "ct_hu" in z.files else None
            dose = None
            if "dose_u16" in z.files:
                step = float(_require(z, "dose_step_gy", p))
                dose = (z["dose_u16"].astype(np.float64) * step).astype(np.float32)
            occupancy = {}
            if "occupancy_u8" in z.files:
                onames = [str(n) for n in _require(z, "occupancy_names", p)]
                occupancy = {n: (o.astype(np.float32) / 255.0) for n, o in zip(onames, z["occupancy_u8"])}
            prescriptions = [
                Prescription(str(t), float(d), int(f))
                for t, d, f in zip(
                    _require(z, "rx_target", p),
                    _require(z, "rx_dose_gy", p),
                    _require(z, "rx_fractions", p),
                )
            ]
            beams = None
            if "beam_gantry_deg" in z.files:
                beams = Beams(
                    tuple(_require(z, "beam_isocenter_mm", p)),
                    tuple(z["beam_gantry_deg"]),
                    str(_require(z, "beam_technique", p)),
                    tuple(z["beam_couch_deg"]) if "beam_couch_deg" in z.files else None,
                )
            meta = json.loads(str(z["meta_json"])) if "meta_json" in z.files else {}
            if not isinstance(meta, dict):
                raise DataError(f"meta_json holds a {type(meta).__name__}; it must be a JSON object")
            case_id = str(_require(z, "case_id", p))
    except DataError as exc:
        if str(exc).startswith(str(p)):
            raise
        raise DataError(f"{p}: {exc}") from exc
    except (
        ValueError,
        TypeError,
        KeyError,
        OSError,
        OverflowError,
        EOFError,
        SyntaxError,
        tokenize.TokenError,
        zipfile.BadZipFile,
        zlib.error,
    ) as exc:  # a damaged member or npy header
        raise DataError(f"{p}: damaged phantom file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    meta["source"] = str(p)
    meta["format"] = PHANTOM_FORMAT
    return Case(
        case_id=case_id,
        grid=grid,
        ct=ct,
        structures=structures,
        prescriptions=prescriptions,
        beams=beams,
        dose=dose,
        body=body,
        occupancy=occupancy,
        meta=meta,
    )
