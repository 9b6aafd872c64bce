"""Shared fixtures of the diffusion tests: real OpenKBP patients and tiny models (16^3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import randomise_zero_init, tiny_config
from shared_data import PT_108, PT_196, need

from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.slots import ModelSpec


def _need_openkbp() -> None:
    need(PT_108)


@pytest.fixture(scope="session")
def case():
    """Real OpenKBP patient pt_108 (128^3, dose, 9 structures, 3 prescriptions)."""
    _need_openkbp()
    from dosegym.data import read_case

    return read_case(PT_108)


@pytest.fixture(scope="session")
def case2():
    need(PT_108, PT_196)
    from dosegym.data import read_case

    return read_case(PT_196)


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return ModelSpec(shape=(16, 16, 16), spacing_mm=(10.0, 16.0, 16.0))


@pytest.fixture
def tiny_model(tiny_spec) -> Any2Any:
    torch.manual_seed(0)
    return randomise_zero_init(Any2Any(tiny_config(tiny_spec))).eval()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One preprocessed-case cache for the whole session."""
    return tmp_path_factory.mktemp("dosegym-cache")
