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


ENV_IDS = ("dosegym/DenoiseDose-v0", "dosegym/GuidedDose-v0", "dosegym/ScorecardBandit-v0")
VECTOR_CLASSES = {
    "dosegym/DenoiseDose-v0": "DenoiseDoseVectorEnv",
    "dosegym/GuidedDose-v0": "GuidedDoseVectorEnv",
    "dosegym/ScorecardBandit-v0": "ScorecardBanditVectorEnv",
}


def fixed_action(env_id, shape, i, k):
    """Sub-env ``i``'s action at step ``k`` of the Guided and Bandit envs (the same for both sides)."""
    if "Guided" in env_id:
        return np.linspace(-1.0, 1.0, shape[0], dtype=np.float32)[::-1] * (-1.0) ** (i + k)
    return np.full(shape, 0.25 * (i + 1), np.float32)


def assert_info_equal(vector_info, i, single_info):
    """Sub-env ``i`` of Gymnasium's batched info dict equals a single env's info, key by key."""
    for key, value in single_info.items():
        assert vector_info[f"_{key}"][i], key
        if isinstance(value, dict):
            assert_info_equal(vector_info[key], i, value)
        else:
            np.testing.assert_equal(vector_info[key][i], value, err_msg=key)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_native_vector_env_equals_single_envs_exactly(env_id, per_sample_policy, prostate_cases):
    """B = 4 episodes of every kind's native vector env are 4 single envs with the seeds
    s + i: the same cases, noise, observations, rewards and infos, bit for bit (the model
    runs each sample alone, so the batched forward rounds as the single ones)."""
    kw = dict(policy=per_sample_policy, cases=prostate_cases, steps=2, reward={"w_fid": 0.5, "w_kl": 0.5})
    venv = gym.make_vec(env_id, num_envs=4, vectorization_mode="vector_entry_point", **kw)
    assert type(venv).__name__ == VECTOR_CLASSES[env_id]
    singles = [gym.make(env_id, disable_env_checker=True, **kw) for _ in range(4)]
    v_obs, v_info = venv.reset(seed=100)
    s_obs, s_info = zip(*(env.reset(seed=100 + i) for i, env in enumerate(singles)))
    assert venv.observation_space.contains(v_obs)
    assert len(set(v_info["case_key"])) == 2  # both cases drawn
    done, k = False, 0
    while True:
        for i in range(4):
            for key in s_obs[i]:
                np.testing.assert_array_equal(v_obs[key][i], s_obs[i][key], err_msg=key)
            assert_info_equal(v_info, i, s_info[i])
        if done:
            break
        if "Denoise" in env_id:
            mean, std = venv.policy_step(v_obs)
            v_act = mean + std * venv.sample_noise()
            s_act = []
            for env, obs in zip(singles, s_obs):
                m, s = env.unwrapped.policy_step(obs)
                s_act.append(m + s * env.unwrapped.sample_noise())
            np.testing.assert_array_equal(v_act, np.stack(s_act))
        else:
            s_act = [fixed_action(env_id, venv.single_action_space.shape, i, k) for i in range(4)]
            v_act = np.stack(s_act)
        v_obs, v_rew, v_term, v_trunc, v_info = venv.step(v_act)
        s_obs, s_rew, s_term, _, s_info = zip(*(env.step(a) for env, a in zip(singles, s_act)))
        np.testing.assert_array_equal(v_rew, np.array(s_rew))
        assert list(v_term) == list(s_term) and not v_trunc.any()
        done, k = bool(v_term.all()), k + 1
    assert k == (1 if "Bandit" in env_id else 2) and "score_total" in v_info
    # NEXT_STEP autoreset: the next step starts new episodes, as a reset of the singles would
    obs, rewards, terminated, _, infos = venv.step(v_act)
    assert (rewards == 0).all() and not terminated.any() and venv.observation_space.contains(obs)


@pytest.mark.parametrize("env_id", ENV_IDS[1:])
def test_guided_and_bandit_vector_envs_batch_the_real_model(env_id, tiny_policy, prostate_cases):
    """With the real (batched) forward: the same draws, rewards within rounding."""
    kw = dict(policy=tiny_policy, cases=prostate_cases, steps=2)
    venv = gym.make_vec(env_id, num_envs=3, **kw)
    _, v_info = venv.reset(seed=7)
    single = gym.make(env_id, disable_env_checker=True, **kw)
    for i in range(3):
        _, info = single.reset(seed=7 + i)
        assert info["case_key"] == v_info["case_key"][i]
    done = False
    while not done:
        _, rewards, terminated, _, _ = venv.step(venv.action_space.sample())
        done = terminated.all()
    assert np.isfinite(rewards).all()
    with pytest.raises(
        EnvError, match=r"GuidedDoseVectorEnv: .*'num_envs'|ScorecardBanditVectorEnv: .*'num_envs'"
    ):
        gym.make_vec(env_id, num_envs=2, polcy=tiny_policy)


def test_each_sub_env_can_be_given_its_case(tiny_policy, prostate_cases):
    from dosegym.envs.denoise import DenoiseDoseVectorEnv
    from dosegym.errors import EnvError

    env = DenoiseDoseVectorEnv(num_envs=3, policy=tiny_policy, cases=prostate_cases[:2], steps=2)
    _, infos = env.reset(seed=0, options={"case_index": [1, 0, 1]})
    keys = list(infos["case_key"])
    assert keys[0] == keys[2] != keys[1]
    _, infos = env.reset(seed=0, options={"case_index": 0})
    assert len(set(infos["case_key"])) == 1
    with pytest.raises(EnvError, match="2 indices for 3 episodes"):
        env.reset(seed=0, options={"case_index": [0, 1]})
    with pytest.raises(EnvError, match="out of range"):
        env.reset(seed=0, options={"case_index": [0, 1, 5]})
