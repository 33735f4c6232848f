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


# -- the memory-lean computation against the dense soft-target formula it replaced -------------------------
def dense_clip(a, b, log_scale, max_log_scale, group=None):
    """The former implementation: cross entropy against the row-normalised same-group matrix, both ways."""
    scale = log_scale.clamp(max=max_log_scale).exp()
    logits = scale * a @ b.T
    targets = (torch.eye(len(a), dtype=torch.bool) if group is None else group[:, None] == group[None, :])
    targets = targets.to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@pytest.mark.parametrize("use_groups", [True, False])
@pytest.mark.parametrize("block_elements", [2**20, 7])  # one block, and blocks of a single row
def test_value_and_gradients_equal_the_dense_formula(use_groups, block_elements, monkeypatch):
    import unimodality.loss

    monkeypatch.setattr(unimodality.loss, "BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(unimodality.loss, "MIN_BLOCK_ROWS", 1)
    a, b = embeddings(n=17, d=6, seed=4)
    a, b = a.requires_grad_(), b.requires_grad_()
    group = torch.tensor([5, 5, 5, 5, -2, -2, 9, 1, 1, 1, 30, 30, 7, 8, 8, 3, 4])  # sizes 4, 3, 2 and 1
    loss = ClipLoss(init_scale=20.0, use_groups=use_groups).double()
    value = loss(a, b, group)
    grads = torch.autograd.grad(value, [a, b, loss.log_scale])
    log_scale = loss.log_scale.detach().clone().requires_grad_()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    expected = dense_clip(a2, b2, log_scale, loss.max_log_scale, group if use_groups else None)
    expected_grads = torch.autograd.grad(expected, [a2, b2, log_scale])
    assert abs(float(value.detach()) - float(expected.detach())) < 1e-10
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_gradcheck_with_groups():
    a, b = embeddings(n=9, d=4, seed=5)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4])
    loss = ClipLoss(init_scale=5.0).double()
    assert torch.autograd.gradcheck(lambda x, y: loss(x, y, group), (a.requires_grad_(), b.requires_grad_()))


def test_float32_stays_close_at_full_scale():
    """fp32 at scale 100: logsumexp minus the positive sum stays as close to fp64 as cross entropy does."""
    a, b = embeddings(n=512, d=32, seed=6)
    group = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(0))
    loss = ClipLoss(init_scale=100.0)
    value = loss(a.float(), b.float(), group)
    reference = dense_clip(a, b, torch.tensor(math.log(100.0), dtype=torch.float64), math.log(100.0), group)
    assert float(value) == pytest.approx(float(reference), rel=1e-5)
