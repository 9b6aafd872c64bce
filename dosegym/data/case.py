"""The ``Case``: one patient (or phantom) with everything on one voxel grid.

Conventions (see ``Grid``): arrays are ``(z, y, x)``; CT in HU (``float32``); dose in Gy,
total physical dose over all fractions (``float32``); masks ``bool``; lengths in mm;
volumes in cc; gantry angles in degrees (IEC 61217).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from dosegym.data.dose import check_dose_gy
from dosegym.data.grid import Grid
from dosegym.errors import DataError

TARGET_PREFIXES = ("PTV", "CTV", "GTV", "ITV")
#: Names of the body outline (compared by :func:`canonical_name`, see :func:`is_body_name`).
BODY_NAMES = ("body", "external", "possible_dose_mask", "outline", "skin")

#: Common synonyms of structure names, lower-case, mapped to a canonical name.
STRUCTURE_ALIASES: dict[str, str] = {
    "cord": "SpinalCord",
    "spinal_cord": "SpinalCord",
    "spinal cord": "SpinalCord",
    "spinalcanal": "SpinalCord",
    "brain_stem": "Brainstem",
    "brainstem": "Brainstem",
    "parotid_l": "LeftParotid",
    "parotid_r": "RightParotid",
    "l_parotid": "LeftParotid",
    "r_parotid": "RightParotid",
    "leftparotid": "LeftParotid",
    "rightparotid": "RightParotid",
    "esophagus": "Esophagus",
    "oesophagus": "Esophagus",
    "larynx": "Larynx",
    "mandible": "Mandible",
    "external": "Body",
    "body": "Body",
    "possible_dose_mask": "Body",
    "femoralhead_l": "FemoralHead_L",
    "femoralhead_r": "FemoralHead_R",
    "femur_head_l": "FemoralHead_L",
    "femur_head_r": "FemoralHead_R",
    "lung_l": "Lung_L",
    "lung_r": "Lung_R",
    "heart": "Heart",
    "rectum": "Rectum",
    "bladder": "Bladder",
}


def _squash(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


_ALIASES_SQUASHED = {_squash(k): _squash(v) for k, v in STRUCTURE_ALIASES.items()}


def canonical_name(name: str) -> str:
    """A case-insensitive key for matching structure names (separators dropped, aliases folded).

    Separators are dropped before the alias look-up, so ``Parotid_L``, ``parotid-l`` and
    ``Parotid L`` all fold to ``leftparotid``.
    """
    key = _squash(name)
    return _ALIASES_SQUASHED.get(key, key)


_BODY_KEYS = frozenset(canonical_name(n) for n in BODY_NAMES)


def is_body_name(name: str) -> bool:
    """Whether structure ``name`` is the body outline (one of :data:`BODY_NAMES`, any case or
    separators: ``BODY``, ``External``, ``Possible Dose Mask``)."""
    return canonical_name(name) in _BODY_KEYS


def _is_real(value: object) -> bool:
    """A real number (not a bool, string or container): what a numeric field may hold."""
    try:
        kind = np.asarray(value).dtype.kind
    except (TypeError, ValueError):
        return False
    return np.ndim(value) == 0 and kind in "iuf"


@dataclass(frozen=True)
class Prescription:
    """A dose prescription: ``dose_gy`` total over ``fractions`` fractions to ``target``."""

    target: str
    dose_gy: float
    fractions: int

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise DataError(f"Prescription: target must be a structure name, got {self.target!r}")
        if not _is_real(self.dose_gy) or not np.isfinite(self.dose_gy) or self.dose_gy <= 0:
            raise DataError(f"Prescription for {self.target!r}: dose_gy must be > 0, got {self.dose_gy!r}")
        if not _is_real(self.fractions) or self.fractions != int(self.fractions) or self.fractions < 1:
            raise DataError(
                f"Prescription for {self.target!r}: fractions must be >= 1 and whole, got {self.fractions!r}"
            )
        object.__setattr__(self, "dose_gy", float(self.dose_gy))
        object.__setattr__(self, "fractions", int(self.fractions))

    @property
    def dose_per_fraction_gy(self) -> float:
        return self.dose_gy / self.fractions


@dataclass(frozen=True)
class Beams:
    """Beam geometry: isocenter (z, y, x) in patient mm, gantry angles in degrees (IEC 61217)."""

    isocenter_mm: tuple[float, float, float]
    gantry_deg: tuple[float, ...]
    technique: Literal["IMRT", "VMAT"] = "IMRT"
    couch_deg: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        iso = tuple(float(v) for v in np.asarray(self.isocenter_mm, dtype=float).reshape(-1))
        if len(iso) != 3 or not all(np.isfinite(iso)):
            raise DataError(f"Beams.isocenter_mm must be 3 finite mm values (z, y, x), got {iso}")
        angles = tuple(float(a) % 360.0 for a in np.asarray(self.gantry_deg, dtype=float).reshape(-1))
        if not angles:
            raise DataError("Beams.gantry_deg must hold at least one angle")
        if self.technique not in ("IMRT", "VMAT"):
            raise DataError(f"Beams.technique must be 'IMRT' or 'VMAT', got {self.technique!r}")
        object.__setattr__(self, "isocenter_mm", iso)
        object.__setattr__(self, "gantry_deg", angles)
        if self.couch_deg is not None:
            object.__setattr__(self, "couch_deg", tuple(float(a) for a in self.couch_deg))

    def to_dict(self) -> dict:
        return {
            "isocenter_mm": list(self.isocenter_mm),
            "gantry_deg": list(self.gantry_deg),
            "technique": self.technique,
            "couch_deg": None if self.couch_deg is None else list(self.couch_deg),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Beams:
        return cls(
            tuple(d["isocenter_mm"]),
            tuple(d["gantry_deg"]),
            d.get("technique", "IMRT"),
            None if d.get("couch_deg") is None else tuple(d["couch_deg"]),
        )


def equispaced_gantry_deg(n: int, start_deg: float = 0.0) -> tuple[float, ...]:
    """``n`` coplanar gantry angles equally spaced over 360°, starting at ``start_deg``."""
    return tuple(float((start_deg + i * 360.0 / n) % 360.0) for i in range(n))


@dataclass
class Case:
    """One case on one grid. Validated on construction; errors name ``meta['source']``.

    Attributes:
        case_id: identifier, unique within a data set.
        grid: the voxel grid of every array below.
        ct: CT in HU, ``float32``, or ``None``.
        structures: name -> ``bool`` mask of ``grid.shape``.
        prescriptions: one per target; ``target`` names a key of ``structures``.
        beams: beam geometry, or ``None``.
        dose: reference dose in Gy, ``float32``, or ``None``.
        body: body / possible-dose mask (``bool``), or ``None``.
        occupancy: optional fractional (``float32`` in [0, 1]) masks beside ``structures``.
        meta: anything else: ``source`` (file or folder read), ``site``, ``format``.
    """

    case_id: str
    grid: Grid
    ct: np.ndarray | None = None
    structures: dict[str, np.ndarray] = field(default_factory=dict)
    prescriptions: list[Prescription] = field(default_factory=list)
    beams: Beams | None = None
    dose: np.ndarray | None = None
    body: np.ndarray | None = None
    occupancy: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------
    @property
    def source(self) -> str:
        return str(self.meta.get("source", f"case {self.case_id!r}"))

    def _fail(self, fld: str, msg: str) -> DataError:
        return DataError(f"{self.source}: {fld}: {msg}")

    def validate(self) -> None:
        """Check shapes, dtypes, finiteness, the dose rule (:func:`~dosegym.data.dose.check_dose_gy`),
        non-empty masks, prescriptions.

        Arrays are converted in place to the conventional dtypes (``float32`` / ``bool``).
        """
        if not isinstance(self.grid, Grid):
            raise self._fail("grid", f"must be a dosegym Grid, got {type(self.grid).__name__}")
        shape = self.grid.shape
        for name in ("ct", "dose"):
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = np.asarray(arr)
            if arr.shape != shape:
                raise self._fail(name, f"shape {arr.shape} does not match grid shape {shape} (z, y, x)")
            if name == "dose":
                rx = [p.dose_gy for p in self.prescriptions if isinstance(p, Prescription)]
                arr = check_dose_gy(arr, where=f"{self.source}: dose", prescription_gy=max(rx, default=None))
            else:
                arr = arr.astype(np.float32, copy=False)
                if not np.all(np.isfinite(arr)):
                    raise self._fail(
                        name,
                        f"contains {int((~np.isfinite(arr)).sum())} non-finite values (NaN or inf)",
                    )
            setattr(self, name, arr)
        if self.body is not None:
            self.body = self._check_mask("body", self.body)
        checked = {}
        for sname, mask in self.structures.items():
            checked[str(sname)] = self._check_mask(f"structures[{sname!r}]", mask)
        self.structures = checked
        for oname, occ in self.occupancy.items():
            occ = np.asarray(occ, dtype=np.float32)
            if occ.shape != shape:
                raise self._fail(f"occupancy[{oname!r}]", f"shape {occ.shape} does not match grid {shape}")
            if not np.all(np.isfinite(occ)) or occ.min() < 0 or occ.max() > 1:
                raise self._fail(f"occupancy[{oname!r}]", "must be finite and within [0, 1]")
            if oname not in self.structures:
                raise self._fail(f"occupancy[{oname!r}]", "has no boolean structure of the same name")
            self.occupancy[oname] = occ
        for i, rx in enumerate(self.prescriptions):
            if not isinstance(rx, Prescription):
                raise self._fail(f"prescriptions[{i}]", "must be a Prescription")
            if rx.target not in self.structures:
                raise self._fail(
                    f"prescriptions[{i}].target",
                    f"{rx.target!r} is not a structure of this case; valid: {sorted(self.structures)}",
                )
        if self.beams is not None and not isinstance(self.beams, Beams):
            raise self._fail("beams", "must be a Beams instance or None")

    def _check_mask(self, fld: str, mask) -> np.ndarray:
        arr = np.asarray(mask)
        if arr.shape != self.grid.shape:
            raise self._fail(fld, f"shape {arr.shape} does not match grid shape {self.grid.shape} (z, y, x)")
        if arr.dtype != bool:
            if not np.all(np.isfinite(arr)):
                raise self._fail(fld, "mask contains non-finite values")
            arr = arr > 0.5
        if not arr.any():
            raise self._fail(fld, "mask is empty (no voxel inside the grid)")
        return arr

    # -- helpers ------------------------------------------------------------------------
    @property
    def voxel_volume_cc(self) -> float:
        return self.grid.voxel_volume_cc

    @property
    def targets(self) -> list[str]:
        """Structures that carry a prescription, then any other PTV/CTV/GTV/ITV, sorted by Rx."""
        rx_targets = [p.target for p in sorted(self.prescriptions, key=lambda p: -p.dose_gy)]
        others = [n for n in self.structures if n.upper().startswith(TARGET_PREFIXES) and n not in rx_targets]
        return rx_targets + sorted(others)

    @property
    def oars(self) -> list[str]:
        """Every structure that is neither a target nor the body."""
        targets = set(self.targets)
        return [n for n in self.structures if n not in targets and not is_body_name(n)]

    @property
    def max_prescription_gy(self) -> float | None:
        return max((p.dose_gy for p in self.prescriptions), default=None)

    def prescription_for(self, target: str) -> Prescription | None:
        return next((p for p in self.prescriptions if p.target == target), None)

    def find_structure(self, name_or_alias: str) -> str | None:
        """The case's own name for ``name_or_alias`` (case-insensitive, aliases), or ``None``."""
        if name_or_alias in self.structures:
            return name_or_alias
        key = canonical_name(name_or_alias)
        for n in self.structures:
            if canonical_name(n) == key:
                return n
        if key == "body" and self.body is not None:
            return "Body"
        return None

    def structure(self, name_or_alias: str) -> np.ndarray:
        """The boolean mask of a structure by name or alias (``'Body'`` gives ``body``)."""
        found = self.find_structure(name_or_alias)
        if found is None:
            raise DataError(
                f"{self.source}: structure {name_or_alias!r} not found; valid: {sorted(self.structures)}"
            )
        if found not in self.structures:
            return self.body  # type: ignore[return-value]
        return self.structures[found]

    def volume_cc(self, name_or_alias: str) -> float:
        """Volume of a structure in cc (fractional occupancy where present)."""
        found = self.find_structure(name_or_alias)
        if found in self.occupancy:
            return float(self.occupancy[found].sum()) * self.voxel_volume_cc
        return float(self.structure(name_or_alias).sum()) * self.voxel_volume_cc

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary (grid, structures with cc, prescriptions, beams, dose stats)."""
        out: dict[str, Any] = {
            "case_id": self.case_id,
            "source": self.source,
            "format": self.meta.get("format"),
            "grid": self.grid.to_dict(),
            "grid_source": self.meta.get("grid_source"),  # e.g. DICOM: "ct" or "rtdose"
            "grid_reason": self.meta.get("grid_reason"),
            "notes": [str(n) for n in self.meta.get("notes") or []],
            "ct_hu": None if self.ct is None else {"min": float(self.ct.min()), "max": float(self.ct.max())},
            "body_cc": None if self.body is None else float(self.body.sum()) * self.voxel_volume_cc,
            "structures": {n: round(self.volume_cc(n), 3) for n in self.structures},
            "prescriptions": [
                {"target": p.target, "dose_gy": p.dose_gy, "fractions": p.fractions}
                for p in self.prescriptions
            ],
            "beams": None if self.beams is None else self.beams.to_dict(),
            "dose_gy": None,
        }
        if self.dose is not None:
            inside = self.dose[self.body] if self.body is not None else self.dose.ravel()
            out["dose_gy"] = {
                "max": float(self.dose.max()),
                "mean_in_body": float(inside.mean()),
            }
        return out
