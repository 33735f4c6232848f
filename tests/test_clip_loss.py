import math

import pytest
import torch
import torch.nn.functional as F

from unimodality.plugins.losses.clip import ClipLoss


def reference_clip(a, b, scale, group=None):
    """Loop-based symmetric InfoNCE: -mean log p(positive), positives spread uniformly over a row's group."""
    n = a.shape[0]
    total = 0.0
    for direction in range(2):
        q, c = (a, b) if direction == 0 else (b, a)
        for i in range(n):
            logits = [scale * float(q[i] @ c[j]) for j in range(n)]
            log_norm = math.log(sum(math.exp(x) for x in logits))
            positives = [j for j in range(n) if (j == i if group is None else group[i] == group[j])]
            total += -sum(logits[j] - log_norm for j in positives) / len(positives)
    return total / (2 * n)


def embeddings(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a, b


def test_matches_loop_reference_without_groups():
    a, b = embeddings()
    loss = ClipLoss(use_groups=False).double()
    assert loss(a, b).item() == pytest.approx(reference_clip(a, b, loss.scale.item()), rel=1e-9)


def test_group_ids_are_ignored_when_switched_off():
    a, b = embeddings()
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7])
    loss = ClipLoss(use_groups=False).double()
    assert loss(a, b, group).item() == pytest.approx(reference_clip(a, b, loss.scale.item()), rel=1e-9)


def test_replicates_are_positives_with_groups():
    a, b = embeddings()
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7])
    loss = ClipLoss(use_groups=True).double()
    expected = reference_clip(a, b, loss.scale.item(), group.tolist())
    assert loss(a, b, group).item() == pytest.approx(expected, rel=1e-9)
    # and it differs from the textbook loss, which treats replicates as negatives
    assert abs(expected - reference_clip(a, b, loss.scale.item())) > 1e-3


def test_unique_groups_equal_textbook_loss():
    a, b = embeddings()
    loss = ClipLoss().double()
    assert loss(a, b, torch.arange(12)).item() == pytest.approx(loss(a, b).item(), rel=1e-12)


def test_scale_is_learnable_in_log_space_and_clamped():
    loss = ClipLoss(init_scale=50.0, max_scale=100.0)
    assert loss.scale.item() == pytest.approx(50.0, rel=1e-6)
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1000.0))
    assert loss.scale.item() == pytest.approx(100.0, rel=1e-6)
    assert loss.extra_metrics()["logit_scale"].item() == pytest.approx(100.0, rel=1e-6)
    a, b = embeddings()
    with torch.no_grad():
        loss.log_scale.fill_(math.log(10.0))
    loss.double()(a, b).backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad.abs().item() > 0


def test_fixed_scale_gets_no_gradient():
    loss = ClipLoss(learn_scale=False)
    assert not loss.log_scale.requires_grad


def test_invalid_scale_is_refused():
    with pytest.raises(ValueError, match="init_scale"):
        ClipLoss(init_scale=200.0, max_scale=100.0)
