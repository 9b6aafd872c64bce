"""Fixtures of the agent tests: a tiny random DosePolicy (16^3) and a DenoiseDose env on it."""

from __future__ import annotations

import pytest
import torch
from helpers import make_env, tiny_policy_config

from dosegym.diffusion import Any2Any, DosePolicy


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_policy() -> DosePolicy:
    """Random weights, 16^3 model grid, DDIM eta=1. Agents never change the policy they get."""
    torch.manual_seed(0)
    return DosePolicy(Any2Any(tiny_policy_config()), sampler="ddim", eta=1.0)


@pytest.fixture()
def env(tiny_policy):
    e = make_env(tiny_policy)
    yield e
    e.close()


@pytest.fixture(scope="session")
def headneck28():
    from dosegym.data.io import read_case

    return read_case("phantoms:headneck/28")
