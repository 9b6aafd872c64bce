"""PPO through SB3 on DenoiseDose: the policy's step, its value head, learn, save/load, resume, memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_env

from dosegym.agents import get
from dosegym.agents.ppo import PPO, rollout_buffer_bytes
from dosegym.agents.sb3_env import numpy_obs
from dosegym.diffusion.schedulers import gaussian_log_prob
from dosegym.errors import AgentError

CFG = {"samples_per_iteration": 2, "sample_num_steps": 4, "batch_size": 4, "seed": 3}


def make_agent(env, policy, **over) -> PPO:
    with torch.random.fork_rng():
        torch.manual_seed(1)  # the LoRA adapters' initial weights
        return PPO(env, policy, {**CFG, **over})


def as_torch(obs):
    return {k: torch.as_tensor(v) for k, v in numpy_obs(obs).items()}


def perturb_adapters(agent: PPO) -> None:
    """Non-zero LoRA B matrices, so that the trainable model differs from the pretrained one."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in agent.policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def lora_state(agent: PPO) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in agent.policy.model.state_dict().items() if "lora_" in k}


def test_log_prob_equals_dose_policy_step(env, tiny_policy):
    agent = make_agent(env, tiny_policy)
    agent.setup_training(1)
    perturb_adapters(agent)
    sb3, vec = agent.model.policy, agent.vec_env
    obs = vec.reset()
    timesteps = agent.policy.timesteps(CFG["sample_num_steps"])
    for k in range(3):  # the first step and later ones
        o = as_torch(obs)
        with torch.no_grad():
            actions, _, logp = sb3(o)
            _, logp_eval, entropy = sb3.evaluate_actions(o, actions.reshape(actions.shape[0], -1))
            mean, std = agent.policy.step_distribution(o["x_t"], timesteps[k], vec.core.chain.cond)
        expected = agent.policy.log_prob(actions, mean, std)
        torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(logp_eval, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(sb3.last_gaussian[0], mean, rtol=0, atol=1e-6)
        assert torch.equal(sb3.last_gaussian[1].reshape(-1), std.reshape(-1))
        # element-averaged, not summed: a per-voxel-sized number
        assert abs(float(expected[0])) < 10
        torch.testing.assert_close(entropy, 0.5 * math.log(2 * math.pi * math.e) + torch.log(std.reshape(-1)))
        pretrained_mean = vec.core.chain.distribution().mean
        assert not torch.allclose(mean, pretrained_mean, atol=1e-4)  # the trainable model acts
        obs, *_ = vec.step(actions.numpy())


def test_deterministic_step_has_log_prob_zero():
    from dosegym.agents.sb3_policy import ElementMeanGaussian

    mean = torch.zeros(2, 1, 2, 2, 2)
    dist = ElementMeanGaussian().proba_distribution(mean, torch.tensor([0.5, 0.0]).reshape(2, 1, 1, 1, 1))
    x = torch.ones(2, 8)
    lp = dist.log_prob(x)
    assert lp[1] == 0 and torch.isclose(
        lp[0], gaussian_log_prob(x[:1].reshape(1, 1, 2, 2, 2), mean[:1], 0.5)[0]
    )
    assert dist.entropy()[1] == 0


def test_value_head_trains_and_only_adapters_and_value_head_train(env, tiny_policy):
    agent = make_agent(env, tiny_policy)
    agent.setup_training(1)
    sb3 = agent.model.policy
    trainable = {id(p) for g in sb3.optimizer.param_groups for p in g["params"]}
    head = {id(p) for p in sb3.value_head().parameters()}
    lora = {id(p) for n, p in agent.policy.model.named_parameters() if "lora_" in n}
    assert trainable == head | lora
    assert all(not p.requires_grad for n, p in agent.policy.model.named_parameters() if "lora_" not in n)
    vec = agent.vec_env
    batch = [as_torch(vec.reset())]
    for _ in range(3):
        obs, *_ = vec.step(sb3(batch[-1])[0].detach().numpy())
        batch.append(as_torch(obs))
    obs = {k: torch.cat([b[k] for b in batch]) for k in batch[0]}
    target = torch.linspace(-1.0, 2.0, obs["x_t"].shape[0])[:, None]
    opt = torch.optim.Adam(sb3.value_head().parameters(), lr=1e-2)
    before = lora_state(agent)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(sb3.predict_values(obs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    assert all(torch.equal(v, lora_state(agent)[k]) for k, v in before.items())


def test_learn_save_load_identical_predictions(env, tiny_policy, headneck28, tmp_path):
    agent = make_agent(env, tiny_policy)
    before = lora_state(agent)
    infos = []
    agent.learn(4, callback=lambda a, info: infos.append(info))
    assert [i["iteration"] for i in infos] == [1, 2] and agent.samples_trained == 4
    for info in infos:
        for key in ("reward_mean", "score_mean", "loss", "grad_norm", "lr", "tied_fraction", "reward_std"):
            assert math.isfinite(info[key]), key
        assert math.isnan(info["kl_mean"])  # w_kl = 0: the frozen model never ran for a KL
        assert 0 <= info["score_mean"] <= 1 and math.isfinite(info["mae_gy"])
    assert any(not torch.equal(v, lora_state(agent)[k]) for k, v in before.items())
    agent.save(tmp_path / "ppo")
    assert (tmp_path / "ppo" / "value_head.safetensors").is_file()
    loaded = PPO.load(tmp_path / "ppo", env=env, policy=tiny_policy)
    np.testing.assert_array_equal(loaded.predict(headneck28, seed=5), agent.predict(headneck28, seed=5))
    state = loaded.value_head_state()
    assert state is not None
    assert all(torch.equal(v, state[k]) for k, v in agent.value_head_state().items())


def test_callback_false_stops(env, tiny_policy):
    agent = make_agent(env, tiny_policy)
    agent.learn(6, callback=lambda a, info: False)
    assert agent.iteration == 1


def test_kl_is_charged_with_w_kl(tiny_policy):
    env = make_env(tiny_policy)
    agent = make_agent(env, tiny_policy, reward={"w_kl": 0.5})
    infos = []
    agent.learn(2, callback=lambda a, info: infos.append(info))
    assert math.isfinite(infos[0]["kl_mean"]) and infos[0]["kl_mean"] >= 0
    env.close()


def test_resume_continues_exactly(tiny_policy, tmp_path):
    env_a, env_b = make_env(tiny_policy), make_env(tiny_policy)
    straight = make_agent(env_a, tiny_policy)
    straight.learn(4)
    first = make_agent(env_b, tiny_policy)
    first.learn(2)
    first.save(tmp_path / "run", training_state=True)
    resumed = PPO.load(tmp_path / "run", env=env_b, policy=tiny_policy, resume=True)
    assert resumed.iteration == 1
    resumed.learn(2)
    assert resumed.iteration == 2 and len(resumed.curves) == 2
    same = [k for k in straight.curves[1] if k != "wall_s"]
    assert np.allclose(
        [resumed.curves[1][k] for k in same],
        [straight.curves[1][k] for k in same],
        rtol=0,
        atol=0,
        equal_nan=True,
    )
    want, got = lora_state(straight), lora_state(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert all(torch.equal(v, resumed.value_head_state()[k]) for k, v in straight.value_head_state().items())
    env_a.close()
    env_b.close()


def test_memory_formula_matches_sb3_buffer(env, tiny_policy):
    agent = make_agent(env, tiny_policy)
    agent.setup_training(1)
    buf, core = agent.model.rollout_buffer, agent.vec_env.core
    held = sum(a.nbytes for a in buf.observations.values()) + buf.actions.nbytes
    held += sum(
        getattr(buf, k).nbytes
        for k in ("rewards", "returns", "episode_starts", "values", "log_probs", "advantages")
    )
    obs_space, act_space = core.single_observation_space, core.single_action_space
    transitions = agent.n_steps() * agent.num_envs()
    per = held // transitions
    largest = 4 * 8 * int(np.prod(obs_space["x_t"].shape))  # the 8 OAR channels
    assert (
        rollout_buffer_bytes(obs_space, act_space, transitions, 4) == held + transitions * largest + 4 * per
    )


def test_too_large_buffer_is_refused_before_allocation(env, tiny_policy):
    with pytest.raises(AgentError, match=r"rollout buffer would need \d+ bytes .* are available"):
        make_agent(env, tiny_policy, samples_per_iteration=4_000_000)


def test_n_steps_must_make_whole_episodes(env, tiny_policy):
    with pytest.raises(AgentError, match="valid: n_steps=4 or None"):
        make_agent(env, tiny_policy, n_steps=3)


def test_registry_names():
    from dosegym.agents.sb3_guided import PPOGuided, SACGuided

    assert get("ppo") is PPO and get("ppo_guided") is PPOGuided and get("sac_guided") is SACGuided
