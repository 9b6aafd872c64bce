"""Alignment agents: one :class:`Agent` contract, one registry, shared config and machinery.

::

    Agent = dosegym.agents.get("best_of_n")      # the registry: name -> class
    agent = Agent(env, policy, config)           # env: a (vector) dosegym env; policy: DosePolicy
    agent.learn(total_samples=512, callback=None)
    agent.save("runs/x"); agent = Agent.load("runs/x")   # or dosegym.agents.load("runs/x")
    dose_gy = agent.predict(case, seed=0)

Modules: :mod:`~dosegym.agents.config` (``AgentConfig``, torch-free),
:mod:`~dosegym.agents.registry` (``get``, ``register``, ``available``; torch-free; how to add
an agent), :mod:`~dosegym.agents.base` (``Agent``, the checks, saving, ``result.json``),
:mod:`~dosegym.agents.lora` (what trains: LoRA through peft, or full weights),
the agents (:mod:`~dosegym.agents.best_of_n` ``BestOfN``, :mod:`~dosegym.agents.ddpo`
``DDPO``, :mod:`~dosegym.agents.ppo` ``PPO``: SB3 PPO on DenoiseDose with
:mod:`~dosegym.agents.sb3_policy`'s ``DenoiserPolicy``, :mod:`~dosegym.agents.sb3_guided`
``PPOGuided``, ``SACGuided``: stock SB3 on GuidedDose), :mod:`~dosegym.agents.evaluate`
(``evaluate``, ``EvalResult``, ``PolicyPredictor``), :mod:`~dosegym.agents.result` (the
``result.json`` schema: ``write_result``, ``read_result``, ``validate_result``), and the
training machinery: :mod:`~dosegym.agents.optim` (the accelerate optimizer step),
:mod:`~dosegym.agents.rollout` (batched rollouts through the DenoiseDose vector env),
:mod:`~dosegym.agents.stat_tracking` (per-case reward normalisation), the SB3 glue
:mod:`~dosegym.agents.sb3_env` (``CoreVecEnv``, seeds) and :mod:`~dosegym.agents.sb3_agent`
(the SB3 agents' iteration). The agents import torch on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dosegym.agents.config import AgentConfig
from dosegym.agents.registry import available, get, load, register, shipped_config

_LAZY = {
    "Agent": "dosegym.agents.base",
    "BestOfN": "dosegym.agents.best_of_n",
    "BestOfNConfig": "dosegym.agents.best_of_n",
    "DDPO": "dosegym.agents.ddpo",
    "DDPOConfig": "dosegym.agents.ddpo",
    "write_result": "dosegym.agents.result",
    "read_result": "dosegym.agents.result",
    "validate_result": "dosegym.agents.result",
    "evaluate": "dosegym.agents.evaluate",
    "EvalResult": "dosegym.agents.evaluate",
    "PolicyPredictor": "dosegym.agents.evaluate",
}


def __getattr__(name: str) -> Any:
    """``Agent``, ``BestOfN`` and the torch-side helpers, imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dosegym.agents' has no attribute {name!r}")


__all__ = ["AgentConfig", "available", "get", "load", "register", "shipped_config", *_LAZY]
