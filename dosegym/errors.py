"""Error types of dosegym.

Every error a user can cause is a :class:`DosegymError`. Messages say *what* is wrong,
*where* (file, field or item) and *what would be valid*.
"""

from __future__ import annotations


class DosegymError(Exception):
    """Base class of every dosegym error."""


class DataError(DosegymError, ValueError):
    """A case, file or array that cannot be read or is inconsistent."""


class ScorecardError(DosegymError, ValueError):
    """A scorecard file or item that is invalid, or a structure it cannot match."""


class ModelError(DosegymError, ValueError):
    """A checkpoint, model config or model input that does not fit."""


class EnvError(DosegymError, ValueError):
    """Invalid use of an environment: bad action, step before reset, unknown source."""


class AgentError(DosegymError, ValueError):
    """Invalid agent configuration or training state."""


class BenchError(DosegymError, ValueError):
    """Invalid benchmark suite or results."""
