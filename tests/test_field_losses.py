"""VICRegLoss, DCCALoss, S2LLoss, CWCLLoss and SinkhornLoss against references.

Each loss is checked against a transcription of its public implementation where one exists (VICReg:
facebookresearch/vicreg; S2L and CWCL: suinleelab/CellCLIP), a loop written from the paper's formula
(which also covers the multi-positive groups), and a numerical library where one computes the same thing
(DCCA: numpy and scikit-learn's CCA; Sinkhorn: POT). The 2-process equality with one process is in
tests/test_distributed.py, which covers every built-in loss.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from unimodality.cli import main
from unimodality.config import config_form
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.losses.cwcl import CWCLLoss
from unimodality.plugins.losses.dcca import DCCALoss
from unimodality.plugins.losses.s2l import S2LLoss
from unimodality.plugins.losses.siglip import SigLipLoss
from unimodality.plugins.losses.sinkhorn import SinkhornLoss
from unimodality.plugins.losses.vicreg import VICRegLoss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = [0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 6, 7]  # replicates: pairs, a triple, and singletons


def raw(n=12, d=6, seed=0):
    """Un-normalised tower outputs, correlated across the two inputs."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = shared + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    b = shared @ torch.randn(d, d, generator=g, dtype=torch.float64) + 0.7 * torch.randn(n, d, generator=g,
                                                                                        dtype=torch.float64)
    return a, b


def embeddings(n=12, d=8, seed=0, spread=1.0):
    """L2-normalised embeddings; ``b`` has near-duplicate rows (clusters) when ``spread`` is small."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    centres = torch.randn(4, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = F.normalize(centres[torch.arange(n) % 4] + spread * noise, dim=1)
    return a, b


def is_positive(group, i, j):
    return i == j if group is None else group[i] == group[j]


# == VICReg ===============================================================================================

def published_vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """facebookresearch/vicreg main_vicreg.py ``VICReg.forward`` after the projector, one process."""
    batch_size, num_features = x.shape

    def off_diagonal(m):
        n, k = m.shape
        assert n == k
        return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()

    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(num_features) + off_diagonal(cov_y).pow_(2).sum().div(
        num_features)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def reference_vicreg(a, b, group=None, lam=25.0, mu=25.0, nu=1.0, gamma=1.0, eps=1e-4):
    """Bardes et al. 2022, section 3, with loops; the invariance term over each row's positives."""
    a, b = a.tolist(), b.tolist()
    n, d = len(a), len(a[0])
    invariance = 0.0
    for i in range(n):
        positives = [j for j in range(n) if is_positive(group, i, j)]
        invariance += sum(sum((a[i][k] - b[j][k]) ** 2 for k in range(d)) for j in positives) / len(positives)
    invariance /= n * d

    def variance(x):
        total = 0.0
        for k in range(d):
            mean = sum(x[i][k] for i in range(n)) / n
            var = sum((x[i][k] - mean) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, gamma - math.sqrt(var + eps))
        return total / d

    def covariance(x):
        means = [sum(x[i][k] for i in range(n)) / n for k in range(d)]
        total = 0.0
        for k in range(d):
            for m in range(d):
                if k != m:
                    c = sum((x[i][k] - means[k]) * (x[i][m] - means[m]) for i in range(n)) / (n - 1)
                    total += c * c
        return total / d

    return lam * invariance + mu * (variance(a) + variance(b)) / 2 + nu * (covariance(a) + covariance(b))


def test_vicreg_matches_published_code():
    a, b = raw()
    assert VICRegLoss(use_groups=False)(a, b).item() == pytest.approx(published_vicreg(a, b).item(), rel=1e-12)
    loss = VICRegLoss(sim_coeff=5.0, std_coeff=10.0, cov_coeff=0.5, use_groups=False)
    assert loss(a, b, torch.tensor(GROUPS)).item() == pytest.approx(published_vicreg(a, b, 5.0, 10.0, 0.5).item(),
                                                                    rel=1e-12)


@pytest.mark.parametrize("use_groups", [False, True])
def test_vicreg_matches_loop_reference(use_groups):
    a, b = raw()
    group = torch.tensor(GROUPS)
    expected = reference_vicreg(a, b, GROUPS if use_groups else None)
    assert VICRegLoss(use_groups=use_groups)(a, b, group).item() == pytest.approx(expected, rel=1e-10)
    if use_groups:  # replicates are positives of the invariance term
        assert abs(expected - reference_vicreg(a, b)) > 1e-3
        assert VICRegLoss()(a, b, torch.arange(12)).item() == pytest.approx(reference_vicreg(a, b), rel=1e-10)


def test_vicreg_terms_and_weights():
    a, b = raw()
    only = partial(VICRegLoss, sim_coeff=0.0, std_coeff=0.0, cov_coeff=0.0, use_groups=False)
    assert only(sim_coeff=1.0)(a, b).item() == pytest.approx(F.mse_loss(a, b).item(), rel=1e-12)
    loss = VICRegLoss(use_groups=False)
    value = loss(a, b)
    terms = loss.extra_metrics()
    assert set(terms) == {"invariance", "variance", "covariance"}
    assert value.item() == pytest.approx(25 * terms["invariance"] + 25 * terms["variance"] + terms["covariance"])
    # features with a standard deviation above the target have no variance penalty; decorrelated ones none
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert loss.variance(3 * x).item() == 0.0 and loss.variance(x / 2).item() == pytest.approx(0.5, abs=0.02)
    assert loss.covariance(x).item() < 0.01
    assert loss.covariance(x[:, [0, 0, 1]]).item() == pytest.approx(2 / 3, rel=0.1)  # two identical features


def test_vicreg_refuses_a_batch_of_one_and_bad_options():
    a, b = raw(n=1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        VICRegLoss()(a, b)
    for kwargs, match in [({"sim_coeff": -1.0}, "sim_coeff"), ({"std_target": 0.0}, "std_target"),
                          ({"eps": 0.0}, "eps"), ({"sim_coeff": 0.0, "std_coeff": 0.0, "cov_coeff": 0.0}, "one of")]:
        with pytest.raises(ValueError, match=match):
            VICRegLoss(**kwargs)


# == DCCA =================================================================================================

def numpy_canonical_correlations(x, y, ridge=0.0, group=None):
    """Canonical correlations from the definitions, in numpy: whitening by inverse square roots (eigh)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, d = x.shape
    x, y = x - x.mean(0), y - y.mean(0)
    if group is not None:  # each row pairs with the mean of its group's rows
        group = np.asarray(group)
        y_paired = np.stack([y[group == group[i]].mean(0) for i in range(n)])
    else:
        y_paired = y
    s_xx = x.T @ x / (n - 1) + ridge * np.eye(d)
    s_yy = y.T @ y / (n - 1) + ridge * np.eye(d)
    s_xy = x.T @ y_paired / (n - 1)

    def inverse_sqrt(m):
        values, vectors = np.linalg.eigh(m)
        return vectors @ np.diag(values ** -0.5) @ vectors.T

    return np.linalg.svd(inverse_sqrt(s_xx) @ s_xy @ inverse_sqrt(s_yy), compute_uv=False)


@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_dcca_is_minus_the_top_k_canonical_correlations(top_k, ridge):
    a, b = raw(n=40, d=5)
    expected = numpy_canonical_correlations(a, b, ridge)[: top_k or 5].sum()
    loss = DCCALoss(top_k=top_k, ridge=ridge, use_groups=False)
    assert loss(a, b).item() == pytest.approx(-expected, rel=1e-10)
    assert loss.extra_metrics()["correlation"].item() == pytest.approx(expected, rel=1e-10)


def test_dcca_with_groups_pairs_rows_with_their_perturbation():
    a, b = raw(n=12, d=4)
    group = torch.tensor(GROUPS)
    expected = numpy_canonical_correlations(a, b, 1e-3, GROUPS).sum()
    assert DCCALoss(use_groups=True)(a, b, group).item() == pytest.approx(-expected, rel=1e-10)
    assert DCCALoss(use_groups=False)(a, b, group).item() == pytest.approx(
        -numpy_canonical_correlations(a, b, 1e-3).sum(), rel=1e-10)
    assert DCCALoss()(a, b, torch.arange(12)).item() == pytest.approx(DCCALoss()(a, b).item(), rel=1e-12)
    correlations = DCCALoss(ridge=0.0)(a, b, group)
    assert -4 <= correlations.item() <= 0


def test_dcca_matches_scikit_learn_cca():
    cross_decomposition = pytest.importorskip("sklearn.cross_decomposition", reason="scikit-learn not installed")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 2))
    x = np.c_[z, rng.normal(size=(200, 2))] @ rng.normal(size=(4, 4)) + 0.5 * rng.normal(size=(200, 4))
    y = np.c_[z[:, ::-1], rng.normal(size=(200, 2))] @ rng.normal(size=(4, 4)) + 0.5 * rng.normal(size=(200, 4))
    cca = cross_decomposition.CCA(n_components=3, scale=False, max_iter=10000, tol=1e-14).fit(x, y)
    x_scores, y_scores = cca.transform(x, y)
    sklearn_correlations = [np.corrcoef(x_scores[:, c], y_scores[:, c])[0, 1] for c in range(3)]
    loss = DCCALoss(top_k=3, ridge=0.0, use_groups=False)
    assert -loss(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(sum(sklearn_correlations), rel=1e-6)


def test_dcca_is_invariant_to_invertible_linear_maps():
    a, b = raw(n=30, d=4)
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss = DCCALoss(ridge=0.0, use_groups=False)
    assert loss(a @ mix + 3.0, b).item() == pytest.approx(loss(a, b).item(), rel=1e-9)


def test_dcca_trains_linear_towers_to_the_inputs_canonical_correlations():
    """Linear towers to k dimensions can reach at most the top-k canonical correlations of the inputs."""
    torch.manual_seed(0)
    x, y = raw(n=200, d=5, seed=3)
    x, y = x.float(), y.float()
    best = numpy_canonical_correlations(x, y)[:2].sum()
    towers = torch.nn.ModuleList([torch.nn.Linear(5, 2), torch.nn.Linear(5, 2)])
    loss = DCCALoss(ridge=0.0, use_groups=False)
    optimizer = torch.optim.Adam(towers.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        value = loss(towers[0](x), towers[1](y))
        value.backward()
        optimizer.step()
    assert -value.item() == pytest.approx(best, abs=2e-3)
    assert -value.item() <= best + 1e-4


def test_dcca_alignment_is_soft_ccas_distance_of_standardised_outputs():
    a, b = raw(n=20, d=4)
    n = 20
    standardised = [(x - x.mean(0)) / x.std(0) for x in (a, b)]
    distance = (standardised[0] - standardised[1]).pow(2).sum() / (2 * (n - 1))
    plain = DCCALoss(use_groups=False)(a, b)
    aligned = DCCALoss(alignment=0.5, use_groups=False)(a, b)
    assert aligned.item() == pytest.approx(plain.item() + 0.5 * distance.item(), rel=1e-10)
    # zero when each coordinate is its own canonical variate with correlation 1
    assert DCCALoss(alignment=1.0, ridge=0.0, use_groups=False).coordinate_correlations(a, 2 * a + 1).sum().item() \
        == pytest.approx(4.0, rel=1e-12)


def test_dcca_errors_are_clear():
    a, b = raw(n=10, d=4)
    with pytest.raises(ValueError, match=r"top_k \(5\) is more than the embedding size \(4\)"):
        DCCALoss(top_k=5)(a, b)
    with pytest.raises(ValueError, match="singular.*ridge"):
        DCCALoss(ridge=0.0)(torch.ones(10, 4, dtype=torch.float64), b)
    with pytest.raises(ValueError, match="at least 2 rows"):
        DCCALoss()(a[:1], b[:1])
    for kwargs, match in [({"top_k": 0}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"ridge": -1e-3}, "ridge"),
                          ({"alignment": -1.0}, "alignment")]:
        with pytest.raises(ValueError, match=match):
            DCCALoss(**kwargs)


# == S2L ==================================================================================================

def published_s2l(image_features, mol_features, inv_tau, bias):
    """suinleelab/CellCLIP src/clip/methods.py ``s2l_loss`` (MolPhenix's S2L), as published."""
    def s2l_dist(zxi):
        c = 0.3
        threshold = 0.75
        pi = torch.tensor(torch.pi)
        squared_norms = (zxi ** 2).sum(dim=1, keepdim=True)
        dist_matrix = squared_norms + squared_norms.T - 2 * (zxi @ zxi.T)
        sim_matrix = 1 - torch.atan(dist_matrix / c) * (4 / pi)
        sim_matrix = torch.where(sim_matrix < threshold, torch.tensor(0.0, device=sim_matrix.device), sim_matrix)
        return sim_matrix

    gamma = 1.7
    delta = 0.75
    logits_per_image = inv_tau.exp() * image_features @ mol_features.t()
    logits = logits_per_image.t() + bias
    sim_matrix = s2l_dist(image_features)
    pos = F.logsigmoid(logits)
    neg = F.logsigmoid(-logits)
    n = len(logits)
    loss = sim_matrix * pos + (gamma - delta * sim_matrix) * neg
    return -torch.sum(loss) / n


def reference_s2l(a, b, scale, bias, teacher="b", group=None, c=0.3, threshold=0.75, gamma=1.7, delta=0.75):
    a, b = a.tolist(), b.tolist()
    u = b if teacher == "b" else a
    n = len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            distance = sum((x - y) ** 2 for x, y in zip(u[i], u[j]))
            s = 1 - math.atan(distance / c) * 4 / math.pi
            s = 0.0 if s < threshold else s
            if group is not None and group[i] == group[j]:
                s = 1.0
            logit = scale * sum(x * y for x, y in zip(a[i], b[j])) + bias
            log_sig = -math.log1p(math.exp(-logit))
            log_sig_neg = -math.log1p(math.exp(logit))
            total += s * log_sig + (gamma - delta * s) * log_sig_neg
    return -total / n


def test_s2l_matches_published_code():
    a, b = embeddings(spread=0.08)  # b in four tight clusters: soft labels off the diagonal
    loss = S2LLoss(teacher="b", use_groups=False).double()
    labels = loss.labels(a, b)
    assert ((labels > 0) & (labels < 1)).sum() > 6  # soft labels are in play
    expected = published_s2l(b, a, loss.log_scale.detach(), loss.bias.detach())
    # rel 1e-7: the published code's pi is a float32 tensor (torch.tensor(torch.pi))
    assert loss(a, b).item() == pytest.approx(expected.item(), rel=1e-7)


@pytest.mark.parametrize("teacher", ["a", "b"])
@pytest.mark.parametrize("use_groups", [False, True])
def test_s2l_matches_loop_reference(teacher, use_groups):
    a, b = embeddings(spread=0.08)
    a = F.normalize(a + 3 * b, dim=1)  # a clustered too, so either teacher has soft labels
    loss = S2LLoss(teacher=teacher, init_scale=5.0, init_bias=-2.0, use_groups=use_groups).double()
    group = torch.tensor(GROUPS)
    expected = reference_s2l(a, b, loss.scale.item(), loss.bias.item(), teacher, GROUPS if use_groups else None)
    assert loss(a, b, group).item() == pytest.approx(expected, rel=1e-9)


def test_s2l_with_hard_labels_is_siglip():
    a, b = embeddings(spread=0.08)
    group = torch.tensor(GROUPS)
    for use_groups in (False, True):
        hard = S2LLoss(gamma=1.0, delta=1.0, threshold=1.0, use_groups=use_groups).double()
        siglip = SigLipLoss(use_groups=use_groups).double()
        assert hard(a, b, group).item() == pytest.approx(siglip(a, b, group).item(), rel=1e-12)


def test_s2l_labels_are_targets_without_gradient():
    a, b = (x.requires_grad_() for x in embeddings(spread=0.08))
    grads = {}
    for detach in (True, False):
        b.grad = None
        S2LLoss(detach_labels=detach, use_groups=False).double()(a, b).backward()
        grads[detach] = b.grad.clone()
    assert not torch.allclose(grads[True], grads[False])
    loss = S2LLoss()
    assert set(loss.extra_metrics()) == {"scale", "bias"}
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1e4))
    assert loss.scale.item() == pytest.approx(100.0, rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"teacher": "c"}, "teacher"), ({"init_scale": 200.0}, "init_scale"), ({"distance_scale": 0.0}, "distance_scale"),
    ({"threshold": 1.5}, "threshold"), ({"delta": 2.0}, "delta"),
])
def test_s2l_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S2LLoss(**kwargs)


# == CWCL =================================================================================================

def published_cwcl(images, image_features, text_features, inv_tau):
    """suinleelab/CellCLIP src/clip/methods.py ``cwcl_loss`` (CrossEntropyLoss for ``loss_fct_txt``)."""
    logits_per_image = inv_tau.exp() * image_features @ text_features.t()
    logits_per_text = logits_per_image.t()
    n = len(logits_per_image)
    ground_truth = torch.arange(n, dtype=torch.long, device=images.device)
    loss_cl = F.cross_entropy(logits_per_text, ground_truth)
    batch, channels, _ = images.shape
    images_norm = images / (images.norm(dim=-1, keepdim=True) + 1e-8)
    sim_matrix = torch.zeros(batch, batch, dtype=images.dtype, device=images.device)
    for c in range(channels):
        channel_features = images_norm[:, c, :]
        sim_matrix += torch.mm(channel_features, channel_features.T)
    sim_matrix = sim_matrix / (channels * 2) + 0.5
    sim_matrix = sim_matrix / (sim_matrix.sum(dim=1, keepdim=True) + 1e-8)
    loss_cwcl = -torch.sum(sim_matrix * torch.log_softmax(logits_per_image, dim=1)) / n
    return loss_cwcl + loss_cl


def reference_cwcl(a, b, scale, teacher="b", group=None):
    """Srinivasa et al. 2023 with loops: -1/n sum_i sum_j w_ij / sum_j w_ij * log softmax_j, per direction."""
    a, b = a.tolist(), b.tolist()
    n = len(a)

    def direction(q, c, weighted):
        total = 0.0
        for i in range(n):
            logits = [scale * sum(x * y for x, y in zip(q[i], c[j])) for j in range(n)]
            log_norm = math.log(sum(math.exp(x) for x in logits))
            if weighted:
                w = [1.0 if is_positive(group, i, j) else (1 + sum(x * y for x, y in zip(q[i], q[j]))) / 2
                     for j in range(n)]
            else:
                w = [1.0 if is_positive(group, i, j) else 0.0 for j in range(n)]
            total += -sum(w[j] * (logits[j] - log_norm) for j in range(n)) / sum(w)
        return total / n

    return (direction(a, b, teacher in ("a", "both")) + direction(b, a, teacher in ("b", "both"))) / 2


def test_cwcl_matches_published_code():
    a, b = embeddings()
    loss = CWCLLoss(teacher="b", use_groups=False).double()
    # CellCLIP's images = the teacher's (here: b's) features, one channel; it sums the two directions
    # (rel 1e-7: its 1e-8 guards in the normalisations)
    expected = published_cwcl(b[:, None, :], b, a, loss.log_scale.detach())
    assert 2 * loss(a, b).item() == pytest.approx(expected.item(), rel=1e-7)


@pytest.mark.parametrize("teacher", ["a", "b", "both"])
@pytest.mark.parametrize("use_groups", [False, True])
def test_cwcl_matches_loop_reference(teacher, use_groups):
    a, b = embeddings()
    loss = CWCLLoss(teacher=teacher, use_groups=use_groups).double()
    expected = reference_cwcl(a, b, loss.scale.item(), teacher, GROUPS if use_groups else None)
    assert loss(a, b, torch.tensor(GROUPS)).item() == pytest.approx(expected, rel=1e-9)


def test_cwcl_weights_and_scale():
    a, b = (x.requires_grad_() for x in embeddings())
    loss = CWCLLoss(use_groups=False).double()
    same = F.normalize(torch.ones(12, 8, dtype=torch.float64), dim=1)  # a teacher that sees no difference
    uniform = loss.weights(same, torch.eye(12, dtype=torch.bool))
    torch.testing.assert_close(uniform, torch.full((12, 12), 1 / 12, dtype=torch.float64))
    loss(a, b).backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad.abs().item() > 0
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1e4))
    assert loss.extra_metrics()["logit_scale"].item() == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        CWCLLoss(teacher="tx")
    with pytest.raises(ValueError, match="init_scale"):
        CWCLLoss(init_scale=0.0)


# == Sinkhorn =============================================================================================

@pytest.mark.parametrize("use_groups", [False, True])
def test_sinkhorn_without_iterations_is_clip(use_groups):
    a, b = embeddings()
    group = torch.tensor(GROUPS)
    sinkhorn = SinkhornLoss(max_iter=0, use_groups=use_groups).double()
    clip = ClipLoss(use_groups=use_groups).double()
    assert sinkhorn(a, b, group).item() == pytest.approx(clip(a, b, group).item(), rel=1e-12)


def test_sinkhorn_plan_has_uniform_marginals_and_the_loss_finds_the_pairing():
    a, b = embeddings()
    loss = SinkhornLoss(max_iter=1000, tol=1e-10).double()
    plan = loss.plan(a, b)
    torch.testing.assert_close(plan.sum(dim=1), torch.full((12,), 1 / 12, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(dim=0), torch.full((12,), 1 / 12, dtype=torch.float64), atol=1e-10, rtol=0)
    assert 0 < loss.extra_metrics()["sinkhorn_iterations"].item() < 1000
    assert loss(a, b).item() > 0
    # the same orthonormal rows on both sides at a large scale: the plan is the pairing, the loss ~0
    eye = torch.eye(8, dtype=torch.float64)
    assert SinkhornLoss(init_scale=100.0).double()(eye, eye).item() < 1e-6


def pot():
    return pytest.importorskip("ot", reason="POT is not installed (pip install '.[ot]'): no reference for Sinkhorn")


@pytest.mark.parametrize("use_groups", [False, True])
def test_sinkhorn_matches_pot(use_groups):
    ot = pot()
    a, b = embeddings()
    group = torch.tensor(GROUPS)
    loss = SinkhornLoss(init_scale=10.0, max_iter=5000, tol=1e-12, use_groups=use_groups).double()
    n, reg = 12, 1 / loss.scale.item()  # 0.1, up to the float32 rounding of the stored log scale
    cost = (1 - a @ b.T).numpy()  # -a.b up to a constant, which changes neither plan nor loss
    marginal = np.full(n, 1 / n)
    plan = ot.sinkhorn(marginal, marginal, cost, reg=reg, method="sinkhorn_log", numItermax=100000, stopThr=1e-14)
    np.testing.assert_allclose(loss.plan(a, b).detach().numpy(), plan, rtol=1e-8, atol=1e-14)
    target = (group[:, None] == group[None, :]).double().numpy() if use_groups else np.eye(n)
    target = target / (n * target.sum(axis=1, keepdims=True))
    expected = -(target * np.log(n * plan)).sum()
    assert loss(a, b, group).item() == pytest.approx(expected, rel=1e-9)
    transport_cost = ot.sinkhorn2(marginal, marginal, cost, reg=reg, method="sinkhorn_log", numItermax=100000,
                                  stopThr=1e-14)
    assert float((loss.plan(a, b).detach().numpy() * cost).sum()) == pytest.approx(float(transport_cost), rel=1e-9)


def test_sinkhorn_gradients_match_differentiating_pots_iterations():
    """The envelope-theorem gradient equals autograd through POT's (unrolled, converged) iterations."""
    ot = pot()
    a0, b0 = embeddings()
    n = 12
    grads = []
    loss = SinkhornLoss(init_scale=10.0, max_iter=5000, tol=1e-12, use_groups=False).double()
    for implementation in ("ours", "pot"):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        if implementation == "ours":
            value = loss(a, b)
        else:
            marginal = torch.full((n,), 1 / n, dtype=torch.float64)
            plan = ot.sinkhorn(marginal, marginal, 1 - a @ b.T, reg=1 / loss.scale.item(), method="sinkhorn_log",
                               numItermax=2000, stopThr=1e-14)
            value = -(torch.eye(n, dtype=torch.float64) / n * torch.log(n * plan)).sum()
        value.backward()
        grads.append((a.grad, b.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_sinkhorn_bad_options():
    for kwargs, match in [({"max_iter": -1}, "max_iter"), ({"max_iter": 2.5}, "max_iter"), ({"tol": 0.0}, "tol"),
                          ({"init_scale": 1000.0}, "init_scale")]:
        with pytest.raises(ValueError, match=match):
            SinkhornLoss(**kwargs)


# == all five =============================================================================================

NEW = {
    "VICRegLoss": VICRegLoss, "DCCALoss": DCCALoss, "S2LLoss": S2LLoss, "CWCLLoss": CWCLLoss,
    "SinkhornLoss": SinkhornLoss,
}


def inputs_for(loss, n=12, seed=0):
    return raw(n=n, seed=seed) if not loss.normalized_inputs else embeddings(n=n, seed=seed, spread=0.3)


@pytest.mark.parametrize("name", list(NEW))
def test_bf16_autocast_gives_an_fp32_loss(name):
    loss = NEW[name]()
    a, b = (x.bfloat16() for x in inputs_for(loss))
    group = torch.tensor(GROUPS)
    expected = loss(a.float(), b.float(), group)  # the same (bf16-rounded) inputs, in fp32
    a.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(a, b, group)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad.float()).all()


@pytest.mark.parametrize("name", list(NEW))
def test_float32_agrees_with_float64(name):
    loss = NEW[name]()
    a, b = inputs_for(loss)
    group = torch.tensor(GROUPS)
    assert loss(a.float(), b.float(), group).item() == pytest.approx(loss.double()(a, b, group).item(), rel=1e-4)


@pytest.mark.parametrize("name", list(NEW))
def test_batch_of_one_group_stays_finite(name):
    loss = NEW[name]().double()
    a, b = (x.requires_grad_() for x in inputs_for(loss, n=6))
    value = loss(a, b, torch.zeros(6, dtype=torch.long))
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("name", list(NEW))
def test_init_args_are_recorded(name):
    form = config_form(NEW[name]())
    assert form["class_path"] == f"{NEW[name].__module__}.{name}"
    assert form["init_args"]["use_groups"] is True


def test_normalized_inputs_flags():
    assert not VICRegLoss.normalized_inputs and not DCCALoss.normalized_inputs
    assert S2LLoss.normalized_inputs and CWCLLoss.normalized_inputs and SinkhornLoss.normalized_inputs


# == setups honour normalized_inputs ======================================================================

class RecordsNorms:
    """A loss mixin that remembers the row norms of what the loss was given."""

    def __init__(self) -> None:
        super().__init__()
        self.norms: list[torch.Tensor] = []

    def forward(self, a, b, group=None):
        self.norms.append(torch.cat([a.norm(dim=1), b.norm(dim=1)]).detach())
        return super().forward(a, b, group)


class RecordingVICReg(RecordsNorms, VICRegLoss):
    pass


class RecordingClip(RecordsNorms, ClipLoss):
    pass


@pytest.mark.parametrize("loss_cls, normalized", [(RecordingVICReg, False), (RecordingClip, True)])
def test_cross_modal_setup_hands_raw_outputs_to_a_loss_that_asks(loss_cls, normalized):
    from tests.helpers import example_datamodule, quiet_trainer
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.setups.cross_modal import CrossModalSetup

    loss = loss_cls()
    encoder = partial(MLPEncoder, hidden_sizes=[16])
    setup = CrossModalSetup(encoders={"tx": encoder, "ph": encoder}, embed_dim=8, loss=loss)
    trainer = quiet_trainer(fast_dev_run=1, log_every_n_steps=1)
    trainer.fit(setup, datamodule=example_datamodule(batch_size=16))
    assert len(loss.norms) >= 2  # a training and a validation step
    for norms in loss.norms:
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5) == normalized
    # metrics and embeddings stay on the sphere
    assert float(trainer.callback_metrics["train/uniformity/tx"]) <= 0
    batch = example_datamodule(batch_size=16)
    batch.setup("fit")
    rows = batch.datasets["val"].__getitems__(list(range(4)))
    setup.eval()
    for embedding in setup.embed(rows).values():
        torch.testing.assert_close(embedding.norm(dim=1), torch.ones(4))
    for name, raw_output in setup.loss_inputs(rows).items():
        torch.testing.assert_close(F.normalize(raw_output, dim=1), setup.embed(rows)[name])


def test_simclr_setup_hands_raw_projections_to_a_loss_that_asks():
    from unimodality.plugins.encoders.mlp import MLPEncoder
    from unimodality.plugins.setups.simclr import SimCLRSetup

    x = torch.randn(10, 6)
    for loss, normalized in ((VICRegLoss(), False), (ClipLoss(), True)):
        setup = SimCLRSetup(encoder=partial(MLPEncoder, hidden_sizes=[16]), loss=loss, embed_dim=8,
                            schema={"tx": {"features": [f"g{i}" for i in range(6)]}})
        a, b = setup._views(x, lambda v: v)
        for view in (a, b):
            assert torch.allclose(view.norm(dim=1), torch.ones(10), atol=1e-5) == normalized


# == CLI and configs ======================================================================================

@pytest.mark.parametrize("name, config", [
    ("VICRegLoss", "vicreg"), ("DCCALoss", "dcca"), ("S2LLoss", "s2l"), ("CWCLLoss", "cwcl"),
    ("SinkhornLoss", "sinkhorn"),
])
def test_config_selects_the_loss_by_short_name(name, config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    loss = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["loss"]
    assert loss["class_path"] == f"{NEW[name].__module__}.{name}"
    with pytest.raises(SystemExit) as exit_info:  # and a short name on the command line
        main(["fit", "--config", str(CONFIGS / "clip.yaml"), "--model.loss", name, "--print_config"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["loss"]["class_path"].endswith(name)
