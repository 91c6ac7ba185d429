"""Which source each optimizer step draws (all its micro-batches, on every rank): a seeded weighted choice,
resumable exactly.

Draw ``i`` uses its own generator ``numpy.random.default_rng([seed, i])``, so the state is just
``(seed, draws)``: after :meth:`MixtureSampler.load_state_dict` the sequence continues exactly as an
uninterrupted run's would, whatever the number of workers and micro-batches per step (one draw per step).

Schedule: phase ``k`` holds its weights at ``start_frac_k · max_steps`` and then, with ``mode="linear"``, moves
linearly toward phase ``k+1``'s, or with ``mode="step"`` holds them until phase ``k+1`` starts (the recipe's
70:30 → 50:50 → 60:40 schedule); after the last phase its weights hold. The weights used at optimizer step
``s`` (0-based) are those at ``s / max_steps``. The stage's own ``weights`` act as an implicit phase at
``start_frac = 0`` unless a phase starts at 0. A name missing from a phase has weight 0 there. Each phase is
normalised first, so the interpolation is between compositions (shares), not raw weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kcpt.config import MixturePhase


class MixtureSampler:
    def __init__(self, weights: dict[str, float], seed: int, *, schedule: Sequence[MixturePhase] = (),
                 max_steps: int = 1, mode: str = "linear") -> None:
        if mode not in ("linear", "step"):
            raise ValueError(f"mode must be 'linear' or 'step', got {mode!r}")
        self.mode = mode
        if seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {seed}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be ≥ 1, got {max_steps}")
        phases = sorted(schedule, key=lambda p: p.start_frac)
        points: list[tuple[float, dict[str, float]]] = [(p.start_frac, dict(p.weights)) for p in phases]
        if not points or points[0][0] > 0:
            points.insert(0, (0.0, dict(weights)))
        names: list[str] = list(weights)
        for _, w in points:
            names += [n for n in w if n not in names]
        for frac, w in points:
            bad = {n: v for n, v in w.items() if not v >= 0}
            if bad or sum(w.values()) <= 0:
                raise ValueError(f"mixture weights at start_frac {frac} must be ≥ 0 with a positive sum, got {w}")
        self.names = names
        """Every source that can be drawn (the loop needs an iterator for each)."""
        self.seed = int(seed)
        self.max_steps = max_steps
        self.draws = 0
        self.counts: dict[str, int] = dict.fromkeys(names, 0)
        vecs = [np.array([w.get(n, 0.0) for n in names], dtype=np.float64) for _, w in points]
        self._points = [(frac, v / v.sum()) for (frac, _), v in zip(points, vecs, strict=True)]

    def _vector_at(self, step: int) -> np.ndarray:
        frac = step / self.max_steps
        pts = self._points
        vec = pts[-1][1]
        for (f0, w0), (f1, w1) in zip(pts, pts[1:], strict=False):
            if frac < f1:
                t = 0.0 if f1 <= f0 or self.mode == "step" else min(1.0, max(0.0, (frac - f0) / (f1 - f0)))
                vec = (1.0 - t) * w0 + t * w1
                break
        return vec / vec.sum()

    def weights_at(self, step: int) -> dict[str, float]:
        """Normalised weights at optimizer step ``step`` of the stage."""
        return {n: float(w) for n, w in zip(self.names, self._vector_at(step), strict=True)}

    def sample(self, step: int) -> str:
        """Source name of optimizer step ``step``'s micro-batches; advances the draw counter."""
        vec = self._vector_at(step)
        u = np.random.default_rng([self.seed, self.draws]).random()
        cdf = np.cumsum(vec)
        idx = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        idx = min(idx, int(np.flatnonzero(vec > 0)[-1]))
        self.draws += 1
        name = self.names[idx]
        self.counts[name] += 1
        return name

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "draws": self.draws, "counts": dict(self.counts)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.seed, self.draws = int(d["seed"]), int(d["draws"])
        self.counts = dict.fromkeys(self.names, 0) | {k: int(v) for k, v in d.get("counts", {}).items()}
