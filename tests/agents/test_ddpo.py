"""DDPO and the shared training machinery on the tiny model (16^3, 4 steps, 2 envs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_env

import dosegym.agents.ddpo as ddpo_mod
from dosegym.agents import get
from dosegym.agents.base import weights_fingerprint
from dosegym.agents.ddpo import DDPO, DDPOConfig, clip_advantages, ddpo_loss, tied_fraction
from dosegym.agents.rollout import collect, step_gaussian
from dosegym.agents.stat_tracking import PerCaseStatTracker, batch_advantages
from dosegym.errors import AgentError

#: Fidelity makes every episode's reward differ (the tiny random model's scores often tie).
REWARD = {"w_fid": 1.0}
FAST = {"samples_per_iteration": 4, "sample_num_steps": 4, "train_batch_size": 2, "learning_rate": 1e-3}


def ddpo_env(policy, **kw):
    kw.setdefault("reward", REWARD)
    kw.setdefault("pretrained_log_prob", False)
    return make_env(policy, obs_backend="torch", **kw)


@pytest.fixture()
def denv(tiny_policy):
    e = ddpo_env(tiny_policy)
    yield e
    e.close()


def lora_state(agent) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in agent.policy.model.state_dict().items() if "lora_" in k}


# -- the loss, by hand ----------------------------------------------------------------------
def test_is_loss_ratio_one_on_unchanged_policy():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, st = ddpo_loss(logp, logp.detach().clone(), adv, "is", 1e-4)
    assert torch.equal(st["ratio"], torch.ones(3))
    assert float(loss.detach()) == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert float(st["clipfrac"]) == 0.0
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 3)  # d(-A r)/dlogp = -A r / B at r = 1


def test_is_clipping_engages_exactly_where_it_should():
    eps = 0.1
    old = torch.zeros(4)
    # ratios 1.2 (above 1 + eps), 0.8 (below 1 - eps), 1.05 (inside), 1.2
    logp = torch.log(torch.tensor([1.2, 0.8, 1.05, 1.2])).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, st = ddpo_loss(logp, old, adv, "is", eps)
    # per sample max(-A r, -A clip(r)): A>0, r=1.2 -> -1.1 (clipped); A>0, r=0.8 -> -0.8
    # (unclipped: the pessimistic one); inside -> -1.05; A<0, r=1.2 -> 1.2 (unclipped)
    assert float(loss.detach()) == pytest.approx((-1.1 - 0.8 - 1.05 + 1.2) / 4, abs=1e-6)
    assert float(st["clipfrac"]) == pytest.approx(0.75)
    loss.backward()
    expected = torch.tensor([0.0, -0.8, -1.05, 1.2]) / 4  # no gradient where the clip is active
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_sf_loss_is_reinforce():
    logp = torch.tensor([-1.0, -3.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = ddpo_loss(logp, torch.zeros(2), adv, "sf", 1e-4)
    assert float(loss.detach()) == pytest.approx(-(2.0 * -1.0 + -1.0 * -3.0) / 2)
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 2)
    with pytest.raises(AgentError, match="valid: \\['is', 'sf'\\]"):
        ddpo_loss(logp, torch.zeros(2), adv, "ppo", 1e-4)


def test_advantage_clipping_and_tied_fraction():
    assert clip_advantages(np.array([-9.0, -1.0, 0.0, 6.0]), 5.0).tolist() == [-5.0, -1.0, 0.0, 5.0]
    keys = ["a", "a", "b", "b", "c"]
    assert tied_fraction(keys, np.array([1.0, 1.0, 0.5, 0.7, 3.0])) == 0.5  # "c" alone: not a group
    assert math.isnan(tied_fraction(["a", "b"], np.array([1.0, 2.0])))


def test_per_case_stat_tracker_hand_computed():
    tr = PerCaseStatTracker(buffer_size=3, min_count=2)
    # batch 1: case "a" has 1 reward (< min_count): normalised by the batch (mean 2, std 1)
    adv = tr.update(["a", "b", "b"], np.array([1.0, 2.5, 2.5]))
    batch_std = np.std([1.0, 2.5, 2.5])
    assert adv[0] == pytest.approx((1.0 - 2.0) / (batch_std + 1e-6))
    assert adv[1:] == pytest.approx([0.0, 0.0])  # "b": its own 2 rewards, std 0
    # batch 2: "a" now holds [1, 3] -> mean 2, std 1; "b" buffer [2.5, 2.5, 4.5] (size 3)
    adv = tr.update(["a", "b"], np.array([3.0, 4.5]))
    assert adv[0] == pytest.approx((3.0 - 2.0) / (1.0 + 1e-6))
    b = np.array([2.5, 2.5, 4.5])
    assert adv[1] == pytest.approx((4.5 - b.mean()) / (b.std() + 1e-6))
    tr.update(["b"], np.array([0.0]))  # pushes the oldest 2.5 out
    assert list(tr.stats["b"]) == [2.5, 4.5, 0.0]
    state = tr.state_dict()
    other = PerCaseStatTracker(3, 2)
    other.load_state_dict(state)
    assert other.stats == tr.stats
    with pytest.raises(AgentError, match="does not fit"):
        PerCaseStatTracker(4, 2).load_state_dict(state)
    with pytest.raises(AgentError, match="min_count"):
        PerCaseStatTracker(2, 3)
    r = np.array([1.0, 2.0, 3.0])
    assert batch_advantages(r) == pytest.approx((r - 2.0) / (np.std(r) + 1e-8))


# -- config -----------------------------------------------------------------------------------
def test_config_checks_and_yaml_round_trip():
    c = DDPOConfig(**FAST, mode="sf", kl_weight=0.1, reward={"score": "dense", "dense_temperature_gy": 1.5})
    assert DDPOConfig.from_yaml(c.to_yaml()) == c
    with pytest.raises(AgentError, match="multiple of train_batch_size 3"):
        DDPOConfig.coerce({"samples_per_iteration": 4, "train_batch_size": 3})
    with pytest.raises(AgentError, match="gradient_accumulation_steps 3"):
        DDPOConfig.coerce(
            {"samples_per_iteration": 4, "train_batch_size": 2, "gradient_accumulation_steps": 3}
        )
    with pytest.raises(AgentError, match="valid fields"):
        DDPOConfig.coerce({"train_cliprange": 0.1})
    assert get("ddpo") is DDPO


def test_from_trl_dict_maps_and_refuses_with_reasons():
    c = DDPOConfig.from_trl(
        {
            "sample_num_steps": 10,
            "sample_batch_size": 2,
            "sample_num_batches_per_epoch": 4,
            "train_batch_size": 2,
            "train_learning_rate": 3e-4,
            "train_clip_range": 2e-4,
            "per_prompt_stat_tracking": False,
            "train_adam_beta1": 0.9,
            "mixed_precision": "no",
        }
    )
    assert (c.sample_num_steps, c.samples_per_iteration, c.learning_rate) == (10, 8, 3e-4)
    assert (c.train_clip_range, c.per_prompt_stat_tracking, c.mixed_precision) == (2e-4, False, "no")
    with pytest.raises(AgentError) as exc:
        DDPOConfig.from_trl({"sample_guidance_scale": 5.0, "train_cfg": True, "mixed_precision": "fp16"})
    msg = str(exc.value)
    assert "sample_guidance_scale=5.0: dosegym's dose model has no classifier-free guidance" in msg
    assert "train_cfg=True" in msg and "mixed_precision='fp16': needs a GPU" in msg
    with pytest.raises(AgentError, match="AdamW"):
        DDPOConfig.from_trl({"train_adam_weight_decay": 0.1})
    with pytest.raises(AgentError, match="not a field of trl's DDPOConfig"):
        DDPOConfig.from_trl({"sample_steps": 10})
    assert DDPOConfig.from_trl({"mixed_precision": "fp16"}, device="cuda").mixed_precision == "fp16"


# -- rollouts -----------------------------------------------------------------------------------
def test_rollout_costs_one_trainable_forward_per_step(tiny_policy, denv):
    agent = DDPO(denv, tiny_policy, FAST)
    calls = {"trainable": 0, "frozen": 0}
    hooks = [
        agent.policy.model.register_forward_hook(
            lambda *a: calls.__setitem__("trainable", calls["trainable"] + 1)
        ),
        denv.core.chain.model.register_forward_hook(
            lambda *a: calls.__setitem__("frozen", calls["frozen"] + 1)
        ),
    ]
    try:
        ro = collect(denv, agent.policy, [11, 12], eta=1.0)
    finally:
        for h in hooks:
            h.remove()
    assert calls["trainable"] == 2 * 4  # 2 batches x 4 steps, B = 2 per forward
    assert len(ro) == 4 and ro.x_t.shape == (4, 4, 1, 16, 16, 16) and ro.x_t.dtype == torch.float32
    assert ro.x_t.device.type == "cpu" and torch.equal(ro.x_t[:, 1:], ro.x_prev[:, :-1])
    assert np.isfinite(ro.rewards).all() and np.isfinite(ro.reference_mae_gy).all()
    assert ro.case_keys == ["phantoms:headneck/28"] * 4 and np.isnan(ro.kl).all()
    # the stored log-prob is the acting policy's density of the stored action
    with torch.no_grad():
        cond = ro.conditions([0], tiny_policy.device)
        mean, std = step_gaussian(agent.policy.model, denv.core.chain.scheduler, ro.x_t[:1, 2],
                                  ro.timesteps[2], cond, 1.0)  # fmt: skip
    assert float(((ro.x_prev[:1, 2] - mean) / std).std()) == pytest.approx(1.0, abs=0.05)
    assert calls["frozen"] == 0  # w_kl = 0, reference fidelity: the frozen model never runs


def test_rollout_tells_the_env_its_gaussian_only_when_kl_is_charged(tiny_policy):
    env = ddpo_env(tiny_policy, reward={"w_fid": 1.0, "w_kl": 0.5})
    agent = DDPO(env, tiny_policy, FAST)
    ro = collect(env, agent.policy, [3], eta=1.0)
    # the trainable copy starts as the base policy: KL ~ 0 at every step (LoRA B starts at 0)
    assert np.isfinite(ro.kl).all() and ro.kl == pytest.approx(0.0, abs=1e-6)
    env.close()


def test_seeds_make_rollouts_reproducible(tiny_policy, denv):
    agent = DDPO(denv, tiny_policy, FAST)
    a = collect(denv, agent.policy, [5], eta=1.0)
    b = collect(denv, agent.policy, [5], eta=1.0)
    c = collect(denv, agent.policy, [6], eta=1.0)
    assert torch.equal(a.x_prev, b.x_prev) and not torch.equal(a.x_prev, c.x_prev)
    assert agent.rollout_seed(0) != agent.rollout_seed(1)


# -- learning -----------------------------------------------------------------------------------
def test_update_moves_the_step_mean_along_the_advantage(tiny_policy, denv):
    """SF on hand-made actions x_{t-1} = mean + std/2 everywhere: a positive advantage pulls the
    step mean up towards them (more dose), a negative one pushes it down."""
    moved = {}
    for sign in (1.0, -1.0):
        agent = DDPO(denv, tiny_policy, {**FAST, "mode": "sf", "learning_rate": 1e-2})
        agent.setup_training(1)
        ro = collect(denv, agent.policy, [7, 8], eta=1.0)
        sched = denv.core.chain.scheduler
        cond = ro.conditions(range(4), tiny_policy.device)

        def step_means(ro=ro, agent=agent, sched=sched, cond=cond):
            with torch.no_grad():
                return torch.stack(
                    [step_gaussian(agent.policy.model, sched, ro.x_t[:, k], ro.timesteps[k], cond, 1.0)[0]
                     for k in range(4)], 1)  # fmt: skip

        before = step_means()
        std = torch.stack(
            [step_gaussian(agent.policy.model, sched, ro.x_t[:, k], ro.timesteps[k], cond, 1.0)[1]
             for k in range(4)], 1).detach()  # fmt: skip
        ro.x_prev = before + 0.5 * std
        agent.update(ro, np.full(4, sign))
        moved[sign] = float((step_means() - before).mean())
    assert moved[1.0] > 0 > moved[-1.0]


def test_learn_trains_only_the_adapters_and_logs_curves(tiny_policy, denv):
    base_fp = weights_fingerprint(tiny_policy.model)
    agent = DDPO(denv, tiny_policy, FAST)
    frozen_before = {k: v.clone() for k, v in agent.policy.model.state_dict().items() if "lora_" not in k}
    lora_before = lora_state(agent)
    infos = []
    agent.learn(8, callback=lambda a, info: infos.append(info))
    assert weights_fingerprint(tiny_policy.model) == base_fp  # the given policy never changes
    after = agent.policy.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    assert any(not torch.equal(after[k], v) for k, v in lora_before.items())
    assert [i["iteration"] for i in infos] == [1, 2] and agent.samples_trained == 8
    for key in ("reward_mean", "reward_std", "score_mean", "kl_mean", "mae_gy", "loss", "grad_norm",
                "tied_fraction", "lr", "wall_s", "samples"):  # fmt: skip
        assert key in infos[0]
    assert math.isfinite(infos[0]["grad_norm"]) and math.isfinite(infos[0]["mae_gy"])
    assert infos[0]["clipfrac"] < 1.0 and agent.curves == infos


def test_first_minibatch_ratio_is_one(tiny_policy, denv, monkeypatch):
    ratios = []
    real = ddpo_mod.ddpo_loss

    def spy(*a, **k):
        loss, st = real(*a, **k)
        ratios.append(st["ratio"])
        return loss, st

    monkeypatch.setattr(ddpo_mod, "ddpo_loss", spy)
    DDPO(denv, tiny_policy, FAST).learn(4)
    first = torch.cat(ratios[:4])  # the 4 trained steps of the first minibatch, before any update
    assert torch.allclose(first, torch.ones_like(first), atol=1e-5)


def test_budget_smaller_than_one_iteration_is_refused(tiny_policy, denv):
    with pytest.raises(AgentError, match="minimum is total_samples=4"):
        DDPO(denv, tiny_policy, FAST).learn(3)


def test_kl_penalty_and_dense_reward_run(tiny_policy):
    denv = ddpo_env(tiny_policy, reward={**REWARD, "score": "dense"})
    agent = DDPO(denv, tiny_policy, {**FAST, "kl_weight": 0.1})
    ro = collect(denv, agent.policy, [1], eta=1.0)
    exact_env = ddpo_env(tiny_policy)
    ro_exact = collect(exact_env, agent.policy, [1], eta=1.0)  # the same episodes, scored exactly
    assert np.array_equal(ro.score_normalised, ro_exact.score_normalised)
    assert np.isfinite(ro.rewards).all() and not np.allclose(ro.rewards, ro_exact.rewards)
    exact_env.close()
    infos = []
    agent.learn(4, callback=lambda a, i: infos.append(i))
    assert infos[0]["kl_mean"] >= 0.0 and math.isfinite(infos[0]["kl_mean"])  # the DPOK penalty's KL


# -- checkpoints ---------------------------------------------------------------------------------
def test_resume_continues_exactly(tiny_policy, tmp_path):
    cfg = {**FAST, "lr_schedule": "cosine", "per_prompt_stat_tracking_min_count": 2,
           "per_prompt_stat_tracking_buffer_size": 4}  # fmt: skip
    env = ddpo_env(tiny_policy)
    ckpt = tmp_path / "ckpt"

    def save_first(agent, info):
        if info["iteration"] == 1:
            agent.save(ckpt, training_state=True)

    straight = DDPO(env, tiny_policy, cfg)
    straight.learn(8, callback=save_first)
    resumed = DDPO.load(ckpt, env=env, policy=tiny_policy, resume=True)
    assert resumed.iteration == 1 and len(resumed.curves) == 1
    assert len(resumed.tracker.stats["phantoms:headneck/28"]) == 4  # the stat tracker came back
    resumed.learn(4)
    a, b = lora_state(straight), lora_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("wall_s",)
    np.testing.assert_equal(  # NaN (kl_mean without a KL) equals NaN here
        [{k: v for k, v in c.items() if k not in drop} for c in resumed.curves],
        [{k: v for k, v in c.items() if k not in drop} for c in straight.curves],
    )
    with pytest.raises(AgentError, match="training_state=True"):
        straight.save(tmp_path / "plain")
        DDPO.load(tmp_path / "plain", env=env, policy=tiny_policy, resume=True)
    env.close()


def test_save_load_identical_predictions(tiny_policy, denv, headneck28, tmp_path):
    agent = DDPO(denv, tiny_policy, FAST)
    agent.learn(4)
    agent.save(tmp_path / "a")
    loaded = DDPO.load(tmp_path / "a", policy=tiny_policy)
    assert loaded.samples_trained == 4 and loaded.iteration == 1
    assert np.array_equal(agent.predict(headneck28, seed=3), loaded.predict(headneck28, seed=3))


def test_nonfinite_reward_stops_with_diagnosis_and_keeps_last_checkpoint(
    tiny_policy, denv, tmp_path, monkeypatch
):
    import dosegym.agents.ddpo as ddpo_module

    agent = DDPO(denv, tiny_policy, FAST)
    ckpt = tmp_path / "last"
    real = ddpo_module.collect
    calls = []

    def collect_nan(*args, **kwargs):
        calls.append(1)
        ro = real(*args, **kwargs)
        if len(calls) == 2:
            ro.rewards[3] = np.nan
        return ro

    monkeypatch.setattr(ddpo_module, "collect", collect_nan)
    with pytest.raises(AgentError) as exc:
        agent.learn(12, callback=lambda a, info: a.save(ckpt))
    msg = str(exc.value)
    assert "iteration 2" in msg and "episode 3 (case 'phantoms:headneck/28'" in msg
    assert "last step 4/4" in msg and str(ckpt) in msg
    good = DDPO.load(ckpt, policy=tiny_policy)
    assert good.samples_trained == 4
    a, b = lora_state(agent), lora_state(good)
    assert all(torch.equal(a[k], b[k]) for k in a)  # nothing of iteration 2 was applied


def test_eval_cadence_before_every_k_and_after_last(tiny_policy, denv, monkeypatch):
    class Summary:
        def summary(self):
            return {"score_mean": 0.5}

    agent = DDPO(denv, tiny_policy, {**FAST, "eval_cases": ["phantoms:headneck/29"], "eval_every": 2})
    monkeypatch.setattr(agent, "evaluate", lambda *a, **k: Summary())
    infos = []
    agent.learn(12, callback=lambda a, i: infos.append(i))
    assert [e["iteration"] for e in agent.eval_history] == [0, 2, 3]
    assert ["eval" in i for i in infos] == [False, True, True]
    assert all("eval" not in c for c in agent.curves)


def test_nonfinite_loss_is_refused_before_the_update(tiny_policy, denv, monkeypatch):
    agent = DDPO(denv, tiny_policy, FAST)
    before = lora_state(agent)
    real = ddpo_mod.ddpo_loss
    monkeypatch.setattr(
        ddpo_mod, "ddpo_loss", lambda *a, **k: (real(*a, **k)[0] * math.nan, real(*a, **k)[1])
    )
    with pytest.raises(AgentError, match="non-finite loss .* epoch 1, minibatch 1, trained step 1/4"):
        agent.learn(4)
    after = lora_state(agent)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_mixed_precision_on_cpu_trains(tiny_policy, denv):
    agent = DDPO(denv, tiny_policy, {**FAST, "mixed_precision": "bf16"})
    before = lora_state(agent)
    infos = []
    agent.learn(4, callback=lambda a, i: infos.append(i))
    assert agent.optim.accelerator.mixed_precision == "bf16"
    assert math.isfinite(infos[0]["loss"]) and math.isfinite(infos[0]["grad_norm"])
    assert any(not torch.equal(v, lora_state(agent)[k]) for k, v in before.items())
    assert all(p.dtype == torch.float32 for p in agent.parameters())  # weights stay float32


def test_rollout_batches_share_cases_in_groups(tiny_policy):
    from dosegym.agents.rollout import case_groups

    rng = np.random.default_rng(0)
    picks = case_groups(5, 4, 2, rng)
    assert picks[0] == picks[1] and picks[2] == picks[3] and picks[0] != picks[2]  # without replacement
    assert case_groups(1, 4, 2, rng) == [0, 0, 0, 0]  # fewer cases than groups: with replacement
    with pytest.raises(AgentError, match="must divide"):
        case_groups(5, 4, 3, rng)
    env = ddpo_env(tiny_policy, cases=["phantoms:headneck/0", "phantoms:headneck/1", "phantoms:headneck/2"])
    agent = DDPO(env, tiny_policy, {**FAST, "samples_per_case": 2})
    seen = []
    agent.learn(4, callback=lambda a, info: seen.append(info["tied_fraction"]))
    ro = collect(env, agent.policy, [1], 1.0, [case_groups(3, 2, 2, np.random.default_rng(1))])
    assert ro.case_keys[0] == ro.case_keys[1]
    assert seen and all(np.isfinite(seen))
    env.close()
