"""Cheap tests of what a file is, from its first bytes (no reader library imported).

Used by :func:`dosegym.data.io.detect_format` (which dispatches to the readers) and by the
readers themselves, so that no reader imports the dispatcher.
"""

from __future__ import annotations

from pathlib import Path


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` carries the DICOM preamble (``DICM`` at byte 128); False if unreadable."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False
