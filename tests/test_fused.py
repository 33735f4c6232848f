"""Torch's fused Adam/AdamW kernels by default (``unimodality.fused``), unless a setting chooses its own."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback

from tests.helpers import example_datamodule
from unimodality.cli import main
from unimodality.datamodule import GROUP
from unimodality.fused import _fused_steps, fused_default
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup

CLIP = Path(__file__).resolve().parents[1] / "configs" / "clip.yaml"


def built(optimizer) -> CrossModalSetup:
    encoder = partial(MLPEncoder, hidden_sizes=[16])
    setup = CrossModalSetup(encoders={"tx": encoder, "ph": encoder}, embed_dim=8, optimizer=optimizer)
    setup.build(example_datamodule().schema)
    return setup


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_adam_and_adamw_are_fused_by_default(cls):
    assert built(partial(cls, lr=1e-3)).configure_optimizers().defaults["fused"] is True


def test_a_class_given_without_arguments_is_fused_too():
    assert built(torch.optim.AdamW).configure_optimizers().defaults["fused"] is True


@pytest.mark.parametrize("chosen", [{"fused": False}, {"foreach": True}, {"foreach": False}, {"differentiable": True}])
def test_a_setting_that_chooses_its_kernels_keeps_them(chosen):
    optimizer = built(partial(torch.optim.AdamW, lr=1e-3, **chosen)).configure_optimizers()
    assert not optimizer.defaults["fused"]
    for name, value in chosen.items():
        assert optimizer.defaults[name] is value


def test_other_optimizers_and_subclasses_are_left_alone():
    class MyAdamW(torch.optim.AdamW):
        pass

    assert not built(partial(MyAdamW, lr=1e-3)).configure_optimizers().defaults["fused"]
    assert not built(partial(torch.optim.SGD, lr=1e-2)).configure_optimizers().defaults.get("fused")


def test_fused_training_matches_torchs_default_kernels():
    """The same steps with the fused kernel and with torch's per-tensor loop: the same weights to rounding."""
    datamodule = example_datamodule(batch_size=64)
    datamodule.setup("fit")
    batches = [batch for _, batch in zip(range(8), datamodule.train_dataloader())]
    weights, initial = {}, {}
    for fused in (True, False):
        torch.manual_seed(0)
        setup = built(partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1, fused=None if fused else False))
        initial[fused] = torch.cat([p.detach().flatten() for p in setup.parameters()])
        optimizer = setup.configure_optimizers()
        assert bool(optimizer.defaults["fused"]) is fused
        setup.train()
        for step, batch in enumerate(batches):
            torch.manual_seed(step)  # the same dropout masks
            loss = setup._loss(setup.loss_inputs(batch), batch[GROUP])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        weights[fused] = torch.cat([p.detach().flatten() for p in setup.parameters()])
    assert torch.equal(initial[True], initial[False])
    assert (weights[True] - initial[True]).abs().max() > 1e-2  # the steps moved the weights
    assert (weights[True] - weights[False]).abs().max() < 1e-5


def test_no_fused_kernel_under_loss_scaling_or_deepspeed():
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    plain = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None), strategy=object())
    assert fused_default(torch.optim.AdamW, {}, params, plain) == {"fused": True}
    # fp16 mixed precision: Lightning refuses gradient clipping with an optimizer that unscales by itself
    scaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")), strategy=object())
    assert fused_default(torch.optim.AdamW, {}, params, scaled) == {}
    DeepSpeedStrategy = type("DeepSpeedStrategy", (), {})
    deepspeed = SimpleNamespace(precision_plugin=None, strategy=type("Mine", (DeepSpeedStrategy,), {})())
    assert fused_default(torch.optim.AdamW, {}, params, deepspeed) == {}


def test_parameters_fused_kernels_cannot_step_keep_torchs_default():
    assert not _fused_steps(torch.optim.AdamW, "meta", torch.float32)
    assert not _fused_steps(torch.optim.AdamW, "cpu", torch.int64)
    meta = [{"params": [torch.nn.Parameter(torch.zeros(3, device="meta"))]}]
    assert fused_default(torch.optim.AdamW, {}, meta) == {}
    assert fused_default(torch.optim.AdamW, {}, []) == {}


class Kernels(Callback):
    def on_train_start(self, trainer, *args) -> None:
        self.fused = trainer.optimizers[0].defaults["fused"]


@pytest.mark.parametrize("options, fused",
                         [((), True), (("--model.init_args.optimizer.init_args.fused", "false"), False)])
def test_a_shipped_config_trains_with_the_fused_kernel_unless_it_says_otherwise(tmp_path, options, fused):
    kernels = Kernels()
    main(["fit", "--config", str(CLIP), "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
          "--trainer.enable_model_summary", "false", "--trainer.limit_train_batches", "1",
          "--trainer.limit_val_batches", "0", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
          *options], callbacks=[kernels])
    assert kernels.fused is fused
