"""The DDP/bare engine's rollback point (preallocated host buffers, in-place restore) gives back exactly the
weights and optimizer state of the point: a rolled-back engine then steps exactly like one that never left it."""

from __future__ import annotations

import torch

from kcpt.config import ModelConfig, TinyModelConfig
from kcpt.model.loading import build_tiny_model
from kcpt.train.engine import TorchEngine, make_adamw

MC = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))


def _engine() -> TorchEngine:
    return TorchEngine(build_tiny_model(MC, 40), lambda g: make_adamw(g, lr=1e-2, betas=(0.9, 0.95), fused=False),
                       clip=1.0, weight_decay=0.1, device=torch.device("cpu"))


def _step(engine: TorchEngine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (2, 10), generator=g)
    out = engine.module(input_ids=ids, position_ids=torch.arange(10).repeat(2, 1)).logits
    torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1)).backward()
    engine.step()


def _state(engine: TorchEngine) -> dict[str, torch.Tensor]:
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(engine.module.parameters())}
    for i, p in enumerate(engine.module.parameters()):
        for k, v in engine.optimizer.state.get(p, {}).items():
            out[f"s{i}.{k}"] = v.detach().clone()
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rollback_restores_weights_and_optimizer_state_exactly():
    e = _engine()
    e.mark_stable(0)
    start = _state(e)
    _step(e, 1)
    assert e.rollback() == 0
    assert _equal(_state(e), start) and not e.optimizer.state  # no moments before the first step
    for s in (1, 2):
        _step(e, s)
    e.mark_stable(2)
    point = _state(e)
    _step(e, 3)
    _step(e, 4)
    assert not _equal(_state(e), point)
    assert e.rollback() == 2
    assert _equal(_state(e), point)
    _step(e, 3)
    twin = _engine()
    for s in (1, 2, 3):
        _step(twin, s)
    assert _equal(_state(e), _state(twin))
    _step(e, 5)  # the point is not altered by later in-place updates
    e.rollback()
    assert _equal(_state(e), point)
