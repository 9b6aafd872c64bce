"""dosegym.bench."""
