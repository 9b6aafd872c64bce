"""The environments on a CUDA device (skipped without one)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import dosegym  # noqa: F401
from dosegym.envs.denoise import DenoiseDoseVectorEnv
from dosegym.scorecards import GROUP_NAMES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_policy(tiny_model_config):
    from dosegym.diffusion import Any2Any, DosePolicy

    torch.manual_seed(0)
    return DosePolicy(Any2Any(tiny_model_config), device="cuda")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_denoise_on_cuda_reproduces_predict(backend, cuda_policy, prostate_cases):
    env = gym.make(
        "dosegym/DenoiseDose-v0",
        policy=cuda_policy,
        cases=prostate_cases[:1],
        steps=4,
        device="cuda",
        obs_backend=backend,
        disable_env_checker=True,
    )
    u = env.unwrapped
    obs, info = env.reset(seed=2)
    if backend == "torch":
        assert obs["x_t"].is_cuda and obs["cond_targets"].is_cuda
    done = False
    while not done:
        mean, std = u.policy_step(obs)
        obs, reward, done, _, final = env.step(mean + std * u.sample_noise())
    dose = cuda_policy.predict(prostate_cases[0], steps=4, seed=info["sampler_seed"], eta=cuda_policy.eta)
    expected = u.case_data(0).card.score(prostate_cases[0], dose).normalised
    assert reward == pytest.approx(expected, abs=1e-6)


def test_guided_bandit_and_vector_on_cuda(cuda_policy, prostate_cases):
    guided = gym.make(
        "dosegym/GuidedDose-v0", policy=cuda_policy, cases=prostate_cases, steps=3, device="cuda"
    )
    guided.reset(seed=0)
    done = False
    while not done:
        _, reward, done, _, info = guided.step(np.ones(len(GROUP_NAMES), np.float32))
    assert np.isfinite(reward) and info["kl"] > 0

    bandit = gym.make("dosegym/ScorecardBandit-v0", policy=cuda_policy, cases=prostate_cases, steps=2)
    bandit.reset(seed=0)
    x = torch.full((1, *bandit.action_space.shape), 0.9, device="cuda", requires_grad=True)
    bandit.unwrapped.soft_score(x).sum().backward()
    assert x.grad is not None and x.grad.is_cuda and float(x.grad.abs().sum()) > 0

    venv = DenoiseDoseVectorEnv(num_envs=4, policy=cuda_policy, cases=prostate_cases, steps=2, device="cuda")
    obs, _ = venv.reset(seed=0)
    for _ in range(2):
        mean, std = venv.policy_step(obs)
        obs, rewards, done, _, _ = venv.step(mean + std * venv.sample_noise())
    assert done.all() and np.isfinite(rewards).all()
