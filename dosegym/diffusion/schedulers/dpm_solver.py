"""DPM-Solver++ (diffusers ``DPMSolverMultistepScheduler``): fast deterministic sampling.

Second-order multistep ``dpmsolver++`` with ``thresholding=False`` (no clamp of x̂0),
``timestep_spacing="trailing"`` and lower-order final steps: good doses in 10-20 steps.
It is **not** a Markov Gaussian policy (each step uses previous model outputs and adds no
noise), so it serves ``predict`` / sampling only; RL steps use DDIM (eta > 0) or DDPM.
"""

from __future__ import annotations

from diffusers import DPMSolverMultistepScheduler

from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.schedulers.schedule import shifted_betas


def make_dpm_solver(cfg: DiffusionConfig) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        trained_betas=shifted_betas(cfg),
        prediction_type=cfg.prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=False,
        timestep_spacing="trailing",
        lower_order_final=True,
    )
