"""Our DDIM step log-prob against trl 0.23.1's ``scheduler_step`` (the ``trl`` extra).

Skipped where trl is not installed, except under ``CI=true`` (CI installs the extra), where a
missing trl fails. trl's ``log_prob`` is averaged over every non-batch dimension, as ours is,
so the two compare one to one. The ``from_trl`` config mapping is tested without trl in
``test_ddpo.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.schedulers import make_scheduler, reverse_step

if os.environ.get("CI") == "true":
    import trl  # noqa: F401  (CI installs the trl extra: a missing trl must fail there)
else:
    pytest.importorskip("trl")


def test_step_log_prob_matches_trl_scheduler_step():
    from trl.models.modeling_sd_base import scheduler_step

    scheduler = make_scheduler("ddim", DiffusionConfig())
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    b = 6
    # per-sample timesteps of the schedule, the last step (to alphas_cumprod[0]) included
    t = scheduler.timesteps[torch.tensor([0, 2, 4, 7, 8, 9])].long()
    x = torch.randn(b, 1, 4, 6, 5, generator=gen)
    eps = torch.randn(b, 1, 4, 6, 5, generator=gen)
    x_prev = torch.randn(b, 1, 4, 6, 5, generator=gen)
    for eta in (1.0, 0.5):
        ours = reverse_step(scheduler, eps, t, x, eta=eta, prev_sample=x_prev)
        theirs = scheduler_step(scheduler, eps, t, x, eta, prev_sample=x_prev)
        assert ours.log_prob is not None
        assert torch.allclose(ours.log_prob, theirs.log_probs, rtol=1e-5, atol=1e-5)


def test_from_trl_reads_a_trl_config_object():
    from trl import DDPOConfig as TrlDDPOConfig

    from dosegym.agents.ddpo import DDPOConfig

    trl_cfg = TrlDDPOConfig(sample_num_steps=10, train_clip_range=2e-4, mixed_precision="no")
    ours = DDPOConfig.from_trl(trl_cfg)
    assert (ours.sample_num_steps, ours.train_clip_range, ours.mixed_precision) == (10, 2e-4, "no")
