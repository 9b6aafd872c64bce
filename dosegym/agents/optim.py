"""The optimizer step every gradient agent shares, through ``accelerate``.

:class:`Optim` holds an ``accelerate.Accelerator`` (``cpu=True`` on a CPU policy;
``mixed_precision`` from the config, bf16 allowed on CPU), AdamW over ``agent.parameters()``
(trl's DDPO settings: betas (0.9, 0.999), weight decay 1e-4, eps 1e-8) and the denoiser
prepared for training (DDP under ``accelerate launch``; its forwards autocast under mixed
precision). :meth:`Optim.backward` is one micro-batch: it refuses a non-finite loss,
back-propagates (scaled for accumulation) and, on the micro-batch that completes an
accumulation of ``accumulation_steps``, clips the gradient to ``max_grad_norm`` (the
gradient norm is all-reduced, so every rank sees the same one), refuses a non-finite norm,
steps and zeroes. The learning rate of iteration ``i`` of ``n`` is
``config.learning_rate_at(i, n)`` (:meth:`Optim.set_iteration`): a function of the
iteration only, so a checkpoint needs the optimizer's state and the iteration, no
scheduler state.

Several processes (``accelerate launch --num_processes P``): every rank collects its own
rollouts (its seeds depend on its rank), gradients are all-reduced by DDP, and only the
main process (:attr:`Optim.is_main`) writes files. On CPUs:
``ACCELERATE_USE_CPU=yes accelerate launch --multi_gpu --num_processes P ...`` (gloo; accelerate's
``--cpu`` flag alone runs a single process).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dosegym.agents.config import AgentConfig
from dosegym.errors import AgentError

#: AdamW's settings (trl's DDPOConfig defaults).
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-4
ADAM_EPS = 1e-8


def make_accelerator(cpu: bool, mixed_precision: str, accumulation_steps: int) -> Any:
    """An ``accelerate.Accelerator``. In a single process whose accelerate state was set up
    with another precision (an earlier agent), that state is reset first; under a launcher
    the precision must be the launch's."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, PartialState

    # adapters on the heads and encoders of slots a case lacks get no gradient: DDP must look
    # for unused parameters (as pretraining does)
    kw = dict(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    try:
        return Accelerator(**kw)
    except ValueError as exc:
        if PartialState().num_processes > 1:
            raise AgentError(f"mixed_precision {mixed_precision!r}: {exc}") from exc
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate has no public reset
        return Accelerator(**kw)


class Optim:
    """See the module docstring. ``model``: the denoiser that trains (``agent.policy.model``);
    ``params``: what trains in it; ``max_grad_norm`` > 0 (``inf``: no clipping)."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        config: AgentConfig,
        max_grad_norm: float,
        accumulation_steps: int = 1,
    ) -> None:
        if not params:
            raise AgentError("nothing trains: the agent has no trainable parameters")
        device = next(model.parameters()).device
        self.config = config
        self.max_grad_norm = float(max_grad_norm)
        self.accelerator = make_accelerator(device.type == "cpu", config.mixed_precision, accumulation_steps)
        self.params = params
        optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.grad_norms: list[float] = []

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes files (rank 0)."""
        return bool(self.accelerator.is_main_process)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    def set_iteration(self, iteration: int, total_iterations: int) -> float:
        """Set and return the learning rate of ``iteration`` (0-based) of ``total_iterations``."""
        lr = self.config.learning_rate_at(iteration, total_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def backward(self, loss: torch.Tensor, where: str) -> float | None:
        """One micro-batch (see the module docstring); the clipped-before gradient norm when
        it stepped, else None. ``where`` names the micro-batch in error messages."""
        if not bool(torch.isfinite(loss.detach()).all()):
            raise AgentError(f"non-finite loss {float(loss.detach()):g} at {where}")
        with self.accelerator.accumulate(self.model):
            self.accelerator.backward(loss)
            if not self.accelerator.sync_gradients:
                return None
            norm = float(self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm))
            if not math.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise AgentError(f"non-finite gradient norm {norm:g} at {where}; the update was not applied")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.grad_norms.append(norm)
        return norm

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of every rank concatenated in rank order (itself in one process)."""
        return self.accelerator.gather(values.contiguous()) if self.world_size > 1 else values

    def gather_objects(self, values: list) -> list:
        """A list of every rank's ``values`` concatenated in rank order."""
        if self.world_size == 1:
            return list(values)
        from accelerate.utils import gather_object

        return list(gather_object(list(values)))

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (for a training checkpoint)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
