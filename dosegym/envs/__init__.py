"""dosegym.envs."""
