"""Samplers (diffusers schedulers configured for doses) and the Gaussian reverse step.

``make_scheduler("ddpm" | "ddim" | "dpm_solver", diffusion_config)``; every one runs with
x̂0 clipping off. :func:`reverse_step` gives the mean, std and log-probability of a DDPM or
DDIM step, :func:`mean_x0_gain` its mean's slope in x̂0; :func:`x0_and_eps` /
:func:`output_for_x0` convert between a model output and x̂0.
"""

from __future__ import annotations

from collections.abc import Callable

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.schedulers.ddim import make_ddim
from dosegym.diffusion.schedulers.ddpm import make_ddpm
from dosegym.diffusion.schedulers.dpm_solver import make_dpm_solver
from dosegym.diffusion.schedulers.logprob import (
    PREDICTION_TYPES,
    ReverseStepOutput,
    gaussian_log_prob,
    mean_x0_gain,
    output_for_x0,
    per_sample,
    reverse_step,
    x0_and_eps,
)
from dosegym.errors import ModelError

Scheduler = DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler
_FACTORIES: dict[str, Callable[[DiffusionConfig], Scheduler]] = {
    "ddpm": make_ddpm,
    "ddim": make_ddim,
    "dpm_solver": make_dpm_solver,
}
SAMPLERS: tuple[str, ...] = tuple(_FACTORIES)


def make_scheduler(sampler: str, cfg: DiffusionConfig) -> Scheduler:
    """A fresh diffusers scheduler for ``sampler`` (see :data:`SAMPLERS`)."""
    if sampler not in _FACTORIES:
        raise ModelError(f"unknown sampler {sampler!r}; valid: {list(SAMPLERS)}")
    return _FACTORIES[sampler](cfg)


__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "ReverseStepOutput",
    "Scheduler",
    "gaussian_log_prob",
    "make_scheduler",
    "mean_x0_gain",
    "output_for_x0",
    "per_sample",
    "reverse_step",
    "x0_and_eps",
]
