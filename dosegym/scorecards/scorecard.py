"""``Scorecard``: a validated card (:class:`~dosegym.scorecards.schema.CardSchema`) that
binds to cases, scores doses and reads and writes its YAML file.

Structures are resolved once per case: ``card.bind(case)`` gives a
:class:`~dosegym.scorecards.bound.BoundScorecard` for any number of doses, and ``card.score``
/ ``card.score_torch`` keep the bindings of the last ``BIND_CACHE_SIZE`` cases. Treat cases
and cards as read-only once scored (a binding does not see later edits); environments with
many cases keep their own bindings. Torch is imported only by ``score_torch``
(:mod:`dosegym.scorecards.soft_card`).

Card files are UTF-8 text (UTF-16/32 with a byte-order mark are read too,
:func:`read_card_text`); our YAML schema is :class:`~dosegym.scorecards.schema.CardSchema`.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import PrivateAttr

from dosegym.data.atomic import atomic_path
from dosegym.data.case import Case
from dosegym.errors import ScorecardError
from dosegym.scorecards.bound import BoundScorecard
from dosegym.scorecards.report import ScoreReport
from dosegym.scorecards.schema import CardSchema

#: how many cases a card keeps bound (masks resolved) for ``score`` / ``score_torch``
BIND_CACHE_SIZE = 4


class _BindCache(dict):
    """Bindings of a card to recent cases (``(id(case), on_unmatched) -> BoundScorecard``; the
    binding holds the case, so an id is not reused while cached), or their soft scorecards
    (``id(binding) -> SoftScorecard``). A cache, not state: it never makes two cards unequal
    and is not copied."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BindCache)

    __hash__ = None  # type: ignore[assignment]

    def __deepcopy__(self, memo: dict) -> _BindCache:
        return _BindCache()


class Scorecard(CardSchema):
    """A scorecard (see :mod:`~dosegym.scorecards.schema` for its fields and rules). Build
    with :meth:`from_dict`, :meth:`from_yaml`, :func:`dosegym.scorecards.maas.read_maas` or
    :func:`dosegym.scorecards.registry.load_card`."""

    _bound: _BindCache = PrivateAttr(default_factory=lambda: _BindCache())
    _soft: _BindCache = PrivateAttr(default_factory=lambda: _BindCache())

    # -- YAML files -------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> Scorecard:
        """Read a card in our YAML schema."""
        p = Path(path)
        text = read_card_text(p)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ScorecardError(f"{p}: not valid YAML{where}: {exc}") from None
        return cls.from_dict(data, source=str(p))

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The card as YAML text (written atomically to ``path`` when given)."""
        text = "# dosegym scorecard (see dosegym.scorecards.scorecard for the schema)\n"
        text += yaml.dump(
            _flow_points(self.to_dict()), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
        )
        if path is not None:
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return text

    # -- scoring ----------------------------------------------------------------------------
    def bind(self, case: Case, *, on_unmatched: str | None = None) -> BoundScorecard:
        """Resolve every item's structure on ``case`` once (see :class:`BoundScorecard`)."""
        return BoundScorecard(self, case, on_unmatched=on_unmatched or self.on_unmatched)

    def _bound_for(self, case: Case, on_unmatched: str | None) -> BoundScorecard:
        """The binding to ``case`` from the cache of the ``BIND_CACHE_SIZE`` most recently
        scored cases (least recently used dropped first), else a new one."""
        mode = on_unmatched or self.on_unmatched
        key = (id(case), mode)
        bound = self._bound.pop(key, None)
        if bound is None or bound.case is not case:
            bound = self.bind(case, on_unmatched=mode)
        self._bound[key] = bound  # most recent last
        while len(self._bound) > BIND_CACHE_SIZE:
            self._bound.pop(next(iter(self._bound)))
        return bound

    def score(
        self, case: Case, dose_gy: np.ndarray | None = None, *, on_unmatched: str | None = None
    ) -> ScoreReport:
        """Score ``dose_gy`` (Gy, ``case.grid.shape``; default ``case.dose``) -> ``ScoreReport``.

        Structures are resolved once per case and cached on the card.
        """
        return self._bound_for(case, on_unmatched).score(dose_gy)

    def score_torch(
        self,
        case: Case,
        dose_gy,
        *,
        temperature: float | None = None,
        on_unmatched: str | None = None,
    ) -> Any:
        """Batched scoring in torch: ``dose_gy`` ``(B, Z, Y, X)`` (or ``(Z, Y, X)``) in Gy.

        Returns :class:`~dosegym.scorecards.soft_card.TorchScores` (totals ``(B,)``, points
        ``(B, n_items)``). With ``temperature`` (Gy) the metrics are the smooth ones of
        :mod:`~dosegym.scorecards.soft`. The soft scorecard of each cached binding is kept.
        """
        from dosegym.scorecards.soft_card import SoftScorecard  # torch only when asked for

        bound = self._bound_for(case, on_unmatched)
        key = id(bound)
        soft = self._soft.get(key)
        if soft is None or soft.bound is not bound:
            live = {id(b) for b in self._bound.values()}
            for stale in [k for k in self._soft if k not in live]:
                del self._soft[stale]
            soft = self._soft[key] = SoftScorecard(bound)
        return soft.score(dose_gy, temperature=temperature)


# -- YAML output -----------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    pass


class _FlowDict(dict):
    pass


class _FlowList(list):
    pass


_Dumper.add_representer(
    _FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True)
)
_Dumper.add_representer(
    _FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


def _flow_points(card: dict[str, Any]) -> dict[str, Any]:
    for item in card.get("items", []):
        pts = []
        for p in item.get("points", []):
            p = dict(p)
            if "colors" in p:
                p["colors"] = _FlowList(p["colors"])
            pts.append(_FlowDict(p))
        item["points"] = pts
    return card


# -- card files ------------------------------------------------------------------------------
#: Byte-order marks of the encodings read besides UTF-8 (UTF-32 first: its LE mark starts with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_card_text(path: Path) -> str:
    """The text of a card file: UTF-8 (with or without a byte-order mark), or UTF-16/32 with
    one (what Windows tools such as PowerShell's ``Out-File`` write). A NUL byte (UTF-16
    without its mark, a binary file) or bytes that do not decode raise ``ScorecardError``
    naming the file and the offset."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ScorecardError(f"{path}: cannot read ({exc.strerror})") from exc
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8-sig")
    if encoding == "utf-8-sig" and b"\x00" in raw:
        raise ScorecardError(
            f"{path}: NUL byte at offset {raw.index(0)}: UTF-16 without a byte-order mark, or not a "
            "text file; a card file must be UTF-8 text (UTF-16 only with a byte-order mark)"
        )
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ScorecardError(
            f"{path}: not {encoding.replace('-sig', '').upper()} text (byte 0x{raw[exc.start]:02x} at "
            f"offset {exc.start} cannot be decoded); a card file must be UTF-8 text (UTF-16 only with "
            "a byte-order mark)"
        ) from None
