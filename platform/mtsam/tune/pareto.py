"""The Pareto front of a multi-objective sweep (e.g. delta_m up, adapter parameters down).

A trial is on the front when no other trial is at least as good on every objective and
strictly better on one. Equal points do not dominate each other: both stay on the front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[bool]:
    """For each point (one value per objective), whether it is on the front.

    ``modes`` holds "max" or "min" per objective. Points are visited best-first in
    lexicographic order of the objectives; a point can only be dominated by one visited
    before it, and whatever dominates it is dominated by (or equal to) a front point found
    before it, so each point is compared with the front so far, not with every other point.
    Points with a non-finite value are never on the front.
    """
    if any(m not in ("max", "min") for m in modes):
        raise ValueError(f"pareto_front: modes must be 'max' or 'min', got {list(modes)}")
    signs = [-1.0 if m == "max" else 1.0 for m in modes]  # to minimise every objective
    keyed: list[tuple[tuple[float, ...], int]] = []
    for i, p in enumerate(points):
        if len(p) != len(modes):
            raise ValueError(f"pareto_front: point {i} has {len(p)} values for {len(modes)} modes")
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in p):
            keyed.append((tuple(s * float(v) for s, v in zip(signs, p, strict=True)), i))
    keyed.sort()
    on = [False] * len(points)
    front: list[tuple[float, ...]] = []
    for key, i in keyed:
        if not any(_dominates(f, key) for f in front):
            front.append(key)
            on[i] = True
    return on


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """``a`` dominates ``b`` (both to be minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b
