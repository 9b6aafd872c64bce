"""Clinical data layer: ``Case``, ``Grid``, readers and writers, geometry channels, phantoms.

Conventions: arrays (z, y, x); mm; Gy (total dose); cc; HU; masks ``bool``.
"""

from dosegym.data.case import Beams, Case, Prescription, canonical_name, equispaced_gantry_deg
from dosegym.data.grid import Grid
from dosegym.data.io import detect_format, read_case, write_case

__all__ = [
    "Beams",
    "Case",
    "Grid",
    "Prescription",
    "canonical_name",
    "detect_format",
    "equispaced_gantry_deg",
    "read_case",
    "write_case",
]
