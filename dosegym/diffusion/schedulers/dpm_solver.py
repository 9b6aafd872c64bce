"""DPM-Solver++ (diffusers ``DPMSolverMultistepScheduler``): fast deterministic sampling.

Second-order multistep ``dpmsolver++`` with ``thresholding=False`` (no clamp of x̂0),
``timestep_spacing="trailing"`` and lower-order final steps: good doses in 10-20 steps.
It is **not** a Markov Gaussian policy (each step uses previous model outputs and adds no
noise), so it serves ``predict`` / sampling only; RL steps use DDIM (eta > 0) or DDPM.
"""

from __future__ import annotations

from diffusers import DPMSolverMultistepScheduler

from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.schedulers.schedule import schedule_kwargs


def make_dpm_solver(cfg: DiffusionConfig) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        **schedule_kwargs(cfg),
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=False,
        timestep_spacing="trailing",
        lower_order_final=True,
    )
