"""PPO (Schulman et al. 2017) through stable-baselines3 on DenoiseDose: the model's own steps as actions.

::

    agent = PPO(env, policy, {"samples_per_iteration": 8, "sample_num_steps": 10})
    agent.learn(total_samples=64)

**What runs.** SB3's ``PPO`` with :class:`~dosegym.agents.sb3_policy.DenoiserPolicy` (actor:
the trainable denoiser's step Gaussian, log-probs averaged over elements; critic: a tiny 3-D
CNN value head) on :class:`~dosegym.agents.sb3_env.CoreVecEnv` over a twin of the env's core
with ``pretrained_log_prob=False``, the torch backend, ``sample_num_steps`` steps and the
config's reward, so that
a rollout with ``w_kl = 0`` costs one forward of the trainable model per step. With
``reward.w_kl > 0`` the agent tells the env its Gaussian before every step (the env then
runs the frozen model for the KL).

**One iteration** = one SB3 rollout of ``samples_per_iteration`` whole episodes (SB3's
``n_steps`` = ``samples_per_iteration / num_envs * sample_num_steps`` env steps per env) and
one update (``n_epochs`` passes over minibatches of ``batch_size`` transitions); then the
shared ``_after_iteration`` (metrics from the episodes' infos and SB3's logger). Rollout
randomness comes from ``(seed, iteration, index)`` (:func:`~dosegym.agents.sb3_env.rollout_seed`):
episode ``index`` of ``iteration`` resets with its own seed, the action noise generator and
the minibatch order (numpy's global generator, scoped and restored) are reseeded every
iteration, so resuming needs no RNG state.

**Rollout buffer memory** (SB3's ``DictRolloutBuffer``, allocated when the model is built).
With ``V = Z*Y*X`` voxels, ``C_x`` dose channels, ``C_c`` condition channels (13 for the
default slots: ct, body, targets, 8 OAR groups, beam and angle plates) and ``n_slots``
condition slots, one transition holds ``b = 4 V (2 C_x + C_c) + 4 + n_slots + 24`` bytes
(x_t, conditions and action as float32, timestep, ``cond_present`` as int8, six float32
scalars). The buffer of ``T = n_steps * n_envs = samples_per_iteration * sample_num_steps``
transitions needs ``T b`` bytes, plus, while SB3 flattens it for the update, one more copy of
its largest entry (``4 V max_slot_channels T``: the 8 OAR channels), plus one minibatch
(``batch_size * b``): :func:`rollout_buffer_bytes`. At the default grid 48x64x64 (V = 196 608)
b = 11.8 MB, so the defaults (8 samples x 20 steps = 160 transitions, batch 8) need about
2.8 GiB. A buffer that would not fit in the available memory (``/proc/meminfo``
MemAvailable) is refused before anything is allocated, with the bytes it needs.

**Saved**: what trains, the LoRA adapters (base :meth:`~dosegym.agents.base.Agent.save`) and
the value head (``value_head.safetensors``); with ``training_state=True`` the shared
``training_state.pt`` also holds the SB3 optimizer's state and SB3's step counters
(:meth:`PPO.agent_state`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from pydantic import Field

from dosegym.agents.sb3_agent import PPOFields, SB3Agent
from dosegym.agents.sb3_buffer import VolumeRolloutBuffer
from dosegym.agents.sb3_env import ACTION_NOISE, MODEL_INIT, rollout_core, rollout_seed, scoped_seed
from dosegym.agents.sb3_policy import DenoiserPolicy
from dosegym.envs.core import DoseCore
from dosegym.errors import AgentError

VALUE_HEAD_FILE = "value_head.safetensors"


class PPOConfig(PPOFields):
    """PPO's config: the shared fields plus SB3's PPO fields (:class:`PPOFields`), with
    defaults for voxel-sized Gaussian actions."""

    agent_name: ClassVar[str] = "ppo"

    batch_size: int = Field(8, ge=2)
    """Transitions per minibatch of the update (the update's memory grows with it)."""
    n_epochs: int = Field(1, ge=1)
    """Passes over the rollout per update (1, as DDPO's train_num_inner_epochs)."""
    clip_range: float = Field(1e-4, gt=0)
    """PPO clip range of the ratio of element-averaged step probabilities (DDPO's 1e-4 scale)."""
    ent_coef: float = Field(0.0, ge=0)
    """Entropy coefficient (0: the scheduler fixes the step std, the entropy does not train)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient norm clip of each minibatch step."""
    value_channels: int = Field(8, ge=1)
    """Channels of the value head's first Conv3d (the second has twice as many)."""


def available_memory_bytes() -> int:
    """Memory available to a new allocation: ``/proc/meminfo`` MemAvailable, else free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _nbytes(space: spaces.Space) -> int:
    return int(np.prod(space.shape)) * np.dtype(space.dtype).itemsize


def rollout_buffer_bytes(
    observation_space: spaces.Dict, action_space: spaces.Box, transitions: int, batch_size: int
) -> int:
    """Peak bytes of SB3's ``DictRolloutBuffer`` of ``transitions`` (n_steps * n_envs) during
    an update with minibatches of ``batch_size`` (the formula of the module docstring)."""
    per = sum(_nbytes(s) for s in observation_space.spaces.values()) + _nbytes(action_space) + 6 * 4
    largest = max(_nbytes(s) for s in [*observation_space.spaces.values(), action_space])
    return int(transitions) * (per + largest) + int(batch_size) * per


class PPO(SB3Agent):
    """See the module docstring."""

    name = "ppo"
    Config = PPOConfig

    config: PPOConfig

    def __init__(self, env: Any = None, policy: Any = None, config: Any = None, **kw: Any) -> None:
        super().__init__(env, policy, config, **kw)
        if env is not None:
            self.check_memory()

    def _reset_training(self) -> None:
        super()._reset_training()
        self._value_state: dict[str, torch.Tensor] | None = None
        self._sb3_state: dict[str, Any] | None = None

    def check_memory(self, core: DoseCore | None = None) -> int:
        """The rollout buffer's bytes; ``AgentError`` saying how many, before anything is
        allocated, when they exceed the available memory."""
        core = core or getattr(self.env, "unwrapped", self.env).core
        n_steps, b = self.n_steps(), self.num_envs()
        need = rollout_buffer_bytes(
            core.single_observation_space, core.single_action_space, n_steps * b, self.config.batch_size
        )
        have = available_memory_bytes()
        if need > have:
            raise AgentError(
                f"PPO's rollout buffer would need {need} bytes ({need / 2**30:.2f} GiB: n_steps {n_steps} "
                f"x {b} envs transitions on a {core.model_spec.shape} grid, "
                f"batch_size {self.config.batch_size}) "
                f"but {have} bytes ({have / 2**30:.2f} GiB) are available; lower samples_per_iteration, "
                "sample_num_steps or batch_size"
            )
        return need

    def setup_training(self, iterations: int) -> None:
        """Build SB3's PPO on the rollout env once (restoring a loaded value head and, when
        resumed, the optimizer state and SB3's counters)."""
        if self.model is not None:
            return
        from stable_baselines3 import PPO as SB3PPO

        if self.env is None:
            raise AgentError("PPO.learn needs an env: give the agent a DenoiseDose env (env=...)")
        c = self.config
        core = rollout_core(
            self.env,
            pretrained_log_prob=False,
            obs_backend="torch",
            steps=c.sample_num_steps,
            reward=c.reward_config(),
        )
        self.check_memory(core)
        vec_env = self.make_vec_env(core, model_conditions=True)
        if c.reward.w_kl > 0:
            vec_env.before_step = self._tell_gaussian
        policy_kwargs = {
            "dose_policy": self.policy,
            "steps": c.sample_num_steps,
            "eta": c.sample_eta,
            "value_channels": c.value_channels,
        }
        with scoped_seed(rollout_seed(c.seed, 0, 0, MODEL_INIT)):  # the value head's initial weights
            self.model = SB3PPO(
                DenoiserPolicy,
                vec_env,
                learning_rate=self.schedule,
                n_steps=self.n_steps(),
                batch_size=c.batch_size,
                n_epochs=c.n_epochs,
                gamma=c.gamma,
                gae_lambda=c.gae_lambda,
                clip_range=c.clip_range,
                ent_coef=c.ent_coef,
                vf_coef=c.vf_coef,
                max_grad_norm=c.max_grad_norm,
                target_kl=c.target_kl,
                policy_kwargs=policy_kwargs,
                rollout_buffer_class=VolumeRolloutBuffer,
                device=self.policy.device,
                verbose=0,
            )
        sb3_policy = self.model.policy
        if self._value_state is not None:
            sb3_policy.value_head().load_state_dict(self._value_state)
        if self._sb3_state is not None:
            sb3_policy.optimizer.load_state_dict(self._sb3_state["optimizer"])
            self.model.num_timesteps = int(self._sb3_state["num_timesteps"])
            self.model._n_updates = int(self._sb3_state["n_updates"])
        self.record_grad_norms(sb3_policy.optimizer)

    def before_iteration(self) -> None:
        """Reseed the policy's action noise from ``(seed, iteration)``; the rollouts' denoiser
        (:meth:`sampling_policy`: the adapters folded in) synced to the last update."""
        seed = rollout_seed(self.config.seed, self.iteration, 1, ACTION_NOISE)  # index 0: scoped_seed
        self.model.policy.noise_generator.manual_seed(seed)
        self.model.policy.use_for_rollouts(self.sampling_policy().model)

    def _tell_gaussian(self, core: DoseCore) -> None:
        """Before a step: the policy's Gaussian of the actions it just chose, for the env's KL."""
        mean, std = self.model.policy.last_gaussian
        core.set_agent_gaussian(mean, std)

    # -- saving ---------------------------------------------------------------------------
    def value_head_state(self) -> dict[str, torch.Tensor] | None:
        """The value head's weights (None before the model is built and with none loaded)."""
        if self.model is not None:
            state = self.model.policy.value_head().state_dict()
            return {k: v.detach().contiguous().cpu() for k, v in state.items()}
        return self._value_state

    def _save_extra(self, folder: Path, training_state: bool) -> list[str]:
        from safetensors.torch import save_file

        files = []
        state = self.value_head_state()
        if state is not None:
            save_file(state, str(folder / VALUE_HEAD_FILE))
            files.append(VALUE_HEAD_FILE)
        return files

    def agent_state(self) -> dict[str, Any]:
        """SB3's optimizer state and step counters (in the shared training state)."""
        if self.model is None:
            raise AgentError("save(training_state=True) before any training: there is no state to resume")
        return {
            "optimizer": self.model.policy.optimizer.state_dict(),
            "num_timesteps": int(self.model.num_timesteps),
            "n_updates": int(self.model._n_updates),
        }

    def load_agent_state(self, state: dict[str, Any]) -> None:
        self._sb3_state = dict(state)  # applied when setup_training builds the model

    def _after_load(self, folder: Path, resume: bool) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self._reset_training()
        path = folder / VALUE_HEAD_FILE
        if path.is_file():
            try:
                self._value_state = load_file(str(path))
            except (OSError, SafetensorError) as exc:
                raise AgentError(f"{path}: cannot read the value head ({exc})") from exc
