"""Checkpoints describe their model: load with no config, save again, load again with weights_only."""

from functools import partial

import torch

from tests.helpers import example_datamodule, quiet_trainer
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.clip import ClipLoss
from unimodality.plugins.setups.cross_modal import CrossModalSetup


def python_built_model() -> CrossModalSetup:
    return CrossModalSetup(
        encoders={"tx": partial(MLPEncoder, hidden_sizes=[64], norm="batch"), "ph": MLPEncoder},
        loss=ClipLoss(init_scale=10.0, use_groups=False),
        embed_dim=16,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )


def train_briefly(model, datamodule, steps=3):
    quiet_trainer(max_steps=steps, limit_val_batches=0).fit(model, datamodule=datamodule)


def embed(model, batch):
    model.eval()
    with torch.no_grad():
        return model.embed(batch)


def test_python_built_model_round_trips(tmp_path):
    datamodule = example_datamodule()
    model = python_built_model()
    train_briefly(model, datamodule)
    path = tmp_path / "model.ckpt"
    model.trainer.save_checkpoint(path)

    stored = torch.load(path, weights_only=True)["hyper_parameters"]
    assert stored["loss"] == {
        "class_path": "unimodality.plugins.losses.clip.ClipLoss",
        "init_args": {"init_scale": 10.0, "max_scale": 100.0, "learn_scale": True, "use_groups": False},
    }
    assert stored["encoders"]["tx"]["init_args"]["hidden_sizes"] == [64]
    assert stored["schema"]["tx"]["features"][:2] == ["GENE0000", "GENE0001"]

    loaded = CrossModalSetup.load_from_checkpoint(path)  # no config given
    assert isinstance(loaded.loss, ClipLoss) and loaded.loss.use_groups is False
    assert loaded.encoders["tx"](5).blocks[0][1].__class__.__name__ == "BatchNorm1d"
    batch = datamodule.datasets["val"].__getitems__(list(range(8))) if "val" in datamodule.datasets else None
    if batch is None:
        datamodule.setup("validate")
        batch = datamodule.datasets["val"].__getitems__(list(range(8)))
    for name, value in embed(model, batch).items():
        torch.testing.assert_close(embed(loaded, batch)[name], value)
    # the optimizer recorded in the checkpoint is the one a resumed run uses
    assert isinstance(loaded.configure_optimizers(), torch.optim.SGD)


def test_reloaded_model_saves_and_reloads_again(tmp_path):
    datamodule = example_datamodule()
    model = python_built_model()
    train_briefly(model, datamodule)
    first = tmp_path / "first.ckpt"
    model.trainer.save_checkpoint(first)

    reloaded = CrossModalSetup.load_from_checkpoint(first)
    # hyperparameters are config data again, not the modules jsonargparse rebuilt
    assert isinstance(reloaded.hparams["loss"], dict)
    train_briefly(reloaded, example_datamodule(), steps=1)
    second = tmp_path / "second.ckpt"
    reloaded.trainer.save_checkpoint(second)
    torch.load(second, weights_only=True)  # would fail if hparams held modules
    again = CrossModalSetup.load_from_checkpoint(second)
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


def test_optimizer_from_config_skips_weight_decay_on_biases_and_scale():
    model = CrossModalSetup(
        encoders={"tx": MLPEncoder, "ph": MLPEncoder},
        optimizer=partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=3),
        lr_scheduler_interval="step",
    )
    model.build(example_datamodule().schema)
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert any(p is model.loss.log_scale for p in plain["params"])
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "step"
