"""Vectorised use: the native batched DenoiseDose and make_vec 'sync' / 'async'."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import dosegym  # noqa: F401
from dosegym.envs.denoise import DenoiseDoseVectorEnv
from dosegym.errors import EnvError

STEPS = 3


def single_episode(policy, cases, seed):
    env = gym.make(
        "dosegym/DenoiseDose-v0", policy=policy, cases=cases, steps=STEPS, disable_env_checker=True
    )
    u = env.unwrapped
    obs, info = env.reset(seed=seed)
    done = False
    while not done:
        mean, std = u.policy_step(obs)
        obs, reward, done, _, _ = env.step(mean + std * u.sample_noise())
    return info, reward


def test_native_batch_matches_single_envs(tiny_policy, pt108, prostate_cases):
    cases = [pt108, *prostate_cases]
    venv = gym.make_vec("dosegym/DenoiseDose-v0", num_envs=3, policy=tiny_policy, cases=cases, steps=STEPS)
    assert isinstance(venv, DenoiseDoseVectorEnv)
    assert venv.metadata["autoreset_mode"] is AutoresetMode.NEXT_STEP
    obs, infos = venv.reset(seed=40)
    assert venv.observation_space.contains(obs)
    assert obs["x_t"].shape == (3, 1, 16, 16, 16)
    done = np.zeros(3, bool)
    while not done.any():
        mean, std = venv.policy_step(obs)
        assert std.shape == (3, 1, 1, 1, 1)
        obs, rewards, done, truncated, step_infos = venv.step(mean + std * venv.sample_noise())
        assert not truncated.any()
    assert done.all()
    for i in range(3):
        info, reward = single_episode(tiny_policy, cases, seed=40 + i)
        assert infos["case_key"][i] == info["case_key"]
        assert infos["sampler_seed"][i] == info["sampler_seed"]
        # one batched forward vs B single ones differ only by floating-point rounding
        assert rewards[i] == pytest.approx(reward, abs=1e-3)
    assert step_infos["score_report"]["case_id"][0] == infos["case_id"][0]
    # NEXT_STEP autoreset: the step after the end resets every sub-env and ignores the actions
    obs, rewards, done, _, infos = venv.step(np.zeros(venv.action_space.shape, np.float32))
    assert not done.any() and (rewards == 0).all()
    assert (obs["timestep"] == 1.0).all() and "sampler_seed" in infos
    with pytest.raises(EnvError, match="shape"):
        venv.step(np.zeros((2, 1, 16, 16, 16), np.float32))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_make_vec_modes(mode, tiny_policy, prostate_cases):
    venv = gym.make_vec(
        "dosegym/DenoiseDose-v0",
        num_envs=2,
        vectorization_mode=mode,
        policy=tiny_policy,
        cases=prostate_cases,
        steps=2,
    )
    try:
        obs, infos = venv.reset(seed=5)
        native = DenoiseDoseVectorEnv(num_envs=2, policy=tiny_policy, cases=prostate_cases, steps=2)
        native_obs, native_infos = native.reset(seed=5)
        np.testing.assert_array_equal(obs["x_t"], native_obs["x_t"])
        assert list(infos["sampler_seed"]) == list(native_infos["sampler_seed"])
        actions = obs["x_t"]  # stay where we are: any in-bounds state is a valid action
        for _ in range(2):
            obs, rewards, done, _, infos = venv.step(actions)
        assert done.all() and np.isfinite(rewards).all()
        assert "score_total" in infos
    finally:
        venv.close()
