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
