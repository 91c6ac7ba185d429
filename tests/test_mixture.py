"""Mixture sampler: weights and schedule interpolation, frequencies, exact continuation after a reload."""

from __future__ import annotations

import io
import json

import pytest
import torch

from kcpt.config import MixturePhase
from kcpt.train.mixture import MixtureSampler

BASE = {"qa": 0.35, "ex": 0.35, "raw": 0.30}
SCHED = [MixturePhase(start_frac=0.5, weights={"qa": 0.2, "ex": 0.2, "raw": 0.6})]


def test_weights_are_normalised_without_schedule():
    s = MixtureSampler({"a": 3.0, "b": 1.0}, seed=0)
    assert s.weights_at(0) == {"a": 0.75, "b": 0.25}
    assert s.weights_at(10_000) == {"a": 0.75, "b": 0.25}


@pytest.mark.parametrize(("step", "expected"), [
    (0, {"qa": 0.35, "ex": 0.35, "raw": 0.30}),     # implicit phase at 0 = the stage's weights
    (25, {"qa": 0.275, "ex": 0.275, "raw": 0.45}),  # halfway to the phase at 0.5
    (50, {"qa": 0.2, "ex": 0.2, "raw": 0.6}),
    (100, {"qa": 0.2, "ex": 0.2, "raw": 0.6}),      # after the last phase: held
])
def test_schedule_interpolates_between_phases(step, expected):
    s = MixtureSampler(BASE, seed=0, schedule=SCHED, max_steps=100)
    assert s.weights_at(step) == pytest.approx(expected)


def test_phase_at_zero_replaces_stage_weights_and_adds_sources():
    sched = [MixturePhase(start_frac=0.0, weights={"a": 1.0}),
             MixturePhase(start_frac=1.0, weights={"b": 2.0, "c": 2.0})]
    s = MixtureSampler({"a": 1.0, "z": 5.0}, seed=0, schedule=sched, max_steps=10)
    assert s.names == ["a", "z", "b", "c"]
    assert s.weights_at(0) == {"a": 1.0, "z": 0.0, "b": 0.0, "c": 0.0}
    assert s.weights_at(5) == pytest.approx({"a": 0.5, "z": 0.0, "b": 0.25, "c": 0.25})
    assert s.weights_at(10) == pytest.approx({"a": 0.0, "z": 0.0, "b": 0.5, "c": 0.5})


def test_sample_frequencies_follow_weights_and_zero_never_drawn():
    s = MixtureSampler({"a": 0.6, "zero": 0.0, "b": 0.4}, seed=3)
    n = 5000
    draws = [s.sample(0) for _ in range(n)]
    assert "zero" not in draws
    share = draws.count("a") / n
    assert abs(share - 0.6) < 4 * (0.6 * 0.4 / n) ** 0.5        # 4 σ; deterministic given the seed
    assert s.counts == {"a": draws.count("a"), "zero": 0, "b": draws.count("b")}


def test_schedule_changes_what_is_drawn():
    s = MixtureSampler({"a": 1.0}, seed=0, schedule=[MixturePhase(start_frac=0.5, weights={"b": 1.0})],
                       max_steps=10)
    assert {s.sample(0) for _ in range(50)} == {"a"}
    assert {s.sample(5) for _ in range(50)} == {"b"}


def test_reload_continues_the_sequence_exactly():
    a = MixtureSampler(BASE, seed=7, schedule=SCHED, max_steps=100)
    first = [a.sample(i // 2) for i in range(60)]
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)             # as in trainer_state.pt
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    rest = [a.sample(30 + i // 2) for i in range(60)]
    b = MixtureSampler(BASE, seed=999, schedule=SCHED, max_steps=100)   # seed comes from the state
    b.load_state_dict(json.loads(json.dumps(state)))
    assert [b.sample(30 + i // 2) for i in range(60)] == rest
    assert b.counts == a.counts
    c = MixtureSampler(BASE, seed=8, schedule=SCHED, max_steps=100)
    assert [c.sample(i // 2) for i in range(60)] != first


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="positive sum"):
        MixtureSampler({"a": 0.0}, seed=0)
    with pytest.raises(ValueError, match="≥ 0"):
        MixtureSampler({"a": 1.0, "b": -1.0}, seed=0)
