"""Cross-modal distillation: KD, C2KD and SHAKE against transcriptions of their reference code, exact under
2-process DDP, trained on the example data, reloaded and predicting."""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy.stats import kendalltau

from tests.helpers import example_datamodule, quiet_trainer
from tests.test_dino import ROWS as dino_rows
from tests.test_dino import ddp_results as dino_ddp_results
from unimodality.batch import GROUP
from unimodality.cli import main
from unimodality.plugins.datamodules.embed import EmbedDataModule
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.losses.distillation import KDLoss, kendall_tau, non_target_kl
from unimodality.plugins.setups.distillation import C2KDSetup, KDSetup, SHAKESetup

# -- transcriptions of the references -----------------------------------------------------------------


def reference_distill_kl(y_s, y_t, T):
    """DistillKL of the CRD code base that SHAKE builds on (and Hinton et al.'s T^2-scaled term)."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / y_s.shape[0]


def reference_ntkl(logits_student, logits_teacher, target, mask, criterion4, temperature=1):
    """``ntkl`` of huofushuo/C2KD, utils/helper.py."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    logits_teacher = logits_teacher * (~gt_mask)
    pred_teacher_part2 = F.softmax(logits_teacher / temperature, dim=1)
    logits_student = logits_student * (~gt_mask)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature, dim=1)
    return (mask * (criterion4(log_pred_student_part2, pred_teacher_part2.detach()).sum(1))).mean()


def reference_c2kd_loss(outputs, pseu_label, stu_logits, tea_logits, labels, krc=0.0):
    """The loss of ``train_network_distill`` in huofushuo/C2KD, utils/helper.py (student ``outputs``, teacher
    ``pseu_label``, proxies ``stu_logits`` and ``tea_logits``)."""
    criterion3 = torch.nn.KLDivLoss(reduction="batchmean")
    criterion4 = torch.nn.KLDivLoss(reduction="none")
    XE_s = F.cross_entropy(outputs, labels, reduction="none")
    XE_t = F.cross_entropy(pseu_label, labels, reduction="none")
    kl_loss_t_t_im = criterion3(F.log_softmax(tea_logits, -1), F.softmax(pseu_label.detach(), dim=-1))
    kl_loss_t_im_t = criterion3(F.log_softmax(pseu_label, -1), F.softmax(tea_logits.detach(), dim=-1))
    kl_loss_s_s_im = criterion3(F.log_softmax(stu_logits, -1), F.softmax(outputs.detach(), dim=-1))
    kl_loss_s_im_s = criterion3(F.log_softmax(outputs, -1), F.softmax(stu_logits.detach(), dim=-1))
    kendall = np.empty(tea_logits.size(0))
    for i in range(tea_logits.size(0)):
        kendall[i] = kendalltau(tea_logits[i, :].detach().numpy(), stu_logits[i, :].detach().numpy())[0]
    mask = torch.where(torch.from_numpy(kendall) > krc, 1, 0)
    if mask.sum() == 0:
        kl_loss_st_s_t = kl_loss_st_t_s = 0
    else:
        kl_loss_st_s_t = reference_ntkl(stu_logits, tea_logits.detach(), labels, mask, criterion4)
        kl_loss_st_t_s = reference_ntkl(tea_logits, stu_logits.detach(), labels, mask, criterion4)
    tmp1 = XE_t.mean() + kl_loss_t_t_im + kl_loss_st_t_s + kl_loss_t_im_t
    tmp2 = XE_s.mean() + kl_loss_s_s_im + kl_loss_st_s_t + kl_loss_s_im_s
    return tmp1 + tmp2


def reference_shake_loss(logit_s, logit_t, pred_feat_s, target, T, gamma=1.0, alpha=1.0, beta=1.0):
    """The ``shake`` branch of ``train_distill`` in lliai/SHAKE, helper/loops.py (without its layer norm)."""
    loss_cls = F.cross_entropy(logit_s, target)
    loss_div = reference_distill_kl(logit_s, logit_t, T)
    loss_kd = reference_distill_kl(pred_feat_s, logit_s.detach(), T) + reference_distill_kl(
        logit_s, pred_feat_s.detach(), T)
    loss_kd += F.cross_entropy(pred_feat_s, target) + F.mse_loss(pred_feat_s, logit_t.detach())
    return gamma * loss_cls + alpha * loss_div + beta * loss_kd


# -- the loss and its pieces ----------------------------------------------------------------------------

def test_kd_loss_matches_hinton_and_averages_targets_over_replicates():
    torch.manual_seed(0)
    student = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    got = KDLoss(temperature=3.0, use_groups=False)(student, teacher, torch.arange(9))
    torch.testing.assert_close(got, reference_distill_kl(student, teacher.detach(), 3.0), rtol=1e-12, atol=1e-12)
    got.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the teacher is never pulled to the student

    group = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    probabilities = F.softmax(teacher.detach() / 2.0, dim=1)
    target = torch.stack([probabilities[group == g].mean(dim=0) for g in group])
    expected = F.kl_div(F.log_softmax(student / 2.0, dim=1), target, reduction="batchmean") * 4.0
    torch.testing.assert_close(KDLoss(temperature=2.0)(student, teacher, group), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0.0)


def test_kendall_tau_matches_scipy_with_ties():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(12, 30, generator=generator, dtype=torch.float64)
    b = a + torch.randn(12, 30, generator=generator, dtype=torch.float64)
    a[0, :10] = 0.5  # ties
    b[1, 5:15] = 0.0
    got = kendall_tau(a, b, chunk_elements=2000)  # several chunks
    expected = [kendalltau(a[i].numpy(), b[i].numpy())[0] for i in range(12)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.isnan(kendall_tau(torch.ones(1, 4), torch.randn(1, 4))).all()  # a constant row ranks nothing


def test_non_target_kl_matches_the_c2kd_code():
    torch.manual_seed(1)
    s, t = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (7,))
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    expected = reference_ntkl(s, t, target, mask, torch.nn.KLDivLoss(reduction="none"))
    torch.testing.assert_close((mask * non_target_kl(s, t, target)).mean(), expected, rtol=1e-12, atol=1e-12)


# -- the setups' objectives against the references -----------------------------------------------------

SCHEMA = {"tx": {"features": [f"g{i}" for i in range(10)]}, "ph": {"features": [f"f{i}" for i in range(6)]}}
CLASSES = [3, 5, 8, 9, 12]


def built(cls, **kwargs):
    torch.manual_seed(0)
    model = cls(encoders={"tx": partial(MLPEncoder, hidden_sizes=[16], dropout=0.0),
                          "ph": partial(MLPEncoder, hidden_sizes=[8], dropout=0.0)},
                teacher="ph", student="tx", embed_dim=12, classes=CLASSES, schema=SCHEMA, **kwargs)
    return model.double().train()


def test_labels_are_the_training_perturbations():
    model = built(KDSetup)
    labels = model.labels(torch.tensor([3, 12, 4, 9, 100, 0]))
    assert labels.tolist() == [0, 4, -1, 3, -1, -1]


def random_logits(n=10, k=len(CLASSES), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, k, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(4)]


def test_c2kd_objective_matches_the_reference():
    model = built(C2KDSetup)
    student, teacher, student_proxy, teacher_proxy = random_logits()
    group = torch.tensor(CLASSES * 2)
    outputs = {"tx": student, "ph": teacher, "tx/proxy": student_proxy, "ph/proxy": teacher_proxy}
    got = sum(model.distillation_terms(outputs, group).values())
    expected = reference_c2kd_loss(student, teacher, student_proxy, teacher_proxy, model.labels(group))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(got, [student, teacher, student_proxy, teacher_proxy])
    want = torch.autograd.grad(expected, [student, teacher, student_proxy, teacher_proxy])
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert 0 < float(model.selected_fraction) < 1  # some rows are selected, not all


def test_shake_objective_matches_the_reference():
    model = built(SHAKESetup, loss=KDLoss(temperature=4.0, use_groups=False), teacher_ce_weight=0.0,
                  student_ce_weight=0.7, distill_weight=0.9, shadow_weight=1.3)
    student, teacher, shadow, _ = random_logits(seed=2)
    group = torch.tensor(CLASSES * 2)
    got = sum(model.distillation_terms({"tx": student, "ph": teacher, "shadow": shadow}, group).values())
    expected = reference_shake_loss(student, teacher, shadow, model.labels(group), 4.0, 0.7, 0.9, 1.3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_kd_objective_is_hinton_with_both_cross_entropies():
    model = built(KDSetup, loss=KDLoss(temperature=2.0, use_groups=False), student_ce_weight=0.5)
    student, teacher, _, _ = random_logits(seed=3)
    group = torch.tensor(CLASSES * 2)
    labels = model.labels(group)
    got = sum(model.distillation_terms({"tx": student, "ph": teacher}, group).values())
    expected = (F.cross_entropy(teacher, labels) + 0.5 * F.cross_entropy(student, labels)
                + reference_distill_kl(student, teacher.detach(), 2.0))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="model.teacher and model.student"):
        KDSetup(teacher="ph")
    with pytest.raises(ValueError, match="model.loss KDLoss"):
        KDSetup(teacher="ph", student="tx", loss=ClipLoss())
    with pytest.raises(ValueError, match="the data's modalities"):
        built(KDSetup).build({"tx": SCHEMA["tx"], "mol": SCHEMA["ph"]})
    with pytest.raises(ValueError, match="krc_threshold"):
        C2KDSetup(teacher="ph", student="tx", krc_threshold=2.0)


# -- training on the example data, reloading, predicting ------------------------------------------------

@pytest.mark.parametrize("cls", [KDSetup, C2KDSetup, SHAKESetup], ids=lambda c: c.__name__)
def test_fit_reload_and_predict(cls, tmp_path):
    model = cls(encoders={"tx": partial(MLPEncoder, hidden_sizes=[32]), "ph": partial(MLPEncoder, hidden_sizes=[32])},
                teacher="ph", student="tx", embed_dim=16, optimizer=partial(torch.optim.AdamW, lr=0.003))
    trainer = quiet_trainer(limit_train_batches=5, limit_val_batches=2, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(model, datamodule=example_datamodule())
    assert {"val/loss", "val/pert/mrr", "train/loss"} <= set(trainer.callback_metrics)
    n_classes = len(model.classes)
    assert n_classes > 100 and model.classifiers["tx"].out_features == n_classes  # training perturbations only
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["classes"] == model.classes
    loaded = cls.load_from_checkpoint(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    output = tmp_path / "tx.parquet"
    predictions = quiet_trainer().predict(loaded, datamodule=EmbedDataModule(
        "example://transcriptomics.h5ad", output=str(output), n_samples=12))
    embedding = torch.cat([p["embedding"] for p in predictions])
    assert embedding.shape == (12, n_classes)  # class probabilities, L2-normalised
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(12))


@pytest.mark.slow
def test_cli_predict_from_a_kd_checkpoint(tmp_path):
    encoders = {"tx": partial(MLPEncoder, hidden_sizes=[16]), "ph": partial(MLPEncoder, hidden_sizes=[16])}
    model = KDSetup(encoders=encoders, teacher="ph", student="tx", embed_dim=8)
    trainer = quiet_trainer(limit_train_batches=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=example_datamodule())
    path = tmp_path / "kd.ckpt"
    trainer.save_checkpoint(path)
    output = tmp_path / "ph.parquet"
    main(["predict", "--ckpt_path", str(path), "--trainer.enable_progress_bar", "false",
          "--data.path", "example://phenomics.parquet", "--data.output", str(output), "--data.n_samples", "7"])
    import pandas as pd
    table = pd.read_parquet(output)
    assert len(table) == 7


# -- two processes give the loss and gradients of one process on the global batch ------------------------

ROWS = (5, 7)


def ddp_results(rows: slice) -> dict[str, tuple]:
    generator = torch.Generator().manual_seed(3)
    n = sum(ROWS)
    data = {"tx": torch.randn(n, 10, generator=generator, dtype=torch.float64),
            "ph": torch.randn(n, 6, generator=generator, dtype=torch.float64),
            GROUP: torch.tensor([3, 3, 5, 8, 8, 8, 9, 12, 5, 3, 7, 12])}  # 7 is no training class
    batch = {key: value[rows] for key, value in data.items()}
    out = {}
    for cls in (KDSetup, C2KDSetup, SHAKESetup):
        model = built(cls, **({"krc_threshold": -0.2} if cls is C2KDSetup else {}))
        loss = model._loss(batch)
        loss.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        if dist.is_initialized():
            for g in grads:
                dist.all_reduce(g)
                g /= dist.get_world_size()
        out[cls.__name__] = (loss.detach(), grads)
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    start = sum(ROWS[:rank])
    torch.save(ddp_results(slice(start, start + ROWS[rank])), Path(out) / f"rank{rank}.pt")
    # the DINO setups in the same two processes (each spawn pays the imports again): their centres too
    torch.save(dino_ddp_results(slice(start, start + dino_rows[rank])), Path(out) / f"dino{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_match_one_for_dino_centres_and_gradients(two_process_folder):
    """DINOSetup and CrossModalDINOSetup: loss, gradients and the centres after the update (the all-reduced
    teacher mean of DINO) in two gloo processes equal one process on the global batch."""
    folder = two_process_folder
    expected = dino_ddp_results(slice(None))
    for rank in range(2):
        got = torch.load(folder / f"dino{rank}.pt")
        for name, (loss, grads, centres) in expected.items():
            torch.testing.assert_close(got[name][0], loss, rtol=1e-5, atol=1e-6, msg=f"{name} loss, rank {rank}")
            for a, b in zip(got[name][1], grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{name} gradient, rank {rank}")
            for a, b in zip(got[name][2], centres):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"{name} centre, rank {rank}")
            assert any(g.abs().sum() > 0 for g in grads) and all(c.abs().sum() > 0 for c in centres)


@pytest.fixture(scope="module")
def two_process_folder(tmp_path_factory) -> Path:
    """What the two gloo processes wrote (spawned once for both tests of this module)."""
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    return out


def test_two_processes_match_one_on_the_global_batch(two_process_folder):
    folder = two_process_folder
    expected = ddp_results(slice(None))
    for rank in range(2):
        got = torch.load(folder / f"rank{rank}.pt")
        for name, (loss, grads) in expected.items():
            torch.testing.assert_close(got[name][0], loss, rtol=1e-10, atol=1e-10, msg=f"{name} loss, rank {rank}")
            for a, b in zip(got[name][1], grads):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"{name} gradient, rank {rank}")
            assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("cls", [KDSetup, C2KDSetup, SHAKESetup], ids=lambda c: c.__name__)
def test_terms_run_in_fp32_under_mixed_precision(cls):
    model = built(cls).float()
    generator = torch.Generator().manual_seed(0)
    batch = {"tx": torch.randn(10, 10, generator=generator), "ph": torch.randn(10, 6, generator=generator),
             GROUP: torch.tensor(CLASSES * 2)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model._loss(batch)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in model.loss_terms.values())
    torch.testing.assert_close(loss, model._loss(batch), rtol=0.05, atol=0.05)  # bf16 towers, fp32 terms
