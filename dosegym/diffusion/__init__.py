"""dosegym.diffusion."""
