"""Sampling loops: noise -> generate slot, with any of the three samplers.

``ddpm`` and ``ddim`` step through :func:`~dosegym.diffusion.schedulers.reverse_step` (the
same Gaussian the RL policy uses; ``eta`` for DDIM, 0 = deterministic); ``dpm_solver``
uses diffusers' multistep ``step`` (deterministic). A ``regression`` model needs no loop:
one forward pass predicts the slot.

Determinism: the initial noise (and DDIM/DDPM step noise) comes from ``generator`` only, so
a seed gives the same sample on every run (on one device and torch version).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.schedulers import make_scheduler, reverse_step
from dosegym.diffusion.slots import SLOT_CHANNELS, ModelInput
from dosegym.errors import ModelError

SEED_MAX = 2**64 - 1  # the largest seed a torch.Generator takes


def _integer(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def seeded_generator(seed: int) -> torch.Generator:
    """The CPU generator that every seeded sampling path uses (``DosePolicy.predict``, the
    environments): the same int seed gives the same noise whatever the model's device.
    ``seed`` is an integer in ``[0, SEED_MAX]``, else ``ModelError``."""
    if not _integer(seed) or not 0 <= seed <= SEED_MAX:
        raise ModelError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    return torch.Generator("cpu").manual_seed(int(seed))


def check_num_steps(num_steps: int, cfg: DiffusionConfig, what: str = "num_steps") -> int:
    """``num_steps`` when it is an integer in ``[1, cfg.num_train_timesteps]`` (the range every
    sampler's schedule allows), else ``ModelError`` naming ``what`` and that range."""
    top = cfg.num_train_timesteps
    if not _integer(num_steps) or not 1 <= num_steps <= top:
        raise ModelError(
            f"{what} must be an integer in [1, {top}] (the model was trained with {top} timesteps), "
            f"got {num_steps!r}"
        )
    return int(num_steps)


def step_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> torch.Tensor:
    """The noise of one DDPM/DDIM reverse step, drawn on the generator's device (``device``
    without one) and moved to ``device``; :func:`sample` and the environments draw it here."""
    gen_device = generator.device if generator is not None else torch.device(device)
    return randn_tensor(tuple(shape), generator=generator, device=gen_device).to(device)


def initial_noise(
    model: Any2Any,
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    slot: str | None = None,
) -> torch.Tensor:
    """``x_T ~ N(0, I)`` of shape ``(B, C, Z, Y, X)`` for ``slot`` (default the spec's
    generate slot), drawn on the generator's device and moved to ``device``."""
    shape = (
        int(batch),
        SLOT_CHANNELS[slot or model.config.spec.generate],
        *model.config.spec.shape,
    )
    gen_device = generator.device if generator is not None else torch.device(device)
    return randn_tensor(shape, generator=generator, device=gen_device).to(device)


@torch.no_grad()
def sample(
    model: Any2Any,
    cond: ModelInput,
    sampler: str = "ddim",
    num_steps: int = 20,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate ``cond``'s generate slot: ``(B, C, Z, Y, X)`` in model units (dose: 1.0 = Rx)."""
    if not cond.batched:
        raise ModelError("sample needs a batched ModelInput (use slots.collate)")
    if model.config.objective == "regression":
        return model(None, torch.zeros(cond.batch_size, device=cond.device), cond)
    num_steps = check_num_steps(num_steps, model.config.diffusion)
    scheduler = make_scheduler(sampler, model.config.diffusion)
    scheduler.set_timesteps(num_steps, device=cond.device)
    if x_T is None:
        x = initial_noise(model, cond.batch_size, generator, cond.device, cond.generate_slot)
    else:
        x = x_T.to(cond.device)
    for t in scheduler.timesteps:
        out = model(x, t, cond)
        if sampler == "dpm_solver":
            x = scheduler.step(out, t, x).prev_sample
        else:
            noise = None
            if sampler == "ddpm" or eta > 0:
                noise = step_noise(x.shape, generator, x.device)
            x = reverse_step(scheduler, out, t, x, eta=eta, variance_noise=noise).prev_sample
    return x
