"""The shipped checkpoint: loads with no argument and no network, predicts plausible doses on
held-out phantoms, and records what it was trained on."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import dosegym  # noqa: F401  (registers the environments)
from dosegym.data import read_case
from dosegym.diffusion import load_pretrained
from dosegym.diffusion.policy import DosePolicy, shipped_checkpoint_dir


@pytest.fixture(scope="module")
def policy() -> DosePolicy:
    return load_pretrained()


def test_ships_as_small_safetensors_with_its_training_record():
    folder = shipped_checkpoint_dir()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 40e6
    record = json.loads((folder / "training.json").read_text())
    cases = record["data"]["cases"]
    assert record["data"]["count"] == len(cases) > 0
    assert all(c.startswith(("openkbp:train-pats/", "phantoms:")) for c in cases)
    held_out = {f"phantoms:{s}/{i}" for s in ("headneck", "prostate", "lung") for i in range(28, 32)}
    assert not held_out & set(cases)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {r["source"] for r in metrics["results"]} == {"openkbp", "phantoms"}


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["phantoms:headneck/28", "phantoms:prostate/28"])
def test_predicts_a_plausible_dose_on_a_held_out_phantom(policy, case_id):
    case = read_case(case_id)
    dose = policy.predict(case, steps=8, seed=0)
    assert dose.shape == case.grid.shape and np.isfinite(dose).all() and dose.min() >= 0
    primary = case.prescriptions[0]
    ptv_mean = dose[case.structures[primary.target]].mean()
    assert 0.8 * primary.dose_gy < ptv_mean < 1.2 * primary.dose_gy
    for oar in case.oars:
        assert dose[case.structures[oar]].mean() < ptv_mean, oar
    # far better than a constant prescription dose inside the body
    body = case.body
    mae = np.abs(dose[body] - case.dose[body]).mean()
    assert mae < 0.5 * np.abs(primary.dose_gy - case.dose[body]).mean()


@pytest.mark.slow
def test_environment_defaults_use_the_shipped_model():
    env = gym.make("dosegym/DenoiseDose-v0", cases="phantoms:headneck", steps=2)
    obs, info = env.reset(seed=3)
    mean, std = env.unwrapped.policy_step(obs)
    _, reward, terminated, _, info = env.step(mean + std * env.unwrapped.sample_noise())
    assert not terminated and reward == 0.0
    env.close()
