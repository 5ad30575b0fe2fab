"""Pareto frontier of (cost, error) points where lower is better on both axes."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


def _usable(value: object) -> bool:
    """A coordinate can take part only if it is a finite real number."""
    return (
        isinstance(value, numbers.Real)  # includes numpy scalars
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def pareto_front(points: Iterable[tuple[str, float | None, float | None]]) -> list[str]:
    """Names of the points that no other point dominates, in input order.

    ``a`` dominates ``b`` when ``a`` is no worse on both axes and strictly better
    on at least one (lower x and lower y are better). Identical points do not
    dominate each other, so ties all stay on the front. Points with a missing
    (None) or non-finite coordinate are left out entirely.
    """
    pts = [(name, float(x), float(y)) for name, x, y in points if _usable(x) and _usable(y)]

    def dominated(x: float, y: float) -> bool:
        return any(ox <= x and oy <= y and (ox < x or oy < y) for _, ox, oy in pts)

    # O(n^2) is fine: a report compares a handful of variants.
    return [name for name, x, y in pts if not dominated(x, y)]
