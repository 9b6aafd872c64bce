"""Per-case reward normalisation: trl's ``PerPromptStatTracker`` with cases for prompts.

:class:`PerCaseStatTracker` keeps the last ``buffer_size`` rewards of every case key. A
batch's advantage of a sample is ``(reward - mean) / (std + 1e-6)`` with the mean and
(population) std of the case's buffer once that buffer, this batch included, holds at least
``min_count`` rewards, else of the whole batch (trl 0.23.1's rule, from ddpo-pytorch).
:func:`batch_advantages` is the normalisation without tracking (DDPO with
``per_prompt_stat_tracking=False``): the batch's mean and std, ``+ 1e-8``.
:func:`group_advantages` is GRPO's: each case's samples of this batch against their own
mean and std, no history; a group whose rewards all tie (or of one sample) gets 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from dosegym.errors import AgentError

#: Added to a case's (or the batch's) std, as trl does.
TRACKER_EPS = 1e-6
#: Added to the batch's std without tracking, as trl does.
BATCH_EPS = 1e-8


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """``(r - mean(r)) / (std(r) + 1e-8)`` over the batch, float64."""
    r = np.asarray(rewards, dtype=np.float64)
    return (r - r.mean()) / (r.std() + BATCH_EPS)


def group_advantages(keys: Sequence[str], rewards: np.ndarray, eps: float = TRACKER_EPS) -> np.ndarray:
    """GRPO's group-relative advantages ``(r - mean_g) / (std_g + eps)`` over the samples of
    each case key ``g`` in this batch (population std), float64; 0 for a group of one sample
    or whose rewards all tie (it teaches nothing)."""
    r = np.asarray(rewards, dtype=np.float64)
    keys_arr = np.asarray(list(keys), dtype=object)
    if keys_arr.shape != r.shape:
        raise AgentError(f"group advantages: {len(keys_arr)} case keys for {r.size} rewards")
    adv = np.zeros_like(r)
    for key in dict.fromkeys(keys_arr.tolist()):
        sel = keys_arr == key
        g = r[sel]
        if g.size > 1 and float(np.ptp(g)) > 0:
            adv[sel] = (g - g.mean()) / (g.std() + eps)
    return adv


class PerCaseStatTracker:
    """See the module docstring. ``buffer_size`` >= 1 rewards per case; ``min_count`` >= 1."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if buffer_size < 1 or min_count < 1:
            raise AgentError(
                f"per-case stat tracking needs buffer_size >= 1 and min_count >= 1, got "
                f"{buffer_size} and {min_count}"
            )
        if min_count > buffer_size:
            raise AgentError(
                f"per_prompt_stat_tracking_min_count {min_count} exceeds the buffer size {buffer_size}: "
                "a case's own statistics would never be used"
            )
        self.buffer_size, self.min_count = int(buffer_size), int(min_count)
        self.stats: dict[str, deque[float]] = {}

    def update(self, keys: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Add a batch (``keys[i]`` is sample ``i``'s case) and return its advantages ``(N,)``."""
        r = np.asarray(rewards, dtype=np.float64)
        keys_arr = np.asarray(list(keys), dtype=object)
        if keys_arr.shape != r.shape:
            raise AgentError(f"stat tracker: {len(keys_arr)} case keys for {r.size} rewards")
        adv = np.empty_like(r)
        for key in dict.fromkeys(keys_arr.tolist()):  # first-seen order
            sel = keys_arr == key
            buf = self.stats.setdefault(key, deque(maxlen=self.buffer_size))
            buf.extend(r[sel].tolist())
            ref = np.asarray(buf) if len(buf) >= self.min_count else r
            adv[sel] = (r[sel] - ref.mean()) / (ref.std() + TRACKER_EPS)
        return adv

    def state_dict(self) -> dict[str, Any]:
        """The buffers, for a training checkpoint."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {k: list(v) for k, v in self.stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the buffer size and minimum count must match)."""
        if (state["buffer_size"], state["min_count"]) != (self.buffer_size, self.min_count):
            raise AgentError(
                f"stat tracker state of buffer {state['buffer_size']} / min count {state['min_count']} "
                f"does not fit this config's {self.buffer_size} / {self.min_count}"
            )
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}
