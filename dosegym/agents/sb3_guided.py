"""Stock stable-baselines3 PPO and SAC on GuidedDose: learn the guidance weights, the denoiser stays frozen.

::

    agent = PPOGuided(guided_env, policy, {"samples_per_iteration": 8})
    agent.learn(total_samples=64); dose_gy = agent.predict(case, seed=0)

**What trains** is SB3's actor and critic (``MultiInputPolicy``); the dose model is the
env's frozen policy (``trains_denoiser = False``: no LoRA copy, no adapters saved). What
steers it is GuidedDose's action, one guidance weight per objective group.

**Features.** GuidedDose observes ``timestep`` (1), ``scores`` (the card's items, soft
scores of the current x̂0) and ``features``: x_t and x̂0 average-pooled to ``pool``³ per
channel, flattened, i.e. two small volumes. SB3's default ``CombinedExtractor`` would
flatten them and lose their layout, so :class:`GuidedFeatures` reshapes ``features`` back
to ``(2C, pool, pool, pool)`` and applies one ``Conv3d`` (3³, padding 1, SiLU), flattened,
joined with ``timestep`` and ``scores``; SB3's MLPs follow (actor and critic share it).

**Rollouts** run on a twin of the env's core with ``sample_num_steps`` steps, the config's
``guidance_scale`` (when set) and the
config's reward. **Episodes and seeds** as every SB3 agent (:mod:`dosegym.agents.sb3_agent`): one iteration
is ``samples_per_iteration`` whole episodes; SB3's global draws (action noise, minibatch
order, replay sampling) are seeded per iteration and scoped.

**Saved**: SB3's own ``model.save`` zip (``sb3_model.zip``: weights and optimizer states)
inside the agent folder's atomic write; with ``training_state=True`` (the shared
``training_state.pt``: iteration, curves) also, for SAC, the replay buffer
(``replay_buffer.pkl``).

:meth:`SB3Guided.predict` runs one guided episode on the case with the learned policy's
deterministic actions and returns the decoded final dose in Gy on the case grid.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from pydantic import Field
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from dosegym.agents.config import AgentConfig
from dosegym.agents.sb3_agent import PPOFields, SB3Agent
from dosegym.agents.sb3_env import MODEL_INIT, numpy_obs, rollout_core, rollout_seed, scoped_seed
from dosegym.data.case import Case
from dosegym.errors import AgentError

MODEL_FILE = "sb3_model.zip"
REPLAY_FILE = "replay_buffer.pkl"


class GuidedFeatures(BaseFeaturesExtractor):
    """See the module docstring: ``(B, channels * pool**3 + 1 + n_items)`` features."""

    def __init__(
        self, observation_space: spaces.Dict, pool: int, volume_channels: int, channels: int = 8
    ) -> None:
        n_features = int(np.prod(observation_space["features"].shape))
        if n_features != volume_channels * pool**3:
            raise AgentError(
                f"GuidedFeatures: features has {n_features} values, not volume_channels {volume_channels} "
                f"x pool {pool}^3; give the env's pool and 2 x its dose channels"
            )
        n_items = int(np.prod(observation_space["scores"].shape))
        super().__init__(observation_space, channels * pool**3 + 1 + n_items)
        self.shape = (volume_channels, pool, pool, pool)
        self.cnn = nn.Sequential(nn.Conv3d(volume_channels, channels, 3, padding=1), nn.SiLU(), nn.Flatten())

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        volumes = obs["features"].reshape(-1, *self.shape)
        return torch.cat([self.cnn(volumes), obs["timestep"], obs["scores"]], dim=1)


class PPOGuidedConfig(PPOFields):
    """PPO on GuidedDose: the shared fields plus SB3's PPO fields (:class:`PPOFields`, SB3's
    defaults)."""

    agent_name: ClassVar[str] = "ppo_guided"

    features_channels: int = Field(8, ge=1)
    """Channels of GuidedFeatures' Conv3d."""
    guidance_scale: float | None = Field(None, ge=0)
    """GuidedDose's ``guidance_scale`` (units of the highest Rx) for rollouts and predictions;
    None: the env's own."""
    log_std_init: float = 0.0
    """Initial log std of the Gaussian actions (SB3's ``log_std_init``; 0: std 1 on actions in [-1, 1])."""


class SACGuidedConfig(AgentConfig):
    """SAC on GuidedDose: the shared fields plus SB3's SAC fields."""

    agent_name: ClassVar[str] = "sac_guided"

    buffer_size: int = Field(100_000, ge=1)
    """Replay buffer capacity in transitions."""
    learning_starts: int = Field(100, ge=0)
    """Env steps collected before the first update."""
    batch_size: int = Field(64, ge=1)
    """Transitions per gradient step."""
    tau: float = Field(0.005, gt=0, le=1)
    """Soft update coefficient of the target critics."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount factor."""
    train_freq: int = Field(1, ge=1)
    """Env steps (per env) between updates."""
    gradient_steps: int = Field(1, ge=1)
    """Gradient steps per update."""
    ent_coef: float | Literal["auto"] = "auto"
    """Entropy coefficient, or "auto" (learned towards the target entropy)."""
    features_channels: int = Field(8, ge=1)
    """Channels of GuidedFeatures' Conv3d."""
    guidance_scale: float | None = Field(None, ge=0)
    """GuidedDose's ``guidance_scale`` (units of the highest Rx) for rollouts and predictions;
    None: the env's own."""


class SB3Guided(SB3Agent):
    """Base of the GuidedDose agents (see the module docstring)."""

    trains_denoiser = False
    env_kind = "guided"
    #: The SB3 algorithm's name in ``stable_baselines3``.
    algorithm: ClassVar[str] = ""

    def sb3_class(self) -> Any:
        import stable_baselines3

        return getattr(stable_baselines3, self.algorithm)

    def sb3_kwargs(self) -> dict[str, Any]:
        """The algorithm's own arguments from the config."""
        raise NotImplementedError

    def policy_kwargs(self) -> dict[str, Any]:
        """The algorithm's policy arguments from the config, beside the features extractor."""
        return {}

    def _guided_core(self) -> Any:
        if self.env is None:
            raise AgentError(f"{type(self).__name__} needs a GuidedDose env: give the agent env=...")
        core = getattr(self.env, "unwrapped", self.env).core
        if not hasattr(core.config, "guidance_scale"):
            raise AgentError(f"{type(self).__name__} runs on GuidedDose; got a {type(core).__name__} env")
        return core

    def env_changes(self) -> dict[str, Any]:
        """What the agent sets on the env's config: its steps, and its guidance scale if any."""
        c = self.config
        scale = {} if c.guidance_scale is None else {"guidance_scale": float(c.guidance_scale)}
        return {"steps": c.sample_num_steps, **scale}

    def setup_training(self, iterations: int) -> None:
        """Build SB3's model on the rollout env once (or give a loaded one the env)."""
        if self.vec_env is not None:
            return
        self._guided_core()
        self.n_steps()  # a config n_steps that does not make whole episodes is refused here
        core = rollout_core(self.env, reward=self.config.reward_config(), **self.env_changes())
        vec_env = self.make_vec_env(core)
        if self.model is not None:
            self.model.set_env(vec_env)
        else:
            c = self.config
            policy_kwargs = {
                "features_extractor_class": GuidedFeatures,
                "features_extractor_kwargs": {
                    "pool": core.config.pool,
                    "volume_channels": 2 * core.gen_shape[0],
                    "channels": c.features_channels,
                },
                **self.policy_kwargs(),
            }
            with scoped_seed(rollout_seed(c.seed, 0, 0, MODEL_INIT)):
                self.model = self.sb3_class()(
                    "MultiInputPolicy",
                    vec_env,
                    learning_rate=self.schedule,
                    policy_kwargs=policy_kwargs,
                    device=self.base_policy.device,
                    verbose=0,
                    **self.sb3_kwargs(),
                )
        self.record_grad_norms(*self.optimizers())

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers of what trains (for ``grad_norm``)."""
        return [self.model.policy.optimizer]

    def predict(self, case: Case, seed: int = 0) -> np.ndarray:
        """One guided episode of ``case`` with the learned policy's deterministic actions
        (sampler seed from ``seed``): the final dose, Gy on the case grid, ``(Z, Y, X)`` float32.
        Before any training (no SB3 model yet) every weight is -1: no guidance, the frozen
        model's own episode (what ``dosegym align`` evaluates as "before")."""
        core = self._guided_core()
        config = dataclasses.replace(core.config, cases=[case], **self.env_changes())
        one = type(core)(config, 1)
        obs, _ = one.reset([seeding.np_random(seed)[0]], None)
        while one.running:
            if self.model is None:
                action = -np.ones(one.single_action_space.shape, np.float32)[None]
            else:
                action, _ = self.model.predict(numpy_obs(obs), deterministic=True)
            obs, _, _, _ = one.step(np.asarray(action, dtype=np.float32))
        with torch.no_grad():
            return one.decode(one.cds[0], one.chain.x[0]).float().cpu().numpy()

    # -- saving ---------------------------------------------------------------------------
    def _save_extra(self, folder: Path, training_state: bool) -> list[str]:
        if self.model is None:
            return []
        self.model.save(folder / MODEL_FILE)
        files = [MODEL_FILE]
        if training_state:
            if hasattr(self.model, "replay_buffer"):
                self.model.save_replay_buffer(folder / REPLAY_FILE)
                files.append(REPLAY_FILE)
        return files

    def _after_load(self, folder: Path, resume: bool) -> None:
        self._reset_training()
        path = folder / MODEL_FILE
        if path.is_file():
            self.model = self.sb3_class().load(
                path, device=self.base_policy.device, custom_objects={"learning_rate": self.schedule}
            )
        if resume:
            if self.model is None:
                raise AgentError(f"{folder}: no {MODEL_FILE}; it was saved before any training")
            if (folder / REPLAY_FILE).is_file():
                self.model.load_replay_buffer(folder / REPLAY_FILE)


class PPOGuided(SB3Guided):
    """Stock SB3 PPO on GuidedDose."""

    name = "ppo_guided"
    Config = PPOGuidedConfig
    algorithm = "PPO"

    def sb3_kwargs(self) -> dict[str, Any]:
        c = self.config
        return {
            "n_steps": self.n_steps(),
            **{k: getattr(c, k) for k in ("batch_size", "n_epochs", "gamma", "gae_lambda", "clip_range")},
            **{k: getattr(c, k) for k in ("ent_coef", "vf_coef", "max_grad_norm", "target_kl")},
        }

    def policy_kwargs(self) -> dict[str, Any]:
        return {"log_std_init": float(self.config.log_std_init)}


class SACGuided(SB3Guided):
    """Stock SB3 SAC on GuidedDose."""

    name = "sac_guided"
    Config = SACGuidedConfig
    algorithm = "SAC"

    def sb3_kwargs(self) -> dict[str, Any]:
        c = self.config
        keys = (
            "buffer_size",
            "learning_starts",
            "batch_size",
            "tau",
            "gamma",
            "train_freq",
            "gradient_steps",
        )
        return {**{k: getattr(c, k) for k in keys}, "ent_coef": c.ent_coef}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.model.actor.optimizer, self.model.critic.optimizer]
