"""Gymnasium environments over the dose diffusion chain.

Importing this package (``import dosegym`` does) registers, without importing torch:

* ``dosegym/DenoiseDose-v0``: :class:`~dosegym.envs.denoise.DenoiseDoseEnv`, the reverse chain
  as an MDP (DDPO);
* ``dosegym/GuidedDose-v0``: :class:`~dosegym.envs.guided.GuidedDoseEnv`, per-objective
  guidance weights on a frozen model (any SB3 Box-action algorithm);
* ``dosegym/ScorecardBandit-v0``: :class:`~dosegym.envs.bandit.ScorecardBanditEnv`, one step,
  the action a whole dose.

Every kind runs on one batched core (:mod:`dosegym.envs.core`); ``gymnasium.make_vec(id,
num_envs=B, vectorization_mode="vector_entry_point")`` (the default for these ids) gives its
native vector env (``DenoiseDoseVectorEnv``, ``GuidedDoseVectorEnv``,
``ScorecardBanditVectorEnv``: B episodes, one batched model forward per step).

Reward composition: :mod:`dosegym.envs.reward`; case sources: :mod:`dosegym.envs.sources`;
constructor arguments: :mod:`dosegym.envs.config`.
The ids are registered with ``order_enforce=False`` so that the envs' own ``EnvError``
(step before reset, bad actions) reaches the caller unchanged.
"""

from __future__ import annotations

import importlib
from typing import Any

from gymnasium.envs.registration import register, registry

ENV_IDS: dict[str, tuple[str, str]] = {
    "dosegym/DenoiseDose-v0": (
        "dosegym.envs.denoise:DenoiseDoseEnv",
        "dosegym.envs.denoise:DenoiseDoseVectorEnv",
    ),
    "dosegym/GuidedDose-v0": ("dosegym.envs.guided:GuidedDoseEnv", "dosegym.envs.guided:GuidedDoseVectorEnv"),
    "dosegym/ScorecardBandit-v0": (
        "dosegym.envs.bandit:ScorecardBanditEnv",
        "dosegym.envs.bandit:ScorecardBanditVectorEnv",
    ),
}

for _id, (_entry, _vector) in ENV_IDS.items():
    if _id not in registry:
        register(id=_id, entry_point=_entry, vector_entry_point=_vector, order_enforce=False)

_LAZY = {
    "DenoiseDoseEnv": "dosegym.envs.denoise",
    "GuidedDoseEnv": "dosegym.envs.guided",
    "ScorecardBanditEnv": "dosegym.envs.bandit",
    "DenoiseDoseVectorEnv": "dosegym.envs.denoise",
    "GuidedDoseVectorEnv": "dosegym.envs.guided",
    "ScorecardBanditVectorEnv": "dosegym.envs.bandit",
    "DenoiseConfig": "dosegym.envs.denoise",
    "GuidedConfig": "dosegym.envs.guided",
    "BanditConfig": "dosegym.envs.bandit",
    "EnvConfig": "dosegym.envs.config",
    "RewardConfig": "dosegym.envs.reward",
    "gaussian_kl": "dosegym.envs.reward",
    "CaseSource": "dosegym.envs.sources",
    "GROUP_NAMES": "dosegym.scorecards.groups",
}


def __getattr__(name: str) -> Any:
    """The env classes and helpers, imported on first use (they import torch)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dosegym.envs' has no attribute {name!r}")


__all__ = ["ENV_IDS", *_LAZY]
