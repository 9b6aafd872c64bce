"""Image files read with our own integrity checks, beside SimpleITK's readers.

ITK's NIfTI reader fills a short voxel block with zeros, reads damaged gzip data without
complaint and turns NaN/inf voxels into 0; its MetaImage and NRRD readers accept damaged
compressed bytes. Here NIfTI voxels are read with numpy and compressed ``.mha`` / ``.nrrd``
data is inflated once more, so a truncated or damaged file and NaN/inf voxels raise
``DataError``. Arrays are ``(z, y, x)``, as SimpleITK returns them.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dosegym.errors import DataError

#: NIfTI datatype code -> numpy dtype (without byte order) of the scalar types read here.
_NIFTI_DTYPES = {
    2: "u1",
    4: "i2",
    8: "i4",
    16: "f4",
    64: "f8",
    256: "i1",
    512: "u2",
    768: "u4",
    1024: "i8",
    1280: "u8",
}


def _nifti_bytes(path: Path) -> tuple[bytes, bool]:
    """The bytes of a ``.nii`` file, or of a ``.nii.gz`` decompressed (CRC checked), and
    whether the gzip stream was complete."""
    data = path.read_bytes()
    if not path.name.lower().endswith(".gz"):
        return data, True
    parts = []
    while True:
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            parts.append(inflate.decompress(data))
        except zlib.error as exc:
            raise DataError(f"{path}: damaged gzip data ({exc}); the file is corrupt") from exc
        if not inflate.eof:
            return b"".join(parts), False
        data = inflate.unused_data
        if data[:2] != b"\x1f\x8b":  # no further gzip member
            return b"".join(parts), True


def read_nifti_voxels(path: str | Path) -> tuple[np.ndarray, float, float] | None:
    """The voxel block of a ``.nii`` / ``.nii.gz`` file read with numpy: a flat array in the
    file's dtype (x fastest, i.e. C order (z, y, x)) and the header's ``scl_slope`` and
    ``scl_inter``; ``None`` for a datatype other than the scalar ones of ``_NIFTI_DTYPES``
    (its size is still checked).

    ITK's NIfTI reader fills a short voxel block with zeros, reads a gzip stream with
    damaged bytes without complaint and turns NaN and inf voxels into 0; this raises
    ``DataError`` for a short block (naming the expected vs found byte counts) or damaged
    gzip data. Non-finite values are the caller's to check.
    """
    path = Path(path)
    raw, complete = _nifti_bytes(path)
    if len(raw) < 348:
        raise DataError(f"{path}: {len(raw)} bytes; a NIfTI header alone is 348 bytes")
    end = next((e for e in "<>" if struct.unpack(e + "i", raw[:4])[0] in (348, 540)), None)
    if end is None:
        raise DataError(f"{path}: not a NIfTI file (its first 4 bytes are not the header size 348 or 540)")
    if struct.unpack(end + "i", raw[:4])[0] == 348:
        dim = struct.unpack(end + "8h", raw[40:56])
        datatype, bitpix = struct.unpack(end + "hh", raw[70:74])
        offset = int(struct.unpack(end + "f", raw[108:112])[0])
        slope, inter = struct.unpack(end + "ff", raw[112:120])
        size = 348
    else:
        datatype, bitpix = struct.unpack(end + "hh", raw[12:16])
        dim = struct.unpack(end + "8q", raw[16:80])
        offset = struct.unpack(end + "q", raw[168:176])[0]
        slope, inter = struct.unpack(end + "dd", raw[176:192])
        size = 540
    shape = tuple(int(d) for d in dim[1 : 1 + max(0, min(int(dim[0]), 7))])
    if not shape or min(shape) < 0 or bitpix <= 0 or bitpix % 8 or offset < size:
        raise DataError(
            f"{path}: NIfTI header is damaged (dim {shape}, bitpix {bitpix}, vox_offset {offset})"
        )
    expected = math.prod(shape) * (bitpix // 8)
    found = max(0, len(raw) - offset)
    if found < expected or not complete:
        raise DataError(
            f"{path}: truncated: the header declares {shape} (x, y, ...) voxels of {bitpix // 8} bytes = "
            f"{expected} bytes of voxel data, the file holds {min(found, expected)}"
            + ("" if complete else " before its gzip stream breaks off")
        )
    kind = _NIFTI_DTYPES.get(datatype)
    if kind is None or np.dtype(kind).itemsize * 8 != bitpix:
        return None
    return np.frombuffer(raw, dtype=end + kind, count=math.prod(shape), offset=offset), slope, inter


#: MetaImage element types ITK reads.
_MET_TYPES = {
    f"MET_{t}"
    for t in (
        "CHAR",
        "UCHAR",
        "SHORT",
        "USHORT",
        "INT",
        "UINT",
        "LONG",
        "ULONG",
        "LONG_LONG",
        "ULONG_LONG",
        "FLOAT",
        "DOUBLE",
    )
}
#: NRRD scalar types (the spellings of the NRRD 5 format).
_NRRD_TYPES = {
    "signed char",
    "int8",
    "int8_t",
    "uchar",
    "unsigned char",
    "uint8",
    "uint8_t",
    "short",
    "short int",
    "signed short",
    "signed short int",
    "int16",
    "int16_t",
    "ushort",
    "unsigned short",
    "unsigned short int",
    "uint16",
    "uint16_t",
    "int",
    "signed int",
    "int32",
    "int32_t",
    "uint",
    "unsigned int",
    "uint32",
    "uint32_t",
    "longlong",
    "long long",
    "long long int",
    "signed long long",
    "signed long long int",
    "int64",
    "int64_t",
    "ulonglong",
    "unsigned long long",
    "unsigned long long int",
    "uint64",
    "uint64_t",
    "float",
    "double",
}
#: The most voxels an image may declare (a 2048 x 2048 x 1024 grid); beyond it a header is
#: damaged or not a dose-planning image.
MAX_IMAGE_VOXELS = 2**32


def _numbers(path: Path, field: str, text: str, n: int, kind: type, positive: bool = False) -> list:
    """``n`` numbers of ``kind`` in header field ``field``, else ``DataError`` naming it."""
    parts = text.replace(",", " ").replace("(", " ").replace(")", " ").split()
    try:
        values = [kind(v) for v in parts]
    except ValueError:
        values = []
    ok = len(values) == n and all(math.isfinite(v) and (v > 0 if positive else True) for v in values)
    if not ok:
        what = "integers" if kind is int else "numbers"
        raise DataError(
            f"{path}: header field {field} is {text.strip()[:80]!r}; expected {n} finite "
            f"{'positive ' if positive else ''}{what}"
        )
    return values


def check_image_header(path: str | Path) -> None:
    """Check the text header of a MetaImage (``.mha`` / ``.mhd``) or NRRD (``.nrrd``) file
    before ITK parses it: the dimension, sizes, spacing, origin, direction and voxel type must
    be well formed (a damaged header can crash ITK's readers outright). ``DataError`` names
    the field and what would be valid; other suffixes are not checked."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".mha", ".mhd", ".nrrd")):
        return
    with open(path, "rb") as fh:
        head = fh.read(65536)
    if name.endswith(".nrrd"):
        _check_nrrd_header(path, head)
    else:
        _check_meta_header(path, head)


def _header_lines(path: Path, head: bytes, end: bytes, sep: str) -> dict[str, str]:
    """``field -> value`` of the text header in ``head`` (up to ``end``), one ``field SEP value``
    per line; lines without ``sep`` (comments, the magic line) are skipped."""
    stop = head.find(end)
    try:
        text = (head if stop < 0 else head[:stop]).decode("ascii")
    except UnicodeDecodeError:
        raise DataError(f"{path}: its header holds non-text bytes; the file is damaged") from None
    fields = {}
    for line in text.splitlines():
        key, found, value = line.partition(sep)
        if found and not key.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


def _check_meta_header(path: Path, head: bytes) -> None:
    fields = _header_lines(path, head, b"ElementDataFile", "=")
    if "NDims" not in fields:
        raise DataError(f"{path}: not a MetaImage file (no NDims field in its header)")
    (ndims,) = _numbers(path, "NDims", fields["NDims"], 1, int, positive=True)
    if ndims > 4:
        raise DataError(f"{path}: header field NDims is {ndims}; an image has 1 to 4 dimensions")
    sizes = _numbers(path, "DimSize", fields.get("DimSize", ""), ndims, int, positive=True)
    if math.prod(sizes) > MAX_IMAGE_VOXELS:
        raise DataError(f"{path}: header field DimSize {sizes} declares more than {MAX_IMAGE_VOXELS} voxels")
    for key in ("ElementSpacing", "ElementSize"):
        if key in fields:
            _numbers(path, key, fields[key], ndims, float, positive=True)
    for key in ("Offset", "Origin", "Position", "CenterOfRotation"):
        if key in fields:
            _numbers(path, key, fields[key], ndims, float)
    for key in ("TransformMatrix", "Rotation", "Orientation"):
        if key in fields:
            _numbers(path, key, fields[key], ndims * ndims, float)
    if "ElementNumberOfChannels" in fields:
        (channels,) = _numbers(
            path, "ElementNumberOfChannels", fields["ElementNumberOfChannels"], 1, int, True
        )
        if channels > 16:
            raise DataError(f"{path}: header field ElementNumberOfChannels is {channels}; at most 16")
    if "CompressedDataSize" in fields:
        _numbers(path, "CompressedDataSize", fields["CompressedDataSize"], 1, int, positive=True)
    if "HeaderSize" in fields:
        (hs,) = _numbers(path, "HeaderSize", fields["HeaderSize"], 1, int)
        if hs < -1:
            raise DataError(f"{path}: header field HeaderSize is {hs}; expected -1 or a size >= 0")
    etype = fields.get("ElementType", "")
    if etype not in _MET_TYPES:
        raise DataError(f"{path}: header field ElementType is {etype[:40]!r}; valid: {sorted(_MET_TYPES)}")


def _check_nrrd_header(path: Path, head: bytes) -> None:
    if not head.startswith(b"NRRD"):
        raise DataError(f"{path}: not a NRRD file (it does not start with 'NRRD')")
    fields = {k.lower(): v for k, v in _header_lines(path, head, b"\n\n", ":").items()}
    (ndims,) = _numbers(path, "dimension", fields.get("dimension", ""), 1, int, positive=True)
    if ndims > 4:
        raise DataError(f"{path}: header field dimension is {ndims}; an image has 1 to 4 dimensions")
    sizes = _numbers(path, "sizes", fields.get("sizes", ""), ndims, int, positive=True)
    if math.prod(sizes) > MAX_IMAGE_VOXELS:
        raise DataError(f"{path}: header field sizes {sizes} declares more than {MAX_IMAGE_VOXELS} voxels")
    kind = " ".join(fields.get("type", "").split())
    if kind not in _NRRD_TYPES:
        raise DataError(f"{path}: header field type is {kind[:40]!r}; expected a scalar NRRD type")
    space_dim = None
    if "space dimension" in fields:
        (space_dim,) = _numbers(path, "space dimension", fields["space dimension"], 1, int, positive=True)
    elif "space" in fields:
        space_dim = 3
    if space_dim is not None:
        if "space origin" in fields:
            _numbers(path, "space origin", fields["space origin"], space_dim, float)
        if "space directions" in fields:
            vectors = [v for v in re.findall(r"\(([^)]*)\)", fields["space directions"])]
            for vec in vectors:
                _numbers(path, "space directions", vec, space_dim, float)
            if len(vectors) != space_dim:
                raise DataError(
                    f"{path}: header field space directions holds {len(vectors)} vectors; "
                    f"expected {space_dim}"
                )
    if "spacings" in fields:
        parts = [v for v in fields["spacings"].split() if v.lower() != "nan"]
        _numbers(path, "spacings", " ".join(parts), len(parts), float, positive=True)


def _inflated_size(path: Path) -> int | None:
    """Decompressed size (bytes) of the voxel data of a compressed ``.mha`` / ``.nrrd`` file
    with its data inside, checksum verified; ``None`` when the data is not compressed
    there. ITK's readers accept damaged compressed bytes (printing "Uncompress failed")."""
    data = path.read_bytes()
    if path.name.lower().endswith(".mha"):
        head, sep, body = data.partition(b"ElementDataFile")
        line, _, body = body.partition(b"\n")
        if not sep or b"CompressedData = True" not in head or line.split(b"=")[-1].strip() != b"LOCAL":
            return None
        wbits = zlib.MAX_WBITS
    else:
        head, sep, body = data.partition(b"\n\n")
        enc = re.search(rb"^encoding:\s*(\w+)", head, re.MULTILINE)
        if not sep or not enc or enc.group(1) not in (b"gzip", b"gz") or b"\ndata file:" in head:
            return None
        wbits = 16 + zlib.MAX_WBITS
    inflate = zlib.decompressobj(wbits)
    try:
        size = len(inflate.decompress(body))
    except zlib.error as exc:
        raise DataError(f"{path}: damaged compressed voxel data ({exc}); the file is corrupt") from exc
    if not inflate.eof:
        raise DataError(
            f"{path}: truncated or damaged: its compressed voxel data ends early ({size} bytes inflated)"
        )
    return size


def _first_bad(arr: np.ndarray, path: Path) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(bad)[0]), arr.shape))
        raise DataError(
            f"{path}: {int(bad.sum())} voxels are NaN or infinite, the first at index (z, y, x) {first}; "
            "every voxel must be a finite number"
        )


def read_checked_image(path: str | Path, what: str = "image") -> tuple[sitk.Image, np.ndarray]:
    """An image file as a SimpleITK image and its voxels ``(z, y, x)`` (the image's own
    dtype), checked by us: a truncated or damaged file and NaN/inf voxels are ``DataError``.

    NIfTI voxels are read with numpy (:func:`read_nifti_voxels`; scaled by ``scl_slope`` and
    ``scl_inter`` as ITK does), the geometry by SimpleITK; other formats by SimpleITK, whose
    MetaImage and NRRD readers refuse short files and keep NaN; their compressed data is
    inflated once more here to verify its checksum and size.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    name = path.name.lower()
    nifti = read_nifti_voxels(path) if name.endswith((".nii", ".nii.gz")) else None
    inflated = _inflated_size(path) if name.endswith((".mha", ".nrrd")) else None
    if nifti is None:
        check_image_header(path)
    try:
        if nifti is None:
            img = sitk.ReadImage(str(path))
            arr = sitk.GetArrayFromImage(img)
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            img = None
    except RuntimeError as exc:
        raise DataError(f"{path}: not a readable {what} ({str(exc).strip()[:200]})") from exc
    if img is None:
        flat, slope, inter = nifti  # type: ignore[misc]
        size = reader.GetSize()
        if reader.GetNumberOfComponents() != 1 or math.prod(size) != flat.size:
            raise DataError(
                f"{path}: a {what} of scalar voxels is needed, got size {size} x "
                f"{reader.GetNumberOfComponents()} components"
            )
        arr = flat.reshape(size[::-1])
        out = sitk.GetArrayViewFromImage(sitk.Image([1] * len(size), reader.GetPixelID())).dtype
        if np.isfinite(slope) and slope != 0 and (slope, inter) != (1, 0):
            arr = arr.astype(np.float64) * slope + inter
        arr = np.ascontiguousarray(arr.astype(out, copy=False))
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(reader.GetSpacing())
        img.SetOrigin(reader.GetOrigin())
        img.SetDirection(reader.GetDirection())
    if inflated is not None and inflated != arr.nbytes:
        raise DataError(f"{path}: its voxels need {arr.nbytes} bytes, its compressed data holds {inflated}")
    if arr.dtype.kind in "fc":
        _first_bad(arr, path)
    return img, arr
