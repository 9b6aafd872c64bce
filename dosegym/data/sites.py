"""Treatment sites and shipped-phantom ids: the one definition of each.

A site key is lower-case letters only: ``headneck``, ``prostate``, ``lung`` (:data:`SITES`,
the phantom sites). A shipped phantom is written ``phantoms:SITE/N`` (:class:`PhantomId`);
its case id and file stem are ``SITE_NNN`` (index zero-padded to three digits). A source
may also name a selection: ``phantoms`` (every site) or ``phantoms:SITE`` (one site), see
:func:`parse_phantom_ref`. A case is a dosegym phantom when ``case.meta["format"]`` is
:data:`PHANTOM_FORMAT` (:func:`is_phantom`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dosegym.errors import DataError

if TYPE_CHECKING:
    from dosegym.data.case import Case

SITES: tuple[str, ...] = ("headneck", "prostate", "lung")
#: Other spellings of a site, after :func:`site_key`'s folding, mapped to the site key.
SITE_ALIASES: dict[str, str] = {"headandneck": "headneck", "hn": "headneck"}
#: ``case.meta["format"]`` of a dosegym phantom.
PHANTOM_FORMAT = "phantom"
PHANTOM_PREFIX = "phantoms"

_REF = re.compile(r"^phantoms(?::(?P<site>[a-z]+)(?:/(?P<index>\d+))?)?$")
_CASE_ID = re.compile(r"^(?P<site>[a-z]+)_(?P<index>\d{3,})$")


def site_key(site: Any) -> str | None:
    """``site`` folded to a site key (letters only, lower case, aliases such as ``H&N`` ->
    ``headneck``); ``None`` stays ``None``. Unknown sites fold too; they are not refused."""
    if site is None:
        return None
    key = "".join(ch for ch in str(site).lower() if ch.isalpha())
    return SITE_ALIASES.get(key, key)


def check_site(site: str) -> str:
    """``site`` when it is a phantom site (:data:`SITES`), else ``DataError`` listing them."""
    if site not in SITES:
        raise DataError(f"phantom site {site!r} is unknown; valid sites: {list(SITES)}")
    return site


def is_phantom_ref(text: Any) -> bool:
    """Whether ``text`` is written as a shipped-phantom reference (``phantoms`` or
    ``phantoms:...``), well formed or not."""
    return isinstance(text, str) and (text == PHANTOM_PREFIX or text.startswith(PHANTOM_PREFIX + ":"))


def parse_phantom_ref(text: str) -> tuple[str | None, int | None] | None:
    """``(site, index)`` of ``phantoms`` (``(None, None)``), ``phantoms:SITE`` (``(SITE, None)``)
    or ``phantoms:SITE/N``; ``None`` when ``text`` is not of these forms. The site is not checked."""
    m = _REF.match(text)
    if m is None:
        return None
    return m["site"], None if m["index"] is None else int(m["index"])


@dataclass(frozen=True)
class PhantomId:
    """One phantom of the shipped set: ``site`` (one of :data:`SITES`) and ``index`` (>= 0)."""

    site: str
    index: int

    def __post_init__(self) -> None:
        check_site(self.site)
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise DataError(f"phantom {self.site}/{self.index!r}: the index must be an integer >= 0")

    @classmethod
    def parse(cls, text: str) -> PhantomId:
        """From ``phantoms:SITE/N`` or a case id / file stem ``SITE_NNN``; ``DataError`` otherwise."""
        ref = parse_phantom_ref(text)
        if ref is not None and ref[0] is not None and ref[1] is not None:
            return cls(ref[0], ref[1])
        m = _CASE_ID.match(text)
        if m is not None:
            return cls(m["site"], int(m["index"]))
        raise DataError(
            f"{text!r}: a phantom id is 'phantoms:SITE/N' or 'SITE_NNN' with SITE one of "
            f"{list(SITES)} and N an index, e.g. 'phantoms:headneck/0' or 'headneck_000'"
        )

    def __str__(self) -> str:
        return f"{PHANTOM_PREFIX}:{self.site}/{self.index}"

    @property
    def case_id(self) -> str:
        """``SITE_NNN``: the case id of the phantom and the stem of its file."""
        return f"{self.site}_{self.index:03d}"


def is_phantom(case: Case) -> bool:
    """Whether ``case`` is a dosegym phantom (read from a phantom file or generated)."""
    return case.meta.get("format") == PHANTOM_FORMAT
