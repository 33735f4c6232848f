"""Tower modes: trainable, frozen (fixed weights, optionally loaded from a file), disabled (identity)."""

from functools import partial

import pytest
import torch

from tests.helpers import example_datamodule, quiet_trainer
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.tower import Tower


def model(**kwargs) -> CrossModalSetup:
    encoder = partial(MLPEncoder, hidden_sizes=[32], norm="batch", dropout=0.5)
    return CrossModalSetup(encoders={"tx": encoder, "ph": encoder}, embed_dim=8, **kwargs)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_tower_keeps_weights_and_eval_mode_while_head_learns():
    setup = model(modes={"ph": "frozen"})
    datamodule = example_datamodule()
    setup.build(datamodule.schema)
    before_encoder = snapshot(setup.towers["ph"].encoder)
    before_head = snapshot(setup.towers["ph"].head)
    before_tx = snapshot(setup.towers["tx"])
    quiet_trainer(max_steps=4, limit_val_batches=0).fit(setup, datamodule=datamodule)
    tower = setup.towers["ph"]
    for key, value in snapshot(tower.encoder).items():  # batch-norm running stats included
        torch.testing.assert_close(value, before_encoder[key])
    assert not any(p.requires_grad for p in tower.encoder.parameters())
    assert any(not torch.equal(v, before_head[k]) for k, v in snapshot(tower.head).items())
    assert any(not torch.equal(v, before_tx[k]) for k, v in snapshot(setup.towers["tx"]).items())
    setup.train()
    assert not tower.encoder.training and tower.head.training


def test_frozen_tower_loads_weights_from_a_checkpoint(tmp_path):
    source = model()
    datamodule = example_datamodule()
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(source, datamodule=datamodule)
    path = tmp_path / "pretrained.ckpt"
    source.trainer.save_checkpoint(path)

    frozen = model(modes={"tx": "frozen"}, weights={"tx": str(path)}, weights_prefix={"tx": "towers.tx.encoder."})
    frozen.build(datamodule.schema)
    for key, value in source.towers["tx"].encoder.state_dict().items():
        torch.testing.assert_close(frozen.towers["tx"].encoder.state_dict()[key], value)


def test_plain_state_dict_weights_file(tmp_path):
    encoder = MLPEncoder(5, hidden_sizes=[4])
    torch.save(encoder.state_dict(), tmp_path / "w.pt")
    tower = Tower(5, 3, MLPEncoder(5, hidden_sizes=[4]), mode="frozen", weights=str(tmp_path / "w.pt"))
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(tower.encoder.state_dict()[key], value)
    with pytest.raises(ValueError, match="prefix"):
        Tower(5, 3, MLPEncoder(5, hidden_sizes=[4]), weights=str(tmp_path / "w.pt"), weights_prefix="nope.")


def test_disabled_tower_uses_input_features_as_they_are():
    setup = model(modes={"tx": "disabled"})
    schema = example_datamodule().schema
    setup.build(schema)
    tower = setup.towers["tx"]
    assert tower.encoder is None
    assert tower.head.in_features == len(schema["tx"]["features"])
    x = torch.randn(3, tower.in_features)
    torch.testing.assert_close(tower.represent(x), x)
    expected = torch.nn.functional.normalize(tower.head(x), dim=-1)
    torch.testing.assert_close(tower(x), expected)


def test_every_mode_projects_to_the_shared_size():
    schema = example_datamodule().schema
    for modes in ({}, {"tx": "frozen"}, {"ph": "disabled"}, {"tx": "disabled", "ph": "frozen"}):
        setup = model(modes=modes)
        setup.build(schema)
        for name, tower in setup.towers.items():
            out = tower.eval()(torch.randn(4, len(schema[name]["features"])))
            assert out.shape == (4, 8)
            torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_mis_shaped_input_names_expected_and_got():
    tower = Tower(10, 4, MLPEncoder(10, hidden_sizes=[8]))
    with pytest.raises(ValueError, match=r"\(batch, 10\).*\(3, 7\)"):
        tower(torch.randn(3, 7))


def test_missing_encoder_and_unknown_modality_are_explained():
    schema = example_datamodule().schema
    with pytest.raises(ValueError, match="modality 'ph' has no encoder.*model.modes.ph: disabled"):
        CrossModalSetup(encoders={"tx": MLPEncoder}).build(schema)
    with pytest.raises(ValueError, match=r"\['mol'\].*data modalities: \['ph', 'tx'\]"):
        CrossModalSetup(encoders={"tx": MLPEncoder, "ph": MLPEncoder, "mol": MLPEncoder}).build(schema)
