"""The Gaussian reverse step of DDPM and DDIM, with its log-probability (DDPO convention).

:func:`reverse_step` is shaped like a diffusers ``scheduler.step``: it takes the model
output, the timestep and ``x_t`` and returns ``x_{t-1}``; it also returns the Gaussian the
step draws from, ``x_{t-1} ~ N(mean, std^2 I)``, and the log-probability of ``x_{t-1}``.
Unlike diffusers it accepts per-sample timesteps ``(B,)``, injected noise
(``variance_noise``) and a given ``prev_sample`` (to score an action taken earlier, as
PPO-style ratios need). The formulas are diffusers' own (``DDIMScheduler.step`` and
``DDPMScheduler.step`` with ``variance_type="fixed_small"``), without x̂0 clipping.

**Log-probability convention** (as ddpo-pytorch and trl's DDPO): the Gaussian log-density
is **averaged over elements** (C, Z, Y, X), giving one number per sample. A sum would
scale with the number of voxels, so clip ranges, KL weights and learning rates tuned at
one grid size would not transfer to another; the mean is scale-free across resolutions and
makes the ratios and clip ranges of ddpo-pytorch (e.g. clip range 1e-4) carry over. The
log-probability is computed on ``prev_sample.detach()``: it is a function of the action.

**Deterministic steps** (``std == 0``: DDIM with ``eta=0``, or DDPM's last step to t < 0):
the Gaussian degenerates to a point mass and has no density. ``reverse_step`` then returns
``log_prob=None`` (``deterministic=True``) and :func:`gaussian_log_prob` raises
``ModelError`` or, with ``deterministic="nan"``, gives NaN for those samples; it never
returns a fake 0, which would make every PPO ratio exactly 1.

**x̂0 and the model output**: :func:`x0_and_eps` (model output -> x̂0, ε) and
:func:`output_for_x0` (x̂0 -> the model output implying it) are the one place that knows
what each ``prediction_type`` predicts; every step and every guidance goes through them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from dosegym.errors import ModelError

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class ReverseStepOutput:
    """One reverse step. ``std`` broadcasts against ``mean`` (shape ``(B, 1, ..., 1)``);
    ``log_prob`` is ``(B,)`` (mean over elements): ``None`` for a deterministic step from
    :func:`reverse_step`, NaN for each deterministic sample from
    :meth:`dosegym.diffusion.chain.ReverseChain.step`."""

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None
    pred_original_sample: torch.Tensor

    @property
    def deterministic(self) -> bool:
        """True when any sample's step has std == 0 (no density)."""
        return not bool((self.std > 0).all())


def gaussian_log_prob(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    deterministic: Literal["raise", "nan"] = "raise",
) -> torch.Tensor:
    """Per-sample log-density of ``x`` under ``N(mean, std^2)``, averaged over all non-batch
    elements (see module docstring), ``(B,)``. A sample whose ``std`` is not > 0 has no
    density: ``deterministic="raise"`` raises ``ModelError``, ``"nan"`` gives NaN for it."""
    if deterministic not in ("raise", "nan"):
        raise ModelError(f"gaussian_log_prob: deterministic must be 'raise' or 'nan', got {deterministic!r}")
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    positive = std > 0
    if deterministic == "raise" and not bool(positive.all()):
        raise ModelError(
            "log_prob of a deterministic step (std == 0, e.g. DDIM eta=0 or DDPM's last step) is undefined; "
            "use DDIM with eta > 0 for a stochastic policy"
        )
    safe = std if deterministic == "raise" else torch.where(positive, std, torch.ones_like(std))
    lp = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _LOG_SQRT_2PI
    lp = lp.reshape(lp.shape[0], -1).mean(dim=1)
    if deterministic == "raise":
        return lp
    ok = positive.reshape(-1).all() if positive.ndim == 0 else positive.reshape(positive.shape[0], -1).all(1)
    return torch.where(ok, lp, torch.full_like(lp, math.nan))


PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"unknown prediction_type {prediction_type!r}; valid: epsilon, sample, v_prediction")


def x0_and_eps(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂0, ε̂)`` implied by ``model_output`` at ``sample`` = x_t, for a model predicting
    ``prediction_type`` (``epsilon``: ε, ``sample``: x0, ``v_prediction``: v); ``alpha_cumprod``
    is ᾱ_t, broadcastable to ``sample`` (e.g. ``(B, 1, 1, 1, 1)``)."""
    _check_prediction_type(prediction_type)
    beta = 1 - alpha_cumprod
    if prediction_type == "epsilon":
        return (sample - beta**0.5 * model_output) / alpha_cumprod**0.5, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_cumprod**0.5 * model_output) / beta**0.5
    x0 = alpha_cumprod**0.5 * sample - beta**0.5 * model_output
    return x0, alpha_cumprod**0.5 * model_output + beta**0.5 * sample


def output_for_x0(
    prediction_type: str, x0: torch.Tensor, sample: torch.Tensor, alpha_cumprod: torch.Tensor
) -> torch.Tensor:
    """The model output that implies x̂0 = ``x0`` at ``sample`` = x_t: the inverse of
    :func:`x0_and_eps` (same arguments)."""
    _check_prediction_type(prediction_type)
    beta = 1 - alpha_cumprod
    if prediction_type == "epsilon":
        return (sample - alpha_cumprod**0.5 * x0) / beta**0.5
    if prediction_type == "v_prediction":
        return (alpha_cumprod**0.5 * sample - x0) / beta**0.5
    return x0


def per_sample(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[index]`` shaped ``(B, 1, ..., 1)`` to broadcast against ``ndim``-d samples."""
    return values[index].reshape(-1, *([1] * (ndim - 1)))


def _ddpm_prev_timestep(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """diffusers' ``previous_timestep`` for each element: the next timestep of the schedule,
    -1 after the last one."""
    steps = scheduler.timesteps.to(t.device)
    match = steps[None, :] == t[:, None]
    if not bool(match.any(dim=1).all()):
        bad = t[~match.any(dim=1)].tolist()
        raise ModelError(f"DDPM timestep(s) {bad} are not in the schedule {steps.tolist()[:8]}...")
    idx = match.float().argmax(dim=1)
    nxt = torch.cat([steps, steps.new_tensor([-1])])
    return nxt[idx + 1]


def _step_alphas(
    scheduler: DDIMScheduler | DDPMScheduler, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float
) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kind, t, a_t, a_prev)`` of a reverse step (``"ddim"`` or ``"ddpm"``; ``t`` ``(B,)``;
    ᾱ_t and ᾱ_prev ``(B, 1, ..., 1)``), with the checks :func:`reverse_step` documents."""
    if isinstance(scheduler, DDIMScheduler):
        kind = "ddim"
    elif isinstance(scheduler, DDPMScheduler):
        kind = "ddpm"
        if scheduler.config.variance_type != "fixed_small":
            raise ModelError(
                f"DDPM reverse_step needs variance_type='fixed_small', got {scheduler.config.variance_type!r}"
            )
    else:
        raise ModelError(
            f"reverse_step supports DDIMScheduler and DDPMScheduler, got {type(scheduler).__name__}; "
            "multistep solvers are not Markov Gaussian steps"
        )
    if scheduler.config.clip_sample or scheduler.config.thresholding:
        raise ModelError("reverse_step needs a scheduler with clip_sample=False and thresholding=False")
    if scheduler.num_inference_steps is None:
        raise ModelError(
            "call scheduler.set_timesteps(num_steps) (or policy.timesteps(num_steps)) before stepping"
        )
    if eta < 0:
        raise ModelError(f"reverse_step: eta must be >= 0, got {eta}")
    b, nd, dev = sample.shape[0], sample.ndim, sample.device
    t = torch.as_tensor(timestep, device=dev).long().reshape(-1)
    t = t.expand(b) if t.numel() == 1 else t
    if t.shape != (b,):
        raise ModelError(f"reverse_step: timestep must be a scalar or ({b},), got shape {tuple(t.shape)}")
    acp = scheduler.alphas_cumprod.to(dev)
    a_t = per_sample(acp, t, nd)
    if kind == "ddim":
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        final = torch.as_tensor(scheduler.final_alpha_cumprod, device=dev, dtype=acp.dtype)
    else:
        prev_t = _ddpm_prev_timestep(scheduler, t)
        final = torch.ones((), device=dev, dtype=acp.dtype)
    a_prev = torch.where(prev_t >= 0, acp[prev_t.clamp(min=0)], final).reshape(-1, *([1] * (nd - 1)))
    return kind, t, a_t, a_prev


def _ddim_std_and_eps_coef(
    a_t: torch.Tensor, a_prev: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM's step std ``eta * sigma_t`` and the coefficient of ε̂ in its mean."""
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp_min(0) ** 0.5
    return std, (1 - a_prev - std**2).clamp_min(0) ** 0.5


def mean_x0_gain(
    scheduler: DDIMScheduler | DDPMScheduler,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 0.0,
) -> torch.Tensor:
    """``d mean / d x̂0`` of the reverse step from ``sample`` = x_t (fixed), ``(B, 1, ..., 1)``
    in ``sample``'s dtype (arguments as :func:`reverse_step`). The step mean is affine in x̂0
    (ε̂ = (x_t - √ᾱ_t x̂0) / √(1 - ᾱ_t) for every prediction type) and the std does not depend
    on it, so moving x̂0 by δ moves the mean by ``gain * δ``: x̂0 guidance without a second
    step."""
    kind, _, a_t, a_prev = _step_alphas(scheduler, timestep, sample, eta)
    if kind == "ddim":
        eps_coef = _ddim_std_and_eps_coef(a_t, a_prev, eta)[1]
        gain = a_prev**0.5 - eps_coef * (a_t / (1 - a_t)) ** 0.5
    else:
        gain = a_prev**0.5 * (1 - a_t / a_prev) / (1 - a_t)
    return gain.to(sample.dtype)


def reverse_step(
    scheduler: DDIMScheduler | DDPMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 0.0,
    variance_noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ReverseStepOutput:
    """One DDIM (``eta`` as in diffusers) or DDPM (``eta`` ignored) reverse step.

    ``timestep``: a scalar or ``(B,)`` per-sample timesteps from ``scheduler.timesteps``
    (``set_timesteps`` must have been called). Give at most one of ``variance_noise``
    (``x_{t-1} = mean + std * variance_noise``) and ``prev_sample`` (score this
    ``x_{t-1}``); otherwise noise is drawn with ``generator`` (as diffusers does) when any std > 0.
    """
    if variance_noise is not None and prev_sample is not None:
        raise ModelError("reverse_step: give variance_noise or prev_sample, not both")
    kind, t, a_t, a_prev = _step_alphas(scheduler, timestep, sample, eta)
    dev = sample.device
    beta_t = 1 - a_t
    x0, eps = x0_and_eps(scheduler.config.prediction_type, model_output, sample, a_t)
    if kind == "ddim":
        std, eps_coef = _ddim_std_and_eps_coef(a_t, a_prev, eta)
        mean = a_prev**0.5 * x0 + eps_coef * eps
    else:
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        mean = (a_prev**0.5 * cur_beta / beta_t) * x0 + (cur_alpha**0.5 * (1 - a_prev) / beta_t) * sample
        variance = (1 - a_prev) / (1 - a_t) * cur_beta
        std = torch.where(
            t.reshape(variance.shape) > 0, variance.clamp_min(0) ** 0.5, torch.zeros_like(variance)
        )
    std = std.to(mean.dtype)
    if prev_sample is None:
        if variance_noise is None and bool((std > 0).any()):
            variance_noise = randn_tensor(
                model_output.shape, generator=generator, device=dev, dtype=model_output.dtype
            )
        prev_sample = mean if variance_noise is None else mean + std * variance_noise
    deterministic = not bool((std > 0).all())
    log_prob = None if deterministic else gaussian_log_prob(prev_sample.detach(), mean, std)
    return ReverseStepOutput(prev_sample, mean, std, log_prob, x0)
