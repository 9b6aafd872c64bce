"""DDIM sampler (diffusers ``DDIMScheduler``), stochastic with ``eta > 0`` (DDPO uses 1.0).

``clip_sample=False`` (no clamp of x̂0 to [-1, 1]: doses exceed the prescription),
``timestep_spacing="trailing"`` (start from the last training timestep, i.e. pure noise)
and ``set_alpha_to_one=False``: the last step goes to ``alphas_cumprod[0]`` rather than
to exactly 1, so with ``eta > 0`` **every** step, the last included, has a non-zero std and
a defined log-probability (as in ddpo-pytorch with Stable Diffusion's scheduler).
"""

from __future__ import annotations

from diffusers import DDIMScheduler

from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.schedulers.schedule import schedule_kwargs


def make_ddim(cfg: DiffusionConfig) -> DDIMScheduler:
    return DDIMScheduler(
        **schedule_kwargs(cfg),
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=False,
        steps_offset=0,
        timestep_spacing="trailing",
    )
