"""Per-case data of the dose environments: preparation on the model grid and the caches.

:func:`prepare_case` puts a case on the model grid once per process (an LRU shared by every
env on the same source); :class:`CaseStore` keeps one env's :class:`CaseData` (the case, its
bound card, and what the env computes once per case: device tensors, the observation's
condition part, the soft scorer, the pretrained baseline).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from dosegym.data.case import Case
from dosegym.diffusion.refiner import CaseDecoder, Refiner
from dosegym.diffusion.slots import ModelInput, ModelSpec, Resampler, to_model
from dosegym.envs.cards import CardChooser
from dosegym.envs.guidance import SoftScorer
from dosegym.envs.sources import CaseSource
from dosegym.errors import DosegymError, EnvError
from dosegym.scorecards.bound import BoundScorecard
from dosegym.scorecards.fit import CardFit, card_fit
from dosegym.scorecards.scorecard import Scorecard
from dosegym.scorecards.soft_card import SoftScorecard

_PREPARED: OrderedDict[tuple[str, str], tuple[Case, ModelInput, Resampler]] = OrderedDict()
_PREPARED_SIZE = 32


def prepare_case(source: CaseSource, index: int, spec: ModelSpec) -> tuple[Case, ModelInput, Resampler]:
    """Case ``index`` of ``source`` on the model grid (``to_model``), cached per process for
    cases read from paths/ids, so that several envs on one source share the work."""
    ref = source.refs[index]
    key = None if isinstance(ref, Case) else (str(ref), spec.model_dump_json())
    if key is not None and key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    case = source.load(index)
    try:
        mi, res = to_model(case, spec)
    except DosegymError as exc:
        raise EnvError(f"case {source.key(index)!r}: the model cannot take this case: {exc}") from exc
    if key is not None:
        _PREPARED[key] = (case, mi, res)
        while len(_PREPARED) > _PREPARED_SIZE:
            _PREPARED.popitem(last=False)
    return case, mi, res


def _device_tensor(a: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)


class PretrainedStats(NamedTuple):
    """``baseline_samples`` pretrained samples of a case: their mean scorecard points and
    their mean dose (Gy, case grid, on the env's device)."""

    points: float
    mean_dose_gy: torch.Tensor


@dataclass
class CaseData:
    """One case as an env uses it: the case, its model-grid input, resampler and decoder (the
    policy's decode onto the case grid, with its refiner), its card (bound) and fit, and what
    the env computes once per case (on its device, for its observation backend): ``body``
    (bool) and ``reference_gy`` on the case grid,
    ``cond_obs`` (the observation's condition part), ``soft`` (GuidedDose's soft scorer on the
    model grid), ``dense`` (the dense reward's, at ``dense_temperature_gy``), ``soft_card``
    (the Bandit's soft scorecard on the case grid) and ``pretrained`` (the baseline and the
    Bandit's anchor)."""

    index: int
    key: str
    case: Case
    model_input: ModelInput
    resampler: Resampler
    decoder: CaseDecoder
    card: Scorecard
    bound: BoundScorecard
    fit: CardFit
    cond_input: ModelInput
    body: torch.Tensor | None
    reference_gy: torch.Tensor | None
    cond_obs: dict[str, Any] | None = None
    soft: SoftScorer | None = None
    dense: SoftScorer | None = None
    soft_card: SoftScorecard | None = None
    pretrained: PretrainedStats | None = None

    @property
    def rx_gy(self) -> float:
        return float(self.resampler.rx_max_gy)


def cond_input_of(mi: ModelInput) -> ModelInput:
    """``mi`` without the generate slot's clean tensor (the model never sees it, and cases
    with and without a reference dose must collate into one batch)."""
    gen = mi.generate_slot
    tensors = {k: v for k, v in mi.tensors.items() if k != gen}
    return ModelInput(tensors, dict(mi.roles), mi.rx_max_gy, mi.batched, dict(mi.available), mi.case_ids)


class CaseStore:
    """One env's prepared cases: the LRU of :class:`CaseData` (``size`` cases) over
    ``source``, scored with ``cards`` on ``device``, decoded with ``refiner`` (the policy's)."""

    def __init__(
        self,
        source: CaseSource,
        cards: CardChooser,
        spec: ModelSpec,
        device: torch.device,
        size: int,
        allow_card_mismatch: bool,
        refiner: Refiner | None = None,
    ) -> None:
        self.source, self.cards, self.spec, self.device = source, cards, spec, device
        self.refiner = refiner
        self.size = int(size)
        self.allow_card_mismatch = bool(allow_card_mismatch)
        self._cases: OrderedDict[int, CaseData] = OrderedDict()

    def case_data(self, index: int) -> CaseData:
        """Case ``index`` of the source, prepared (cached). A card that does not fit the
        case (:func:`~dosegym.scorecards.fit.card_fit`: matched items carry under half its
        maximum, or its prescription is not the case's) raises ``EnvError`` unless
        ``allow_card_mismatch``."""
        if index in self._cases:
            self._cases.move_to_end(index)
            return self._cases[index]
        key = self.source.key(index)
        case, mi, res = prepare_case(self.source, index, self.spec)
        card = self.cards.card_for(case)
        try:
            bound = card.bind(case)
        except DosegymError as exc:
            raise EnvError(f"case {key!r} cannot be scored with card {card.name!r}: {exc}") from exc
        fit = card_fit(card, case, bound)
        if not fit.ok and not self.allow_card_mismatch:
            hint = (
                "rescale_card=True rescales the card to the case's prescription; " if fit.rx_mismatch else ""
            )
            raise EnvError(
                f"case {key!r}: {fit.message()}; scores would stand for "
                f"the wrong plan. Use a card for this case ({hint}allow_card_mismatch=True "
                "scores with it anyway)"
            )
        body, reference = (_device_tensor(a, self.device) for a in (case.body, case.dose))
        decoder = CaseDecoder(case, res, self.refiner)
        cd = CaseData(
            index, key, case, mi, res, decoder, card, bound, fit, cond_input_of(mi), body, reference
        )
        self._cases[index] = cd
        while len(self._cases) > self.size:
            self._cases.popitem(last=False)
        return cd

    def choose(self, rng: np.random.Generator, options: dict[str, Any] | None) -> CaseData:
        """The episode's case: ``options["case_index"]`` when given, else drawn from ``rng``
        (one draw either way, so the rest of the episode's draws do not depend on it)."""
        options = options or {}
        unknown = sorted(set(options) - {"case_index"})
        if unknown:
            raise EnvError(f"reset options {unknown} are unknown; valid: ['case_index']")
        n = len(self.source)
        if "case_index" in options:
            index = options["case_index"]
            if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < n:
                raise EnvError(
                    f"reset option case_index={index!r} is out of range; the source has {n} cases: "
                    f"an integer in [0, {n - 1}]"
                )
            index = int(index)
            rng.integers(n)  # keep the draw sequence the same either way
        else:
            index = int(rng.integers(n))
        return self.case_data(index)
