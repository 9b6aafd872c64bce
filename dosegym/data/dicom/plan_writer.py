"""RTPLAN writing: beams (one static field per angle, or one arc) and prescriptions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import RTPlanStorage, RTStructureSetStorage, generate_uid

from dosegym.data.case import Beams, Prescription
from dosegym.data.dicom.dataset import Refs, ds_text, new_dataset, read_references, save_dataset
from dosegym.errors import DataError


def write_rtplan(
    beams: Beams | None,
    prescriptions: Sequence[Prescription],
    path: str | Path,
    *,
    ct_folder: str | Path,
    label: str = "dosegym",
) -> Path:
    """Write an RTPLAN with ``beams`` and ``prescriptions``, referencing ``ct_folder``'s CT.

    IMRT: one static beam per gantry angle; VMAT: one arc (CW) with a control point per
    angle. Couch angles: one per gantry angle, one for all, or none (0°). Each prescription
    is a TARGET dose reference to its ROI in the folder's RTSTRUCT, in a fraction group with
    its number of fractions. Written atomically.
    """
    refs = read_references(ct_folder)
    ds = new_dataset(RTPlanStorage, "RTPLAN", refs, "dosegym plan")
    ds.RTPlanLabel = label[:16]
    ds.RTPlanDate = ds.InstanceCreationDate
    ds.RTPlanTime = ds.InstanceCreationTime
    ds.RTPlanGeometry = "PATIENT"
    if refs.rtstruct_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = RTStructureSetStorage
        ref.ReferencedSOPInstanceUID = refs.rtstruct_uid
        ds.ReferencedStructureSetSequence = [ref]
    setup = Dataset()
    setup.PatientPosition = "HFS"
    setup.PatientSetupNumber = 1
    ds.PatientSetupSequence = [setup]
    ds.DoseReferenceSequence = []
    for i, rx in enumerate(prescriptions, start=1):
        if rx.target not in refs.roi_numbers:
            raise DataError(
                f"{ct_folder}: prescription target {rx.target!r} is not an ROI of the RTSTRUCT; "
                f"valid: {sorted(refs.roi_numbers)}"
            )
        ref = Dataset()
        ref.DoseReferenceNumber = i
        ref.DoseReferenceUID = generate_uid()
        ref.DoseReferenceStructureType = "VOLUME"
        ref.DoseReferenceDescription = rx.target[:64]
        ref.ReferencedROINumber = refs.roi_numbers[rx.target]
        ref.DoseReferenceType = "TARGET"
        ref.TargetPrescriptionDose = ds_text(rx.dose_gy)
        ds.DoseReferenceSequence.append(ref)
    beam_items = _beam_items(beams, refs) if beams is not None else []
    if beam_items:
        ds.BeamSequence = beam_items
    groups: dict[int, list[int]] = {}
    for i, rx in enumerate(prescriptions, start=1):
        groups.setdefault(rx.fractions, []).append(i)
    ds.FractionGroupSequence = []
    for g, (fractions, dose_refs) in enumerate((groups or {1: []}).items(), start=1):
        group = Dataset()
        group.FractionGroupNumber = g
        group.NumberOfFractionsPlanned = fractions
        group.NumberOfBeams = len(beam_items) if g == 1 else 0
        group.NumberOfBrachyApplicationSetups = 0
        group.ReferencedBeamSequence = []
        for item in beam_items if g == 1 else []:
            ref = Dataset()
            ref.ReferencedBeamNumber = item.BeamNumber
            group.ReferencedBeamSequence.append(ref)
        group.ReferencedDoseReferenceSequence = []
        for number in dose_refs:
            ref = Dataset()
            ref.ReferencedDoseReferenceNumber = number
            group.ReferencedDoseReferenceSequence.append(ref)
        ds.FractionGroupSequence.append(group)
    return save_dataset(ds, Path(path))


def _beam_items(beams: Beams, refs: Refs) -> list[Dataset]:
    gantry = list(beams.gantry_deg)
    couch = list(beams.couch_deg or [0.0])
    if len(couch) == 1:
        couch = couch * len(gantry)
    if len(couch) != len(gantry):
        raise DataError(
            f"beams.couch_deg has {len(couch)} angles for {len(gantry)} gantry angles; give one "
            "per gantry angle, one for all, or none"
        )
    iso = [ds_text(v) for v in beams.isocenter_mm[::-1]]
    arcs = [gantry] if beams.technique == "VMAT" else [[a] for a in gantry]
    items = []
    for b, angles in enumerate(arcs, start=1):
        beam = Dataset()
        beam.BeamNumber = b
        beam.BeamName = f"{'Arc' if beams.technique == 'VMAT' else 'Field'} {b}"
        beam.BeamType = "DYNAMIC" if beams.technique == "VMAT" else "STATIC"
        beam.RadiationType = "PHOTON"
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.TreatmentMachineName = "dosegym"
        beam.PrimaryDosimeterUnit = "MU"
        beam.SourceAxisDistance = "1000"
        beam.ReferencedPatientSetupNumber = 1
        beam.NumberOfWedges = beam.NumberOfCompensators = 0
        beam.NumberOfBoli = beam.NumberOfBlocks = 0
        beam.FinalCumulativeMetersetWeight = "1"
        points = angles if len(angles) > 1 else angles * 2
        beam.NumberOfControlPoints = len(points)
        beam.ControlPointSequence = []
        for k, angle in enumerate(points):
            cp = Dataset()
            cp.ControlPointIndex = k
            cp.CumulativeMetersetWeight = ds_text(k / (len(points) - 1))
            if k == 0 or beams.technique == "VMAT":
                cp.GantryAngle = ds_text(angle)
            if k == 0:
                cp.NominalBeamEnergy = "6"
                cp.GantryRotationDirection = "CW" if beams.technique == "VMAT" else "NONE"
                cp.BeamLimitingDeviceAngle = "0"
                cp.PatientSupportAngle = ds_text(couch[0 if beams.technique == "VMAT" else b - 1])
                cp.PatientSupportRotationDirection = "NONE"
                cp.IsocenterPosition = iso
            beam.ControlPointSequence.append(cp)
        items.append(beam)
    return items
