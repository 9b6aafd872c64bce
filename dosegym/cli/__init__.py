"""dosegym.cli."""
