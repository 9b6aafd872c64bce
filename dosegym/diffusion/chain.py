"""The reverse chain: B reverse-diffusion chains of one model stepped in lockstep.

:class:`ReverseChain` is what every rollout runs on: :func:`dosegym.diffusion.sample.sample`
(and so ``DosePolicy.predict``), the dose environments, and agents that need no Gymnasium::

    chain = policy.chain(steps=20)                 # or ReverseChain(model, 20, "ddim", eta=1.0)
    chain.start(cond, [seeded_generator(s) for s in seeds])   # x_T, one generator per sample
    while chain.running:
        d = chain.distribution()                   # mean, std, x̂0 of the coming step (cached)
        out = chain.step()                         # on-policy x_{t-1}; or chain.step(my_x_prev)
        out.log_prob                               # (B,), NaN where the step is deterministic
    x0 = chain.x                                   # (B, C, Z, Y, X), model units (dose: 1.0 = Rx)

**Randomness** (the determinism contract): ``generators`` is one ``torch.Generator`` for the
whole batch, or one per sample. One generator draws ``x_T`` for all B samples at once, then,
at every step that draws noise, one standard-normal tensor of the batch's shape: the order of
:func:`~dosegym.diffusion.sample.sample`, so ``DosePolicy.predict(case, seed=s)`` is the
decoded end of a chain started with ``seeded_generator(s)``. With B generators, generator
``i`` draws sample ``i``'s ``x_T`` and step noise, shape ``(1, C, Z, Y, X)``, as a chain of
one sample with that generator would. :meth:`ReverseChain.step` without an ``x_prev`` draws
step noise only when the sampler is stochastic (DDPM, or DDIM with ``eta`` > 0);
:meth:`ReverseChain.noise` always draws one step's noise. Draws happen on the generator's
device (CPU for :func:`seeded_generator`) and move to the chain's device, so a seed gives
the same noise on every device.

Rollouts do not build autograd graphs: every model forward runs under ``torch.no_grad`` with
the model in eval mode (:func:`frozen`). Log-probabilities are averaged over elements
(:mod:`dosegym.diffusion.schedulers.logprob`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from dosegym.diffusion.config import DiffusionConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.schedulers import (
    ReverseStepOutput,
    gaussian_log_prob,
    make_scheduler,
    mean_x0_gain,
    output_for_x0,
    per_sample,
    reverse_step,
)
from dosegym.diffusion.slots import SLOT_CHANNELS, ModelInput
from dosegym.errors import ModelError

SEED_MAX = 2**64 - 1  # the largest seed a torch.Generator takes
#: Samplers whose steps are Markov Gaussians (a chain can step them and score log-probs).
CHAIN_SAMPLERS: tuple[str, ...] = ("ddim", "ddpm")


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


def draw_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> torch.Tensor:
    """Standard-normal noise of ``shape`` (x_T or one step's noise), drawn on the generator's
    device (``device`` without one) and moved to ``device``."""
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
    generate slot): :func:`draw_noise` of that shape."""
    spec = model.config.spec
    return draw_noise((int(batch), SLOT_CHANNELS[slot or spec.generate], *spec.shape), generator, device)


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; a model in training mode is put back in
    it after (a model already in eval mode, as loaded checkpoints are, is left alone: the
    mode switch walks every submodule, a measurable cost per step for small models)."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train(True)


class ReverseChain:
    """B reverse-diffusion chains of ``model`` in lockstep (see the module docstring).

    ``steps``: reverse steps of the schedule; ``sampler``: ``"ddim"`` (with ``eta``; 0 =
    deterministic) or ``"ddpm"``. The chain owns its scheduler, so a ``policy.timesteps``
    call elsewhere does not move it. ``check_finite``: every step whose x̂0 or mean is NaN or
    infinite raises ``ModelError`` naming the step and the chains' ``keys`` (default on).

    State: ``x`` (``(B, C, Z, Y, X)``, None before :meth:`start`), ``k`` (steps done),
    ``cond`` (the batched conditions), ``keys`` (a name per chain, for messages).
    """

    def __init__(
        self,
        model: Any2Any,
        steps: int,
        sampler: str = "ddim",
        eta: float = 0.0,
        *,
        check_finite: bool = True,
    ) -> None:
        if model.config.objective != "diffusion":
            raise ModelError(
                "this checkpoint is a regression model (one forward pass); it has no reverse-diffusion steps"
            )
        if sampler not in CHAIN_SAMPLERS:
            raise ModelError(
                f"sampler {sampler!r} is not a Markov Gaussian step; valid: {list(CHAIN_SAMPLERS)} "
                "(dpm_solver serves predict() only)"
            )
        if not eta >= 0:
            raise ModelError(f"eta must be >= 0, got {eta}")
        cfg = model.config.diffusion
        self.model = model
        self.steps = check_num_steps(steps, cfg, "steps")
        self.sampler = sampler
        self.eta = float(eta)
        self.check_finite = bool(check_finite)
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.scheduler = make_scheduler(sampler, cfg)
        self.scheduler.set_timesteps(self.steps)
        self.timesteps: torch.Tensor = self.scheduler.timesteps.clone()
        self.cond: ModelInput | None = None
        self.x: torch.Tensor | None = None
        self.keys: list[str] = []
        self.k = 0
        self._generators: list[torch.Generator | None] = [None]
        self._dist: ReverseStepOutput | None = None

    # -- state --------------------------------------------------------------------------
    @property
    def stochastic(self) -> bool:
        """Whether an on-policy step draws noise (DDPM, or DDIM with ``eta`` > 0)."""
        return self.sampler == "ddpm" or self.eta > 0

    @property
    def batch_size(self) -> int:
        if self.x is None:
            raise ModelError("the chain has not started: call start(cond, generators) first")
        return int(self.x.shape[0])

    @property
    def running(self) -> bool:
        """Started and not past its last step."""
        return self.x is not None and self.k < self.steps

    @property
    def t(self) -> torch.Tensor:
        """The coming step's timestep (0-d tensor on the chain's device)."""
        return self.timesteps[min(self.k, self.steps - 1)]

    def timestep_fraction(self) -> float:
        """The coming step's timestep over ``num_train_timesteps - 1`` (0 once the chain ended)."""
        if self.k >= self.steps:
            return 0.0
        return float(self.timesteps[self.k]) / max(1, self.num_train_timesteps - 1)

    # -- starting -----------------------------------------------------------------------
    def start(
        self,
        cond: ModelInput,
        generators: torch.Generator | Sequence[torch.Generator] | None = None,
        *,
        x_T: torch.Tensor | None = None,
        keys: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Begin ``cond.batch_size`` chains on ``cond``'s device and return ``x_T``.

        ``generators``: one generator for the batch, one per sample, or None (torch's global
        generator); ``x_T``: a given start ``(B, C, Z, Y, X)`` instead of drawing one;
        ``keys``: the chains' names in messages (default ``cond.case_ids``)."""
        if not cond.batched:
            raise ModelError("the chain needs a batched ModelInput (use slots.collate)")
        b, device = cond.batch_size, cond.device
        if isinstance(generators, torch.Generator) or generators is None:
            gens: list[torch.Generator | None] = [generators]
        else:
            gens = list(generators)
            if len(gens) != b:
                raise ModelError(f"chain.start: {len(gens)} generators for a batch of {b}")
        if self.timesteps.device != device:
            self.scheduler.set_timesteps(self.steps, device=device)
            self.timesteps = self.scheduler.timesteps.clone()
        self.cond, self._generators, self.k, self._dist = cond, gens, 0, None
        self.keys = list(keys) if keys is not None else list(cond.case_ids)
        if x_T is not None:
            expected = (b, SLOT_CHANNELS[cond.generate_slot], *self.model.config.spec.shape)
            if tuple(x_T.shape) != expected:
                raise ModelError(f"chain.start: x_T shape {tuple(x_T.shape)}; expected {expected}")
            self.x = x_T.to(device)
        elif len(gens) == 1:
            self.x = initial_noise(self.model, b, gens[0], device, cond.generate_slot)
        else:
            self.x = torch.cat([initial_noise(self.model, 1, g, device, cond.generate_slot) for g in gens])
        return self.x

    # -- the coming step ----------------------------------------------------------------
    def model_output(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output at state ``x`` and the coming timestep (no autograd, eval mode)."""
        self._check_running()
        assert self.cond is not None
        with frozen(self.model):
            return self.model(x, self.t, self.cond)

    def step_from_output(self, model_output: torch.Tensor, x: torch.Tensor) -> ReverseStepOutput:
        """The Gaussian (``mean``, ``std``, ``pred_original_sample`` = x̂0) of the coming step
        from state ``x`` given a model output (``prev_sample`` is the mean; no noise drawn)."""
        self._check_running()
        with torch.no_grad():
            step = reverse_step(
                self.scheduler, model_output, self.t, x, eta=self.eta, variance_noise=torch.zeros_like(x)
            )
            if self.check_finite:
                finite = torch.isfinite(step.pred_original_sample).flatten(1).all(1)
                finite &= torch.isfinite(step.mean).flatten(1).all(1)
                if not bool(finite.all()):
                    self._not_finite(finite)
        return step

    def output_for_x0(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model output that implies x̂0 = ``x0`` at state ``x`` and the coming timestep
        (feed it to :meth:`step_from_output` to step towards a changed x̂0, e.g. guidance)."""
        self._check_running()
        acp = self.scheduler.alphas_cumprod.to(x.device)
        a_t = per_sample(acp, self.t.long().reshape(1).expand(x.shape[0]), x.ndim).to(x.dtype)
        return output_for_x0(self.scheduler.config.prediction_type, x0, x, a_t)

    def x0_gain(self) -> torch.Tensor:
        """``d mean / d x̂0`` of the coming step at the current state, ``(B, 1, 1, 1, 1)``
        (:func:`~dosegym.diffusion.schedulers.mean_x0_gain`): the step towards x̂0 + δ has the
        mean ``distribution().mean + x0_gain() * δ`` and the same std."""
        self._check_running()
        assert self.x is not None
        return mean_x0_gain(self.scheduler, self.t, self.x, eta=self.eta)

    def distribution(self) -> ReverseStepOutput:
        """The coming step's Gaussian from the current state (one batched forward, cached
        until the state changes)."""
        if self._dist is None:
            self._check_running()
            assert self.x is not None
            self._dist = self.step_from_output(self.model_output(self.x), self.x)
        return self._dist

    def distribution_at(self, x: torch.Tensor) -> ReverseStepOutput:
        """The coming step's Gaussian from another state ``x`` (not cached)."""
        return self.step_from_output(self.model_output(x), x)

    def noise(self) -> torch.Tensor:
        """One step's standard-normal noise of every chain, ``(B, C, Z, Y, X)``, from the
        generators in the module docstring's order (always draws)."""
        self._check_running()
        assert self.x is not None
        if len(self._generators) == 1:
            return draw_noise(self.x.shape, self._generators[0], self.x.device)
        one = (1, *self.x.shape[1:])
        return torch.cat([draw_noise(one, g, self.x.device) for g in self._generators])

    def log_prob(self, x_prev: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-density of ``x_prev`` under the coming step's Gaussian (mean over
        elements), NaN for chains whose step is deterministic."""
        d = self.distribution()
        return gaussian_log_prob(x_prev.detach(), d.mean, d.std, deterministic="nan")

    # -- stepping -----------------------------------------------------------------------
    def step(self, x_prev: torch.Tensor | None = None) -> ReverseStepOutput:
        """Take the coming step to ``x_prev`` (the caller's choice of x_{t-1}) or, without one,
        on-policy (``mean + std * noise()`` when stochastic, else the mean). Returns the step:
        ``prev_sample`` (the new state), the pretrained ``mean``, ``std``, x̂0 and
        ``log_prob`` of ``prev_sample`` (NaN where deterministic)."""
        d = self.distribution()
        if x_prev is None:
            x_prev = d.mean + d.std * self.noise() if self.stochastic else d.mean
        log_prob = gaussian_log_prob(self._checked(x_prev).detach(), d.mean, d.std, deterministic="nan")
        self.x, self.k, self._dist = x_prev, self.k + 1, None
        return ReverseStepOutput(x_prev, d.mean, d.std, log_prob, d.pred_original_sample)

    def advance(self, x_prev: torch.Tensor) -> None:
        """Move to ``x_prev`` without running the model (no log-prob): the step of a caller
        whose own model chose x_{t-1} (an agent's rollout). A distribution already computed
        for this step is dropped."""
        self._check_running()
        self.x, self.k, self._dist = self._checked(x_prev), self.k + 1, None

    def run(self) -> torch.Tensor:
        """Take every remaining step on-policy; the final state ``(B, C, Z, Y, X)``."""
        while self.running:
            self.step()
        assert self.x is not None
        return self.x

    # -- internals ----------------------------------------------------------------------
    def _checked(self, x_prev: torch.Tensor) -> torch.Tensor:
        assert self.x is not None
        if tuple(x_prev.shape) != tuple(self.x.shape):
            raise ModelError(
                f"chain.step: x_prev shape {tuple(x_prev.shape)}; expected {tuple(self.x.shape)}"
            )
        return x_prev

    def _check_running(self) -> None:
        if self.x is None:
            raise ModelError("the chain has not started: call start(cond, generators) first")
        if self.k >= self.steps:
            raise ModelError(f"the chain has ended (all {self.steps} steps taken); start it again")

    def _not_finite(self, finite: torch.Tensor) -> None:
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        cases = [self.keys[i] if i < len(self.keys) else f"episode {i}" for i in bad]
        raise ModelError(
            f"the model's prediction (x̂0 or step mean) is NaN or infinite at step "
            f"{self.k + 1}/{self.steps} (timestep {int(self.t)}) of case(s) {cases}; the policy's "
            "weights or its input are not finite (check the checkpoint)"
        )
