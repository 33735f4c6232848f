"""DINO: the loss against a transcription of facebookresearch/dino, the head, the EMA teacher, the centre under
2-process DDP, and both setups trained on the example data, reloaded and predicting."""

from __future__ import annotations

import math
from functools import partial

import anndata as ad
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.helpers import example_datamodule, quiet_trainer
from unimodality.batch import GROUP
from unimodality.cli import main
from unimodality.outputs import OBSM_KEY
from unimodality.plugins.augmentations.vectors import FeatureMask, GaussianNoise
from unimodality.plugins.datamodules.embed import EmbedDataModule
from unimodality.plugins.datamodules.single import SingleDataModule
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.dino import DINOLoss
from unimodality.plugins.setups.dino import CrossModalDINOSetup, DINOHead, DINOSetup, ema_update, teacher_momentum
from unimodality.plugins.sources.anndata import AnnDataSource

# -- a transcription of the reference: facebookresearch/dino, main_dino.py (DINOLoss), utils.py
# (cosine_scheduler), vision_transformer.py (DINOHead); single process, so the all-reduce is the identity --


class ReferenceDINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float64))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def reference_cosine_scheduler(base_value, final_value, epochs, niter_per_ep):
    iters = np.arange(epochs * niter_per_ep)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


class ReferenceDINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


# -- the loss --------------------------------------------------------------------------------------------

def test_loss_matches_the_reference_over_steps_with_warmup_and_centre():
    torch.manual_seed(0)
    n, k, steps = 6, 16, 5
    reference = ReferenceDINOLoss(k, ncrops=2, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                  warmup_teacher_temp_epochs=3, nepochs=steps, student_temp=0.1, center_momentum=0.9)
    ours = DINOLoss(student_temperature=0.1, teacher_temperature=0.07, warmup_teacher_temperature=0.04,
                    warmup_teacher_temperature_steps=3, center_momentum=0.9, use_groups=False).double()
    group = torch.arange(n)
    for step in range(steps):
        student = torch.randn(2 * n, k, dtype=torch.float64, requires_grad=True)
        teacher = torch.randn(2 * n, k, dtype=torch.float64) * 3
        expected = reference(student, teacher, step)
        (want,) = torch.autograd.grad(expected, student)
        got = ours(student, teacher, group)
        (grad,) = torch.autograd.grad(got, student)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.center, reference.center, rtol=1e-12, atol=1e-12)
    assert ours.current_teacher_temperature() == pytest.approx(0.07)
    assert not torch.equal(ours.center, torch.zeros_like(ours.center))


def test_evaluation_leaves_the_centre_and_schedule_alone():
    loss = DINOLoss(warmup_teacher_temperature_steps=10).double().eval()
    loss(torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64), torch.arange(8))
    assert torch.equal(loss.center, torch.zeros(1, 5, dtype=torch.float64)) and int(loss.steps) == 0


def test_groups_average_the_loss_over_same_perturbation_teacher_rows():
    torch.manual_seed(1)
    student, teacher = torch.randn(7, 9, dtype=torch.float64), torch.randn(7, 9, dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    got = DINOLoss(teacher_temperature=0.05, use_groups=True).double().eval()(student, teacher, group)
    target = F.softmax(teacher / 0.05, dim=-1)
    log_student = F.log_softmax(student / 0.1, dim=-1)
    per_row = [np.mean([-(target[j] * log_student[i]).sum().item() for j in range(7) if group[j] == group[i]])
               for i in range(7)]
    assert got.item() == pytest.approx(float(np.mean(per_row)), rel=1e-12)


def test_bad_loss_settings_and_inputs_are_refused():
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(center_momentum=1.0)
    with pytest.raises(ValueError, match="student_temperature"):
        DINOLoss(student_temperature=0)
    with pytest.raises(ValueError, match="whole views"):
        DINOLoss()(torch.randn(5, 3), torch.randn(4, 3), torch.arange(4))


# -- the head and the EMA teacher ------------------------------------------------------------------------

def test_head_matches_the_reference_head():
    torch.manual_seed(0)
    ours = DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8, n_layers=3)
    reference = ReferenceDINOHead(12, 40, nlayers=3, hidden_dim=24, bottleneck_dim=8)
    reference.mlp.load_state_dict(ours.mlp.state_dict())
    with torch.no_grad():
        reference.last_layer.weight_v.copy_(ours.last_layer.parametrizations.weight.original1)
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours.last_layer.weight.norm(dim=1), torch.ones(40))  # prototypes on the sphere
    assert not ours.last_layer.parametrizations.weight.original0.requires_grad
    assert DINOHead(12, 40, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_momentum_schedule_matches_the_reference_cosine_scheduler():
    reference = reference_cosine_scheduler(0.996, 1.0, epochs=3, niter_per_ep=7)
    ours = [teacher_momentum(i, 21, 0.996, 1.0) for i in range(21)]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-15)
    assert teacher_momentum(5, math.inf, 0.996, 1.0) == 0.996  # a run with no end keeps the base momentum


def test_ema_update_is_the_convex_combination_and_copies_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student[1].running_mean.fill_(2.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(student, teacher, 0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)


# -- the setups --------------------------------------------------------------------------------------------

def tx_datamodule(**kwargs) -> SingleDataModule:
    return SingleDataModule(
        AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"), modality="tx",
        keys=["smiles", "concentration"], split_column="split", **{"batch_size": 64, **kwargs},
    )


def single_model(**kwargs) -> DINOSetup:
    return DINOSetup(
        encoder=partial(MLPEncoder, hidden_sizes=[64, 32], dropout=0.0),
        augmentations=[FeatureMask(rate=0.2), GaussianNoise(std=0.2)],
        loss=DINOLoss(warmup_teacher_temperature_steps=4),
        n_prototypes=64, hidden_dim=48, bottleneck_dim=16, freeze_last_layer_steps=2,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), **kwargs,
    )


def test_teacher_gets_no_gradient_and_follows_the_student_by_ema(tmp_path):
    model = single_model()
    model.build({"tx": {"features": [f"g{i}" for i in range(20)]}})
    model.train()
    assert not model.teacher.training and all(not p.requires_grad for p in model.teacher.parameters())
    batch = {"tx": torch.randn(16, 20), GROUP: torch.arange(16) // 2}
    loss = model.loss(*model._outputs(batch["tx"], model.augmentations), batch[GROUP])
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_single_modality_fit_reload_and_predict(tmp_path):
    datamodule = tx_datamodule()
    model = single_model()
    trainer = quiet_trainer(limit_train_batches=6, limit_val_batches=2, enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)
    assert int(model.ema_steps) == 6 and int(model.loss.steps) == 6
    assert {"val/loss", "val/recall@1"} <= set(trainer.callback_metrics)
    # the teacher moved (EMA), but is not the student
    teacher_weight = model.teacher["encoder"].blocks[0][0].weight
    student_weight = model.encoder.blocks[0][0].weight
    assert not torch.equal(teacher_weight, student_weight)

    path = tmp_path / "dino.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=True)
    assert stored["state_dict"]["loss.center"].shape == (1, 64)
    loaded = DINOSetup.load_from_checkpoint(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)

    output = tmp_path / "emb.h5ad"
    main(["predict", "--ckpt_path", str(path), "--trainer.enable_progress_bar", "false",
          "--data.path", "example://transcriptomics.h5ad", "--data.output", str(output), "--data.n_samples", "20"])
    embedding = ad.read_h5ad(output).obsm[OBSM_KEY]
    raw = torch.from_numpy(AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p")
                           .read_features(np.arange(20)).toarray())
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(embedding, model(raw).numpy(), rtol=1e-5, atol=1e-5)  # the student encoder


def test_last_layer_is_frozen_for_the_first_steps():
    model = single_model()
    model.build(tx_datamodule().schema)
    prototypes = model.head.last_layer.parametrizations.weight.original1.detach().clone()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=tx_datamodule())
    assert torch.equal(model.head.last_layer.parametrizations.weight.original1, prototypes)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, enable_checkpointing=False)
    model.freeze_last_layer_steps = 0
    trainer.fit(model, datamodule=tx_datamodule())
    assert not torch.equal(model.head.last_layer.parametrizations.weight.original1, prototypes)


def cross_model(**kwargs) -> CrossModalDINOSetup:
    return CrossModalDINOSetup(
        encoders={"tx": partial(MLPEncoder, hidden_sizes=[64], dropout=0.0),
                  "ph": partial(MLPEncoder, hidden_sizes=[32], dropout=0.0)},
        embed_dim=24, n_prototypes=48, hidden_dim=32, bottleneck_dim=16,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), **kwargs,
    )


def test_cross_modal_fit_reload_and_predict(tmp_path):
    model = cross_model()
    trainer = quiet_trainer(limit_train_batches=4, limit_val_batches=2, enable_checkpointing=False)
    trainer.fit(model, datamodule=example_datamodule())
    assert sorted(model.dino_losses) == ["ph->tx", "tx->ph"] and int(model.ema_steps) == 4
    assert {"val/loss", "val/pert/mrr", "val/recall@1"} <= set(trainer.callback_metrics)
    path = tmp_path / "clipped.ckpt"
    trainer.save_checkpoint(path)
    loaded = CrossModalDINOSetup.load_from_checkpoint(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    embed = EmbedDataModule("example://phenomics.parquet", output=str(tmp_path / "ph.parquet"), n_samples=10)
    predictions = quiet_trainer().predict(loaded, datamodule=embed)
    embedding = torch.cat([p["embedding"] for p in predictions])
    assert embedding.shape == (10, 48)  # probabilities over the prototypes, L2-normalised
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(10))
    assert (embedding >= 0).all()


def test_a_modality_that_is_nobodys_student_is_a_fixed_teacher():
    model = cross_model(teachers={"tx": ["ph"]})
    model.build({"tx": {"features": [f"g{i}" for i in range(12)]}, "ph": {"features": [f"f{i}" for i in range(8)]}})
    assert model.directions == [("ph", "tx")] and list(model.dino_losses) == ["ph->tx"]
    assert not any(p.requires_grad for p in model.towers["ph"].parameters())
    assert [pair[0] for pair in model.ema_pairs()] == [model.towers["tx"], model.dino_heads["tx"]]
    with pytest.raises(ValueError, match="model.teachers names modalities"):
        cross_model(teachers={"tx": ["mol"]}).build({"tx": {"features": ["a"]}, "ph": {"features": ["b"]}})
    with pytest.raises(ValueError, match="learns one modality"):
        single_model().build({"tx": {"features": ["a"]}, "ph": {"features": ["b"]}})


# -- what tests/test_distillation.py runs in two gloo processes (one spawn for every distillation setup): the
# loss, gradients and centres must equal one process's on the global batch ----------------------------------

ROWS = (5, 7)
SCHEMA = {"tx": {"features": [f"g{i}" for i in range(10)]}, "ph": {"features": [f"f{i}" for i in range(6)]}}


def ddp_data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    n = sum(ROWS)
    return {"tx": torch.randn(n, 10, generator=generator), "ph": torch.randn(n, 6, generator=generator),
            GROUP: torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])}


def ddp_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    single = DINOSetup(encoder=partial(MLPEncoder, hidden_sizes=[8], dropout=0.0), n_prototypes=12, hidden_dim=8,
                       bottleneck_dim=4)
    single.build({"tx": SCHEMA["tx"]})
    cross = cross_model()
    cross.build(SCHEMA)
    return {"single": single.train(), "cross": cross.train()}


def ddp_results(rows: slice) -> dict[str, tuple]:
    data = ddp_data()
    batch = {key: value[rows] for key, value in data.items()}
    out = {}
    for name, model in ddp_models().items():
        if name == "single":
            loss = model.loss(*model._outputs(batch["tx"], lambda x: x), gather_group(batch[GROUP]))
            centres = [model.loss.center.clone()]
        else:
            loss = model._dino_loss(batch)
            centres = [loss_.center.clone() for loss_ in model.dino_losses.values()]
        loss.backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        if dist.is_initialized():
            for g in grads:
                dist.all_reduce(g)
                g /= dist.get_world_size()
        out[name] = (loss.detach(), grads, centres)
    return out


def gather_group(group: torch.Tensor) -> torch.Tensor:
    from unimodality.distributed import gather
    return gather(group)


def test_loss_runs_in_fp32_under_mixed_precision():
    loss = DINOLoss()
    student, teacher = torch.randn(8, 6).bfloat16(), torch.randn(8, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(student, teacher, torch.arange(8))
    assert value.dtype == torch.float32 and loss.center.dtype == torch.float32
