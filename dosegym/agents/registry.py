"""The one registry of agents: name -> class.

A new agent is one file and one registry line: write ``dosegym/agents/NAME.py`` with a
subclass of :class:`~dosegym.agents.base.Agent` whose class attribute ``name = "NAME"`` (and
a subclass of :class:`~dosegym.agents.config.AgentConfig` with ``agent_name = "NAME"`` and
its own fields, one docstring line each), then add the line
``"NAME": "dosegym.agents.NAME:ClassName"`` to :data:`AGENTS` below. :func:`get` imports an
agent's module only when it is asked for (so ``import dosegym.agents`` stays torch-free),
and agent modules never import this one (no import circle). :func:`register` adds an agent
defined outside the package (a plugin, a test) at run time.

:func:`shipped_config` is an agent's measured config (``dosegym/agents/configs/NAME.yaml``,
the settings of its runs in ``benchmarks/results/align/``), where one ships.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from dosegym.errors import AgentError

#: Agent name -> the module that registers it (one line per agent).
AGENTS: dict[str, str] = {
    "best_of_n": "dosegym.agents.best_of_n:BestOfN",
    "ddpo": "dosegym.agents.ddpo:DDPO",
    "draft": "dosegym.agents.draft:DRaFT",
    "grpo": "dosegym.agents.grpo:GRPO",
    "nft": "dosegym.agents.nft:NFT",
    "ppo": "dosegym.agents.ppo:PPO",
    "ppo_guided": "dosegym.agents.sb3_guided:PPOGuided",
    "sac_guided": "dosegym.agents.sb3_guided:SACGuided",
}

_CLASSES: dict[str, Any] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register an :class:`~dosegym.agents.base.Agent` subclass defined
    outside :data:`AGENTS` as ``name`` (sets its ``name`` and its config's ``agent_name``)."""

    def deco(cls: type) -> type:
        if name in AGENTS or name in _CLASSES and _CLASSES[name] is not cls:
            raise AgentError(f"agent name {name!r} is registered already")
        cls.name = name
        config = cls.Config
        if config.agent_name != name:  # a config of its own, never a change to a shared one
            namespace = {"__module__": cls.__module__, "__annotations__": {"agent_name": ClassVar[str]}}
            cls.Config = type(f"{cls.__name__}Config", (config,), {**namespace, "agent_name": name})
        _CLASSES[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """The names of every agent, sorted."""
    return sorted(set(AGENTS) | set(_CLASSES))


def get(name: str) -> Any:
    """The agent class registered as ``name``; ``AgentError`` listing the valid names."""
    if not isinstance(name, str) or name not in AGENTS and name not in _CLASSES:
        raise AgentError(f"unknown agent {name!r}; valid: {available()}")
    if name not in _CLASSES:
        module, attr = AGENTS[name].split(":")
        cls = getattr(importlib.import_module(module), attr)
        if cls.name != name or cls.Config.agent_name != name:
            raise AgentError(
                f"{AGENTS[name]}: registered as {name!r} but its name is {cls.name!r} and its config's "
                f"agent_name {cls.Config.agent_name!r}"
            )
        _CLASSES[name] = cls
    return _CLASSES[name]


def shipped_config(name: str) -> Path | None:
    """The shipped config file of agent ``name`` (``dosegym/agents/configs/NAME.yaml``); None
    where none ships (a plugin); ``AgentError`` for an unknown name."""
    get(name)
    from importlib.resources import files

    path = Path(str(files("dosegym.agents") / "configs" / f"{name}.yaml"))
    return path if path.is_file() else None


def load(folder: str | Path, env: Any = None, policy: Any = None) -> Any:
    """The agent saved in ``folder``, of the class its ``agent.json`` names (see
    :meth:`dosegym.agents.base.Agent.load`)."""
    from dosegym.agents.base import read_agent_file

    return get(read_agent_file(Path(folder))["agent"]).load(folder, env=env, policy=policy)
