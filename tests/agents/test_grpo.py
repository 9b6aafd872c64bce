"""GRPO: group-relative advantages (ties included), the trained steps, the KL, ratio norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_env

import dosegym.agents.ddpo as ddpo_mod
from dosegym.agents import get
from dosegym.agents.stat_tracking import group_advantages
from dosegym.errors import AgentError

FAST = {"samples_per_iteration": 4, "sample_num_steps": 4, "train_batch_size": 2, "learning_rate": 1e-3,
        "samples_per_case": 2}  # fmt: skip


@pytest.fixture()
def genv(tiny_policy):
    e = make_env(tiny_policy, obs_backend="torch", pretrained_log_prob=False, reward={"w_fid": 1.0},
                 cases="phantoms:headneck/train")  # fmt: skip
    yield e
    e.close()


def test_group_advantages_hand_computed_with_ties():
    keys = ["a", "a", "a", "b", "b", "c", "d", "d"]
    r = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 7.0, 0.0, 4.0])
    adv = group_advantages(keys, r)
    std_a = math.sqrt(2 / 3)  # population std of 1, 2, 3
    np.testing.assert_allclose(adv[:3], [-1 / (std_a + 1e-6), 0.0, 1 / (std_a + 1e-6)])
    assert adv[3] == adv[4] == 0.0  # a tied group teaches nothing
    assert adv[5] == 0.0  # a group of one sample too
    np.testing.assert_allclose(adv[6:], [-2 / (2 + 1e-6), 2 / (2 + 1e-6)])
    with pytest.raises(AgentError, match="3 case keys for 2 rewards"):
        group_advantages(["a", "b", "c"], np.zeros(2))


def test_config_checks():
    Config = get("grpo").Config
    assert Config().kl_weight > 0 and Config().per_prompt_stat_tracking is False
    for bad, match in (({"mode": "sf"}, "mode must be 'is'"), ({"samples_per_case": 1}, "must be >= 2"),
                       ({"train_last_k": 30}, "exceeds sample_num_steps")):  # fmt: skip
        with pytest.raises(AgentError, match=match):
            Config.coerce(bad)


def test_last_k_steps_train_and_the_kl_runs(tiny_policy, genv, monkeypatch):
    trained = []
    real = ddpo_mod.step_gaussian

    def spy(model, scheduler, x, t, cond, eta):
        if torch.is_grad_enabled():
            trained.append(int(t.reshape(-1)[0]))
        return real(model, scheduler, x, t, cond, eta)

    monkeypatch.setattr(ddpo_mod, "step_gaussian", spy)
    agent = get("grpo")(genv, tiny_policy, {**FAST, "train_last_k": 2, "kl_weight": 0.1})
    infos = []
    agent.learn(4, callback=lambda a, i: infos.append(i))
    timesteps = genv.core.chain.timesteps.tolist()
    assert set(trained) == set(timesteps[-2:])  # only the last 2 chain steps, for every sample
    assert len(trained) == 2 * 2  # 2 minibatches of 2 samples x 2 steps
    assert math.isfinite(infos[0]["kl_mean"]) and infos[0]["kl_mean"] >= 0
    assert 0.0 <= infos[0]["tied_fraction"] <= 1.0


def test_ratio_norm_centres_the_log_ratios(tiny_policy, genv):
    agent = get("grpo")(genv, tiny_policy, {**FAST, "ratio_norm": True})
    logp, old = torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.1])
    shifted = agent.old_log_prob(logp, old)
    assert float((logp - shifted).mean()) == pytest.approx(0.0, abs=1e-7)
    plain = get("grpo")(genv, tiny_policy, FAST)
    assert torch.equal(plain.old_log_prob(logp, old), old)


def test_learn_updates_and_save_load_predicts_the_same(tiny_policy, genv, headneck28, tmp_path):
    agent = get("grpo")(genv, tiny_policy, FAST)
    before = agent.predict(headneck28, seed=1)
    agent.learn(8)
    assert len(agent.curves) == 2 and all(math.isfinite(c["reward_mean"]) for c in agent.curves)
    agent.save(tmp_path / "g")
    back = get("grpo").load(tmp_path / "g", env=genv, policy=tiny_policy)
    np.testing.assert_array_equal(agent.predict(headneck28, seed=1), back.predict(headneck28, seed=1))
    assert not np.array_equal(before, agent.predict(headneck28, seed=1))
