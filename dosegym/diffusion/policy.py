"""``DosePolicy``: the pretrained dose model as a Gaussian policy over reverse-diffusion steps.

The contract (DESIGN.md "The policy contract")::

    policy = load_pretrained()                       # shipped checkpoint, no network
    cond   = policy.conditions(case_or_batch)        # batched ModelInput on policy.device
    x      = policy.initial_noise(batch, generator)
    for t in policy.timesteps(num_steps):
        mean, std = policy.step_distribution(x, t, cond)
        x_prev = mean + std * noise                  # or the agent's own choice
        logp   = policy.log_prob(x_prev, mean, std)  # mean over elements, per sample
        x = x_prev
    dose_gy = policy.decode(x, cond, to_case=case)   # torch, Gy, on the case grid

``decode`` onto a case grid goes through the case's :class:`~dosegym.diffusion.refiner.CaseDecoder`
(``policy.case_decoder(case)``): trilinear upsampling, then the checkpoint's native-resolution
refiner when it has one (``policy.refiner``; frozen, shared with ``reference()``: agents train
the diffusion model only).

Batched rollouts (per-sample generators, log-probs, x̂0) run on ``policy.chain(steps)``, a
:class:`~dosegym.diffusion.chain.ReverseChain`. The step is DDIM with ``eta`` (default 1.0,
every step stochastic, see :mod:`dosegym.diffusion.schedulers.ddim`) or DDPM.
``step_distribution`` is differentiable with respect to the model's weights when grad is
enabled; agents fine-tune
``policy.model`` (full weights or LoRA via peft) and keep ``policy.reference()`` (the
weights at load time, frozen) for KL terms.
"""

from __future__ import annotations

import importlib.resources
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dosegym.data.case import Case
from dosegym.data.dose import check_dose_gy
from dosegym.diffusion.chain import (
    CHAIN_SAMPLERS,
    ReverseChain,
    check_num_steps,
    initial_noise,
    seeded_generator,
)
from dosegym.diffusion.checkpoint import CONFIG_FILE, load_model
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.refiner import CaseDecoder, Refiner, checkpoint_refiner
from dosegym.diffusion.sample import sample
from dosegym.diffusion.schedulers import (
    ReverseStepOutput,
    gaussian_log_prob,
    make_scheduler,
    reverse_step,
)
from dosegym.diffusion.slots import ModelInput, ModelSpec, collate, make_resampler, to_model
from dosegym.errors import ModelError


def shipped_checkpoint_dir() -> Path:
    """Where the shipped checkpoint lives inside the package: ``dosegym/assets/model/``."""
    return Path(str(importlib.resources.files("dosegym") / "assets" / "model"))


def load_pretrained(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    sampler: str = "ddim",
    eta: float = 1.0,
    refiner: bool = True,
) -> DosePolicy:
    """The policy from a checkpoint folder (default: the shipped one); never uses the network.
    ``refiner=False`` leaves the checkpoint's refiner out (decode by trilinear upsampling alone)."""
    if path is None:
        folder = shipped_checkpoint_dir()
        if not (folder / CONFIG_FILE).is_file():
            raise ModelError(
                f"no shipped checkpoint: {folder} does not hold a trained model yet (it is added once "
                "the pretraining run is done). Train one with `dosegym pretrain --config "
                "configs/pretrain_shipped.yaml --out runs/pretrain` and load it with "
                "load_pretrained('runs/pretrain/checkpoint')"
            )
    else:
        folder = Path(path)
    model = load_model(folder, device)
    ref = checkpoint_refiner(folder, model.config.spec, device) if refiner else None
    return DosePolicy(model, sampler=sampler, eta=eta, device=device, refiner=ref)


class DosePolicy:
    """See module docstring. ``model`` is an :class:`Any2Any` diffusion model; ``refiner`` an
    optional :class:`~dosegym.diffusion.refiner.Refiner` (frozen) used by ``decode``."""

    #: Cases whose :class:`CaseDecoder` is kept (the refiner's inputs cost a pass over the case).
    DECODERS_KEPT = 4

    def __init__(
        self,
        model: Any2Any,
        sampler: str = "ddim",
        eta: float = 1.0,
        device: torch.device | str = "cpu",
        refiner: Refiner | None = None,
    ) -> None:
        if sampler not in CHAIN_SAMPLERS:
            raise ModelError(
                f"policy sampler {sampler!r} is not a Markov Gaussian step; valid: {list(CHAIN_SAMPLERS)} "
                "(dpm_solver serves predict() only)"
            )
        if eta < 0:
            raise ModelError(f"eta must be >= 0, got {eta}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.sampler = sampler
        self.eta = float(eta)
        self.scheduler = make_scheduler(sampler, model.config.diffusion)
        self.refiner = None if refiner is None else refiner.requires_grad_(False).eval().to(self.device)
        self._initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self._reference: DosePolicy | None = None
        self._decoders: OrderedDict[int, tuple[Case, CaseDecoder]] = OrderedDict()

    @property
    def spec(self) -> ModelSpec:
        return self.model.config.spec

    def to(self, device: torch.device | str) -> DosePolicy:
        """Move the model (and later inputs) to ``device``; returns ``self``."""
        self.device = torch.device(device)
        self.model.to(self.device)
        if self.refiner is not None:
            self.refiner.to(self.device)
        if self._reference is not None:
            self._reference.to(device)
        return self

    # -- inputs ---------------------------------------------------------------------------
    def conditions(self, case_or_batch: Case | Sequence[Case] | ModelInput) -> ModelInput:
        """Model-grid inputs of one case, a list of cases or a ``ModelInput``, batched, on
        ``self.device``. A required slot the case lacks raises ``ModelError`` naming it."""
        if isinstance(case_or_batch, ModelInput):
            mi = case_or_batch if case_or_batch.batched else collate([case_or_batch])
        elif isinstance(case_or_batch, Case):
            mi = collate([to_model(case_or_batch, self.spec)[0]])
        else:
            cases = list(case_or_batch)
            if not cases or not all(isinstance(c, Case) for c in cases):
                raise ModelError("conditions: expected a Case, a non-empty list of Cases or a ModelInput")
            mi = collate([to_model(c, self.spec)[0] for c in cases])
        return mi.to(self.device)

    def initial_noise(
        self, batch: int | ModelInput, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x_T ~ N(0, I)``, ``(B, C, Z, Y, X)`` on ``self.device``; ``batch`` is B or a batched input."""
        if isinstance(batch, ModelInput):
            return initial_noise(self.model, batch.batch_size, generator, self.device, batch.generate_slot)
        return initial_noise(self.model, int(batch), generator, self.device)

    def chain(self, steps: int) -> ReverseChain:
        """A :class:`~dosegym.diffusion.chain.ReverseChain` of this policy's model, sampler and
        eta with ``steps`` steps (batched rollouts without Gymnasium; its own scheduler)."""
        self._check_diffusion()
        return ReverseChain(self.model, steps, self.sampler, self.eta)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """Set the schedule to ``num_steps`` steps and return its timesteps (descending)."""
        num_steps = check_num_steps(num_steps, self.model.config.diffusion)
        self.scheduler.set_timesteps(num_steps, device=self.device)
        return self.scheduler.timesteps.clone()

    # -- the step -------------------------------------------------------------------------
    def step(
        self,
        x: torch.Tensor,
        t: int | torch.Tensor,
        cond: ModelInput,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> ReverseStepOutput:
        """One reverse step from ``x`` at ``t`` (scalar or ``(B,)``): sample, mean, std,
        log-prob (see :func:`~dosegym.diffusion.schedulers.reverse_step`)."""
        self._check_diffusion()
        out = self.model(x, t, cond)
        return reverse_step(
            self.scheduler,
            out,
            t,
            x,
            eta=self.eta,
            variance_noise=variance_noise,
            prev_sample=prev_sample,
            generator=generator,
        )

    def step_distribution(
        self, x: torch.Tensor, t: int | torch.Tensor, cond: ModelInput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian of the reverse step: ``mean`` ``(B, C, Z, Y, X)``, ``std`` ``(B, 1, 1, 1, 1)``."""
        out = self.step(x, t, cond, variance_noise=torch.zeros_like(x))
        return out.mean, out.std

    def log_prob(self, x_prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``(B,)`` Gaussian log-density averaged over elements; ``ModelError`` if std == 0."""
        return gaussian_log_prob(x_prev, mean, std)

    # -- outputs --------------------------------------------------------------------------
    def case_decoder(self, case: Case) -> CaseDecoder:
        """The :class:`CaseDecoder` of ``case`` (its resampler and this policy's refiner), kept
        for the last :attr:`DECODERS_KEPT` cases."""
        key = id(case)
        if key in self._decoders and self._decoders[key][0] is case:
            self._decoders.move_to_end(key)
            return self._decoders[key][1]
        decoder = CaseDecoder(case, make_resampler(case, self.spec), self.refiner)
        self._decoders[key] = (case, decoder)
        while len(self._decoders) > self.DECODERS_KEPT:
            self._decoders.popitem(last=False)
        return decoder

    def decode(
        self, x: torch.Tensor, cond: ModelInput, to_case: Case | Sequence[Case] | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Dose in Gy (torch, differentiable) from ``x`` ``(B, 1, Z, Y, X)`` (1.0 = highest Rx).

        ``to_case=None``: on the model grid, ``(B, Z, Y, X)``. A ``Case``: every sample on that
        case's grid, ``(B, Zc, Yc, Xc)``, zero outside its body. A list of B cases: a list of
        ``(Zc, Yc, Xc)`` tensors, one per sample.
        """
        if cond.generate_slot != "dose":
            raise ModelError(
                f"decode gives Gy for the dose slot; this input generates {cond.generate_slot!r}"
            )
        if x.ndim != 5 or x.shape[1] != 1:
            raise ModelError(f"decode expects x of shape (B, 1, Z, Y, X), got {tuple(x.shape)}")
        _check_finite(x, cond, "the model's sample x")
        if to_case is None:
            rx = cond.rx_max_gy.to(x.device).reshape(-1, 1, 1, 1)
            return _check_finite(x[:, 0].clamp_min(0.0) * rx, cond, "the decoded dose")
        if isinstance(to_case, Case):
            return _check_finite(self.case_decoder(to_case).decode(x[:, 0]), cond, "the decoded dose")
        cases = list(to_case)
        if len(cases) != x.shape[0]:
            raise ModelError(f"decode: {len(cases)} cases for a batch of {x.shape[0]} samples")
        return [
            _check_finite(self.case_decoder(c).decode(x[i, 0]), cond, "the decoded dose")
            for i, c in enumerate(cases)
        ]

    def reference(self) -> DosePolicy:
        """A frozen copy of the policy with the weights it was loaded with (for KL terms)."""
        if self._reference is None:
            ref_model = Any2Any(self.model.config)
            ref_model.load_state_dict(self._initial_state)
            ref_model.requires_grad_(False).eval()
            self._reference = DosePolicy(ref_model, self.sampler, self.eta, self.device, self.refiner)
        return self._reference

    @torch.no_grad()
    def predict(
        self,
        case: Case,
        steps: int = 20,
        sampler: str = "ddim",
        seed: int = 0,
        samples: int = 1,
        eta: float = 0.0,
        flip_tta: bool = False,
    ) -> np.ndarray:
        """Predict the dose of ``case``: Gy, ``float32``, on the case grid, ``(Z, Y, X)`` for one
        sample or ``(K, Z, Y, X)`` for ``samples=K``. Same ``seed`` -> same result.
        ``flip_tta``: test-time flips, each of the K doses the mean (on the model grid, before
        decoding) of a sample and a sample of the left-right mirrored input flipped back
        (:meth:`ModelInput.mirrored`; twice the cost)."""
        if samples < 1:
            raise ModelError(f"samples must be >= 1, got {samples}")
        cond = self.conditions(case).expand(samples)
        if flip_tta:
            cond = cond.mirrored()
        gen = seeded_generator(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            x0 = sample(self.model, cond, sampler, steps, gen, eta)
        finally:
            self.model.train(was_training)
        if flip_tta:
            x0 = 0.5 * (x0[:samples] + x0[samples:].flip(-1))
            cond = self.conditions(case).expand(samples)
        dose = self.decode(x0, cond, to_case=case).float().cpu().numpy()
        dose = check_dose_gy(
            dose,
            where=f"predict: the dose predicted for case {case.case_id!r}",
            prescription_gy=case.max_prescription_gy,
            error=ModelError,
        )
        return dose[0] if samples == 1 else dose

    def _check_diffusion(self) -> None:
        if self.model.config.objective != "diffusion":
            raise ModelError(
                "this checkpoint is a regression model (one forward pass); it has no reverse-diffusion steps"
            )


def _check_finite(values: torch.Tensor, cond: ModelInput, what: str) -> torch.Tensor:
    """``values`` unchanged, or ``ModelError`` naming the cases when any value is NaN or inf."""
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        cases = ", ".join(repr(c) for c in dict.fromkeys(cond.case_ids)) or "(unnamed input)"
        raise ModelError(
            f"decode: {what} for case {cases} has {int(bad.sum())} of {bad.numel()} values NaN or "
            "infinite: the model's output is not finite (NaN weights in the checkpoint, or a diverged "
            "chain); no dose is made from it"
        )
    return values
