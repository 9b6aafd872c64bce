"""Objective groups: which part of a plan a card item speaks for (coverage, one OAR group, hot
spots). GuidedDose steers each group with one action weight; gradient-based agents can
weigh them the same way (:meth:`dosegym.scorecards.soft_card.SoftScorecard.group_directions`).
"""

from __future__ import annotations

from dosegym.data.case import TARGET_PREFIXES, Case, canonical_name, is_body_name
from dosegym.data.oar_groups import OAR_GROUPS, oar_group

#: The objective groups: targets (coverage), one per canonical OAR group, hot spots.
GROUP_NAMES: tuple[str, ...] = ("targets", *(f"oar_{n}" for n, _ in OAR_GROUPS), "hot_spots")


def objective_group(item_structure: str, falling: bool, case: Case) -> int:
    """Index in :data:`GROUP_NAMES` of a card item on ``item_structure``.

    Target items (a prescription target of ``case``, or a name starting PTV/CTV/GTV/ITV) whose
    score rises with the metric are ``targets``; target items whose score falls with it (upper
    limits: near-max dose, V110%, ...) and body items are ``hot_spots``; every other item goes
    to its canonical OAR group (:data:`dosegym.data.oar_groups.OAR_GROUPS`).
    """
    key = canonical_name(item_structure)
    rx_targets = {canonical_name(rx.target) for rx in case.prescriptions}
    is_target = key in rx_targets or key.startswith(tuple(p.lower() for p in TARGET_PREFIXES))
    if is_target:
        return len(GROUP_NAMES) - 1 if falling else 0
    if is_body_name(item_structure):
        return len(GROUP_NAMES) - 1
    return 1 + oar_group(item_structure)
