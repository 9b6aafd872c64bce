"""Canonical OAR groups: which group of organs at risk a structure name belongs to.

Used by the model's ``oars`` slot (one channel per group, :mod:`dosegym.diffusion.slots`) and
by the scorecards' objective groups (:mod:`dosegym.scorecards.groups`).
"""

from __future__ import annotations

from dosegym.data.case import canonical_name

#: Canonical OAR groups, in this order. A structure goes to the first group one of whose
#: keywords occurs in its canonical name (:func:`dosegym.data.canonical_name`: lower case,
#: aliases folded, separators dropped); an OAR matching none goes to ``other``.
OAR_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cord_brainstem", ("cord", "brainstem", "spinalcanal", "cauda")),
    ("parotids_glands", ("parotid", "submand")),
    (
        "larynx_esophagus",
        ("larynx", "esoph", "oesoph", "pharyn", "constrictor", "trachea", "glott"),
    ),
    ("mandible_bone", ("mandib", "bone", "rib", "vertebra")),
    ("rectum_bladder", ("rectum", "bladder", "bowel", "sigmoid", "colon", "anal")),
    ("lungs_heart", ("lung", "heart", "cardiac", "pericard")),
    ("femoral_heads", ("femur", "femoral", "hip")),
    ("other", ()),
)


def oar_group(name: str) -> int:
    """Index in :data:`OAR_GROUPS` of a structure name (``other``, the last, when none matches)."""
    key = canonical_name(name)
    for i, (_, words) in enumerate(OAR_GROUPS):
        if any(w in key for w in words):
            return i
    return len(OAR_GROUPS) - 1
