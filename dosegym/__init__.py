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
