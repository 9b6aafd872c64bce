"""Fixtures of the agent tests: a tiny random DosePolicy (16^3) and a DenoiseDose env on it."""

from __future__ import annotations

import gymnasium
import pytest
import torch

from dosegym.diffusion import Any2Any, DosePolicy, ModelConfig, ModelSpec, UNetConfig


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_policy_config() -> ModelConfig:
    spec = ModelSpec(shape=(16, 16, 16), spacing_mm=(10.0, 16.0, 16.0))
    unet = UNetConfig(base_channels=4, channel_mult=(1, 2), groups=2, attention_heads=1)
    return ModelConfig(spec=spec, unet=unet)


@pytest.fixture(scope="session")
def tiny_policy() -> DosePolicy:
    """Random weights, 16^3 model grid, DDIM eta=1. Agents never change the policy they get."""
    torch.manual_seed(0)
    return DosePolicy(Any2Any(tiny_policy_config()), sampler="ddim", eta=1.0)


def make_env(policy: DosePolicy, scorecard: str = "phantom_headneck", **kw):
    """A DenoiseDose vector env of 2 episodes on ``phantoms:headneck/28`` (nothing is reset)."""
    kw.setdefault("cases", "phantoms:headneck/28")
    return gymnasium.make_vec(
        "dosegym/DenoiseDose-v0",
        num_envs=2,
        vectorization_mode="vector_entry_point",
        policy=policy,
        scorecard=scorecard,
        steps=4,
        **kw,
    )


@pytest.fixture()
def env(tiny_policy):
    e = make_env(tiny_policy)
    yield e
    e.close()


@pytest.fixture(scope="session")
def headneck28():
    from dosegym.data.io import read_case

    return read_case("phantoms:headneck/28")
