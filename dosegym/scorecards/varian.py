"""Varian PlanScoreCard ``StructureComment`` recipes, read (:func:`parse_varian`) and written
(:func:`to_varian`) as :mod:`dosegym.scorecards.structures` expressions::

    {<ID>|margin_mm} OP {<ID>|margin_mm} ...      OP: AND, OR, SUB (left to right)

A positive margin expands, a negative one contracts; ``^`` (asymmetric margins) is not
supported and raises ``ScorecardError``.
"""

from __future__ import annotations

import re

from dosegym.errors import ScorecardError
from dosegym.scorecards.structures import (
    NUMBER_RE,
    BinaryOp,
    Keyword,
    Margin,
    Name,
    Ring,
    StructureExpr,
    StructureSyntaxError,
)

_VARIAN_OPERAND = re.compile(r"\{\s*<([^<>{}]*)>\s*(?:\|([^{}]*))?\}")
_VARIAN_OP = re.compile(r"(AND|OR|SUB)\b", re.IGNORECASE)
_VARIAN_OPS = {"and": "&", "or": "+", "sub": "-"}


def parse_varian(comment: str) -> StructureExpr:
    """Parse a Varian ``StructureComment`` recipe, e.g. ``{<PTV>|20} SUB {<PTV>|5}``.

    Margins are in mm; a negative margin contracts. Asymmetric margins (``^``) raise
    ``ScorecardError`` ("not supported").
    """
    text = comment or ""

    def fail(pos: int, msg: str) -> StructureSyntaxError:
        where = "end of text" if pos >= len(text) else f"position {pos}"
        return StructureSyntaxError(
            f"StructureComment {text!r}: {msg} at {where}; expected "
            "'{<ID>|margin_mm} OP {<ID>|margin_mm}' with OP in AND, OR, SUB"
        )

    def operand(pos: int) -> tuple[StructureExpr, int]:
        m = _VARIAN_OPERAND.match(text, pos)
        if not m:
            raise fail(pos, "expected an operand {<ID>} or {<ID>|margin_mm}")
        sid = m.group(1).strip()
        if not sid:
            raise fail(pos, "empty structure ID in <>")
        expr: StructureExpr = Name(sid)
        margin = (m.group(2) or "").strip()
        if "^" in margin:
            raise StructureSyntaxError(
                f"StructureComment {text!r}: asymmetric margins ('^' in {margin!r}) are not "
                "supported; map this structure by hand in the card's structure_map"
            )
        if margin:
            if not NUMBER_RE.fullmatch(margin):
                raise fail(m.start(2), f"margin {margin!r} is not a number of mm")
            mm = float(margin)
            if mm != 0:
                expr = Margin(expr, mm)
        return expr, m.end()

    pos = _skip_space(text, 0)
    if pos >= len(text):
        raise fail(0, "empty recipe")
    expr, pos = operand(pos)
    while True:
        pos = _skip_space(text, pos)
        if pos >= len(text):
            return expr
        m = _VARIAN_OP.match(text, pos)
        if not m:
            raise fail(pos, f"expected AND, OR or SUB, found {text[pos : pos + 10]!r}")
        right, pos = operand(_skip_space(text, m.end()))
        expr = BinaryOp(_VARIAN_OPS[m.group(1).lower()], expr, right)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def to_varian(expr: StructureExpr) -> str:
    """Write an expression as a Varian ``StructureComment`` recipe, where it has one.

    The recipe grammar is a left-to-right chain of ``{<ID>|margin_mm}`` operands, so only
    chains whose right-hand operands are names (with an optional margin) can be written; a
    ``ring`` becomes ``{<A>|outer} SUB {<A>|inner}``. Anything else raises ``ScorecardError``.
    """
    ops = {"+": "OR", "-": "SUB", "&": "AND"}

    def leaf(e: StructureExpr) -> str | None:
        margin = 0.0
        if isinstance(e, Margin):
            margin, e = e.margin_mm, e.operand
        if isinstance(e, Keyword) and e.keyword == "body":
            e = Name("Body")
        if not isinstance(e, Name) or any(c in e.name for c in "<>{}|"):
            return None
        return f"{{<{e.name}>|{margin:g}}}" if margin else f"{{<{e.name}>}}"

    def chain(e: StructureExpr) -> str | None:
        if isinstance(e, Ring):
            outer, inner = leaf(Margin(e.operand, e.outer_mm)), leaf(Margin(e.operand, e.inner_mm))
            return None if outer is None or inner is None else f"{outer} SUB {inner}"
        if isinstance(e, BinaryOp):
            left, right = chain(e.left), leaf(e.right)
            return None if left is None or right is None else f"{left} {ops[e.op]} {right}"
        return leaf(e)

    text = chain(expr)
    if text is None:
        raise ScorecardError(
            f"structure expression {str(expr)!r} has no Varian StructureComment form (a "
            "left-to-right chain of names with margins, combined by AND, OR, SUB)"
        )
    return text
