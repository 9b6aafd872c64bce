"""Gymnasium's and Stable-Baselines3's env checkers pass on all three environments."""

from __future__ import annotations

import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import dosegym  # noqa: F401

ENV_IDS = ["dosegym/DenoiseDose-v0", "dosegym/GuidedDose-v0", "dosegym/ScorecardBandit-v0"]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_checkers_pass(env_id, tiny_policy, prostate_cases):
    env = gym.make(env_id, policy=tiny_policy, cases=prostate_cases, steps=2, render_mode="rgb_array")
    with warnings.catch_warnings():
        # SB3 recommends flat vectors and [-1, 1] actions; volumes and dose units are deliberate
        warnings.filterwarnings("ignore", message=".*unconventional shape.*")
        warnings.filterwarnings("ignore", message=".*symmetric and normalized Box action.*")
        gym_check_env(env.unwrapped, skip_render_check=False)
        sb3_check_env(env.unwrapped)
    # nothing in the passive checker's first reset/step complains either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env.reset(seed=0)
        env.step(env.action_space.sample())
