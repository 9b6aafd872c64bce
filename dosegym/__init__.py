"""dosegym: align radiotherapy dose-prediction diffusion models with reinforcement learning."""

from dosegym.errors import (
    AgentError,
    BenchError,
    DataError,
    DosegymError,
    EnvError,
    ModelError,
    ScorecardError,
)

__version__ = "0.1.0"

# Registers the dosegym/ Gymnasium ids (entry-point strings: torch is not imported here).
import dosegym.envs  # noqa: E402, F401

__all__ = [
    "AgentError",
    "BenchError",
    "DataError",
    "DosegymError",
    "EnvError",
    "ModelError",
    "ScorecardError",
    "__version__",
]
