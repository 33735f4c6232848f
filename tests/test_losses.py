"""SigLipLoss, HopfieldLoss (CLOOB) and NTXentLoss against loop-based references written from the papers."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.helpers import load_benchmark
from unimodality.cli import main
from unimodality.config import config_form
from unimodality.plugins.losses.hopfield import HopfieldLoss
from unimodality.plugins.losses.ntxent import NTXentLoss
from unimodality.plugins.losses.siglip import SigLipLoss

CLIP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip.yaml"
GROUPS = [0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 6, 7]  # replicates: pairs, a triple, and singletons


def embeddings(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a, b


def dot(u, v):
    return sum(x * y for x, y in zip(u, v))


def is_positive(group, i, j):
    return i == j if group is None else group[i] == group[j]


# -- loop references ----------------------------------------------------------------------------------

def reference_siglip(a, b, scale, bias, group=None):
    """Zhai et al. 2023: -1/|B| sum_i sum_j log sigmoid(z_ij (t a_i.b_j + bias)), z = +1 positive, -1 not."""
    a, b = a.tolist(), b.tolist()
    n = len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if is_positive(group, i, j) else -1.0
            x = z * (scale * dot(a[i], b[j]) + bias)
            total += -math.log(1 / (1 + math.exp(-x)))
    return total / n


def reference_hopfield_retrieval(state, stored, beta):
    """CLOOB's ``hopfield``: stored^T @ softmax(beta * stored @ state^T, dim=0), columns normalised.

    Returns the retrieved patterns as rows (the transpose of the published column layout).
    """
    columns = []
    for i in range(len(state)):  # column i: the pattern retrieved by state pattern i
        logits = [beta * dot(stored[k], state[i]) for k in range(len(stored))]
        norm = sum(math.exp(x) for x in logits)
        weights = [math.exp(x) / norm for x in logits]  # softmax over stored patterns (dim=0)
        retrieved = [sum(weights[k] * stored[k][e] for k in range(len(stored))) for e in range(len(stored[0]))]
        length = math.sqrt(sum(x * x for x in retrieved))
        columns.append([x / length for x in retrieved])
    return columns


def reference_info_loob(x, y, inv_tau, group=None):
    """CLOOB's ``infoLOOB_loss``: tau * (-mean_i pos_i + mean_i logsumexp_{j not positive} k_ij), k = x y^T / tau.

    pos_i is the mean of k_ij over i's positives (CLOOB: the single diagonal entry); a row with no
    negatives contributes 0 as its negatives term.
    """
    tau = 1 / inv_tau
    n = len(x)
    positives = negatives = 0.0
    for i in range(n):
        k = [dot(x[i], y[j]) / tau for j in range(n)]
        pos = [k[j] for j in range(n) if is_positive(group, i, j)]
        neg = [k[j] for j in range(n) if not is_positive(group, i, j)]
        positives += -sum(pos) / len(pos)
        negatives += math.log(sum(math.exp(v) for v in neg)) if neg else 0.0
    return tau * (positives / n + negatives / n)


def reference_cloob(a, b, beta, inv_tau, group=None):
    x, y = a.tolist(), b.tolist()
    p_xx = reference_hopfield_retrieval(x, x, beta)
    p_yy = reference_hopfield_retrieval(y, y, beta)
    p_xy = reference_hopfield_retrieval(y, x, beta)  # state y, stored x
    p_yx = reference_hopfield_retrieval(x, y, beta)  # state x, stored y
    return reference_info_loob(p_xx, p_xy, inv_tau, group) + reference_info_loob(p_yy, p_yx, inv_tau, group)


def reference_ntxent(a, b, temperature, group=None):
    """SimCLR over 2N views; positives of view i: every other view of its sample (or of its group)."""
    z = a.tolist() + b.tolist()
    n = len(a)
    sample = list(range(n)) * 2
    total = 0.0
    for i in range(2 * n):
        logits = {j: dot(z[i], z[j]) / temperature for j in range(2 * n) if j != i}
        log_norm = math.log(sum(math.exp(v) for v in logits.values()))
        positives = [j for j in logits if is_positive(group, sample[i], sample[j])]
        total += -sum(logits[j] - log_norm for j in positives) / len(positives)
    return total / (2 * n)


def reference(loss, a, b, group=None):
    group = None if group is None or not loss.use_groups else group.tolist()
    if isinstance(loss, SigLipLoss):
        return reference_siglip(a, b, loss.scale.item(), loss.bias.item(), group)
    if isinstance(loss, HopfieldLoss):
        return reference_cloob(a, b, loss.scale_hopfield, loss.inv_tau.item(), group)
    return reference_ntxent(a, b, loss.temperature.item(), group)


LOSSES = {
    "SigLipLoss": SigLipLoss,
    "HopfieldLoss": HopfieldLoss,
    "HopfieldLoss-learned": lambda **kw: HopfieldLoss(inv_tau=30.0, learn_inv_tau=True, **kw),
    "NTXentLoss": NTXentLoss,
    "NTXentLoss-learned": lambda **kw: NTXentLoss(temperature=0.5, learn_temperature=True, **kw),
}


@pytest.fixture(params=list(LOSSES), ids=list(LOSSES))
def make_loss(request):
    return LOSSES[request.param]


# -- agreement with the references --------------------------------------------------------------------

def test_matches_loop_reference_without_groups(make_loss):
    a, b = embeddings()
    loss = make_loss(use_groups=False).double()
    assert loss(a, b).item() == pytest.approx(reference(loss, a, b), rel=1e-9)
    # group ids are ignored when groups are switched off
    assert loss(a, b, torch.tensor(GROUPS)).item() == pytest.approx(reference(loss, a, b), rel=1e-9)


def test_matches_loop_reference_with_groups(make_loss):
    a, b = embeddings()
    group = torch.tensor(GROUPS)
    loss = make_loss(use_groups=True).double()
    expected = reference(loss, a, b, group)
    assert loss(a, b, group).item() == pytest.approx(expected, rel=1e-9)
    # replicates are positives: it differs from the textbook loss, which treats them as negatives
    assert abs(expected - reference(loss, a, b)) > 1e-3


def test_unique_groups_equal_textbook_loss(make_loss):
    a, b = embeddings()
    loss = make_loss().double()
    no_groups = loss(a, b).item()
    assert loss(a, b, torch.arange(12)).item() == pytest.approx(no_groups, rel=1e-12)
    assert no_groups == pytest.approx(reference(loss, a, b), rel=1e-9)


def test_hopfield_matches_published_cloob_code():
    a, b = embeddings(n=10, d=6, seed=3)
    loss = HopfieldLoss(use_groups=False).double()
    # CLOOB's published code, as transcribed for the loss benchmark's comparison
    expected = load_benchmark("losses").cloob_loss(loss, a, b, None).item()
    assert loss(a, b).item() == pytest.approx(expected, rel=1e-9)
    assert reference(loss, a, b) == pytest.approx(expected, rel=1e-9)


def test_hopfield_retrieval_is_a_softmax_weighted_mean_of_stored_patterns():
    from unimodality.plugins.losses.hopfield import hopfield_retrieval

    a, b = embeddings(n=7, d=5, seed=1)
    got = hopfield_retrieval(b, a, 14.3)
    expected = torch.tensor(reference_hopfield_retrieval(b.tolist(), a.tolist(), 14.3), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(7, dtype=torch.float64))


def test_cross_retrieval_is_both_retrievals_between_the_modalities():
    from unimodality.plugins.losses.hopfield import cross_retrieval

    a, b = embeddings(n=7, d=5, seed=2)
    v_a, v_b = cross_retrieval(a, b, 14.3)
    for got, state, stored in ((v_a, b, a), (v_b, a, b)):
        expected = reference_hopfield_retrieval(state.tolist(), stored.tolist(), 14.3)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_ntxent_without_groups_is_simclr():
    """SimCLR's own form: cross entropy of each view against its partner, self excluded, over 2N rows."""
    a, b = embeddings()
    loss = NTXentLoss(temperature=0.2, use_groups=False).double()
    z = torch.cat([a, b])
    logits = (z @ z.T / 0.2).fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(12, 24), torch.arange(12)])
    assert loss(a, b).item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


# -- edge cases -----------------------------------------------------------------------------------------

def test_batch_of_one_group_stays_finite(make_loss):
    a, b = (x.requires_grad_() for x in embeddings(n=6))
    loss = make_loss().double()
    group = torch.zeros(6, dtype=torch.long)
    value = loss(a, b, group)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(reference(loss, a.detach(), b.detach(), group), rel=1e-9)
    value.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    for p in loss.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("group", [None, [0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]],
                         ids=["no-groups", "groups", "one-group"])
def test_hopfield_gradients_pass_gradcheck(group):
    # the leave-one-out fills run outside autograd: the analytic gradient must still be the true one
    a, b = (x.requires_grad_() for x in embeddings(n=6))
    loss = HopfieldLoss(inv_tau=5.0, learn_inv_tau=True).double()
    group = None if group is None else torch.tensor(group)
    log_inv_tau = loss.log_inv_tau.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y, t: torch.func.functional_call(loss, {"log_inv_tau": t}, (x, y, group)), (a, b, log_inv_tau))


def test_hopfield_rows_without_negatives_keep_only_the_alignment_term():
    a, b = embeddings(n=5)
    loss = HopfieldLoss().double()
    group = torch.zeros(5, dtype=torch.long)
    u_a = torch.tensor(reference_hopfield_retrieval(a.tolist(), a.tolist(), loss.scale_hopfield),
                       dtype=torch.float64)
    v_a = torch.tensor(reference_hopfield_retrieval(b.tolist(), a.tolist(), loss.scale_hopfield),
                       dtype=torch.float64)
    u_b = torch.tensor(reference_hopfield_retrieval(b.tolist(), b.tolist(), loss.scale_hopfield),
                       dtype=torch.float64)
    v_b = torch.tensor(reference_hopfield_retrieval(a.tolist(), b.tolist(), loss.scale_hopfield),
                       dtype=torch.float64)
    expected = -(u_a @ v_a.T).mean() - (u_b @ v_b.T).mean()  # tau * (-mean k) with k = inv_tau * cos
    assert loss(a, b, group).item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("use_groups", [False, True])
def test_batch_of_two(make_loss, use_groups):
    a, b = (x.requires_grad_() for x in embeddings(n=2))
    loss = make_loss(use_groups=use_groups).double()
    group = torch.tensor([3, 7])
    value = loss(a, b, group)
    assert value.item() == pytest.approx(reference(loss, a.detach(), b.detach(), group), rel=1e-9)
    value.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_float32_agrees_with_float64(make_loss):
    a, b = embeddings()
    group = torch.tensor(GROUPS)
    loss = make_loss()
    expected = reference(loss, a, b, group)
    assert loss(a.float(), b.float(), group).item() == pytest.approx(expected, rel=1e-5)


# -- parameters: gradients, fixing, clamps ------------------------------------------------------------

def test_siglip_scale_and_bias_learn():
    loss = SigLipLoss()
    assert loss.scale.item() == pytest.approx(10.0, rel=1e-6) and loss.bias.item() == -10.0
    a, b = (x.float().requires_grad_() for x in embeddings())
    loss(a, b, torch.tensor(GROUPS)).backward()
    for p in (loss.log_scale, loss.bias):
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad.abs().item() > 0
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    metrics = loss.extra_metrics()
    assert set(metrics) == {"scale", "bias"}
    assert metrics["scale"].item() == pytest.approx(10.0, rel=1e-6) and metrics["bias"].item() == -10.0


def test_siglip_fixed_scale_and_bias_get_no_gradient():
    loss = SigLipLoss(init_scale=5.0, init_bias=-2.0, learn_scale=False, learn_bias=False)
    assert not loss.log_scale.requires_grad and not loss.bias.requires_grad
    a, b = (x.float().requires_grad_() for x in embeddings())
    loss(a, b).backward()
    assert loss.log_scale.grad is None and loss.bias.grad is None
    assert a.grad is not None
    assert loss.scale.item() == pytest.approx(5.0, rel=1e-6) and loss.bias.item() == -2.0


def test_siglip_scale_is_clamped():
    loss = SigLipLoss(max_scale=50.0)
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1000.0))
    assert loss.scale.item() == pytest.approx(50.0, rel=1e-6)
    assert loss.extra_metrics()["scale"].item() == pytest.approx(50.0, rel=1e-6)
    a, b = embeddings()
    double = loss.double()
    assert double(a, b).item() == pytest.approx(reference_siglip(a, b, 50.0, -10.0), rel=1e-9)


def test_hopfield_inv_tau_fixed_by_default_and_learnable_on_request():
    fixed = HopfieldLoss()
    assert not fixed.log_inv_tau.requires_grad
    assert fixed.scale_hopfield == 14.3 and fixed.inv_tau.item() == pytest.approx(14.3, rel=1e-6)
    assert fixed.extra_metrics()["inv_tau"].item() == pytest.approx(14.3, rel=1e-6)
    a, b = (x.float().requires_grad_() for x in embeddings())
    fixed(a, b, torch.tensor(GROUPS)).backward()
    assert fixed.log_inv_tau.grad is None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0

    learned = HopfieldLoss(learn_inv_tau=True)
    learned(*embeddings(), torch.tensor(GROUPS)).backward()
    assert learned.log_inv_tau.grad is not None and learned.log_inv_tau.grad.abs().item() > 0


def test_hopfield_inv_tau_is_clamped():
    loss = HopfieldLoss(learn_inv_tau=True, max_inv_tau=40.0)
    with torch.no_grad():
        loss.log_inv_tau.fill_(math.log(1000.0))
    assert loss.inv_tau.item() == pytest.approx(40.0, rel=1e-6)
    assert loss.extra_metrics()["inv_tau"].item() == pytest.approx(40.0, rel=1e-6)
    a, b = embeddings()
    assert loss.double()(a, b).item() == pytest.approx(reference_cloob(a, b, 14.3, 40.0), rel=1e-9)


def test_ntxent_temperature_fixed_by_default_and_learnable_on_request():
    fixed = NTXentLoss()
    assert not fixed.log_temperature.requires_grad
    assert fixed.extra_metrics()["temperature"].item() == pytest.approx(0.1, rel=1e-6)
    a, b = (x.float().requires_grad_() for x in embeddings())
    fixed(a, b, torch.tensor(GROUPS)).backward()
    assert fixed.log_temperature.grad is None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0

    learned = NTXentLoss(temperature=0.5, learn_temperature=True)
    learned(*embeddings(), torch.tensor(GROUPS)).backward()
    assert learned.log_temperature.grad is not None and learned.log_temperature.grad.abs().item() > 0


def test_ntxent_temperature_is_clamped():
    loss = NTXentLoss(temperature=0.5, learn_temperature=True, min_temperature=0.05)
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(1e-4))
    assert loss.temperature.item() == pytest.approx(0.05, rel=1e-6)
    assert loss.extra_metrics()["temperature"].item() == pytest.approx(0.05, rel=1e-6)
    a, b = embeddings()
    assert loss.double()(a, b).item() == pytest.approx(reference_ntxent(a, b, 0.05), rel=1e-9)


@pytest.mark.parametrize("build, match", [
    (lambda: SigLipLoss(init_scale=200.0), "init_scale"),
    (lambda: SigLipLoss(init_scale=0.0), "init_scale"),
    (lambda: HopfieldLoss(inv_tau=200.0), "inv_tau"),
    (lambda: HopfieldLoss(scale_hopfield=0.0), "scale_hopfield"),
    (lambda: NTXentLoss(temperature=0.001), "min_temperature"),
    (lambda: NTXentLoss(temperature=-1.0, min_temperature=-2.0), "min_temperature"),
])
def test_invalid_settings_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_init_args_are_recorded():
    assert config_form(HopfieldLoss(inv_tau=20.0, learn_inv_tau=True)) == {
        "class_path": "unimodality.plugins.losses.hopfield.HopfieldLoss",
        "init_args": {"scale_hopfield": 14.3, "inv_tau": 20.0, "learn_inv_tau": True, "max_inv_tau": 100.0,
                      "use_groups": True},
    }
    assert config_form(SigLipLoss(init_bias=-5.0))["init_args"]["init_bias"] == -5.0
    assert config_form(NTXentLoss(temperature=0.2))["init_args"]["temperature"] == 0.2


# -- CLI ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [SigLipLoss, HopfieldLoss, NTXentLoss], ids=lambda c: c.__name__)
def test_selectable_from_the_cli_by_short_name(cls, tmp_path, monkeypatch, capsys):
    args = ["fit", "--config", str(CLIP_CONFIG), "--model.loss", cls.__name__]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    loss = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["loss"]
    assert loss["class_path"] == f"{cls.__module__}.{cls.__name__}"
    assert loss["init_args"]["use_groups"] is True

    calls = []
    forward = cls.forward

    def recording_forward(self, a, b, group=None):
        value = forward(self, a, b, group)
        calls.append((a.shape[0], value.item()))
        return value

    monkeypatch.setattr(cls, "forward", recording_forward)
    main([*args, "--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    assert len(calls) >= 2 and all(math.isfinite(value) for _, value in calls)


# -- NT-Xent's memory-lean computation against the dense masked formula it replaced -------------------------
def dense_ntxent(a, b, temperature, group=None):
    """The former implementation: (2N)^2 logits, a self mask, a positive mask and a masked log-softmax."""
    n = a.shape[0]
    z = torch.cat([a, b])
    is_self = torch.eye(2 * n, dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(is_self, float("-inf"))
    same = torch.eye(n, dtype=torch.bool) if group is None else group[:, None] == group[None, :]
    positive = same.repeat(2, 2) & ~is_self
    log_prob = logits.log_softmax(dim=1).masked_fill(~positive, 0.0)
    return -(log_prob.sum(dim=1) / positive.sum(dim=1)).mean()


@pytest.mark.parametrize("use_groups", [True, False])
@pytest.mark.parametrize("block_elements", [2**20, 5])
def test_ntxent_value_and_gradients_equal_the_dense_formula(use_groups, block_elements, monkeypatch):
    import unimodality.loss

    monkeypatch.setattr(unimodality.loss, "BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(unimodality.loss, "MIN_BLOCK_ROWS", 1)
    a, b = embeddings(n=13, d=5, seed=7)
    a, b = a.requires_grad_(), b.requires_grad_()
    group = torch.tensor([3, 3, 3, 3, 0, 0, 0, 11, 11, -4, 6, 2, 2])  # sizes 4, 3, 2 and 1
    loss = NTXentLoss(temperature=0.2, learn_temperature=True, use_groups=use_groups).double()
    value = loss(a, b, group)
    grads = torch.autograd.grad(value, [a, b, loss.log_temperature])
    log_t = loss.log_temperature.detach().clone().requires_grad_()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    temperature = log_t.clamp(min=loss.min_log_temperature).exp()
    expected = dense_ntxent(a2, b2, temperature, group if use_groups else None)
    expected_grads = torch.autograd.grad(expected, [a2, b2, log_t])
    assert abs(float(value.detach()) - float(expected.detach())) < 1e-10
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_contrast_terms_match_torch_and_pass_gradcheck(monkeypatch):
    import unimodality.loss
    from unimodality.loss import contrast_terms, group_index

    monkeypatch.setattr(unimodality.loss, "BLOCK_ELEMENTS", 8)
    monkeypatch.setattr(unimodality.loss, "MIN_BLOCK_ROWS", 1)  # several blocks of rows
    a, b = embeddings(n=7, d=3, seed=8)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    index, counts = group_index(torch.tensor([4, 4, 1, 1, 1, 0, 9]), 7, a.device)
    weights = torch.tensor([0.5, 2.0, 0.25, 3.0], dtype=torch.float64)
    terms = contrast_terms(a, b, scale, index, weights)
    logits = scale * a @ b.T
    same = (index[:, None] == index[None, :]).to(logits.dtype)
    torch.testing.assert_close(terms.rows, logits.logsumexp(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(terms.columns, logits.logsumexp(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(terms.positive, (same * weights[index][:, None] * logits).sum(), rtol=0, atol=1e-12)
    diagonal = contrast_terms(a, b, scale, columns=False)  # no groups: the pairs (i, i)
    assert diagonal.columns is None
    torch.testing.assert_close(diagonal.positive, (scale * a * b).sum(), rtol=0, atol=1e-12)
    masked = (scale * a @ a.T).masked_fill(torch.eye(7, dtype=torch.bool), float("-inf"))
    symmetric = contrast_terms(a, None, scale, index, weights)
    torch.testing.assert_close(symmetric.rows, masked.logsumexp(1), rtol=0, atol=1e-12)
    expected = ((same - torch.eye(7)) * weights[index][:, None] * (scale * a @ a.T)).sum()
    torch.testing.assert_close(symmetric.positive, expected, rtol=0, atol=1e-12)

    mix = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()

    def combined(x, y, s):
        t = contrast_terms(x, y, s, index, weights)
        return t.rows @ mix[:7] + t.columns.sum() * mix[7] + 0.3 * t.positive

    assert torch.autograd.gradcheck(combined, (x, y, scale))
    assert torch.autograd.gradcheck(lambda x, y, s: contrast_terms(x, y, s, index, weights).columns.sum(),
                                    (x, y, scale))  # one output only
    assert torch.autograd.gradcheck(lambda x, y, s: contrast_terms(x, y, s).positive, (x, y, scale))
    assert torch.autograd.gradcheck(
        lambda x, s: (lambda t: t.rows @ mix[:7] - t.positive)(contrast_terms(x, None, s, index, weights)), (x, scale))
    with pytest.raises(ValueError, match="index and weights"):
        contrast_terms(a, None, scale)


def _benchmark(name):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["ClipLoss", "NTXentLoss"])
def test_benchmark_anchors_agree_with_our_textbook_losses(name):
    """benchmarks/losses.py's transcriptions of open_clip's and lightly's losses compute our textbook loss."""
    bench = _benchmark("losses")
    child = bench.measure(name, 48, 8, 1, "cpu", naive=True)
    row = bench.summarize(child)
    assert row["agree"] and row["anchor"]["agree"], row
    assert row["anchor"]["name"] == {"ClipLoss": "open_clip", "NTXentLoss": "lightly"}[name]
    assert row["anchor"]["time_ratio_groups"]["median"] > 0
