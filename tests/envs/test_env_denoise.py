"""DenoiseDose-v0: the on-policy episode reproduces predict(), seeding, info, bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import dosegym  # noqa: F401  (registers the ids)
from dosegym.data import Case
from dosegym.errors import EnvError
from dosegym.scorecards import ScoreReport, load_card

STEPS = 4


def make(policy, cases, **kw):
    return gym.make(
        "dosegym/DenoiseDose-v0", policy=policy, cases=cases, steps=STEPS, disable_env_checker=True, **kw
    )


def run_on_policy(env, seed):
    """One episode of pretrained on-policy actions: mean + std * noise from the env's RNG."""
    u = env.unwrapped
    obs, info0 = env.reset(seed=seed)
    rewards, infos = [], []
    done = False
    while not done:
        mean, std = u.policy_step(obs)
        obs, reward, done, truncated, info = env.step(mean + std * u.sample_noise())
        assert not truncated
        rewards.append(reward)
        infos.append(info)
    return info0, obs, rewards, infos


def test_on_policy_episode_equals_predict(tiny_policy, pt108):
    env = make(tiny_policy, [pt108])
    info0, obs, rewards, infos = run_on_policy(env, seed=7)
    assert len(rewards) == STEPS and rewards[:-1] == [0.0] * (STEPS - 1)
    case = env.unwrapped.case_data(0).case
    dose = tiny_policy.predict(
        case, steps=STEPS, sampler=tiny_policy.sampler, seed=info0["sampler_seed"], eta=tiny_policy.eta
    )
    report = load_card("headneck_rtog").score(case, dose)
    assert rewards[-1] == report.normalised  # exactly, not approximately
    final = infos[-1]
    assert ScoreReport.from_dict(final["score_report"]) == report
    assert final["score_total"] == report.total
    # the final state is the predicted dose; the reference-dose MAE is logged in Gy
    body = case.body
    assert final["reference_mae_gy"] == pytest.approx(float(np.abs(dose - case.dose)[body].mean()), rel=1e-5)
    assert obs["timestep"][0] == 0.0


def test_ddpm_policy_episode_equals_predict(tiny_policy, prostate_cases):
    from dosegym.diffusion import DosePolicy

    ddpm = DosePolicy(tiny_policy.model, sampler="ddpm")
    env = make(ddpm, prostate_cases[:1])
    info0, _, rewards, infos = run_on_policy(env, seed=3)
    case = prostate_cases[0]
    dose = ddpm.predict(case, steps=STEPS, sampler="ddpm", seed=info0["sampler_seed"])
    assert rewards[-1] == load_card("phantom_prostate").score(case, dose).normalised
    # DDPM's last step is deterministic (std = 0): it has no density, never a fake 0
    assert np.isnan(infos[-1]["log_prob"]) and np.isfinite(infos[0]["log_prob"])


def test_log_prob_is_the_policy_log_prob(tiny_policy, pt108):
    env = make(tiny_policy, [pt108])
    u = env.unwrapped
    obs, _ = env.reset(seed=1)
    mean, std = u.policy_step(obs)
    action = mean + std * 0.5
    _, _, _, _, info = env.step(action)
    expected = tiny_policy.log_prob(
        torch.from_numpy(action)[None], torch.from_numpy(mean)[None], torch.from_numpy(std)[None]
    )
    assert info["log_prob"] == pytest.approx(float(expected[0]), rel=1e-6)
    # the mean itself has the highest density: -log(std) - log(2 pi) / 2
    mean, std = u.policy_step()
    _, _, _, _, info = env.step(mean)
    assert info["log_prob"] == pytest.approx(float(-np.log(std.reshape(-1)[0]) - 0.5 * np.log(2 * np.pi)))


def test_reset_is_repeatable_and_seed_dependent(tiny_policy, pt108, prostate_cases):
    cases = [pt108, *prostate_cases]
    env = make(tiny_policy, cases)
    a_obs, a_info = env.reset(seed=11)
    b_obs, b_info = env.reset(seed=11)
    assert a_info["case_key"] == b_info["case_key"] and a_info["sampler_seed"] == b_info["sampler_seed"]
    np.testing.assert_array_equal(a_obs["x_t"], b_obs["x_t"])
    keys = {env.reset(seed=s)[1]["case_key"] for s in range(12)}
    assert len(keys) == 3  # every case gets drawn
    c_obs, c_info = env.reset(seed=12)
    assert c_info["sampler_seed"] != a_info["sampler_seed"]
    # the same seed gives the same whole episode
    r1 = run_on_policy(env, seed=5)[2]
    r2 = run_on_policy(env, seed=5)[2]
    assert r1 == r2


def test_observation_layout(tiny_policy, prostate_cases):
    env = make(tiny_policy, prostate_cases[:1])
    obs, info = env.reset(seed=0, options={"case_index": 0})
    assert env.observation_space.contains(obs)
    assert obs["x_t"].shape == (1, 16, 16, 16)
    assert obs["timestep"][0] == pytest.approx(999 / 999)
    assert obs["cond_oars"].shape == (8, 16, 16, 16)
    present = dict(zip(env.unwrapped.cond_slots, obs["cond_present"]))
    assert present["targets"] == 1 and present["beam_plate"] == 1
    assert obs["cond_targets"].max() == pytest.approx(1.0)
    assert info["scorecard"] == load_card("phantom_prostate").name  # default card of the site


def test_torch_backend_keeps_tensors_on_device(tiny_policy, prostate_cases):
    env = make(tiny_policy, prostate_cases[:1], obs_backend="torch")
    u = env.unwrapped
    obs, _ = env.reset(seed=0)
    assert isinstance(obs["x_t"], torch.Tensor) and obs["x_t"].device == tiny_policy.device
    assert isinstance(obs["cond_ct"], torch.Tensor)
    mean, std = u.policy_step(obs)
    assert isinstance(mean, torch.Tensor)
    obs2, *_ = env.step(mean + std * u.sample_noise())
    assert isinstance(obs2["x_t"], torch.Tensor)


def test_policy_step_from_another_state(tiny_policy, prostate_cases):
    env = make(tiny_policy, prostate_cases[:1])
    u = env.unwrapped
    obs, _ = env.reset(seed=0)
    mean, _ = u.policy_step(obs)
    other = dict(obs, x_t=np.zeros_like(obs["x_t"]))
    mean_other, _ = u.policy_step(other)
    assert not np.allclose(mean, mean_other)
    np.testing.assert_array_equal(u.policy_step(obs)[0], mean)


def test_agent_gaussian_charges_kl(tiny_policy, prostate_cases):
    env = make(tiny_policy, prostate_cases[:1], reward={"w_kl": 2.0})
    u = env.unwrapped
    obs, _ = env.reset(seed=0)
    mean, std = u.policy_step(obs)
    shifted = mean + 0.1
    u.set_agent_gaussian(shifted, std)
    _, reward, _, _, info = env.step(shifted)
    # KL of two Gaussians with equal std = (shift / std)^2 / 2 per element
    expected_kl = float(0.1**2 / (2 * std.reshape(-1)[0] ** 2))
    assert info["kl"] == pytest.approx(expected_kl, rel=1e-3)
    assert reward == pytest.approx(-2.0 * info["kl"])
    _, reward, _, _, info = env.step(u.policy_step()[0])  # the agent gave nothing this step
    assert "kl" not in info and reward == 0.0


def _replay(env, seed, actions, gaussians=None):
    """An episode of given actions (and agent Gaussians): the infos of every step."""
    env.reset(seed=seed)
    infos = []
    for k, action in enumerate(actions):
        if gaussians is not None:
            env.unwrapped.set_agent_gaussian(*gaussians[k])
        infos.append(env.step(action)[4])
    return infos


@pytest.mark.parametrize("with_reference", [True, False])
def test_without_pretrained_log_prob_the_frozen_model_idles(
    tiny_policy, pt108, prostate_cases, with_reference
):
    cases = [pt108] if with_reference else prostate_cases[:1]
    actions = []
    env = make(tiny_policy, cases)
    u = env.unwrapped
    obs, _ = env.reset(seed=5)
    for _ in range(STEPS):
        mean, std = u.policy_step(obs)
        actions.append(mean + std * u.sample_noise())
        obs = env.step(actions[-1])[0]
    full = _replay(env, 5, actions)
    lean = make(tiny_policy, cases, pretrained_log_prob=False)
    calls = []
    hook = tiny_policy.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        lean_infos = _replay(lean, 5, actions)
    finally:
        hook.remove()
    # a reference dose anchors fidelity: no forward at all; else one, for the last step's x̂0
    assert len(calls) == (0 if with_reference else 1)
    assert all("log_prob" not in info for info in lean_infos)
    drop = {"log_prob"}
    assert [{k: v for k, v in i.items() if k not in drop} for i in full] == lean_infos
    # an agent Gaussian still gets its KL charged: the frozen model runs for that step only
    kl_env = make(tiny_policy, cases, pretrained_log_prob=False, reward={"w_kl": 1.0})
    gaussians = [(a, np.full((1, 1, 1, 1), 0.5, np.float32)) for a in actions]
    kl_infos = _replay(kl_env, 5, actions, gaussians)
    assert all(np.isfinite(i["kl"]) for i in kl_infos[:-1])


def test_baseline_scale(tiny_policy, prostate_cases):
    env = make(tiny_policy, prostate_cases[:1], reward={"scale": "baseline", "baseline_samples": 2})
    _, _, rewards, infos = run_on_policy(env, seed=0)
    final = infos[-1]
    assert rewards[-1] == pytest.approx(final["score_total"] - final["baseline_points"])
    assert 0.0 <= final["baseline_points"] <= final["score_report"]["maximum"]
    again = run_on_policy(env, seed=1)[3][-1]
    assert again["baseline_points"] == final["baseline_points"]  # cached per case


def test_fidelity_reference_and_pretrained(tiny_policy, pt108, prostate_cases):
    env = make(tiny_policy, [pt108], reward={"w_fid": 1.0, "fidelity": "reference"})
    _, _, rewards, infos = run_on_policy(env, seed=0)
    final = infos[-1]
    rx = 70.0
    assert final["reward_terms"]["fidelity"] == pytest.approx(final["reference_mae_gy"] / rx)
    assert rewards[-1] == pytest.approx(final["score_normalised"] - final["reference_mae_gy"] / rx)
    # a phantom without a reference dose: 'auto' falls back to the pretrained x̂0 ...
    auto = make(tiny_policy, prostate_cases[:1], reward={"w_fid": 1.0})
    assert run_on_policy(auto, seed=0)[3][-1]["fidelity_anchor"] == "pretrained"
    # ... and 'reference' is an error that says what to use instead
    ref = make(tiny_policy, prostate_cases[:1], reward={"fidelity": "reference"})
    with pytest.raises(EnvError, match="no reference dose"):
        run_on_policy(ref, seed=0)


def test_render_modes(tiny_policy, pt108):
    env = make(tiny_policy, [pt108], render_mode="rgb_array")
    env.reset(seed=0)
    image = env.render()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.std() > 0
    text_env = make(tiny_policy, [pt108], render_mode="ansi")
    text_env.reset(seed=0)
    text = text_env.render()
    assert "PTV70" in text and "total" in text


def test_bad_actions_are_rejected(tiny_policy, prostate_cases):
    env = make(tiny_policy, prostate_cases[:1])
    with pytest.raises(EnvError, match="before reset"):
        env.step(np.zeros((1, 16, 16, 16), np.float32))
    obs, _ = env.reset(seed=0)
    good = obs["x_t"]
    with pytest.raises(EnvError, match="shape"):
        env.step(good[0])
    with pytest.raises(EnvError, match="dtype"):
        env.step(good.astype(np.int32))
    bad = good.copy()
    bad[0, 3, 3, 3] = np.nan
    with pytest.raises(EnvError, match="NaN"):
        env.step(bad)
    with pytest.raises(EnvError, match="outside"):
        env.step(good + 100.0)
    for _ in range(STEPS):
        env.step(good)
    with pytest.raises(EnvError, match="ended"):
        env.step(good)


def test_bad_configuration_is_reported(tiny_policy, prostate_cases, tmp_path):
    with pytest.raises(EnvError, match="headneck_rtog"):
        make(tiny_policy, prostate_cases[:1], scorecard="no_such_card")
    with pytest.raises(EnvError, match="phantoms:SITE"):
        make(tiny_policy, "no/such/source")
    with pytest.raises(EnvError, match="valid"):
        make(tiny_policy, prostate_cases[:1], reward={"scale": "points"})
    with pytest.raises(EnvError, match="obs_backend"):
        make(tiny_policy, prostate_cases[:1], obs_backend="jax")


def test_case_the_model_cannot_take_names_the_slot(tiny_policy, prostate_cases):
    c = prostate_cases[0]
    no_rx = Case(
        case_id="no_rx",
        grid=c.grid,
        ct=c.ct,
        structures=dict(c.structures),
        prescriptions=[],
        beams=c.beams,
        dose=None,
        body=c.body,
        meta={"site": "prostate", "format": "phantom"},
    )
    env = make(tiny_policy, [no_rx])
    with pytest.raises(EnvError, match="targets"):
        env.reset(seed=0)
