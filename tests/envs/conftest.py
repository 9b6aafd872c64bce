"""Fixtures of the environment tests: a tiny random DosePolicy (16^3), real OpenKBP patients,
generated phantom anatomy."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_policy_config
from shared_data import PT_108, TRAIN_PATS, need

from dosegym.diffusion import Any2Any, DosePolicy, ModelConfig, ModelInput


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; several threads on a loaded 2-core machine
    spin-wait (a 16^3 forward goes from ~10 ms to ~300 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    return tiny_policy_config()


@pytest.fixture(scope="session")
def tiny_policy() -> DosePolicy:
    """Random weights, 16^3 model grid, DDIM eta=1 (every step stochastic). The envs never
    change a policy's weights, so one is shared by the session."""
    torch.manual_seed(0)
    return DosePolicy(Any2Any(tiny_policy_config()), sampler="ddim", eta=1.0)


@pytest.fixture(scope="session")
def pt108() -> str:
    """Real OpenKBP patient folder (128^3, reference dose, 3 prescriptions)."""
    return str(need(PT_108))


@pytest.fixture(scope="session")
def train_pats(pt108) -> str:
    return str(TRAIN_PATS)


@pytest.fixture(scope="session")
def prostate_cases():
    """Two generated prostate phantoms (48 x 64 x 64 at 4 mm, anatomy and beams, no dose)."""
    from dosegym.data.phantoms import generate_anatomy

    return [generate_anatomy("prostate", index=i, seed=0) for i in range(2)]


class PerSampleAny2Any(Any2Any):
    """Runs every sample of a batch alone: its batched forward equals B forwards of one sample
    bit for bit (a batched convolution rounds differently), so that a vector env can be
    compared with single envs exactly."""

    def forward(self, x_t, t, cond, drop=None):
        rows = []
        for i in range(cond.batch_size):
            one = ModelInput(
                {k: v[i : i + 1] for k, v in cond.tensors.items()},
                dict(cond.roles),
                cond.rx_max_gy[i : i + 1],
                True,
                {k: v[i : i + 1] for k, v in cond.available.items()},
                cond.case_ids[i : i + 1],
            )
            ti = t if t.ndim == 0 else t[i : i + 1]
            rows.append(super().forward(x_t[i : i + 1], ti, one, None if drop is None else drop[i : i + 1]))
        return torch.cat(rows)


@pytest.fixture(scope="session")
def per_sample_policy(tiny_policy) -> DosePolicy:
    """The tiny policy's weights in a :class:`PerSampleAny2Any`."""
    model = PerSampleAny2Any(tiny_policy_config())
    model.load_state_dict(tiny_policy.model.state_dict())
    return DosePolicy(model.eval(), sampler="ddim", eta=1.0)
