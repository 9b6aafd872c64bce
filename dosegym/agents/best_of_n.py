"""Best-of-N: the inference-time baseline. Sample N doses, keep the best by the card.

``predict(case, seed)`` draws the N samples in one batched ``policy.predict(..., samples=N)``
call and keeps the one with the highest exact scorecard total (the first of ties).
``learn`` trains nothing; it checks and records the budget, so that every learning agent is
compared with Best-of-N at equal sample count (one ``predict`` costs N samples).
The run's ``config.seed`` picks the draws: ``predict(case, seed)`` samples with seed
``seed + SEED_STRIDE * config.seed`` (config seed 0: the policy's own draws), so the seeds of a
benchmark give Best-of-N a spread, as training does a learning agent's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from dosegym.agents.base import Agent, Callback
from dosegym.agents.config import AgentConfig
from dosegym.data.case import Case
from dosegym.scorecards.report import ScoreReport

#: Sampling seeds of config seed ``s`` start at ``s * SEED_STRIDE`` (a prime, far above eval seeds).
SEED_STRIDE = 1_000_003


class BestOfNConfig(AgentConfig):
    """Best-of-N's config: the shared fields plus ``n``."""

    agent_name: ClassVar[str] = "best_of_n"

    n: int = Field(4, ge=1)
    """Samples drawn per prediction; the best by the card is kept."""


class BestOfN(Agent):
    """See the module docstring."""

    name = "best_of_n"
    Config = BestOfNConfig
    learns = False

    @property
    def samples_per_iteration(self) -> int:
        """One prediction: N samples."""
        return int(self.config.n)

    def learn(self, total_samples: int, callback: Callback | None = None) -> BestOfN:
        """Nothing trains: check the budget and the eval cases' card fit, and record the budget."""
        predictions = self.check_budget(total_samples)
        self.check_card_fit(self.eval_cases())
        self.samples_trained += int(total_samples)
        if callback is not None:
            callback(self, {"samples": self.samples_trained, "predictions": predictions})
        return self

    def samples(self, case: Case, seed: int = 0) -> np.ndarray:
        """The N doses of ``case`` (Gy, ``(N, Z, Y, X)``), one batched call."""
        c = self.config
        doses = self.policy.predict(
            case,
            steps=c.sample_num_steps,
            sampler=self.policy.sampler,
            seed=seed + SEED_STRIDE * c.seed,
            samples=c.n,
            eta=c.predict_eta,
        )
        return doses[None] if c.n == 1 else doses

    def best(self, case: Case, seed: int = 0) -> tuple[np.ndarray, list[ScoreReport], int]:
        """``(doses, reports, index)``: the N doses, their exact card reports, the kept one."""
        self.check_card_fit([case])
        card = self.card_for(case)
        doses = self.samples(case, seed)
        reports = [card.score(case, d) for d in doses]
        totals = np.array([r.total for r in reports], dtype=np.float64)
        return doses, reports, int(np.argmax(totals))

    def predict(self, case: Case, seed: int = 0) -> np.ndarray:
        """The best of N doses of ``case`` by its card (Gy, case grid, ``(Z, Y, X)``)."""
        doses, _, k = self.best(case, seed)
        return doses[k]

    def info(self) -> dict[str, Any]:
        return {"n": self.config.n}
