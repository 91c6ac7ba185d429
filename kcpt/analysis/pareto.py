"""Pareto frontier over objectives to minimise (e.g. raw val loss and exam val loss)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, all objectives minimised, in input order.

    A point is dominated when another is ≤ in every objective and < in at least one. Equal points are
    all kept. Points containing NaN/None are never on the front.
    """
    def ok(p: Sequence[float]) -> bool:
        return all(v is not None and v == v for v in p)

    idx = [i for i, p in enumerate(points) if ok(p)]
    front = []
    for i in idx:
        p = points[i]
        dominated = any(
            all(q[k] <= p[k] for k in range(len(p))) and any(q[k] < p[k] for k in range(len(p)))
            for j in idx if j != i for q in [points[j]]
        )
        if not dominated:
            front.append(i)
    return front


def pareto_records(records: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The records on the Pareto front over ``keys`` (all minimised); records lacking a key are skipped."""
    pts = [[r.get(k) for k in keys] for r in records]
    return [records[i] for i in pareto_front(pts)]
