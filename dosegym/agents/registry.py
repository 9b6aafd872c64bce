"""The one registry of agents: name -> class.

A new agent is one file and one registry line: write ``dosegym/agents/NAME.py`` with a
subclass of :class:`~dosegym.agents.base.Agent` (and of
:class:`~dosegym.agents.config.AgentConfig` for its own fields), decorate the class with
``@register("NAME")``, and add the line ``"NAME": "dosegym.agents.NAME"`` to :data:`AGENTS`
below (so that :func:`get` finds it without importing every agent, and without torch until
an agent is asked for).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from dosegym.errors import AgentError

#: Agent name -> the module that registers it (one line per agent).
AGENTS: dict[str, str] = {
    "best_of_n": "dosegym.agents.best_of_n",
}

_CLASSES: dict[str, Any] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register an :class:`~dosegym.agents.base.Agent` subclass as ``name``."""

    def deco(cls: type) -> type:
        if name in _CLASSES and _CLASSES[name] is not cls:
            raise AgentError(f"agent name {name!r} is registered already (by {_CLASSES[name].__name__})")
        cls.name = name
        config = getattr(cls, "Config", None)
        if config is not None and not config.__dict__.get("agent_name"):
            config.agent_name = name
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
        importlib.import_module(AGENTS[name])
    if name not in _CLASSES:
        raise AgentError(f"module {AGENTS[name]} did not register an agent {name!r}")
    return _CLASSES[name]
