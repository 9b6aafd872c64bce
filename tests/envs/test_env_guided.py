"""GuidedDose-v0: guidance moves the dose the way each group asks; SB3 PPO and SAC run on it."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import dosegym  # noqa: F401
from dosegym.errors import EnvError
from dosegym.scorecards import GROUP_NAMES

STEPS = 4


def make(policy, cases, **kw):
    return gym.make("dosegym/GuidedDose-v0", policy=policy, cases=cases, steps=STEPS, **kw)


def final_dose(env, seed, group):
    """Final dose (Gy, case grid) with full weight on ``group`` only (None: no guidance)."""
    action = -np.ones(len(GROUP_NAMES), np.float32)
    if group is not None:
        action[GROUP_NAMES.index(group)] = 1.0
    env.reset(seed=seed)
    kls = []
    done = False
    while not done:
        _, _, done, _, info = env.step(action)
        kls.append(info.get("kl"))
    u = env.unwrapped
    return u.decode(u.case_data(0), u.chain.x[0]).numpy(), kls


def test_guidance_moves_each_group_the_right_way(tiny_policy, prostate_cases):
    case = prostate_cases[0]
    env = make(tiny_policy, [case])
    ptv, rectum = case.structures["PTV60"], case.structures["Rectum"]
    for seed in (0, 1):
        base, kls = final_dose(env, seed, None)
        assert kls == [0.0] * STEPS  # unguided steps are the pretrained steps
        up, kls_up = final_dose(env, seed, "targets")
        assert min(kls_up) > 0
        assert up[ptv].mean() > base[ptv].mean()
        down, _ = final_dose(env, seed, "oar_rectum_bladder")
        assert down[rectum].mean() < base[rectum].mean()
        cooler, _ = final_dose(env, seed, "hot_spots")
        assert cooler[ptv].mean() < base[ptv].mean()


def test_observation_and_kl_reward(tiny_policy, prostate_cases):
    env = make(tiny_policy, prostate_cases[:1], reward={"w_kl": 1.0})
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    n_items = env.observation_space["scores"].shape[0]
    assert n_items == len(env.unwrapped.cards.fixed.items) == 13  # phantom_prostate
    assert obs["features"].shape == (2 * 4**3,)
    _, reward, _, _, info = env.step(np.ones(len(GROUP_NAMES), np.float32))
    assert info["kl"] > 0 and reward == pytest.approx(-info["kl"])
    assert info["guidance_weights"] == [1.0] * len(GROUP_NAMES)
    with pytest.raises(EnvError, match="outside"):
        env.step(np.full(len(GROUP_NAMES), 1.5, np.float32))


def test_guided_step_is_the_step_towards_the_moved_x0(tiny_policy, prostate_cases):
    """The env's sparse step (mean moved on the structures' voxels, KL taken there) is the
    dense definition: x_{t-1} = mean + x0_gain * scale * sum_g w_g d_g + std * noise, and the
    KL of N(that mean, std) against the unguided step, averaged over every element."""
    import torch

    from dosegym.envs.reward import gaussian_kl

    env = make(tiny_policy, prostate_cases[:1], guidance_scale=0.3)
    u = env.unwrapped
    env.reset(seed=0)
    action = np.linspace(-1.0, 1.0, len(GROUP_NAMES)).astype(np.float32)
    for _ in range(STEPS - 1):
        core = u.core
        dist, dirs = core.chain.distribution(), core._dirs[0]
        weights = torch.as_tensor((action + 1.0) / 2.0)[None]
        mean = dist.mean + core.chain.x0_gain() * (0.3 * dirs.combine(weights))
        state = [g.get_state() for g in core.chain._generators]
        noise = core.chain.noise()
        for g, st in zip(core.chain._generators, state):
            g.set_state(st)  # the env draws the same noise
        _, _, _, _, info = env.step(action)
        torch.testing.assert_close(core.chain.x, mean + dist.std * noise, rtol=1e-5, atol=1e-5)
        dense_kl = float(gaussian_kl(mean, dist.std, dist.mean, dist.std)[0])
        assert info["kl"] == pytest.approx(dense_kl, rel=1e-4) and dense_kl > 0
        assert info["guidance_max"] == pytest.approx(float((0.3 * dirs.combine(weights)).abs().max()))


def test_mixed_sites_need_one_card(tiny_policy, prostate_cases):
    from dosegym.data.phantoms import generate_anatomy

    lung = generate_anatomy("lung", index=0, seed=0)
    with pytest.raises(EnvError, match="scorecard="):
        make(tiny_policy, [prostate_cases[0], lung])


@pytest.mark.slow
def test_sb3_ppo_trains(tiny_policy, prostate_cases):
    from stable_baselines3 import PPO

    env = make(tiny_policy, prostate_cases)
    model = PPO("MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=2, seed=0, device="cpu")
    model.learn(total_timesteps=192)
    assert model.num_timesteps == 192
    action, _ = model.predict(env.reset(seed=3)[0], deterministic=True)
    assert env.action_space.contains(action)


def test_sb3_sac_runs(tiny_policy, prostate_cases):
    from stable_baselines3 import SAC

    env = make(tiny_policy, prostate_cases)
    model = SAC(
        "MultiInputPolicy", env, learning_starts=8, batch_size=8, buffer_size=200, seed=0, device="cpu"
    )
    model.learn(total_timesteps=24)
    assert model.num_timesteps == 24


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_guidance_with_x0_and_epsilon_models(prediction_type, prostate_cases):
    """The shipped recipe predicts x0 (``prediction_type: sample``); guidance edits x̂0 and
    maps it back to the model's own output, so it works the same for every parametrisation."""
    from helpers import tiny_policy_with

    policy = tiny_policy_with(prediction_type)
    case = prostate_cases[0]
    env = make(policy, [case])
    ptv, rectum = case.structures["PTV60"], case.structures["Rectum"]
    base, kls = final_dose(env, 0, None)
    # unguided steps are the pretrained steps (up to the rounding of x̂0 -> ε -> x̂0)
    assert kls == pytest.approx([0.0] * STEPS, abs=1e-5)
    up, kls_up = final_dose(env, 0, "targets")
    assert min(kls_up) > 0 and up[ptv].mean() > base[ptv].mean()
    down, _ = final_dose(env, 0, "oar_rectum_bladder")
    assert down[rectum].mean() < base[rectum].mean()
    check_env(env.unwrapped)
