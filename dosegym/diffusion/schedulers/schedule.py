"""The noise schedule shared by training and every sampler, with the optional SNR shift.

:func:`schedule_kwargs` is the one definition of the forward process that every sampler
factory passes to its diffusers scheduler. :func:`shifted_betas` turns ``DiffusionConfig``
into the ``trained_betas`` that the diffusers schedulers take: ``None`` (diffusers computes
``beta_schedule`` itself) when ``snr_shift == 1``, else the betas whose cumulative product is
``alpha_bar'_t = sigmoid(logit(alpha_bar_t) - 2 ln snr_shift)``, i.e. the base schedule's
log-SNR lowered by ``2 ln snr_shift`` at every timestep (computed in float64).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from diffusers import DDPMScheduler

from dosegym.diffusion.config import DiffusionConfig


def shifted_betas(cfg: DiffusionConfig) -> np.ndarray | None:
    """``trained_betas`` for the diffusers schedulers (see module docstring)."""
    if cfg.snr_shift == 1.0:
        return None
    base = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
    )
    alpha_bar = base.alphas_cumprod.double().numpy()
    log_snr = np.log(alpha_bar) - np.log1p(-alpha_bar) - 2.0 * math.log(cfg.snr_shift)
    shifted = 1.0 / (1.0 + np.exp(-log_snr))
    return 1.0 - shifted / np.concatenate([[1.0], shifted[:-1]])


def schedule_kwargs(cfg: DiffusionConfig) -> dict[str, Any]:
    """The diffusers scheduler arguments that define the forward process and the model output."""
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "trained_betas": shifted_betas(cfg),
        "prediction_type": cfg.prediction_type,
    }
