"""Bad options get one line naming the option and the closest valid one; a switched class starts from its own
defaults; bad optimizer and scheduler settings are refused before training; a diverged run says truly
whether a checkpoint was saved."""

from __future__ import annotations

import inspect
import io
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

import tests.test_bad_inputs as bad_inputs
from tests.helpers import PoisonedLoss, example_datamodule, quiet_trainer
from tests.test_bad_inputs import CONFIGS, QUICK, assert_user_error, fit, run
from unimodality.cli import main
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.siglip import SigLipLoss
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.setup import NonFiniteLossError, build

CLIP = ["fit", "--config", str(CONFIGS / "clip.yaml")]
data = bad_inputs.data  # the fixture: small copies of the example files


def one_line_error(args: list[str], *patterns: str, folder: Path | None = None) -> str:
    """The command fails with exactly one line, ``unimodality fit: error: ...``, matching ``patterns``."""
    printed = assert_user_error(args, *patterns, folder=folder)
    lines = printed.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unimodality fit: error: "), printed
    return lines[0]


# -- unknown keys, plugin names and wrong types: one line -------------------------------------------------

@pytest.mark.parametrize("option, value, unknown, suggested", [
    ("--model.init_args.loss.init_args.use_groupz", "true", "model.init_args.loss.init_args.use_groupz",
     "model.init_args.loss.init_args.use_groups"),
    ("--trainer.max_epochz", "3", "trainer.max_epochz", "trainer.max_epochs"),
    ("--model.embed_dimm", "3", "model.init_args.embed_dimm", "model.init_args.embed_dim"),
    ("--model.init_args.lr_scheduler.init_args.T_maxx", "3", "model.init_args.lr_scheduler.init_args.T_maxx",
     "model.init_args.lr_scheduler.init_args.T_max"),
    ("--trainer.logger.init_args.save_dirr", "x", "trainer.logger.init_args.save_dirr",
     "trainer.logger.init_args.save_dir"),
    # a dict of classes: the key (tx) is named, though jsonargparse's message leaves it out
    ("--data.modalities.tx.init_args.pathz", "x", "data.init_args.modalities.tx.init_args.pathz",
     "data.init_args.modalities.tx.init_args.path"),
    ("--seed_everythingz", "1", "seed_everythingz", "seed_everything"),
])
def test_an_unknown_option_is_one_line_with_the_closest_key(data, option, value, unknown, suggested):
    line = one_line_error(fit(data, option, value), folder=data["dir"])
    assert line.endswith(f"unknown option {unknown!r}; did you mean {suggested!r}?"), line


@pytest.mark.parametrize("content, unknown, suggested", [
    ({"model": {"init_args": {"embed_dimm": 64}}}, "model.init_args.embed_dimm", "model.init_args.embed_dim"),
    ({"trainer": {"max_epochz": 3}}, "trainer.max_epochz", "trainer.max_epochs"),
    ({"model": {"init_args": {"loss": {"class_path": "SigLipLoss", "init_args": {"init_scalez": 3}}}}},
     "model.init_args.loss.init_args.init_scalez", "model.init_args.loss.init_args.init_scale"),
    ({"model": {"init_args": {"encoders": {"tx": {"init_args": {"hidden_sizez": [8]}}}}}},
     "model.init_args.encoders.tx.init_args.hidden_sizez", "model.init_args.encoders.tx.init_args.hidden_sizes"),
])
def test_a_misspelt_key_in_a_config_file_is_one_line(tmp_path, content, unknown, suggested):
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(content))
    line = one_line_error([*CLIP, "--config", str(config), *QUICK], folder=tmp_path)
    assert line.endswith(f"unknown option {unknown!r}; did you mean {suggested!r}?"), line


def test_an_unknown_top_level_key_lists_the_valid_ones(tmp_path):
    config = tmp_path / "top.yaml"
    config.write_text("fooo: 3\n")
    one_line_error([*CLIP, "--config", str(config)], r"unknown option 'fooo'", r"seed_everything", r"trainer")


def test_an_unknown_plugin_name_suggests_names_of_its_own_group_only(data):
    line = one_line_error(fit(data, "--model.encoders.tx", "ClipLos"), r"model\.init_args\.encoders\.tx",
                          r"unknown encoder 'ClipLos'", r"encoders: AdapterEncoder, CNNEncoder, GNNEncoder, MLPEncoder")
    assert "Did you mean" not in line  # ClipLoss is a loss: no answer for an encoder
    one_line_error(fit(data, "--model.encoders.tx", "ClipLoss"), r"'ClipLoss' is a loss, not an encoder")
    one_line_error(fit(data, "--model.encoders.tx", "MLPEncodr"), r"Did you mean 'MLPEncoder'\?")
    one_line_error(fit(data, "--model.loss", "ClipLos"), r"model\.init_args\.loss", r"Did you mean 'ClipLoss'\?")
    one_line_error(fit(data, "--model.loss", "MLPEncoder"), r"'MLPEncoder' is an encoder, not a loss")
    one_line_error(fit(data, "--model.loss", "torch.nn.Linear"), r"'torch\.nn\.Linear' is not a loss")
    one_line_error(fit(data, "--model", "CrossModalSetp"), r"option 'model'", r"Did you mean 'CrossModalSetup'\?")
    # not a plugin group: the imported classes of the expected type
    one_line_error(fit(data, "--model.init_args.optimizer", "SGDD"), r"optimizer", r"Did you mean 'SGD'\?")
    one_line_error(fit(data, "--model.init_args.lr_scheduler", "OneCycleLRR"), r"Did you mean 'OneCycleLR'\?")


@pytest.mark.parametrize("option, value, expected", [
    ("--data.batch_size", "many", r"option 'data\.init_args\.batch_size' expects int, got 'many'"),
    ("--trainer.max_epochs", "many", r"option 'trainer\.max_epochs' expects int or null, got 'many'"),
    ("--model.init_args.lr_scheduler_interval", "weekly",
     r"option 'model\.init_args\.lr_scheduler_interval' expects one of 'epoch', 'step', got 'weekly'"),
    ("--model.encoders.tx.init_args.hidden_sizes", "many",
     r"option 'model\.init_args\.encoders\.tx\.init_args\.hidden_sizes' expects list\[int\], got 'many'"),
])
def test_a_wrong_value_type_is_one_line_with_the_expected_type(data, option, value, expected):
    one_line_error(fit(data, option, value), expected, folder=data["dir"])


def test_unimodality_debug_shows_jsonargparse_s_full_message(data, monkeypatch):
    monkeypatch.setenv("UNIMODALITY_DEBUG", "1")
    code, printed = run(fit(data, "--model.init_args.loss.init_args.use_groupz", "true"))
    assert code != 0
    assert "usage:" in printed and "Does not validate against any of the Union subtypes" in printed
    assert "Option 'use_groupz' is not accepted" in printed


# -- a switched class starts from its own defaults --------------------------------------------------------

def printed_config(*args: str) -> dict:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exit_info:
        main([*CLIP, *args, "--print_config"])
    assert exit_info.value.code == 0, out.getvalue()
    return yaml.safe_load(out.getvalue())["model"]["init_args"]


def default(cls: type, name: str):
    return inspect.signature(cls).parameters[name].default


def test_a_class_switched_on_the_command_line_does_not_keep_the_previous_class_s_arguments():
    model = printed_config("--model.init_args.loss", "SigLipLoss", "--model.init_args.optimizer", "SGD")
    assert model["loss"]["class_path"].endswith("SigLipLoss")
    assert model["loss"]["init_args"]["init_scale"] == default(SigLipLoss, "init_scale") == 10  # not CLIP's 14.29
    assert model["optimizer"]["class_path"] == "torch.optim.SGD"
    assert model["optimizer"]["init_args"]["weight_decay"] == default(torch.optim.SGD, "weight_decay")  # not 0.01
    # only what comes after the switch applies
    model = printed_config("--model.init_args.loss.init_args.init_scale", "3", "--model.init_args.loss", "SigLipLoss",
                           "--model.init_args.loss.init_args.init_scale", "5", "--model.init_args.loss.use_groups",
                           "false")
    assert model["loss"]["init_args"]["init_scale"] == 5 and model["loss"]["init_args"]["use_groups"] is False


def test_naming_the_same_class_again_keeps_its_arguments():
    model = printed_config("--model.init_args.optimizer.init_args.lr", "0.05",
                           "--model.init_args.optimizer", "torch.optim.adamw.AdamW",  # the same class, another path
                           "--model.init_args.loss", "ClipLoss")
    assert model["optimizer"]["init_args"]["lr"] == 0.05 and model["optimizer"]["init_args"]["weight_decay"] == 0.01
    assert model["loss"]["init_args"]["use_groups"] is True


def test_a_class_switched_by_a_second_config_starts_from_its_defaults_and_keeps_the_config_s_init_args(tmp_path):
    only_class = tmp_path / "siglip.yaml"
    only_class.write_text(yaml.safe_dump({"model": {"init_args": {"loss": {"class_path": "SigLipLoss"}}}}))
    model = printed_config("--config", str(only_class))
    assert model["loss"]["init_args"]["init_scale"] == default(SigLipLoss, "init_scale")
    with_args = tmp_path / "siglip_sgd.yaml"
    with_args.write_text(yaml.safe_dump({"model": {"init_args": {
        "loss": {"class_path": "SigLipLoss", "init_args": {"init_scale": 5.0}},
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}},
    }}}))
    model = printed_config("--config", str(with_args))
    assert model["loss"]["init_args"]["init_scale"] == 5.0
    assert model["optimizer"]["init_args"]["momentum"] == 0.9
    assert model["optimizer"]["init_args"]["weight_decay"] == default(torch.optim.SGD, "weight_decay")


class Capture(Callback):
    """Records the loss and optimizer the CLI built (the class path names this module, imported anew)."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        Capture.seen.update(scale=pl_module.loss.scale.item(), loss=type(pl_module.loss).__name__,
                            optimizer=trainer.optimizers[0])


def test_the_trained_model_uses_the_switched_class_s_defaults(data):
    args = fit(data, "--model.init_args.loss", "SigLipLoss", "--model.init_args.optimizer", "SGD",
               "--trainer.callbacks+", "tests.test_bad_options.Capture")
    code, printed = run(args)
    assert code == 0, printed
    seen = sys.modules["tests.test_bad_options"].Capture.seen
    assert seen["loss"] == "SigLipLoss" and seen["scale"] == pytest.approx(default(SigLipLoss, "init_scale"))
    assert isinstance(seen["optimizer"], torch.optim.SGD)
    decays = {group["weight_decay"] for group in seen["optimizer"].param_groups}
    assert decays == {0.0}  # SGD's default (and none on biases), not AdamW's 0.01 from clip.yaml


# -- optimizer and scheduler settings ---------------------------------------------------------------------

@pytest.mark.parametrize("option, value, shown", [
    ("--model.init_args.optimizer.init_args.lr", "nan", "nan"),
    ("--model.init_args.optimizer.init_args.lr", ".nan", "nan"),
    ("--model.init_args.optimizer.init_args.lr", ".inf", "inf"),
    ("--model.init_args.optimizer.init_args.lr", "-0.001", "-0.001"),
    ("--model.init_args.optimizer.init_args.weight_decay", "-0.1", "-0.1"),
])
def test_a_negative_or_non_finite_learning_rate_is_one_line(data, option, value, shown):
    name = option.rsplit(".", 1)[-1]
    one_line_error(fit(data, option, value), rf"\b{name}\b", re.escape(shown), folder=data["dir"])


def test_a_non_finite_learning_rate_is_refused_when_the_model_is_built():
    for lr in (float("nan"), float("inf"), -1.0, torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match=r"AdamW: lr must be a finite number >= 0"):
            CrossModalSetup(optimizer=partial(torch.optim.AdamW, lr=lr))
    CrossModalSetup(optimizer=partial(torch.optim.SGD, lr=0.0))  # zero is allowed (a frozen run)


def test_a_scheduler_missing_an_argument_is_one_line(data):
    one_line_error(fit(data, "--model.init_args.lr_scheduler", "OneCycleLR",
                       "--model.init_args.lr_scheduler.init_args.max_lr", "0.01"),
                   r"OneCycleLR", r"total_steps", r"model\.init_args\.lr_scheduler\.init_args\.total_steps")
    one_line_error(fit(data, "--model.init_args.lr_scheduler", "OneCycleLR"),
                   r"model\.init_args\.lr_scheduler\.init_args\.max_lr", r"OneCycleLR")


def test_an_optimizer_that_cannot_be_built_is_one_line(data):
    one_line_error(fit(data, "--model.init_args.optimizer.init_args.betas", "[1.5, 0.9]"),
                   r"optimizer AdamW could not be built", r"beta", r"model\.init_args\.optimizer\.init_args")


class NeedsGamma(torch.optim.SGD):
    """An optimizer with a required argument."""

    def __init__(self, params, gamma: float, lr: float = 0.01) -> None:
        super().__init__(params, lr=lr * gamma)


def test_an_optimizer_or_scheduler_missing_a_required_argument_names_it():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"optimizer NeedsGamma needs gamma: set "
                                         r"model\.init_args\.optimizer\.init_args\.gamma"):
        build("optimizer", partial(NeedsGamma, lr=0.1), params)
    optimizer = torch.optim.SGD(params)
    with pytest.raises(ValueError, match=r"lr_scheduler OneCycleLR needs max_lr: set "
                                         r"model\.init_args\.lr_scheduler\.init_args\.max_lr"):
        build("lr_scheduler", torch.optim.lr_scheduler.OneCycleLR, optimizer)
    with pytest.raises(ValueError, match=r"OneCycleLR could not be built: .*total_steps.*; set "
                                         r"model\.init_args\.lr_scheduler\.init_args\.total_steps"):
        build("lr_scheduler", partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1), optimizer)


# -- a diverged run: checkpoint saved or not --------------------------------------------------------------

def diverge(tmp_path: Path, after: int) -> str:
    model = CrossModalSetup(
        encoders={"tx": partial(MLPEncoder, hidden_sizes=[32]), "ph": partial(MLPEncoder, hidden_sizes=[32])},
        loss=PoisonedLoss(after=after), embed_dim=8,
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = quiet_trainer(max_epochs=3, callbacks=[checkpoint], enable_checkpointing=True, num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(model, datamodule=example_datamodule(batch_size=32))  # 10 steps per epoch
    return str(error.value)


def test_a_run_diverging_before_its_first_checkpoint_says_none_was_saved(example_data_dir, tmp_path):
    message = diverge(tmp_path, after=3)
    assert "step 2 (epoch 0)" in message and "no checkpoint was saved yet" in message
    assert "holds finite weights" not in message
    assert not (tmp_path / "last.ckpt").exists()


def test_a_run_diverging_after_a_checkpoint_names_it(example_data_dir, tmp_path):
    message = diverge(tmp_path, after=15)
    assert "step 14 (epoch 1)" in message
    assert f"the last checkpoint saved ({tmp_path / 'last.ckpt'}) holds finite weights" in message
    assert "no checkpoint" not in message
