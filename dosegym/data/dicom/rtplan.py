"""RTPLAN: beams (gantry and couch angles, isocenter, IMRT or VMAT) and prescriptions.

Rules: the "Plan" paragraph of :mod:`dosegym.data.dicom`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from dosegym.data.case import Beams, Prescription, canonical_name
from dosegym.data.dicom.files import Folder, header_floats, only_one, read_one
from dosegym.errors import DataError

_PTV_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")
_TREATMENT = ("TREATMENT", "CONTINUATION")  # TreatmentDeliveryType of treatment beams


def _beams(plan: Dataset) -> list[Dataset]:
    return list(plan.get("BeamSequence") or plan.get("IonBeamSequence") or [])


def _delivery(beam: Dataset) -> str:
    return str(beam.get("TreatmentDeliveryType", "") or "TREATMENT").upper()


def _plan_beams(ds: Dataset, path: Path) -> Beams | None:
    gantry: list[float] = []
    couch: list[float] = []
    isocenter = None
    arc = False
    for b, beam in enumerate(_beams(ds)):
        if _delivery(beam) not in _TREATMENT:
            continue  # setup and verification fields
        points = beam.get("ControlPointSequence") or beam.get("IonControlPointSequence") or []
        where = f"{path}: BeamSequence[{b}]"
        if not points:
            raise DataError(f"{where}: ControlPointSequence is empty")
        cp0 = points[0]
        if cp0.get("GantryAngle") in (None, ""):
            raise DataError(f"{where}.ControlPointSequence[0].GantryAngle is missing")
        if isocenter is None:
            if "IsocenterPosition" not in cp0:
                raise DataError(f"{where}.ControlPointSequence[0].IsocenterPosition is missing")
            isocenter = header_floats(cp0, "IsocenterPosition", 3, path)[::-1]
        rotation = str(cp0.get("GantryRotationDirection", "") or "NONE").upper()
        if rotation != "NONE":
            arc = True
            angles = [float(cp.GantryAngle) for cp in points if cp.get("GantryAngle") not in (None, "")]
        else:
            angles = [float(cp0.GantryAngle)]
        gantry += angles
        couch += [float(cp0.get("PatientSupportAngle", 0.0) or 0.0)] * len(angles)
    if not gantry:
        return None
    return Beams(tuple(isocenter), tuple(gantry), "VMAT" if arc else "IMRT", tuple(couch))


def _highest_ptv(names: Sequence[str]) -> str | None:
    ptvs = [n for n in names if n.strip().upper().startswith("PTV")]
    numbered = [(float(m.group(1)), n) for n in ptvs if (m := _PTV_NUMBER.search(n))]
    if numbered:
        return max(numbered)[1]
    return ptvs[0] if len(ptvs) == 1 else None


def _plan_prescriptions(ds: Dataset, path: Path, rois: Mapping[int, str]) -> list[Prescription]:
    groups = ds.get("FractionGroupSequence") or []
    by_target: dict[str, Prescription] = {}
    for i, ref in enumerate(ds.get("DoseReferenceSequence") or []):
        if str(ref.get("DoseReferenceType", "")).upper() != "TARGET":
            continue
        dose = ref.get("TargetPrescriptionDose")
        if dose in (None, "") or not float(dose) > 0:
            continue
        target = None
        number = ref.get("ReferencedROINumber")
        if number not in (None, "") and int(number) in rois:
            target = rois[int(number)]
        description = canonical_name(str(ref.get("DoseReferenceDescription", "") or ""))
        if target is None and description:
            target = next((n for n in rois.values() if canonical_name(n) == description), None)
        target = target or _highest_ptv(list(rois.values()))
        if target is None:
            continue
        group = next(
            (
                g
                for g in groups
                if any(
                    r.get("ReferencedDoseReferenceNumber") == ref.get("DoseReferenceNumber")
                    for r in g.get("ReferencedDoseReferenceSequence") or []
                )
            ),
            groups[0] if groups else None,
        )
        planned = group.get("NumberOfFractionsPlanned") if group is not None else None
        fractions = int(planned) if planned not in (None, "") and int(planned) >= 1 else 1
        try:
            rx = Prescription(target, float(dose), fractions)
        except DataError as exc:
            raise DataError(f"{path}: DoseReferenceSequence[{i}]: {exc}") from exc
        if target not in by_target or rx.dose_gy > by_target[target].dose_gy:
            by_target[target] = rx
    return list(by_target.values())


def read_rtplan(
    path: str | Path, rois: Mapping[int, str] | None = None
) -> tuple[Beams | None, list[Prescription]]:
    """Beams and prescriptions of an RTPLAN (see module docstring).

    ``rois`` maps ROI numbers of the matching RTSTRUCT to structure names; prescriptions
    are matched to them (none without ``rois``). Isocenter in (z, y, x) patient mm.
    """
    p, ds = read_one(path, "RTPLAN", pixels=False)
    return plan_contents(ds, p, rois or {})


def plan_contents(
    ds: Dataset, path: Path, rois: Mapping[int, str]
) -> tuple[Beams | None, list[Prescription]]:
    """Beams and prescriptions of an RTPLAN dataset; a value that is not a number raises ``DataError``."""
    try:
        return _plan_beams(ds, path), _plan_prescriptions(ds, path, rois)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{path}: an RTPLAN value (angle, isocenter, dose or fraction count) is not a number ({exc})"
        ) from exc


def treatment_beams(plan: Dataset) -> int:
    """The number of treatment beams of an RTPLAN (setup and verification fields left out)."""
    return sum(_delivery(b) in _TREATMENT for b in _beams(plan))


def pick_plan(found: Folder, doses: list[tuple[Path, Dataset]]) -> tuple[Path, Dataset] | None:
    """The RTPLAN of the folder: the only one, else the one the doses reference."""
    if len(found.rtplan) <= 1:
        return found.rtplan[0] if found.rtplan else None
    wanted = {
        str(r.get("ReferencedSOPInstanceUID", ""))
        for _, ds in doses
        for r in ds.get("ReferencedRTPlanSequence") or []
    }
    chosen = [(p, ds) for p, ds in found.rtplan if str(ds.get("SOPInstanceUID", "")) in wanted]
    return only_one(chosen if chosen else found.rtplan, "RTPLAN", found.path)
