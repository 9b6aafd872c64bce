"""ScorecardBandit-v0: the reward of a whole dose, and a reward-hacking demonstration."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import dosegym  # noqa: F401
from dosegym.errors import EnvError
from dosegym.scorecards import load_card


def make(policy, cases, **kw):
    return gym.make(
        "dosegym/ScorecardBandit-v0", policy=policy, cases=cases, steps=2, disable_env_checker=True, **kw
    )


def test_reward_is_the_score_of_the_decoded_action(tiny_policy, pt108):
    env = make(tiny_policy, [pt108])
    u = env.unwrapped
    obs, info = env.reset(seed=0)
    assert set(obs) == set(env.observation_space.spaces) and "x_t" not in obs
    action = u.case_data(0).model_input.tensors["dose"].numpy()  # the reference, 1.0 = Rx
    _, reward, terminated, truncated, info = env.step(action)
    assert terminated and not truncated
    case = u.case_data(0).case
    dose = u.case_data(0).resampler.decode(torch.from_numpy(action)[None, 0])[0].numpy()
    assert reward == load_card("headneck_rtog").score(case, dose).normalised
    with pytest.raises(EnvError, match="ended"):
        env.step(action)


def test_actions_outside_the_dose_box_are_rejected(tiny_policy, prostate_cases):
    env = make(tiny_policy, prostate_cases[:1], max_dose=1.5)
    env.reset(seed=0)
    shape = env.action_space.shape
    with pytest.raises(EnvError, match="outside"):
        env.step(np.full(shape, -0.1, np.float32))
    with pytest.raises(EnvError, match="outside"):
        env.step(np.full(shape, 1.6, np.float32))
    with pytest.raises(EnvError, match="shape"):
        env.step(np.zeros((2, *shape), np.float32))


def test_pretrained_anchor_without_a_reference(tiny_policy, prostate_cases):
    env = make(tiny_policy, prostate_cases[:1], reward={"w_fid": 1.0, "baseline_samples": 2})
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert info["fidelity_anchor"] == "pretrained" and "reference_mae_gy" not in info
    # a zero dose is as far from the pretrained mean dose as that dose's mean over the body
    mean_gy = env.unwrapped.pretrained_stats(env.unwrapped.case_data(0))[1]
    body = torch.from_numpy(prostate_cases[0].body)
    assert info["fidelity_mae_gy"] == pytest.approx(float(mean_gy[body].mean()), rel=1e-5)
    assert reward == pytest.approx(info["score_normalised"] - info["fidelity_mae_gy"] / 60.0)


def test_reward_only_optimiser_hacks_the_score(tiny_policy, pt108):
    """Gradient ascent on the soft scorecard alone, from the reference dose of a real patient,
    raises the exact score while the dose moves away from the physical reference (fidelity
    worsens; here it drops the target dose wherever the card has nothing more to take). With
    the fidelity term in the reward, the hacked dose earns less than the reference."""
    env = make(tiny_policy, [pt108], reward={"w_fid": 1.0, "fidelity": "reference"})
    u = env.unwrapped
    env.reset(seed=0)
    start = u.case_data(0).model_input.tensors["dose"][None].clone()
    _, reward0, _, _, info0 = env.step(start[0].numpy())
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        (-u.soft_score(x).sum()).backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, u.max_dose)
    env.reset(seed=0)
    _, reward1, _, _, info1 = env.step(x.detach()[0].numpy())
    assert info1["score_normalised"] > info0["score_normalised"]  # the score went up ...
    assert info1["reference_mae_gy"] > 1.5 * info0["reference_mae_gy"]  # ... away from physics
    assert reward1 < reward0  # and the fidelity term stops it
    ptv = u.case_data(0).case.structures["PTV70"]
    dose1 = u.decode(u.case_data(0), x.detach()[0]).numpy()
    assert dose1[ptv].mean() < 0.9 * u.case_data(0).case.dose[ptv].mean()  # target underdosed
