"""Paths of the shared test data and the one rule for a missing file.

The data live in ``../shared/data`` beside the repository (``$DOSEGYM_SHARED_DATA`` instead,
when set): OpenKBP sample patients under ``openkbp/`` and MAAS scorecards under
``scorecards/``. A test that needs a file takes it through :func:`need` (in a fixture or the
test) or :func:`needs` (a mark, checked by ``tests/conftest.py`` before the test runs): when
the file is missing the test is skipped, except under ``CI=true``, where it fails.
Import with ``from shared_data import ...`` (``tests/`` is on ``sys.path`` through the root
``conftest.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (
    Path(os.environ["DOSEGYM_SHARED_DATA"])
    if os.environ.get("DOSEGYM_SHARED_DATA")
    else REPO / ".." / "shared" / "data"
)
OPENKBP = SHARED / "openkbp"
TRAIN_PATS = OPENKBP / "train-pats"
#: The three OpenKBP sample patients, relative to :data:`OPENKBP`.
OPENKBP_PATIENTS = ("train-pats/pt_108", "train-pats/pt_196", "validation-pats/pt_201")
PT_108 = TRAIN_PATS / "pt_108"
PT_196 = TRAIN_PATS / "pt_196"
PT_201 = OPENKBP / "validation-pats" / "pt_201"
SCORECARDS = SHARED / "scorecards"
LUNG_JSON = SCORECARDS / "SC_Lung(60Gy)_2022MAAS_ExampleV2.json"
PROSTATE_JSON = SCORECARDS / "SC_ProstateSBRT-ARTIA-V1.2(KBPModel).json"


def need(*paths: Path) -> Path:
    """The first of ``paths`` when all exist; else the test fails under ``CI=true`` and is
    skipped otherwise, naming the missing path."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        where = "set DOSEGYM_SHARED_DATA or provide ../shared/data"
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data {missing[0]} is missing (CI=true needs it; {where})", pytrace=False)
        pytest.skip(f"shared data {missing[0]} is not available ({where})")
    return paths[0]


def needs(*paths: Path) -> pytest.MarkDecorator:
    """A mark: the test needs ``paths`` (see :func:`need`; ``tests/conftest.py`` checks it)."""
    return pytest.mark.shared_data(*paths)
