"""Per-tower parameter groups (``tower_optim``) and learning-rate schedules from config."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.helpers import example_datamodule, quiet_trainer
from unimodality.cli import main
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.plugins.setups.simclr import SimCLRSetup
from unimodality.schedulers import WarmupCosineLR
from unimodality.trust import check_config

CLIP = Path(__file__).resolve().parents[1] / "configs" / "clip.yaml"


def model(**kwargs) -> CrossModalSetup:
    encoder = partial(MLPEncoder, hidden_sizes=[16])
    kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01))
    return CrossModalSetup(encoders={"tx": encoder, "ph": encoder}, embed_dim=8, **kwargs)


def test_tower_optim_gives_a_tower_its_own_groups_and_leaves_frozen_weights_out():
    setup = model(modes={"ph": "frozen"}, tower_optim={"tx": {"lr": 1e-4, "weight_decay": 0.5}})
    setup.build(example_datamodule().schema)
    optimizer = setup.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"default", "default/no_decay", "tx", "tx/no_decay"}
    tx = setup.towers["tx"]
    assert {id(p) for p in groups["tx"]["params"]} == {id(p) for p in tx.parameters() if p.ndim >= 2}
    assert {id(p) for p in groups["tx/no_decay"]["params"]} == {id(p) for p in tx.parameters() if p.ndim < 2}
    assert (groups["tx"]["lr"], groups["tx"]["weight_decay"]) == (1e-4, 0.5)
    assert (groups["tx/no_decay"]["lr"], groups["tx/no_decay"]["weight_decay"]) == (1e-4, 0.0)
    assert (groups["default"]["lr"], groups["default"]["weight_decay"]) == (1e-3, 0.01)
    assert groups["default/no_decay"]["weight_decay"] == 0.0
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))  # each parameter in one group
    assert not {id(p) for p in setup.towers["ph"].encoder.parameters()} & set(grouped)
    trainable = {id(p) for p in setup.parameters() if p.requires_grad}
    assert set(grouped) == trainable  # the ph head and the loss's temperature included


def test_without_tower_optim_the_groups_are_as_before():
    setup = model()
    setup.build(example_datamodule().schema)
    groups = setup.configure_optimizers().param_groups
    assert len(groups) == 2 and "name" not in groups[0]
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])


def test_a_tower_learning_rate_takes_effect_in_training():
    setup = model(tower_optim={"tx": {"lr": 0.0}})
    datamodule = example_datamodule()
    setup.build(datamodule.schema)
    before = {k: v.clone() for k, v in setup.state_dict().items()}
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(setup, datamodule=datamodule)
    after = setup.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("towers.tx."))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("towers.ph."))


def test_bad_tower_optim_settings_are_one_line():
    with pytest.raises(ValueError, match=r"^model\.init_args\.tower_optim\.tx\.momentum: unknown setting; a tower "
                                         r"can set lr, weight_decay$"):
        model(tower_optim={"tx": {"momentum": 0.9}})
    with pytest.raises(ValueError, match=r"^model\.init_args\.tower_optim\.tx\.lr must be a finite number >= 0"):
        model(tower_optim={"tx": {"lr": -1.0}})
    with pytest.raises(ValueError, match=r"model settings name modalities \['mol'\].*data modalities: \['ph', 'tx'\]"):
        model(tower_optim={"mol": {"lr": 0.1}}).build(example_datamodule().schema)
    simclr = SimCLRSetup(encoder=partial(MLPEncoder, hidden_sizes=[8]), tower_optim={"ph": {"lr": 0.1}})
    with pytest.raises(ValueError, match=r"name \['ph'\]; SimCLRSetup's one tower is the data's modality 'tx'"):
        simclr.build({"tx": example_datamodule().schema["tx"]})


def test_simclr_names_its_tower_by_the_modality():
    setup = SimCLRSetup(encoder=partial(MLPEncoder, hidden_sizes=[8]), tower_optim={"tx": {"lr": 0.5}})
    setup.build({"tx": example_datamodule().schema["tx"]})
    groups = {g["name"]: g for g in setup.configure_optimizers().param_groups}
    assert groups["tx"]["lr"] == 0.5
    assert {id(p) for g in ("tx", "tx/no_decay") for p in groups[g]["params"]} == {
        id(p) for p in [*setup.encoder.parameters(), *setup.projection.parameters()]}


# -- schedules ------------------------------------------------------------------------------------------

def test_warmup_cosine_follows_its_formula_and_matches_torch_sequential():
    params = [torch.nn.Parameter(torch.zeros(1))]
    ours = torch.optim.SGD([{"params": params, "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))],
                                                            "lr": 0.1}])
    schedule = WarmupCosineLR(ours, warmup_steps=4, total_steps=14, start_factor=0.1, min_factor=0.2)
    reference_optimizer = torch.optim.SGD(params, lr=1.0)
    reference = torch.optim.lr_scheduler.SequentialLR(reference_optimizer, [
        torch.optim.lr_scheduler.LinearLR(reference_optimizer, start_factor=0.1, total_iters=4),
        torch.optim.lr_scheduler.CosineAnnealingLR(reference_optimizer, T_max=10, eta_min=0.2),
    ], milestones=[4])
    for step in range(16):
        lr, second = (g["lr"] for g in ours.param_groups)
        if step < 4:
            expected = 0.1 + 0.9 * step / 4
        else:
            expected = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 4) / 10)))
        assert lr == pytest.approx(expected, abs=1e-12)
        assert second == pytest.approx(0.1 * expected, abs=1e-12)  # per-group rates keep their ratio
        if step <= 14:
            assert lr == pytest.approx(reference_optimizer.param_groups[0]["lr"], abs=1e-9)
        ours.step(), reference_optimizer.step()
        schedule.step(), reference.step()
    state = schedule.state_dict()
    resumed = WarmupCosineLR(torch.optim.SGD(params, lr=1.0), warmup_steps=4, total_steps=14)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == schedule.last_epoch


def test_warmup_cosine_refuses_bad_settings():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="need warmup_steps >= 0 and total_steps >= 1"):
        WarmupCosineLR(optimizer, warmup_steps=-1, total_steps=3)
    short = WarmupCosineLR(optimizer, warmup_steps=5, total_steps=3)  # a run shorter than its warmup
    assert [short.factor(t) for t in range(4)] == pytest.approx([0, 0.2, 0.4, 0.6])
    assert short.factor(5) == 0.0  # past the end of the schedule: the cosine is over
    with pytest.raises(ValueError, match=r"start_factor must be in \[0, 1\]"):
        WarmupCosineLR(optimizer, total_steps=3, start_factor=2.0)


class LearningRates(Callback):
    """The first parameter group's learning rate at every training batch and the end of every epoch."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.epochs: list[float] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.steps.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, *args) -> None:
        self.epochs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit_clip(tmp_path: Path, *options: str) -> LearningRates:
    recorder = LearningRates()
    main(["fit", "--config", str(CLIP), "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.limit_train_batches", "3",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *options], callbacks=[recorder])
    return recorder


def test_warmup_cosine_per_step_fills_in_the_run_length_and_its_checkpoint_loads(tmp_path):
    schedule = partial(WarmupCosineLR, warmup_steps=2)
    setup = model(lr_scheduler=schedule, lr_scheduler_interval="step")
    recorder = LearningRates()
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(setup, datamodule=example_datamodule())
    expected = [WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), warmup_steps=2,
                               total_steps=6).factor(t) * 1e-3 for t in range(6)]
    assert recorder.steps == pytest.approx(expected, abs=1e-12)  # 2 epochs x 3 batches = 6 steps
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = CrossModalSetup.load_from_checkpoint(tmp_path / "last.ckpt")  # the class it names is trusted
    assert loaded.hparams["lr_scheduler"]["class_path"] == "unimodality.schedulers.WarmupCosineLR"


@pytest.mark.parametrize("interval, t_max, warned", [("epoch", 2, True), ("epoch", 3, False), ("step", 5, True),
                                                    ("step", 9, False)])
def test_a_cosine_schedule_shorter_than_the_run_is_named(caplog, interval, t_max, warned):
    """configs/ ship ``CosineAnnealingLR`` with ``T_max`` = their ``max_epochs``: a longer run (3 epochs x 3
    steps here) would see the rate climb back, so the option to change is named."""
    setup = model(lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=t_max),
                  lr_scheduler_interval=interval)
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(setup, datamodule=example_datamodule())
    messages = [r.getMessage() for r in caplog.records if "CosineAnnealingLR" in r.getMessage()]
    unit, run = ("steps", 9) if interval == "step" else ("epochs", 3)
    assert messages == ([f"model.init_args.lr_scheduler: CosineAnnealingLR's T_max ({t_max} {unit}) is shorter than "
                         f"the run ({run} {unit}), so the learning rate climbs back up after {t_max} {unit}; set "
                         f"model.init_args.lr_scheduler.init_args.T_max to {run}, or use WarmupCosineLR, which "
                         "follows the run's length"] if warned else [])


@pytest.mark.slow
def test_warmup_cosine_from_yaml_per_step_fills_in_the_run_length(tmp_path):
    scheduler = '{"class_path": "WarmupCosineLR", "init_args": {"warmup_steps": 2}}'
    recorder = fit_clip(tmp_path, "--trainer.max_epochs", "2", "--model.init_args.lr_scheduler", scheduler,
                        "--model.init_args.lr_scheduler_interval", "step", "--trainer.limit_val_batches", "0")
    expected = [WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), warmup_steps=2,
                               total_steps=6).factor(t) * 1e-3 for t in range(6)]
    assert recorder.steps == pytest.approx(expected, abs=1e-12)  # 2 epochs x 3 batches = 6 steps
    checkpoint = tmp_path / "runs" / "clip" / "version_0" / "checkpoints" / "last.ckpt"
    loaded = CrossModalSetup.load_from_checkpoint(checkpoint)  # a checkpoint naming the class is trusted
    assert loaded.hparams["lr_scheduler"]["class_path"] == "unimodality.schedulers.WarmupCosineLR"


@pytest.mark.parametrize(("monitor", "mode"), [("val/loss", "min"), ("val/pert/mrr", "max")])
def test_reduce_on_plateau_drops_the_rate_on_a_plateau(monitor, mode):
    # a learning rate too small to move the metric: every epoch after the first is a plateau
    plateau = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode=mode, factor=0.5, patience=0)
    setup = model(optimizer=partial(torch.optim.AdamW, lr=1e-12), lr_scheduler=plateau, lr_scheduler_monitor=monitor)
    recorder = LearningRates()
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=2, callbacks=[recorder],
                            num_sanity_val_steps=0)
    trainer.fit(setup, datamodule=example_datamodule())
    assert trainer.lr_scheduler_configs[0].monitor == monitor
    assert recorder.steps == pytest.approx([1e-12] * 4 + [0.5e-12] * 2, rel=1e-9)  # dropped after epoch 2
    assert recorder.epochs[-1] == pytest.approx(0.25e-12)  # and again after epoch 3


@pytest.mark.slow
@pytest.mark.parametrize(("monitor", "mode"), [("val/loss", "min"), ("val/pert/mrr", "max")])
def test_reduce_on_plateau_from_yaml_drops_the_rate_on_a_plateau(tmp_path, monitor, mode):
    scheduler = json.dumps({"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau",
                            "init_args": {"mode": mode, "factor": 0.5, "patience": 0}})
    recorder = fit_clip(tmp_path, "--trainer.max_epochs", "3", "--model.init_args.lr_scheduler", scheduler,
                        "--model.init_args.lr_scheduler_monitor", monitor,
                        "--model.init_args.optimizer.init_args.lr", "1e-12")
    assert recorder.steps[0] == 1e-12
    assert recorder.steps[-1] == pytest.approx(0.5e-12)  # dropped once, after the second epoch
    assert recorder.epochs[-1] == pytest.approx(0.25e-12)  # and again after the third


def test_trust_accepts_the_schedulers_a_config_names():
    for name in ("torch.optim.lr_scheduler.ReduceLROnPlateau", "torch.optim.lr_scheduler.CosineAnnealingLR",
                 "torch.optim.lr_scheduler.SequentialLR", "unimodality.schedulers.WarmupCosineLR", "WarmupCosineLR"):
        check_config({"model": {"init_args": {"lr_scheduler": {"class_path": name}}}}, "config.yaml")
