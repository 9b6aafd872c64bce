"""Sampling loops: noise -> generate slot, with any of the three samplers.

``ddpm`` and ``ddim`` run the :class:`~dosegym.diffusion.chain.ReverseChain` (the same
Gaussian steps and noise order as the RL policy and the environments; ``eta`` for DDIM,
0 = deterministic); ``dpm_solver`` uses diffusers' multistep ``step`` (deterministic). A
``regression`` model needs no loop: one forward pass predicts the slot.

Determinism: the initial noise (and DDIM/DDPM step noise) comes from ``generator`` only, so
a seed gives the same sample on every run (on one device and torch version). The seeding
helpers live in :mod:`dosegym.diffusion.chain` and are importable from here too.
"""

from __future__ import annotations

import torch

from dosegym.diffusion.chain import CHAIN_SAMPLERS, ReverseChain, check_num_steps, initial_noise
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.schedulers import make_scheduler
from dosegym.diffusion.slots import ModelInput
from dosegym.errors import ModelError


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
    """Generate ``cond``'s generate slot: ``(B, C, Z, Y, X)`` in model units (dose: 1.0 = Rx).

    DDPM / DDIM: a :class:`~dosegym.diffusion.chain.ReverseChain` started with ``generator``
    (one for the batch) run to its end; non-finite outputs are left to the decoder's checks."""
    if not cond.batched:
        raise ModelError("sample needs a batched ModelInput (use slots.collate)")
    if model.config.objective == "regression":
        return model(None, torch.zeros(cond.batch_size, device=cond.device), cond)
    num_steps = check_num_steps(num_steps, model.config.diffusion)
    if sampler in CHAIN_SAMPLERS:
        chain = ReverseChain(model, num_steps, sampler, eta, check_finite=False)
        chain.start(cond, generator, x_T=x_T)
        return chain.run()
    scheduler = make_scheduler(sampler, model.config.diffusion)  # dpm_solver, or the list of samplers
    scheduler.set_timesteps(num_steps, device=cond.device)
    if x_T is None:
        x_T = initial_noise(model, cond.batch_size, generator, cond.device, cond.generate_slot)
    x = x_T.to(cond.device)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t, cond), t, x).prev_sample
    return x
