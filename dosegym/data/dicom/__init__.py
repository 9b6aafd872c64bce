"""DICOM RT: read a folder (CT series, RTSTRUCT, RTDOSE, RTPLAN) into a ``Case``; write RT sets.

Geometry. DICOM patient coordinates are LPS ``(x, y, z)`` mm; dosegym stores them z-first, so
the DICOM point ``(x, y, z)`` is the dosegym point ``(z, y, x)``. The readers and writers of
this package are the only place where that conversion happens. An image stack is described by
``ImageOrientationPatient`` (row cosine ``r``: direction of increasing column index; column
cosine ``c``), the slice normal ``n = r × c`` and ``PixelSpacing`` = (between rows, between
columns). CT slices are sorted by ``ImagePositionPatient · n``; the native index axes (slice,
row, column) run along ``(n, c, r)``. The reader then transposes and flips the axes so that
each index axis runs along the positive patient axis nearest to it: for axial series (HFS,
FFS, HFP, FFP) the grid's direction becomes the identity, so larger x index = further patient
left (+x LPS), larger y = posterior, larger z = superior. Oblique series keep a
(near-identity) direction.

Grid. The case lies on the CT grid when the CT series holds every contour plane (each slice
a slab one slice thick); otherwise (no CT, a partial CT of one or a few slices, a CT with a
missing slice) on the RTDOSE grid, with ``ct`` ``None``: a plan exported as RTSTRUCT +
RTDOSE can still be scored. ``meta["grid_source"]`` ("ct" or "rtdose") and
``meta["grid_reason"]`` say which grid and why, ``meta["notes"]`` what was cut or scaled.
On the RTDOSE grid the slab of a contour plane is the CT's slice gap (or SliceThickness),
else the usual gap between contour planes. Structures are cut to the grid (the share cut off
is noted; one wholly outside is left out). A target (PTV/CTV/GTV) more than 1 % outside the
RTDOSE grid raises ``DataError`` on either grid: its dose there is unknown.

Structures (``RTSTRUCT``). ``CLOSED_PLANAR`` contours are rasterised on the case grid, plane
by plane, by a supersampled even-odd fill (``raster.fill_polygons``): several contours on one
plane combine by XOR, so an inner contour is a hole. The fractional occupancy goes to
``Case.occupancy[name]`` and the mask is ``occupancy >= 0.5`` (if that leaves a tiny structure
empty, its voxels of highest occupancy). Through the planes, each contour plane stands for a
slab one CT slice thick centred on it: a grid slice takes the contours of the nearest plane
within half a CT slice, so a structure extends half a slice beyond its first and last
contoured planes (end-capping), contours between slices go to the nearest slice, and a finer
or coarser grid (``grid="dose"``) samples the nearest plane. ``POINT`` and open contours are
ignored, as are ROIs without contours. The ROI whose ``RTROIInterpretedType`` is ``EXTERNAL``
(else one named Body/External) becomes ``Case.body`` and is not repeated in
``Case.structures`` (``case.structure("Body")`` still finds it).

Dose (``RTDOSE``). ``pixel × DoseGridScaling`` in ``DoseUnits`` GY (CGY divided by 100);
frames at ``ImagePositionPatient + GridFrameOffsetVector · n``. On the CT grid it is
resampled by trilinear interpolation and is zero outside the span of the dose voxel centres.
Several ``BEAM`` doses are summed; otherwise one ``PLAN`` (or ``MULTI_PLAN``) dose is used;
a ``FRACTION`` dose is multiplied by the RTPLAN's ``NumberOfFractionsPlanned`` (refused
without one); an empty ``DoseSummationType`` is taken as PLAN (noted); other types are
refused. Unequally spaced frames are resampled linearly onto equal ones (noted).

Plan (``RTPLAN``). Treatment beams only (setup fields are skipped). Static beams give the
gantry angle of their first control point; an arc (``GantryRotationDirection`` CW/CC) makes
the technique VMAT and lists every control-point gantry angle. Couch angles run parallel to
the gantry angles. The isocenter is the first treatment beam's. Prescriptions come from
``DoseReferenceSequence`` items of type TARGET (``TargetPrescriptionDose``, total Gy) and the
fraction group that references them (else the first; ``NumberOfFractionsPlanned``, default
1). The target is the ROI named by ``ReferencedROINumber``, else by the description, else
the PTV with the highest number in its name (or the only PTV); otherwise no prescription.

Modules (one job each): ``files`` (folder scan, header checks), ``stack`` (image planes in
patient space, sampling, canonical axes), ``ct`` (the CT series), ``rtstruct`` (contour
rasterisation), ``raster`` (polygon fill and iso-lines on one plane), ``rtdose`` (dose
planes and the plan's total), ``rtplan`` (beams, prescriptions), ``case_grid`` (the CT or
RTDOSE grid), ``reader`` (``read_dicom``); writers: ``dataset`` (new datasets, references),
``dose_writer``, ``struct_writer``, ``plan_writer``, ``case_writer`` (a whole case).
"""

from dosegym.data.dicom.case_writer import mask_contours, write_dicom_case
from dosegym.data.dicom.ct import AIR_HU
from dosegym.data.dicom.dose_writer import write_dicom_dose, write_rtdose
from dosegym.data.dicom.files import PATIENT_KEYWORDS, STUDY_KEYWORDS
from dosegym.data.dicom.plan_writer import write_rtplan
from dosegym.data.dicom.reader import read_dicom
from dosegym.data.dicom.rtdose import read_rtdose
from dosegym.data.dicom.rtplan import read_rtplan
from dosegym.data.dicom.rtstruct import Roi, read_rtstruct
from dosegym.data.dicom.struct_writer import write_rtstruct

__all__ = [
    "AIR_HU",
    "PATIENT_KEYWORDS",
    "STUDY_KEYWORDS",
    "Roi",
    "mask_contours",
    "read_dicom",
    "read_rtdose",
    "read_rtplan",
    "read_rtstruct",
    "write_dicom_case",
    "write_dicom_dose",
    "write_rtdose",
    "write_rtplan",
    "write_rtstruct",
]
