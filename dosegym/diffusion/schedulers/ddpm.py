"""DDPM ancestral sampler (diffusers ``DDPMScheduler``).

``clip_sample=False`` (the default clamp of x̂0 to [-1, 1] would cut every hot spot above
the prescription), ``variance_type="fixed_small"`` (the posterior variance, the Gaussian
that :func:`dosegym.diffusion.schedulers.logprob.reverse_step` evaluates) and
``timestep_spacing="trailing"`` (the first step starts at the last training timestep, i.e.
from pure noise). The last step (to t < 0) is deterministic: its posterior variance is 0.
"""

from __future__ import annotations

from diffusers import DDPMScheduler

from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.schedulers.schedule import schedule_kwargs


def make_ddpm(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        **schedule_kwargs(cfg),
        variance_type="fixed_small",
        clip_sample=False,
        thresholding=False,
        timestep_spacing="trailing",
    )
