"""Stock SB3 PPO and SAC on GuidedDose: features, learn, the frozen denoiser, save/load, predict."""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
import torch

from dosegym.agents.base import weights_fingerprint
from dosegym.agents.sb3_guided import GuidedFeatures, PPOGuided, SACGuided
from dosegym.errors import AgentError

CASES = {
    PPOGuided: {"batch_size": 8, "n_epochs": 2},
    SACGuided: {"learning_starts": 0, "batch_size": 8, "buffer_size": 1000},
}


@pytest.fixture()
def guided_env(tiny_policy):
    env = gymnasium.make_vec(
        "dosegym/GuidedDose-v0",
        num_envs=2,
        vectorization_mode="vector_entry_point",
        policy=tiny_policy,
        scorecard="phantom_headneck",
        steps=4,
        cases="phantoms:headneck/28",
    )
    yield env
    env.close()


def make(cls, env, policy, **over):
    return cls(
        env, policy, {"samples_per_iteration": 2, "sample_num_steps": 4, "seed": 2, **CASES[cls], **over}
    )


def test_features_keep_the_pooled_volumes(guided_env):
    space = guided_env.single_observation_space
    feats = GuidedFeatures(space, pool=4, volume_channels=2, channels=3)
    obs = {
        k: torch.as_tensor(np.stack([s.sample() for _ in range(5)])).float() for k, s in space.spaces.items()
    }
    out = feats(obs)
    assert out.shape == (5, feats.features_dim) == (5, 3 * 64 + 1 + space["scores"].shape[0])
    torch.testing.assert_close(out[:, -space["scores"].shape[0] :], obs["scores"])
    with pytest.raises(AgentError, match="volume_channels 2 x pool 3"):
        GuidedFeatures(space, pool=3, volume_channels=2)


@pytest.mark.parametrize("cls", [PPOGuided, SACGuided])
def test_learn_save_load_predict(cls, guided_env, tiny_policy, headneck28, tmp_path):
    fingerprint = weights_fingerprint(tiny_policy.model)
    agent = make(cls, guided_env, tiny_policy)
    assert agent.policy is tiny_policy and agent.parameters() == []  # the denoiser stays frozen
    infos = []
    agent.learn(4, callback=lambda a, info: infos.append(info))
    assert [i["iteration"] for i in infos] == [1, 2]
    for info in infos:
        for key in ("reward_mean", "score_mean", "kl_mean", "loss", "grad_norm", "mae_gy"):
            assert math.isfinite(info[key]), key
    assert weights_fingerprint(tiny_policy.model) == fingerprint
    dose = agent.predict(headneck28, seed=4)
    assert dose.shape == headneck28.grid.shape and dose.dtype == np.float32 and np.isfinite(dose).all()
    np.testing.assert_array_equal(agent.predict(headneck28, seed=4), dose)  # deterministic given the seed
    agent.save(tmp_path / "agent")
    assert (tmp_path / "agent" / "sb3_model.zip").is_file()
    assert not (tmp_path / "agent" / "adapter.safetensors").exists()
    loaded = cls.load(tmp_path / "agent", env=guided_env, policy=tiny_policy)
    np.testing.assert_array_equal(loaded.predict(headneck28, seed=4), dose)
    assert loaded.iteration == 2 and loaded.samples_trained == 4  # the count goes on (new seeds)
    loaded.learn(2)  # a loaded agent trains on
    assert loaded.iteration == 3


def test_sac_without_updates_reports_no_loss(guided_env, tiny_policy):
    agent = make(SACGuided, guided_env, tiny_policy, learning_starts=1000)
    infos = []
    agent.learn(2, callback=lambda a, info: infos.append(info))
    assert "loss" not in infos[0] and "grad_norm" not in infos[0]


def test_predict_before_learning_is_the_unguided_model(guided_env, tiny_policy, headneck28):
    agent = make(PPOGuided, guided_env, tiny_policy)
    dose = agent.predict(headneck28, seed=1)  # no SB3 model yet: every weight -1, no guidance
    assert np.isfinite(dose).all() and dose.shape == headneck28.grid.shape
    np.testing.assert_array_equal(agent.predict(headneck28, seed=1), dose)
    assert not np.array_equal(agent.predict(headneck28, seed=2), dose)


def test_needs_a_guided_env(env, tiny_policy):
    with pytest.raises(AgentError, match="runs on GuidedDose"):
        make(PPOGuided, env, tiny_policy).learn(2)


@pytest.mark.parametrize("cls", [PPOGuided, SACGuided])
def test_the_config_guidance_scale_reaches_rollouts_and_predictions(cls, guided_env, tiny_policy, headneck28):
    unguided = make(cls, guided_env, tiny_policy).predict(headneck28, seed=1)
    infos = []
    none = make(cls, guided_env, tiny_policy, guidance_scale=0.0)
    none.learn(2, callback=lambda a, info: infos.append(info))
    assert math.isfinite(infos[0]["reward_mean"])
    np.testing.assert_array_equal(none.predict(headneck28, seed=1), unguided)  # scale 0: actions do nothing
    strong = make(cls, guided_env, tiny_policy, guidance_scale=2.0)
    strong.learn(2)
    assert float(np.abs(strong.predict(headneck28, seed=1) - unguided).max()) > 0.1


def test_ppo_log_std_init_reaches_the_policy(guided_env, tiny_policy):
    """The config's initial log std is SB3's: exploration noise std exp(-1) on every weight."""
    agent = make(PPOGuided, guided_env, tiny_policy, log_std_init=-1.0)
    agent.learn(2)
    log_std = agent.model.policy.log_std.detach()
    assert log_std.shape == (guided_env.single_action_space.shape[0],)
    assert torch.allclose(log_std, torch.full_like(log_std, -1.0), atol=0.05)  # one small update since
