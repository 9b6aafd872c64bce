"""dosegym.scorecards."""
