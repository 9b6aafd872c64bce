"""Structure expressions: parser, Varian recipes, margins on anisotropic grids, resolving."""

from __future__ import annotations

import numpy as np
import pytest

from dosegym.data import Case, Grid, Prescription
from dosegym.errors import ScorecardError
from dosegym.scorecards.structures import (
    BinaryOp,
    Keyword,
    Margin,
    Name,
    Ring,
    StructureResolver,
    StructureSyntaxError,
    UnmatchedStructureError,
    contract_mask,
    expand_mask,
    parse_expression,
    ring_mask,
)
from dosegym.scorecards.varian import parse_varian, to_varian


def _ball(shape, spacing, center_mm, radius_mm):
    idx = np.indices(shape).astype(float)
    d2 = sum(((idx[a] * spacing[a]) - center_mm[a]) ** 2 for a in range(3))
    return d2 <= radius_mm**2


@pytest.fixture()
def case() -> Case:
    shape, spacing = (20, 24, 24), (2.0, 1.5, 1.5)
    body = np.zeros(shape, bool)
    body[1:-1, 2:-2, 2:-2] = True
    ptv = _ball(shape, spacing, (20.0, 18.0, 18.0), 6.0)
    ctv = _ball(shape, spacing, (20.0, 18.0, 18.0), 3.5)
    parotid = np.zeros(shape, bool)
    parotid[3:6, 3:6, 3:6] = True
    return Case(
        case_id="toy",
        grid=Grid(shape, spacing),
        structures={"PTV": ptv, "CTV": ctv, "LeftParotid": parotid, "Lung L": body & ~ptv},
        prescriptions=[Prescription("PTV", 60.0, 30)],
        body=body,
    )


# -- parser ----------------------------------------------------------------------------------
def test_precedence_and_operators():
    assert parse_expression("A + B - C") == BinaryOp("-", BinaryOp("+", Name("A"), Name("B")), Name("C"))
    # intersection binds tighter than union / difference
    assert parse_expression("A - B & C") == BinaryOp("-", Name("A"), BinaryOp("&", Name("B"), Name("C")))
    assert parse_expression("A | B") == parse_expression("A + B")  # Varian OR
    assert parse_expression("body - targets") == BinaryOp("-", Keyword("body"), Keyword("targets"))
    assert parse_expression("BODY") == Keyword("body")
    assert parse_expression('"Lung L" - "TOTAL LUNG - GTV"') == BinaryOp(
        "-", Name("Lung L"), Name("TOTAL LUNG - GTV")
    )
    assert parse_expression("'body'") == Name("body")  # quoted names are never keywords


def test_functions_and_units():
    assert parse_expression("expand(PTV, 5mm)") == Margin(Name("PTV"), 5.0)
    assert parse_expression("contract(PTV, 0.3 cm)") == Margin(Name("PTV"), -3.0)
    assert parse_expression("ring(PTV, 3mm, 1cm)") == Ring(Name("PTV"), 3.0, 10.0)
    # a structure may be called like a function name when not followed by '('
    assert parse_expression("ring + expand") == BinaryOp("+", Name("ring"), Name("expand"))


@pytest.mark.parametrize(
    "text",
    [
        "A + B - C",
        "A - (B + C)",
        "(A + B) & C",
        "A & (B & C)",
        "ring(expand(PTV, 2mm) - CTV, 0mm, 5mm)",
        'contract("TOTAL LUNG - GTV", 2mm) + \'x"y\'',
        "body - targets",
    ],
)
def test_str_round_trips(text):
    tree = parse_expression(text)
    assert parse_expression(str(tree)) == tree


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("A +", "at the end"),
        ("A + (B", "expected ')'"),
        ("A B", "position 2"),
        ("expand(A, 5)", "no unit"),
        ("expand(A, 5 in)", "unit 'in'"),
        ("ring(A, 5mm, 3mm)", "must exceed the inner"),
        ("2A", "position 0"),
        ('"PTV', "unterminated"),
        ("A $ B", "unexpected character '$'"),
        ("", "empty expression"),
    ],
)
def test_syntax_errors_name_the_position(text, needle):
    with pytest.raises(StructureSyntaxError, match=None) as info:
        parse_expression(text)
    assert needle in str(info.value)
    assert repr(text) in str(info.value)


# -- Varian StructureComment ------------------------------------------------------------------
def test_varian_recipes():
    assert parse_varian("{<PTV>} SUB {<CTV>}") == BinaryOp("-", Name("PTV"), Name("CTV"))
    assert parse_varian("{<PTV>|20} SUB {<PTV>|5}") == BinaryOp(
        "-", Margin(Name("PTV"), 20.0), Margin(Name("PTV"), 5.0)
    )
    assert parse_varian("{<Body>} SUB {<Body>|-35}") == BinaryOp(
        "-", Name("Body"), Margin(Name("Body"), -35.0)
    )
    assert parse_varian("{<A>|0} or {<B>} AND {<C>}") == BinaryOp(
        "&", BinaryOp("+", Name("A"), Name("B")), Name("C")
    )


def test_varian_errors():
    with pytest.raises(ScorecardError, match="asymmetric margins .* not supported"):
        parse_varian("{<PTV>|5^10^5^5^5^5} SUB {<CTV>}")
    with pytest.raises(ScorecardError, match="expected AND, OR or SUB"):
        parse_varian("{<PTV>} XOR {<CTV>}")
    with pytest.raises(ScorecardError, match="expected an operand"):
        parse_varian("{<PTV> SUB")
    with pytest.raises(ScorecardError, match="not a number of mm"):
        parse_varian("{<PTV>|5cm}")


def test_to_varian_round_trips_and_refuses_trees(case):
    r = StructureResolver(case)
    for text in ("ring(PTV, 3mm, 9mm)", "body - contract(body, 4mm)", "(PTV + CTV - LeftParotid) & body"):
        recipe = to_varian(parse_expression(text))
        np.testing.assert_array_equal(r.mask(parse_varian(recipe)), r.mask(text))
    assert to_varian(parse_expression("ring(PTV, 3mm, 30mm)")) == "{<PTV>|30} SUB {<PTV>|3}"
    with pytest.raises(ScorecardError, match="no Varian StructureComment form"):
        to_varian(parse_expression("A - (B + C)"))


# -- margins ----------------------------------------------------------------------------------
def test_expand_is_euclidean_and_anisotropic():
    shape, spacing = (11, 11, 11), (2.0, 1.0, 1.0)
    point = np.zeros(shape, bool)
    point[5, 5, 5] = True
    grown = expand_mask(point, 2.0, spacing)
    # along z (2 mm voxels) one voxel each way; along y and x two voxels each way
    assert grown[4, 5, 5] and grown[6, 5, 5] and not grown[3, 5, 5]
    assert grown[5, 3, 5] and grown[5, 7, 5] and not grown[5, 2, 5]
    assert grown[5, 4, 4]  # diagonal sqrt(2) mm <= 2 mm
    assert not grown[5, 3, 3]  # diagonal sqrt(8) mm > 2 mm
    expected = _ball(shape, spacing, (10.0, 5.0, 5.0), 2.0)
    np.testing.assert_array_equal(grown, expected)


def test_margins_on_a_ball_move_its_radius_by_the_margin():
    shape, spacing = (24, 40, 40), (2.5, 1.2, 1.2)
    ball = _ball(shape, spacing, (30.0, 24.0, 24.0), 8.0)

    def radius_mm(mask):
        return (3 * mask.sum() * np.prod(spacing) / (4 * np.pi)) ** (1 / 3)

    half_voxel = max(spacing) / 2  # distances run between voxel centres
    assert abs(radius_mm(ball) - 8.0) < half_voxel
    assert abs(radius_mm(expand_mask(ball, 5.0, spacing)) - 13.0) < half_voxel
    assert abs(radius_mm(contract_mask(ball, 4.0, spacing)) - 4.0) < half_voxel


def test_contract_is_dual_of_expand_and_grid_edge_counts_as_outside():
    rng = np.random.default_rng(0)
    shape, spacing = (12, 14, 16), (2.0, 1.5, 1.0)
    blob = np.zeros(shape, bool)
    blob[2:-2, 2:-2, 2:-2] = rng.random((8, 10, 12)) < 0.8
    for r in (1.0, 2.5, 4.0):
        np.testing.assert_array_equal(contract_mask(blob, r, spacing), ~expand_mask(~blob, r, spacing) & blob)
    full = np.ones(shape, bool)
    inner = contract_mask(full, 2.0, spacing)  # the grid border is a surface
    assert not inner[0].any() and not inner[:, :, :2].any() and inner[1:-1, 2:-2, 2:-2].all()


def test_ring_is_a_shell_outside_the_structure():
    shape, spacing = (20, 24, 24), (2.0, 1.5, 1.5)
    ptv = _ball(shape, spacing, (20.0, 18.0, 18.0), 6.0)
    ring = ring_mask(ptv, 3.0, 9.0, spacing)
    np.testing.assert_array_equal(ring, expand_mask(ptv, 9.0, spacing) & ~expand_mask(ptv, 3.0, spacing))
    assert not (ring & expand_mask(ptv, 3.0, spacing)).any()
    np.testing.assert_array_equal(ring_mask(ptv, 0.0, 3.0, spacing), expand_mask(ptv, 3.0, spacing) & ~ptv)
    with pytest.raises(ScorecardError, match="inner"):
        ring_mask(ptv, 5.0, 5.0, spacing)


# -- resolving on a case ----------------------------------------------------------------------
def test_resolver_names_aliases_keywords(case):
    r = StructureResolver(case)
    np.testing.assert_array_equal(r.mask("ptv"), case.structures["PTV"])  # case-insensitive
    np.testing.assert_array_equal(r.mask("Parotid_L"), case.structures["LeftParotid"])  # alias
    np.testing.assert_array_equal(r.mask("body"), case.body)
    np.testing.assert_array_equal(r.mask("targets"), case.structures["PTV"] | case.structures["CTV"])
    np.testing.assert_array_equal(r.mask("PTV - CTV"), case.structures["PTV"] & ~case.structures["CTV"])
    np.testing.assert_array_equal(r.mask('"Lung L" & PTV'), np.zeros(case.grid.shape, bool))
    sp = case.grid.spacing_mm
    np.testing.assert_array_equal(
        r.mask("body - contract(body, 3mm)"), case.body & ~contract_mask(case.body, 3.0, sp)
    )


def test_resolver_structure_map(case):
    r = StructureResolver(
        case,
        {"TOTAL LUNG - GTV": ["Lungs - GTV", '"Lung L" - CTV'], "PTV_high": "PTV", "PTV": "CTV"},
    )
    # first alternative needs 'Lungs' and 'GTV' (absent): the second is used
    np.testing.assert_array_equal(
        r.lookup("total lung - gtv"), case.structures["Lung L"] & ~case.structures["CTV"]
    )
    # names inside a mapped expression match the case directly, not the map again
    np.testing.assert_array_equal(r.lookup("PTV_high"), case.structures["PTV"])
    np.testing.assert_array_equal(r.mask("PTV"), case.structures["CTV"])  # the map wins
    with pytest.raises(ScorecardError, match="structure_map"):
        StructureResolver(case, {"X": "A + (B"})


def test_unmatched_names_raise_with_the_valid_names(case):
    r = StructureResolver(case, {"Cord": ["SpinalCord", "Spinal_Canal"]})
    with pytest.raises(UnmatchedStructureError, match="'Rectum' matches nothing") as info:
        r.mask("PTV - Rectum")
    assert info.value.name == "Rectum"
    assert "LeftParotid" in str(info.value)
    with pytest.raises(UnmatchedStructureError, match="none matches"):
        r.mask("Cord")
    no_body = Case("nb", case.grid, structures={"PTV": case.structures["PTV"]})
    with pytest.raises(UnmatchedStructureError, match="no body mask"):
        StructureResolver(no_body).mask("body")
    no_targets = Case("nt", case.grid, structures={"Heart": case.structures["PTV"]})
    with pytest.raises(UnmatchedStructureError, match="'targets' needs target"):
        StructureResolver(no_targets).mask("targets")
