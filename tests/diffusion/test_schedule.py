"""Training options of the diffusion objective: the noise schedule's SNR shift (exact log-SNR
offset, one schedule for training and every sampler, the reverse step still diffusers' own),
``train.diffusion_loss`` and ``data.cases_file``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_pretrain_config

from dosegym.diffusion.config import DiffusionConfig, parse_config
from dosegym.diffusion.schedulers import make_scheduler, reverse_step
from dosegym.diffusion.train import training_sources
from dosegym.errors import ModelError

SAMPLERS = ("ddpm", "ddim", "dpm_solver")


def _logit(a: torch.Tensor) -> np.ndarray:
    a = a.double().numpy()
    return np.log(a) - np.log1p(-a)


def test_no_shift_is_the_diffusers_schedule():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    for name in SAMPLERS:
        torch.testing.assert_close(make_scheduler(name, DiffusionConfig()).alphas_cumprod, ref)


@pytest.mark.parametrize("shift", [0.5, 3.0, 7.0])
def test_shift_lowers_log_snr_by_2_ln_shift_at_every_timestep(shift):
    base = make_scheduler("ddpm", DiffusionConfig()).alphas_cumprod
    shifted = {n: make_scheduler(n, DiffusionConfig(snr_shift=shift)).alphas_cumprod for n in SAMPLERS}
    torch.testing.assert_close(shifted["ddim"], shifted["ddpm"])
    torch.testing.assert_close(shifted["dpm_solver"], shifted["ddpm"])
    ok = (base > 1e-6) & (base < 1 - 1e-6)  # float32 resolution of alpha_bar
    offset = _logit(shifted["ddpm"][ok]) - _logit(base[ok])
    np.testing.assert_allclose(offset, -2 * math.log(shift), atol=2e-3)
    assert bool((shifted["ddpm"][1:] < shifted["ddpm"][:-1]).all())  # still monotone


def test_reverse_step_follows_the_shifted_schedule():
    sched = make_scheduler("ddim", DiffusionConfig(snr_shift=4.0))
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x, out, noise = (torch.randn(2, 1, 3, 4, 5, generator=g) for _ in range(3))
    for t in sched.timesteps:
        ref = sched.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        ours = reverse_step(sched, out, t, x, eta=1.0, variance_noise=noise)
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan")])
def test_invalid_shift_is_named(bad):
    with pytest.raises(ModelError, match="snr_shift"):
        parse_config(DiffusionConfig, {"snr_shift": bad}, "cfg.yaml")


def test_cases_file_trains_on_exactly_the_listed_cases(cache_dir, tmp_path):
    cfg = tiny_pretrain_config(cache_dir)
    labels = [s.label for s in training_sources(cfg)]
    assert labels and all(label.startswith("openkbp:train-pats/pt_") for label in labels)
    listed = tmp_path / "training.json"
    listed.write_text(json.dumps({"data": {"cases": labels[:1]}}))
    only = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cases_file": str(listed)})})
    assert [s.label for s in training_sources(only)] == labels[:1]

    listed.write_text(json.dumps([labels[0], "openkbp:train-pats/pt_99999"]))
    with pytest.raises(ModelError, match=r"training\.json: 1 listed case.*pt_99999"):
        training_sources(only)
    listed.write_text("{}")
    with pytest.raises(ModelError, match="expected a non-empty JSON list"):
        training_sources(only)


def test_l1_loss_on_x0_is_the_regression_loss_at_every_noise_level(cache_dir, tmp_path, monkeypatch):
    from dosegym.diffusion.train import pretrain

    calls = {"l1": [], "mse": []}
    l1, mse = torch.nn.functional.l1_loss, torch.nn.functional.mse_loss
    monkeypatch.setattr(torch.nn.functional, "l1_loss", lambda a, b: calls["l1"].append(b) or l1(a, b))
    monkeypatch.setattr(torch.nn.functional, "mse_loss", lambda a, b: calls["mse"].append(b) or mse(a, b))
    cfg = tiny_pretrain_config(cache_dir, steps=2, diffusion_loss="l1")
    diffusion = cfg.model.diffusion.model_copy(update={"prediction_type": "sample", "snr_shift": 3.0})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"diffusion": diffusion})})
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result.step == 2 and math.isfinite(result.loss)
    assert len(calls["l1"]) == 2 and not calls["mse"]
    # the target is the clean dose (x0, in units of the prescription), not a noisy one
    assert all(float(t.min()) >= 0 and float(t.max()) > 0.5 for t in calls["l1"])
