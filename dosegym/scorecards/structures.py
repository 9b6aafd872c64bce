"""Structure expressions: the structures a scorecard item scores, built from a case's masks.

Our grammar (``parse_expression``), case-insensitive keywords, no ``eval``::

    expr   := term (("+" | "|" | "-") term)*      union, union (Varian OR), difference (SUB)
    term   := atom ("&" atom)*                    intersection (Varian AND) binds tighter
    atom   := NAME | QUOTED | "(" expr ")"
            | "expand(" expr "," LENGTH ")"       grow by a margin
            | "contract(" expr "," LENGTH ")"     shrink by a margin
            | "ring(" expr "," LENGTH "," LENGTH ")"   shell from inner to outer distance
    LENGTH := NUMBER ("mm" | "cm")
    NAME   := letters, digits, "_" and "." (not starting with a digit); the keywords
              ``body`` (the body mask) and ``targets`` (union of all targets) are reserved
    QUOTED := "any name" or 'any name' (a structure name, never a keyword)

``+``, ``|`` and ``-`` are left-associative: ``A + B - C`` is ``(A + B) - C``. Names that
contain spaces or operators (``"TOTAL LUNG - GTV"``) must be quoted, else they are parsed.

The Varian PlanScoreCard ``StructureComment`` recipes are :mod:`dosegym.scorecards.varian`.

Margins are Euclidean and honour anisotropic voxels (``scipy.ndimage.distance_transform_edt``
with ``sampling=spacing_mm``), distances between voxel centres:

* ``expand(A, r)`` = voxels whose distance to the nearest voxel of A is ``<= r``;
* ``contract(A, r)`` = voxels of A whose distance to the nearest voxel outside A is ``> r``;
  voxels outside the grid count as outside A, so ``contract(A, r) == not expand(not A, r)``
  on a grid padded with empty voxels;
* ``ring(A, inner, outer)`` = ``expand(A, outer) - expand(A, inner)`` (``inner >= 0``; with
  ``inner = 0`` the ring starts right outside A).

Name matching (``StructureResolver``): the card's ``structure_map`` first (template name ->
one expression, or a list of alternatives tried in order; names inside a mapped expression
match the case directly, not the map again), then the case's own names, case-insensitive
with the aliases of :func:`dosegym.data.case.canonical_name`. A name that matches nothing
raises :class:`UnmatchedStructureError`; it is never an empty mask.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dosegym.data.case import Case, canonical_name
from dosegym.errors import ScorecardError

KEYWORDS = ("body", "targets")
FUNCTIONS = ("expand", "contract", "ring")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
#: a decimal number (optional sign and exponent)
NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


class StructureSyntaxError(ScorecardError):
    """A structure expression that does not parse; the message names the position."""


class UnmatchedStructureError(ScorecardError):
    """A structure name that matches nothing in the case (nor in the card's mapping)."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


# -- the expression tree ----------------------------------------------------------------------
class StructureExpr:
    """Base of the expression tree. ``str(expr)`` gives the expression in our grammar."""

    def names(self) -> set[str]:
        """The structure names the expression refers to (keywords excluded)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Name(StructureExpr):
    """A structure of the case (or of the card's mapping), by name."""

    name: str

    def names(self) -> set[str]:
        return {self.name}

    def __str__(self) -> str:
        plain = _NAME_RE.fullmatch(self.name) and self.name.lower() not in KEYWORDS
        if plain:
            return self.name
        quote = "'" if '"' in self.name else '"'
        return f"{quote}{self.name}{quote}"


@dataclass(frozen=True)
class Keyword(StructureExpr):
    """``body`` (the body / external mask) or ``targets`` (union of the case's targets)."""

    keyword: str

    def names(self) -> set[str]:
        return set()

    def __str__(self) -> str:
        return self.keyword


@dataclass(frozen=True)
class BinaryOp(StructureExpr):
    """``op`` is ``"+"`` (union), ``"-"`` (difference) or ``"&"`` (intersection)."""

    op: str
    left: StructureExpr
    right: StructureExpr

    def names(self) -> set[str]:
        return self.left.names() | self.right.names()

    def __str__(self) -> str:
        mine = _PRECEDENCE[self.op]

        def side(e: StructureExpr, right: bool) -> str:
            if isinstance(e, BinaryOp):
                theirs = _PRECEDENCE[e.op]
                if theirs < mine or (right and theirs == mine):
                    return f"({e})"
            return str(e)

        return f"{side(self.left, False)} {self.op} {side(self.right, True)}"


_PRECEDENCE = {"+": 0, "-": 0, "&": 1}


@dataclass(frozen=True)
class Margin(StructureExpr):
    """Expand (``margin_mm > 0``) or contract (``margin_mm < 0``) a structure."""

    operand: StructureExpr
    margin_mm: float

    def names(self) -> set[str]:
        return self.operand.names()

    def __str__(self) -> str:
        fn = "expand" if self.margin_mm >= 0 else "contract"
        return f"{fn}({self.operand}, {abs(self.margin_mm):g}mm)"


@dataclass(frozen=True)
class Ring(StructureExpr):
    """The shell ``inner_mm < distance <= outer_mm`` outside a structure."""

    operand: StructureExpr
    inner_mm: float
    outer_mm: float

    def names(self) -> set[str]:
        return self.operand.names()

    def __str__(self) -> str:
        return f"ring({self.operand}, {self.inner_mm:g}mm, {self.outer_mm:g}mm)"


# -- our grammar ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Token:
    kind: str  # name, quoted, number, op, lparen, rparen, comma, end
    text: str
    pos: int


def _syntax(text: str, pos: int, msg: str) -> StructureSyntaxError:
    where = "the end" if pos >= len(text) else f"position {pos}"
    marked = f"{text[:pos]}>>>{text[pos:]}"
    return StructureSyntaxError(f"structure expression {text!r}: {msg} at {where} (marked >>>: {marked!r})")


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "+|-&":
            tokens.append(_Token("op", c, i))
            i += 1
        elif c in "(),":
            tokens.append(_Token({"(": "lparen", ")": "rparen", ",": "comma"}[c], c, i))
            i += 1
        elif c in "\"'":
            end = text.find(c, i + 1)
            if end < 0:
                raise _syntax(text, i, f"unterminated quoted name (missing closing {c})")
            if end == i + 1:
                raise _syntax(text, i, "empty quoted name")
            tokens.append(_Token("quoted", text[i + 1 : end], i))
            i = end + 1
        elif c.isdigit() or (c == "." and i + 1 < len(text) and text[i + 1].isdigit()):
            m = NUMBER_RE.match(text, i)
            assert m is not None
            j = m.end()
            unit = re.match(r"\s*([A-Za-z]+)", text[j:])
            if unit:
                j += unit.end()
            tokens.append(_Token("number", text[i:j], i))
            i = j
        elif _NAME_RE.match(text, i):
            m = _NAME_RE.match(text, i)
            assert m is not None
            tokens.append(_Token("name", m.group(0), i))
            i = m.end()
        else:
            raise _syntax(text, i, f"unexpected character {c!r}")
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def take(self, kind: str, what: str) -> _Token:
        tok = self.tok
        if tok.kind != kind:
            found = "the end of the text" if tok.kind == "end" else repr(tok.text)
            raise _syntax(self.text, tok.pos, f"expected {what}, found {found}")
        self.i += 1
        return tok

    def parse(self) -> StructureExpr:
        if self.tok.kind == "end":
            raise _syntax(self.text, 0, "empty expression; expected a structure name")
        expr = self.expr()
        if self.tok.kind != "end":
            raise _syntax(
                self.text, self.tok.pos, f"unexpected {self.tok.text!r}; expected an operator + | - &"
            )
        return expr

    def expr(self) -> StructureExpr:
        left = self.term()
        while self.tok.kind == "op" and self.tok.text in "+|-":
            op = "-" if self.tok.text == "-" else "+"
            self.i += 1
            left = BinaryOp(op, left, self.term())
        return left

    def term(self) -> StructureExpr:
        left = self.atom()
        while self.tok.kind == "op" and self.tok.text == "&":
            self.i += 1
            left = BinaryOp("&", left, self.atom())
        return left

    def atom(self) -> StructureExpr:
        tok = self.tok
        if tok.kind == "quoted":
            self.i += 1
            return Name(tok.text)
        if tok.kind == "lparen":
            self.i += 1
            inner = self.expr()
            self.take("rparen", "')'")
            return inner
        if tok.kind == "name":
            self.i += 1
            low = tok.text.lower()
            if low in FUNCTIONS and self.tok.kind == "lparen":
                return self.function(low, tok)
            if low in KEYWORDS:
                return Keyword(low)
            return Name(tok.text)
        found = "the end of the text" if tok.kind == "end" else repr(tok.text)
        raise _syntax(self.text, tok.pos, f"expected a structure name, '(' or a function, found {found}")

    def length(self) -> float:
        tok = self.tok
        if tok.kind != "number":
            found = "the end of the text" if tok.kind == "end" else repr(tok.text)
            raise _syntax(self.text, tok.pos, f"expected a length such as 5mm, found {found}")
        self.i += 1
        m = re.fullmatch(r"(.*?)\s*([A-Za-z]*)", tok.text)
        assert m is not None
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit not in ("mm", "cm"):
            got = f"unit {m.group(2)!r}" if unit else "no unit"
            raise _syntax(self.text, tok.pos, f"length {tok.text!r} has {got}; write e.g. 5mm or 0.5cm")
        if not math.isfinite(number) or number < 0:
            raise _syntax(self.text, tok.pos, f"length {tok.text!r} must be >= 0")
        return number * (10.0 if unit == "cm" else 1.0)

    def function(self, name: str, tok: _Token) -> StructureExpr:
        self.take("lparen", "'('")
        operand = self.expr()
        self.take("comma", f"',' and a length after the structure of {name}()")
        first = self.length()
        if name == "ring":
            self.take("comma", "',' and the outer distance of ring(structure, inner, outer)")
            second = self.length()
            if not second > first:
                raise _syntax(
                    self.text,
                    tok.pos,
                    f"ring(): the outer distance ({second:g} mm) must exceed the inner ({first:g} mm)",
                )
            self.take("rparen", "')'")
            return Ring(operand, first, second)
        self.take("rparen", "')'")
        return Margin(operand, first if name == "expand" else -first)


def parse_expression(text: str) -> StructureExpr:
    """Parse a structure expression of our grammar (see the module docstring)."""
    if not isinstance(text, str):
        raise StructureSyntaxError(f"a structure expression must be text, got {type(text).__name__}")
    return _Parser(text).parse()


# -- margins ---------------------------------------------------------------------------------
def _crop(mask: np.ndarray, pad: Sequence[int]) -> tuple[tuple[slice, ...], np.ndarray]:
    """The bounding box of ``mask`` grown by ``pad`` voxels per axis (clipped to the grid)."""
    idx = np.nonzero(mask)
    sl = tuple(
        slice(max(int(i.min()) - p, 0), min(int(i.max()) + p + 1, n)) for i, p, n in zip(idx, pad, mask.shape)
    )
    return sl, mask[sl]


def expand_mask(mask: np.ndarray, margin_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """Voxels within ``margin_mm`` (Euclidean, centre to centre) of ``mask`` (see module doc)."""
    mask = np.asarray(mask, dtype=bool)
    if margin_mm <= 0 or not mask.any():
        return mask.copy()
    pad = [int(math.ceil(margin_mm / s)) + 1 for s in spacing_mm]
    sl, sub = _crop(mask, pad)
    dist = ndimage.distance_transform_edt(~sub, sampling=spacing_mm)
    out = np.zeros_like(mask)
    out[sl] = dist <= margin_mm + 1e-6
    return out


def contract_mask(mask: np.ndarray, margin_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """Voxels of ``mask`` farther than ``margin_mm`` from every voxel outside it (and the grid)."""
    mask = np.asarray(mask, dtype=bool)
    if margin_mm <= 0 or not mask.any():
        return mask.copy()
    sl, sub = _crop(mask, [0, 0, 0])
    padded = np.pad(sub, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(padded, sampling=spacing_mm)[1:-1, 1:-1, 1:-1]
    out = np.zeros_like(mask)
    out[sl] = dist > margin_mm + 1e-6
    return out


def ring_mask(mask: np.ndarray, inner_mm: float, outer_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """``expand(mask, outer_mm) - expand(mask, inner_mm)``: a shell outside ``mask``."""
    if not (0 <= inner_mm < outer_mm):
        raise ScorecardError(f"ring: need 0 <= inner ({inner_mm:g} mm) < outer ({outer_mm:g} mm)")
    return expand_mask(mask, outer_mm, spacing_mm) & ~expand_mask(mask, inner_mm, spacing_mm)


# -- resolving names against a case ----------------------------------------------------------
StructureMap = Mapping[str, "str | Sequence[str]"]


def normalise_structure_map(mapping: StructureMap | None) -> dict[str, list[str]]:
    """``{template name: [expression, ...]}``; every expression is checked to parse."""
    out: dict[str, list[str]] = {}
    for key, value in (mapping or {}).items():
        alternatives = [value] if isinstance(value, str) else list(value)
        if not alternatives:
            raise ScorecardError(f"structure_map[{key!r}]: needs at least one expression")
        for alt in alternatives:
            try:
                parse_expression(alt)
            except StructureSyntaxError as exc:
                raise ScorecardError(f"structure_map[{key!r}]: {exc}") from None
        out[str(key)] = [str(a) for a in alternatives]
    return out


class StructureResolver:
    """Masks of names and expressions on one case, with the card's ``structure_map``.

    Results are cached per expression text, so a resolver bound once serves many doses.
    """

    def __init__(self, case: Case, structure_map: StructureMap | None = None) -> None:
        self.case = case
        self.structure_map = normalise_structure_map(structure_map)
        self._map_keys = {canonical_name(k): k for k in self.structure_map}
        self._cache: dict[str, np.ndarray] = {}

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return self.case.grid.spacing_mm

    def body(self) -> np.ndarray:
        """The body mask: ``case.body``, else a structure named Body/External."""
        if self.case.body is not None:
            return self.case.body
        name = self.case.find_structure("body")
        if name is None:
            raise UnmatchedStructureError(
                f"{self.case.source}: the case has no body mask (case.body) nor a structure "
                "named Body/External",
                "body",
            )
        return self.case.structures[name]

    def targets(self) -> np.ndarray:
        """Union of every target of the case (``case.targets``)."""
        names = self.case.targets
        if not names:
            raise UnmatchedStructureError(
                f"{self.case.source}: 'targets' needs target structures (prescriptions or "
                f"PTV/CTV/GTV/ITV names); structures: {sorted(self.case.structures)}",
                "targets",
            )
        return np.logical_or.reduce([self.case.structures[n] for n in names])

    def mapped(self, name: str) -> list[str] | None:
        """The card's mapping of ``name`` (case-insensitive), or ``None``."""
        key = self._map_keys.get(canonical_name(name))
        return None if key is None else self.structure_map[key]

    def case_name(self, name: str) -> str | None:
        """The case's own name for ``name`` (case-insensitive, aliases), or ``None``."""
        found = self.case.find_structure(name)
        return found if found in self.case.structures else None

    def occupancy(self, name: str) -> np.ndarray | None:
        """Fractional occupancy of a plain structure name, where the case has one."""
        found = self.case_name(name)
        return None if found is None else self.case.occupancy.get(found)

    def lookup(self, name: str, use_map: bool = True) -> np.ndarray:
        """The mask of one name: mapping (alternatives in order), then the case's names."""
        alternatives = self.mapped(name) if use_map else None
        if alternatives is not None:
            errors = []
            for alt in alternatives:
                try:
                    return self._evaluate(parse_expression(alt), use_map=False)
                except UnmatchedStructureError as exc:
                    errors.append(f"{alt!r}: {exc}")
            raise UnmatchedStructureError(
                f"structure {name!r} is mapped to {alternatives}, but none matches: " + "; ".join(errors),
                name,
            )
        if canonical_name(name) == "body":
            return self.body()
        found = self.case_name(name)
        if found is None:
            raise UnmatchedStructureError(
                f"structure {name!r} matches nothing in case {self.case.case_id!r} "
                f"(structures: {sorted(self.case.structures)}); add it to the card's "
                "structure_map",
                name,
            )
        return self.case.structures[found]

    def mask(self, expr: str | StructureExpr) -> np.ndarray:
        """The boolean mask of an expression (text in our grammar, or a parsed tree)."""
        tree = parse_expression(expr) if isinstance(expr, str) else expr
        key = str(tree)
        if key not in self._cache:
            self._cache[key] = self._evaluate(tree, use_map=True)
        return self._cache[key]

    def _evaluate(self, e: StructureExpr, use_map: bool) -> np.ndarray:
        if isinstance(e, Name):
            return self.lookup(e.name, use_map)
        if isinstance(e, Keyword):
            return self.body() if e.keyword == "body" else self.targets()
        if isinstance(e, BinaryOp):
            a = self._evaluate(e.left, use_map)
            b = self._evaluate(e.right, use_map)
            if e.op == "+":
                return a | b
            if e.op == "-":
                return a & ~b
            return a & b
        if isinstance(e, Margin):
            base = self._evaluate(e.operand, use_map)
            if e.margin_mm >= 0:
                return expand_mask(base, e.margin_mm, self.spacing_mm)
            return contract_mask(base, -e.margin_mm, self.spacing_mm)
        if isinstance(e, Ring):
            base = self._evaluate(e.operand, use_map)
            return ring_mask(base, e.inner_mm, e.outer_mm, self.spacing_mm)
        raise ScorecardError(f"unknown structure expression node {e!r}")  # pragma: no cover
