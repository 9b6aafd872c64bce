"""Case sources of the dose environments: where an episode's case comes from.

``cases`` may be:

* ``"phantoms"``: every shipped phantom (:func:`dosegym.data.phantoms.shipped_phantom_ids`);
* ``"phantoms:SITE"``: the shipped phantoms of one site (``headneck``, ``prostate``, ``lung``);
* ``"phantoms:SITE/N"``: one shipped phantom;
* ``"phantoms/SPLIT"`` or ``"phantoms:SITE/SPLIT"``: the shipped phantoms of a split of the
  manifest (``train``: indices 0..27, ``test``: the held-out 28..31), of every site or one;
* a folder of ``pt_*`` patient folders (OpenKBP's ``train-pats`` / ``validation-pats``),
  taken in patient-number order; a folder of phantom ``.npz`` files, in name order; or one
  case (a path :func:`dosegym.data.read_case` reads);
* a list of such paths (or ``phantoms:SITE/N`` ids) and/or :class:`~dosegym.data.Case`
  objects, or a single ``Case``.

Cases are read lazily, when an episode first draws them, and kept in a small LRU cache.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from dosegym.data.case import Case
from dosegym.data.sites import SITES, PhantomId, is_phantom, is_phantom_ref, parse_phantom_ref
from dosegym.errors import DosegymError, EnvError

VALID_FORMS = (
    f"'phantoms', 'phantoms:SITE' or 'phantoms:SITE/N' (SITE one of {', '.join(SITES)}); "
    "'phantoms/SPLIT' or 'phantoms:SITE/SPLIT' (SPLIT train or test); "
    "a folder of OpenKBP pt_* folders or of phantom .npz files; a path to one case; "
    "or a list of paths and/or Case objects"
)
_PT = re.compile(r"^pt_(\d+)$")
#: The splits of the shipped phantom set (its manifest's ``split``; models train on ``train`` only).
PHANTOM_SPLITS = ("train", "test")
_SPLIT = re.compile(r"^phantoms(?::(?P<site>[a-z]+))?/(?P<split>[a-z]+)$")

CaseRef = str | Case


class CaseSource:
    """An ordered list of case references (see the module docstring) with lazy loading.

    ``spec``: what the user passed (kept for messages). ``cache_size``: cases kept loaded.
    """

    def __init__(self, cases: str | Path | Case | Sequence[str | Path | Case], cache_size: int = 16):
        self.spec = cases
        self.refs: list[CaseRef] = _expand(cases)
        if not self.refs:
            raise EnvError(f"case source {cases!r} holds no case; valid forms: {VALID_FORMS}")
        self.cache_size = max(1, int(cache_size))
        self._cache: OrderedDict[int, Case] = OrderedDict()

    def __len__(self) -> int:
        return len(self.refs)

    def key(self, index: int) -> str:
        """A stable name of case ``index`` (its path or id; ``case:<case_id>#<index>`` for objects)."""
        ref = self.refs[index]
        return f"case:{ref.case_id}#{index}" if isinstance(ref, Case) else ref

    def site(self, index: int) -> tuple[str | None, bool | None]:
        """``(site, is_phantom)`` of case ``index`` when known without reading it, else Nones."""
        ref = self.refs[index]
        if isinstance(ref, Case):
            return ref.meta.get("site"), is_phantom(ref)
        parsed = parse_phantom_ref(ref)
        if parsed is not None:
            return parsed[0], True
        if _PT.match(Path(ref).name):
            return "headneck", False
        if index in self._cache:
            case = self._cache[index]
            return case.meta.get("site"), is_phantom(case)
        return None, None

    def load(self, index: int) -> Case:
        """Case ``index`` (read on first use; ``EnvError`` naming the reference if unreadable)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        ref = self.refs[index]
        if isinstance(ref, Case):
            case = ref
        else:
            from dosegym.data.io import read_case

            try:
                case = read_case(ref)
            except DosegymError as exc:
                raise EnvError(f"case source {self.spec!r}: cannot read case {ref!r}: {exc}") from exc
        self._cache[index] = case
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return case


def _phantom_ids(site: str | None, index: int | None, text: str, split: str | None = None) -> list[str]:
    from dosegym.data.phantoms import shipped_phantom_ids

    if site is not None and site not in SITES:
        raise EnvError(f"case source {text!r}: unknown phantom site {site!r}; valid: {list(SITES)}")
    if index is not None:
        return [str(PhantomId(site, index))]
    if split is not None and split not in PHANTOM_SPLITS:
        raise EnvError(f"case source {text!r}: unknown split {split!r}; valid: {list(PHANTOM_SPLITS)}")
    try:
        return shipped_phantom_ids(site, split)
    except DosegymError as exc:
        raise EnvError(f"case source {text!r}: the shipped phantoms are not available ({exc})") from exc


def _folder(p: Path) -> list[str]:
    from dosegym.data.io import detect_format

    try:
        detect_format(p)
        return [str(p)]
    except DosegymError:
        pass
    pts = sorted((int(m.group(1)), c) for c in p.iterdir() if c.is_dir() and (m := _PT.match(c.name)))
    if pts:
        return [str(c) for _, c in pts]
    npz = sorted(c for c in p.iterdir() if c.suffix == ".npz")
    if npz:
        return [str(c) for c in npz]
    raise EnvError(
        f"case source {str(p)!r}: a folder with no pt_* folders, no .npz files and not a case; "
        f"valid forms: {VALID_FORMS}"
    )


def _expand(cases: object) -> list[CaseRef]:
    if isinstance(cases, Case):
        return [cases]
    if isinstance(cases, (str, Path)):
        text = str(cases)
        parsed = parse_phantom_ref(text)
        if parsed is not None:
            return _phantom_ids(*parsed, text)
        split = _SPLIT.match(text)
        if split is not None:
            return _phantom_ids(split["site"], None, text, split["split"])
        if text.startswith("phantoms"):
            raise EnvError(f"case source {text!r} is not a valid phantom source; valid forms: {VALID_FORMS}")
        p = Path(text)
        if not p.exists():
            raise EnvError(
                f"case source {text!r}: no such file or folder, nor a known source; "
                f"valid forms: {VALID_FORMS}"
            )
        return _folder(p) if p.is_dir() else [str(p)]
    if isinstance(cases, Sequence):
        out: list[CaseRef] = []
        for i, item in enumerate(cases):
            if isinstance(item, Case):
                out.append(item)
            elif isinstance(item, (str, Path)):
                text = str(item)
                if not is_phantom_ref(text) and not Path(text).exists():
                    raise EnvError(
                        f"case source item {i} ({text!r}): no such file or folder; valid forms: {VALID_FORMS}"
                    )
                out.append(text)
            else:
                raise EnvError(
                    f"case source item {i} is a {type(item).__name__}; expected a path, a "
                    f"'phantoms:SITE/N' id or a Case"
                )
        return out
    raise EnvError(f"case source of type {type(cases).__name__} is not valid; valid forms: {VALID_FORMS}")
