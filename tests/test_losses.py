"""Token CE and KL sums: causal shift, -100 masking, agreement with a hand computation."""

from __future__ import annotations

import math

import torch

from kcpt.train.losses import kl_to_reference_sum, token_ce_sum


def _manual_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    total, n = 0.0, 0
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            total += -float(torch.log_softmax(logits[b, t].double(), -1)[y])
            n += 1
    return total, n


def test_ce_sum_matches_hand_computation_with_shift_and_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 2] = -100
    labels[1, 4:] = -100
    s, n = token_ce_sum(logits, labels)
    ms, mn = _manual_ce(logits, labels)
    assert int(n) == mn == 2 * 5 - 1 - 2
    assert math.isclose(float(s), ms, rel_tol=1e-5)


def test_ce_first_label_is_never_a_target():
    """labels[:, 0] has no prediction before it: changing it changes nothing."""
    logits = torch.randn(1, 4, 7)
    a = torch.tensor([[3, 1, 2, 5]])
    b = torch.tensor([[-100, 1, 2, 5]])
    assert torch.equal(token_ce_sum(logits, a)[0], token_ce_sum(logits, b)[0])
    assert int(token_ce_sum(logits, a)[1]) == 3


def test_ce_prefers_the_shifted_target():
    """A model that puts all mass on labels[t+1] at position t has ~0 loss; unshifted it would not."""
    labels = torch.tensor([[1, 2, 3, 4]])
    logits = torch.full((1, 4, 5), -30.0)
    for t in range(3):
        logits[0, t, labels[0, t + 1]] = 30.0
    s, n = token_ce_sum(logits, labels)
    assert float(s) < 1e-6 and int(n) == 3


def test_ce_all_ignored_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    s, n = token_ce_sum(logits, torch.full((2, 3), -100))
    assert s.item() == 0.0 and int(n) == 0
    s.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_kl_zero_for_identical_and_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=g)
    ref = torch.randn(2, 5, 9, generator=g)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[1, 3] = -100
    s0, n0 = kl_to_reference_sum(logits, logits.clone(), labels)
    assert abs(float(s0)) < 1e-5 and int(n0) == 7
    s, n = kl_to_reference_sum(logits, ref, labels)
    manual = 0.0
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] == -100:
                continue
            lp = torch.log_softmax(logits[b, t].double(), -1)
            lr = torch.log_softmax(ref[b, t].double(), -1)
            manual += float((lr.exp() * (lr - lp)).sum())
    assert int(n) == 7
    assert math.isclose(float(s), manual, rel_tol=1e-5)
    # direction: KL(p_ref || p_theta) differs from KL(p_theta || p_ref)
    s_rev, _ = kl_to_reference_sum(ref, logits, labels)
    assert not math.isclose(float(s), float(s_rev), rel_tol=1e-3)


def test_kl_gradient_flows_only_into_policy_logits():
    logits = torch.randn(1, 4, 6, requires_grad=True)
    ref = torch.randn(1, 4, 6, requires_grad=True)
    s, _ = kl_to_reference_sum(logits, ref, torch.tensor([[0, 1, 2, 3]]))
    s.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    assert ref.grad is None
