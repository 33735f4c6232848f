"""Three modalities at once: every pair contributes to the loss, with configurable weights."""

from functools import partial

import pytest
import torch

from tests.helpers import quiet_trainer
from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource


def three_modalities(batch_size=32) -> PairedDataModule:
    return PairedDataModule(
        modalities={
            "tx": AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"),
            "ph": TableSource("example://phenomics.parquet", feature_regex="^feat_0[0-5]"),
            "ph2": TableSource("example://phenomics.parquet", feature_regex="^feat_(0[6-9]|1)"),
        },
        keys=["smiles", "concentration"],
        split_column="split",
        batch_size=batch_size,
    )


def model(**kwargs):
    encoder = partial(MLPEncoder, hidden_sizes=[32])
    return CrossModalSetup(encoders={"tx": encoder, "ph": encoder, "ph2": encoder}, embed_dim=8, **kwargs)


def test_loss_is_weighted_mean_over_all_pairs():
    datamodule = three_modalities()
    datamodule.setup("fit")
    setup = model(pair_weights={"ph-tx": 3.0, "ph-ph2": 0.5})
    setup.build(datamodule.schema)
    assert setup.pairs == [("tx", "ph"), ("tx", "ph2"), ("ph", "ph2")]
    batch = datamodule.datasets["val"].__getitems__(list(range(16)))
    setup.eval()
    embeddings = setup.embed(batch)
    per_pair = {p: setup.loss(embeddings[p[0]], embeddings[p[1]], batch["group"]) for p in setup.pairs}
    expected = (3 * per_pair[("tx", "ph")] + per_pair[("tx", "ph2")] + 0.5 * per_pair[("ph", "ph2")]) / 4.5
    torch.testing.assert_close(setup._loss(embeddings, batch["group"]), expected)


def test_unknown_pair_is_refused():
    with pytest.raises(ValueError, match=r"\['tx-mol'\].*pairs: \['tx-ph', 'tx-ph2', 'ph-ph2'\]"):
        model(pair_weights={"tx-mol": 1.0}).build(three_modalities().schema)


def test_trains_and_reports_retrieval_for_every_pair():
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(model(), datamodule=three_modalities())
    for a, b in (("tx", "ph"), ("tx", "ph2"), ("ph", "ph2")):
        for direction in (f"{a}->{b}", f"{b}->{a}"):
            assert 0 <= float(trainer.callback_metrics[f"val/recall@1/{direction}"]) <= 1
    for pair in ("tx-ph", "tx-ph2", "ph-ph2"):
        assert float(trainer.callback_metrics[f"train/modality_gap/{pair}"]) >= 0
        assert float(trainer.callback_metrics[f"train/alignment/{pair}"]) >= 0


def test_a_queue_trains_every_pair_of_three_modalities():
    """Each pair's loss meets the queued keys of its two modalities (joined once per modality, shared)."""
    setup = model(queue_size=48)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(setup, datamodule=three_modalities())
    assert setup.queue.filled == 48 and set(setup.queue.names) == {"tx", "ph", "ph2"}
    assert set(setup.loss_terms) == {"tx-ph", "tx-ph2", "ph-ph2"}
    assert all(torch.isfinite(value) for value in setup.loss_terms.values())
