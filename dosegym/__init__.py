"""dosegym: align radiotherapy dose-prediction diffusion models with reinforcement learning."""

# Registers the dosegym/ Gymnasium ids (entry-point strings: torch is not imported here).
import dosegym.envs  # noqa: E402, F401
from dosegym._version import __version__
from dosegym.errors import (
    AgentError,
    BenchError,
    DataError,
    DosegymError,
    EnvError,
    ModelError,
    ScorecardError,
)

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
