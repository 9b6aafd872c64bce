"""An SB3 ``ActorCriticPolicy`` whose actions are the dose model's own reverse steps (DenoiseDose).

**Actor.** The action distribution of a DenoiseDose observation is the Gaussian of the
reverse step: ``mean`` from the trainable denoiser (LoRA on a copy of the policy's model) at
the observed ``x_t`` and timestep with the observed conditions, ``std`` fixed by the scheduler
at that timestep (``eta`` for DDIM; not learned, so SB3's ``log_std`` does not exist and the
entropy is a constant). The step is :func:`dosegym.diffusion.schedulers.reverse_step`, the
one every sampler and env uses, so its log-prob equals ``DosePolicy.step_distribution`` +
``gaussian_log_prob`` on the same step.

**Log-probs are averaged over elements** (C, Z, Y, X), the DDPO convention of
:mod:`dosegym.diffusion.schedulers.logprob`: SB3's Gaussian sums them, which at 196 608
voxels makes every ratio ``exp(new - old)`` overflow. The entropy is averaged the same way.
A deterministic step (std = 0, e.g. DDPM's last step) acts with the mean and has log-prob 0
under any parameters: it adds nothing to the policy loss.

**Conditions from the observation.** SB3's training loop sees only minibatches of stored
observations (shuffled across steps and envs), so the model input is rebuilt from each
observation's ``cond_<slot>`` volumes and ``cond_present`` (slot ``i`` of the model spec's
condition slots present -> role ``condition`` and available; else absent). The agent's
:class:`~dosegym.agents.sb3_env.CoreVecEnv` puts the chain's own condition tensors in the
observations (``model_conditions``; the env's copies are clamped to the Box bounds, and the
beam plate exceeds 1 on the phantoms), so the model gets exactly the env's input (checked in
the tests). ``rx_max_gy`` is not observed and not needed: the forward never reads it.

**Critic.** :class:`ValueFeatures`, a tiny 3-D CNN over (x_t, condition volumes) pooled to a
vector, joined with the timestep and ``cond_present``; SB3's MLP (``vf``: one hidden layer)
and ``value_net`` map it to the value. It trains with the LoRA adapters; nothing else of the
denoiser trains (the optimizer holds only parameters that require grad).

**Action noise** is drawn from :attr:`DenoiserPolicy.noise_generator` (CPU, reseeded by the
agent every iteration), never from torch's global generator.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from dosegym.diffusion import DosePolicy
from dosegym.diffusion.chain import draw_noise
from dosegym.diffusion.schedulers import gaussian_log_prob, make_scheduler, reverse_step
from dosegym.diffusion.slots import ModelInput
from dosegym.errors import AgentError

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


class ElementMeanGaussian(Distribution):
    """``N(mean, std^2)`` over a whole volume, log-prob and entropy averaged over elements.

    ``mean`` ``(B, C, Z, Y, X)``, ``std`` ``(B, 1, 1, 1, 1)`` (0: a deterministic step);
    :meth:`log_prob` takes actions flat ``(B, C*Z*Y*X)`` (SB3's buffer) or shaped."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def proba_distribution_net(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise AgentError("ElementMeanGaussian has no parameter net: the denoiser gives the mean")

    def proba_distribution(self, mean: torch.Tensor, std: torch.Tensor) -> ElementMeanGaussian:
        self.mean, self.std = mean, std.expand(mean.shape[0], *([1] * (mean.ndim - 1)))
        return self

    def _random(self) -> torch.Tensor:
        return self.std.reshape(-1) > 0

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        assert self.mean is not None and self.std is not None
        x = actions.reshape(self.mean.shape)
        lp = gaussian_log_prob(x, self.mean, self.std, deterministic="nan")
        return torch.where(self._random(), lp, torch.zeros_like(lp))

    def entropy(self) -> torch.Tensor:
        assert self.std is not None
        std = self.std.reshape(-1)
        safe = torch.where(std > 0, std, torch.ones_like(std))
        return torch.where(std > 0, _HALF_LOG_2PI_E + torch.log(safe), torch.zeros_like(std))

    def sample(self) -> torch.Tensor:
        assert self.mean is not None and self.std is not None
        noise = draw_noise(self.mean.shape, self.generator, self.mean.device).to(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        assert self.mean is not None
        return self.mean

    def actions_from_params(
        self, mean: torch.Tensor, std: torch.Tensor, deterministic: bool = False
    ) -> torch.Tensor:
        return self.proba_distribution(mean, std).get_actions(deterministic=deterministic)

    def log_prob_from_params(
        self, mean: torch.Tensor, std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        actions = self.actions_from_params(mean, std)
        return actions, self.log_prob(actions)


def volume_keys(observation_space: spaces.Dict) -> list[str]:
    """``x_t`` then the ``cond_<slot>`` volumes of a DenoiseDose observation space."""
    return [
        "x_t",
        *sorted(
            k for k, s in observation_space.spaces.items() if k.startswith("cond_") and len(s.shape) == 4
        ),
    ]


class ValueFeatures(BaseFeaturesExtractor):
    """The critic's features: two stride-2 ``Conv3d`` (``channels``, ``2 * channels``, SiLU)
    over the channel-stacked x_t and condition volumes, averaged over the grid, joined with
    the timestep and ``cond_present``: ``(B, 2 * channels + 1 + n_slots)``."""

    def __init__(self, observation_space: spaces.Dict, channels: int = 8) -> None:
        keys = volume_keys(observation_space)
        n_present = int(np.prod(observation_space["cond_present"].shape))
        super().__init__(observation_space, 2 * channels + 1 + n_present)
        self.keys = keys
        in_ch = sum(observation_space[k].shape[0] for k in keys)
        self.cnn = nn.Sequential(
            nn.Conv3d(in_ch, channels, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv3d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
        )

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        volumes = torch.cat([obs[k] for k in self.keys], dim=1)
        return torch.cat([self.cnn(volumes), obs["timestep"], obs["cond_present"].float()], dim=1)


class DenoiserPolicy(ActorCriticPolicy):
    """See the module docstring. ``dose_policy``: the trainable :class:`DosePolicy` (its model
    is the actor's denoiser); ``steps``, ``eta``: the rollout sampler's steps and eta
    (``dose_policy.sampler``); ``value_channels``: width of :class:`ValueFeatures`."""

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        lr_schedule: Any,
        *,
        dose_policy: DosePolicy,
        steps: int,
        eta: float,
        value_channels: int = 8,
        **kwargs: Any,
    ) -> None:
        self._dose_policy = dose_policy  # a plain attribute until _build registers its model
        self.steps, self.eta = int(steps), float(eta)
        self.noise_generator = torch.Generator("cpu")
        self.last_gaussian: tuple[torch.Tensor, torch.Tensor] | None = None
        #: What :meth:`forward` (rollouts) steps with: the denoiser itself (None) or a copy with
        #: the same weights that is cheaper to run (the agent's LoRA-merged copy), unregistered.
        self.rollout_denoiser: nn.Module | None = None
        spec = dose_policy.spec
        self.cond_slots = [s for s in spec.slots if s != spec.generate]
        self.generate_slot = spec.generate
        kwargs.setdefault("net_arch", {"pi": [], "vf": [64]})
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            features_extractor_class=ValueFeatures,
            features_extractor_kwargs={"channels": int(value_channels)},
            **kwargs,
        )

    def _build(self, lr_schedule: Any) -> None:
        """The critic (SB3's layers on :class:`ValueFeatures`), the denoiser and its
        scheduler, and the optimizer over what trains."""
        self.denoiser = self._dose_policy.model
        cfg = self.denoiser.config.diffusion
        self.scheduler = make_scheduler(self._dose_policy.sampler, cfg)
        self.scheduler.set_timesteps(self.steps)
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.action_dist = ElementMeanGaussian(self.noise_generator)
        self._build_mlp_extractor()
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if self.ortho_init:
            for module, gain in (
                (self.features_extractor, np.sqrt(2)),
                (self.mlp_extractor, np.sqrt(2)),
                (self.value_net, 1.0),
            ):
                module.apply(partial(self.init_weights, gain=gain))
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)

    def value_head(self) -> nn.ModuleDict:
        """The critic's modules (what trains besides the adapters)."""
        return nn.ModuleDict(
            {
                "features_extractor": self.features_extractor,
                "mlp_extractor": self.mlp_extractor,
                "value_net": self.value_net,
            }
        )

    # -- the actor ------------------------------------------------------------------------
    def model_input(self, obs: dict[str, torch.Tensor]) -> ModelInput:
        """The batched model input of observations (see the module docstring)."""
        present = obs["cond_present"] > 0.5
        b = present.shape[0]
        tensors = {s: obs[f"cond_{s}"] for s in self.cond_slots}
        roles = {**{s: "condition" for s in self.cond_slots}, self.generate_slot: "generate"}
        available = {s: present[:, i] for i, s in enumerate(self.cond_slots)}
        ones = torch.ones(b, device=present.device)
        return ModelInput(tensors, roles, ones, batched=True, available=available)

    def timesteps(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` integer timesteps of observations (their ``timestep`` fraction)."""
        return torch.round(obs["timestep"].reshape(-1).double() * (self.num_train_timesteps - 1)).long()

    def step_gaussian(
        self, obs: dict[str, torch.Tensor], denoiser: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean (B, C, Z, Y, X), std (B, 1, 1, 1, 1))`` of the reverse step at each
        observation with ``denoiser`` (default :attr:`denoiser`: differentiable in the
        adapters when grad is enabled)."""
        x, t = obs["x_t"], self.timesteps(obs)
        out = (self.denoiser if denoiser is None else denoiser)(x, t, self.model_input(obs))
        step = reverse_step(self.scheduler, out, t, x, eta=self.eta, variance_noise=torch.zeros_like(x))
        if not bool(torch.isfinite(step.mean.detach()).all()):
            raise AgentError(
                f"the trainable denoiser's step mean is NaN or infinite at timestep(s) {t.tolist()}: "
                "the adapters diverged (lower the learning rate or max_grad_norm)"
            )
        return step.mean, step.std

    def use_for_rollouts(self, denoiser: nn.Module | None) -> None:
        """Step rollouts (:meth:`forward`) with ``denoiser`` (None: :attr:`denoiser`); kept out
        of the module tree (not in the state dict, the optimizer nor ``.to``)."""
        self.__dict__["rollout_denoiser"] = denoiser

    def get_distribution(
        self, obs: dict[str, torch.Tensor], denoiser: nn.Module | None = None
    ) -> ElementMeanGaussian:
        obs = self.obs_to_dict(obs)
        mean, std = self.step_gaussian(obs, denoiser)
        return ElementMeanGaussian(self.noise_generator).proba_distribution(mean, std)

    def obs_to_dict(self, obs: Any) -> dict[str, torch.Tensor]:
        """SB3's preprocessing of an observation (float tensors)."""
        from stable_baselines3.common.preprocessing import preprocess_obs

        return preprocess_obs(obs, self.observation_space, normalize_images=False)

    # -- SB3's entry points ---------------------------------------------------------------
    def forward(
        self, obs: Any, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Actions ``(B, C, Z, Y, X)``, values ``(B, 1)`` and log-probs ``(B,)`` (rollouts);
        the step Gaussian (of :attr:`rollout_denoiser` when set) is kept in
        :attr:`last_gaussian` (for the env's KL)."""
        dist = self.get_distribution(obs, self.rollout_denoiser)
        actions = dist.get_actions(deterministic=deterministic)
        self.last_gaussian = (dist.mean, dist.std)
        return actions, self.predict_values(obs), dist.log_prob(actions)

    def evaluate_actions(
        self, obs: Any, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values ``(B, 1)``, log-probs ``(B,)`` (mean over elements) and entropies ``(B,)`` of
        stored actions (flat or shaped) under the current parameters (training)."""
        dist = self.get_distribution(obs)
        return self.predict_values(obs), dist.log_prob(actions), dist.entropy()
