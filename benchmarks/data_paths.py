"""Paths of the shared data the benchmarks read: ``../shared/data`` beside the repository, or
``$DOSEGYM_SHARED_DATA`` when set (the same rule as ``tests/shared_data.py``). Import with
``from data_paths import ...`` (a benchmark script's folder is on ``sys.path``)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = (
    Path(os.environ["DOSEGYM_SHARED_DATA"])
    if os.environ.get("DOSEGYM_SHARED_DATA")
    else REPO / ".." / "shared" / "data"
)
OPENKBP = SHARED / "openkbp"
#: The three OpenKBP sample patients, relative to :data:`OPENKBP`.
OPENKBP_PATIENTS = ("train-pats/pt_108", "train-pats/pt_196", "validation-pats/pt_201")
PT_108 = OPENKBP / "train-pats" / "pt_108"
