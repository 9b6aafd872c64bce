"""DiffusionNFT: the loss by hand, optimality, the update's direction, save and load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_bandit

from dosegym import agents
from dosegym.agents.nft import nft_loss, optimality
from dosegym.errors import AgentError


def bandit(policy):
    return make_bandit(policy, num_envs=4, cases="phantoms:headneck/train")


FAST = {"samples_per_iteration": 4, "sample_num_steps": 3, "samples_per_case": 2, "learning_rate": 1e-2,
        "timesteps_per_sample": 1, "train_batch_size": 2}  # fmt: skip


def test_loss_hand_computed():
    x0 = torch.zeros(2, 1, 1, 1, 2)
    old = torch.tensor([1.0, 1.0, 2.0, 0.0]).reshape(2, 1, 1, 1, 2)
    theta = torch.tensor([2.0, 0.0, 2.0, 2.0]).reshape(2, 1, 1, 1, 2)
    r = torch.tensor([1.0, 0.25])
    beta = 0.5
    # sample 0: pos = old + 0.5 (theta - old) = (1.5, 0.5) -> mean sq 1.25; weight r = 1
    # sample 1: pos = (2, 1) -> 2.5; neg = old - 0.5 (theta - old) = (2, -1) -> 2.5
    expected = (1.25 + (0.25 * 2.5 + 0.75 * 2.5)) / 2
    assert float(nft_loss(theta, old, x0, r, beta)) == pytest.approx(expected)
    # at theta == old both implicit policies are the old one: the loss is its error, weights aside
    assert float(nft_loss(old, old, x0, r, beta)) == pytest.approx(
        float(((old - x0) ** 2).flatten(1).mean(1).mean())
    )
    np.testing.assert_allclose(
        optimality(np.array([-4.0, -1.0, 0.0, 1.0, 3.0]), 2.0), [0, 0.25, 0.5, 0.75, 1.0]
    )


def test_the_gradient_pulls_toward_good_samples_and_away_from_bad():
    """At theta == old, d loss / d x̂0_θ = 2 beta (2r - 1) (x̂0_old - x0) / N: descent moves
    x̂0_θ toward a sample with r > 1/2 and away from one with r < 1/2."""
    x0 = torch.zeros(2, 1, 1, 1, 1)
    old = torch.ones(2, 1, 1, 1, 1)
    theta = old.clone().requires_grad_(True)
    nft_loss(theta, old, x0, torch.tensor([0.9, 0.1]), 1.0).backward()
    g = theta.grad.flatten()
    assert g[0] > 0 and g[1] < 0  # descent: sample 0's x̂0 falls toward its x0 = 0, sample 1's rises away
    assert float(g[0]) == pytest.approx(2 * 1.0 * (2 * 0.9 - 1) * 1.0 / 2)


def test_learn_runs_on_a_deterministic_sampler_and_save_load_predicts_the_same(
    tiny_policy, headneck28, tmp_path
):
    env = bandit(tiny_policy)
    agent = agents.get("nft")(env, tiny_policy, FAST)
    assert agent.config.sample_eta == 0.0
    before = agent.predict(headneck28, seed=2)
    agent.learn(8)
    assert len(agent.curves) == 2
    for c in agent.curves:
        assert math.isfinite(c["reward_mean"]) and math.isfinite(c["loss"]) and 0 <= c["optimality_mean"] <= 1
    after = agent.predict(headneck28, seed=2)
    assert not np.array_equal(before, after)
    agent.save(tmp_path / "n")
    back = agents.load(tmp_path / "n", env=env, policy=tiny_policy)
    np.testing.assert_array_equal(after, back.predict(headneck28, seed=2))
    env.close()


def test_full_weights_keep_a_frozen_old_policy(tiny_policy):
    env = bandit(tiny_policy)
    agent = agents.get("nft")(env, tiny_policy, {**FAST, "train": "full"})
    agent.learn(4)
    assert math.isfinite(agent.curves[0]["loss"])
    env.close()


def test_bad_setups_are_refused(tiny_policy, env):
    with pytest.raises(AgentError, match="ScorecardBandit vector env"):
        agents.get("nft")(env, tiny_policy, {**FAST, "samples_per_iteration": 2}).learn(2)
    with pytest.raises(AgentError, match="timestep_range"):
        agents.get("nft").Config.coerce({"timestep_range": (0.5, 0.2)})
