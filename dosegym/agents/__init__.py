"""dosegym.agents."""
