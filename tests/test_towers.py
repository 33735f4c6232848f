"""Tower modes: trainable, frozen (fixed weights, optionally loaded from a file), disabled (identity)."""

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.helpers import example_datamodule, quiet_trainer
from tests.test_embeddings_format import datamodule_of
from unimodality.plugins.encoders.adapter import AdapterEncoder
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


# -- adapter towers (Semi-Clipped): x + g * f(x) on a fixed embedding, identity / orthogonal heads ------------
SEMI_CLIPPED = Path(__file__).resolve().parents[1] / "configs" / "semi_clipped.yaml"


@pytest.mark.parametrize("gate", [False, True])
def test_adapter_starts_as_the_identity_and_learns(gate):
    torch.manual_seed(0)
    adapter = AdapterEncoder(6, hidden_sizes=[8], gate=gate)
    x = torch.randn(5, 6)
    torch.testing.assert_close(adapter(x), x, rtol=0, atol=0)
    assert adapter.out_features == 6
    adapter(x).square().sum().backward()
    # the path that starts closed gets a gradient, so the adapter leaves the identity
    opened = adapter.alpha if gate else adapter.residual[-1].weight
    assert opened.grad is not None and opened.grad.abs().sum() > 0
    torch.optim.SGD(adapter.parameters(), lr=0.1).step()
    assert not torch.allclose(adapter(x), x)


def test_adapter_refuses_bad_settings():
    with pytest.raises(ValueError, match="AdapterEncoder: hidden_sizes"):
        AdapterEncoder(4, hidden_sizes=[])
    with pytest.raises(ValueError, match=r"AdapterEncoder: dropout must be in \[0, 1\)"):
        AdapterEncoder(4, dropout=1.0)
    with pytest.raises(ValueError, match=r"AdapterEncoder expects input of shape \(batch, 4\), got \(2, 3\)"):
        AdapterEncoder(4)(torch.randn(2, 3))


@pytest.mark.parametrize("embed_dim", [6, 16])
def test_orthogonal_head_keeps_the_input_geometry_at_the_start(embed_dim):
    torch.manual_seed(0)
    tower = Tower(6, embed_dim, AdapterEncoder(6, hidden_sizes=[8]), head="orthogonal")
    x = torch.randn(20, 6)
    cosine = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    out = tower(x)
    torch.testing.assert_close(out @ out.T, cosine, atol=1e-5, rtol=0)
    # a default linear head does not: the embedding starts with another geometry
    linear = Tower(6, embed_dim, AdapterEncoder(6, hidden_sizes=[8]))
    assert (linear(x) @ linear(x).T - cosine).abs().max() > 0.1


def test_identity_head_uses_the_embedding_as_it_is_and_checks_its_width():
    tower = Tower(8, 8, None, mode="disabled", head="identity")
    assert not list(tower.parameters())
    x = torch.randn(4, 8)
    torch.testing.assert_close(tower(x), F.normalize(x, dim=1))
    torch.testing.assert_close(tower(x, normalize=False), x)
    with pytest.raises(ValueError, match=r"identity head needs the representation's width \(8\) to equal "
                                         r"embed_dim \(5\): set embed_dim: 8"):
        Tower(8, 5, None, mode="disabled", head="identity")
    with pytest.raises(ValueError, match="tower head must be linear, orthogonal or identity, got 'mlp'"):
        Tower(8, 5, None, mode="disabled", head="mlp")


def test_semi_clipped_keeps_the_image_embedding_and_trains_the_adapter(example_data_dir):
    config = yaml.safe_load(SEMI_CLIPPED.read_text())
    datamodule = datamodule_of(config)
    datamodule.setup("fit")
    args = config["model"]["init_args"]
    adapter = args["encoders"]["tx"]["init_args"]
    setup = CrossModalSetup(
        encoders={"tx": partial(AdapterEncoder, **adapter)}, embed_dim=args["embed_dim"], modes=args["modes"],
        heads=args["heads"],
    )
    setup.build(datamodule.schema)
    ph, tx = setup.towers["ph"], setup.towers["tx"]
    assert not list(ph.parameters())  # the image-model embedding is the target space, as it is
    batch = next(iter(datamodule.train_dataloader()))
    torch.testing.assert_close(ph(batch["ph"]), F.normalize(batch["ph"], dim=1))
    tx.eval()
    start = tx(batch["tx"])
    torch.testing.assert_close(start @ start.T, F.normalize(batch["tx"], dim=1) @ F.normalize(batch["tx"], dim=1).T,
                               atol=1e-5, rtol=0)  # the aligned embedding starts as scVI's geometry
    quiet_trainer(max_steps=4, limit_val_batches=0).fit(setup, datamodule=datamodule)
    torch.testing.assert_close(ph(batch["ph"]), F.normalize(batch["ph"], dim=1))
    tx.eval()
    assert (tx(batch["tx"]) - start).abs().max() > 1e-3


@pytest.mark.parametrize("setup", ["cross_modal", "simclr"])
def test_models_built_with_the_default_loss_each_own_a_real_loss(setup):
    """The default loss is a jsonargparse lazy_instance made once, with the class: each model must get its own
    object of the real class (a deep copy of the lazy instance still ran the first model's loss, so a second
    model trained the first one's temperature and, under DDP, left its own loss parameters unused)."""
    from unimodality.plugins.losses.clip import ClipLoss
    from unimodality.plugins.losses.ntxent import NTXentLoss
    from unimodality.plugins.setups.cross_modal import CrossModalSetup
    from unimodality.plugins.setups.simclr import SimCLRSetup

    cls, loss_cls = (CrossModalSetup, ClipLoss) if setup == "cross_modal" else (SimCLRSetup, NTXentLoss)
    first, second = cls(), cls()
    assert type(first.loss) is loss_cls and type(second.loss) is loss_cls
    assert first.loss is not second.loss
    a, b = torch.nn.functional.normalize(torch.randn(2, 8, 4), dim=-1)
    with torch.no_grad():
        for p in first.loss.parameters():
            p.add_(0.5)
    if list(first.loss.parameters()):
        assert not torch.equal(first.loss(a, b), second.loss(a, b))
    scale = [p for p in second.loss.parameters() if p.requires_grad]
    if scale:  # the second model's own parameter gets the gradient of its loss
        second.loss(a, b).backward()
        assert all(p.grad is not None for p in scale)
