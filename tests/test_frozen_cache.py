"""``CrossModalSetup(cache_frozen=True)``: a frozen tower's representations computed once per source row give
the uncached run's weights, losses and metrics (vectors with input standardisation, images through a frozen
CNN, molecules through a frozen GNN, gradient caching), with the encoder run on unseen rows only; the cache
is emptied when weights or statistics load; the combinations it cannot serve are refused in one line."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from tests.helpers import example_datamodule, quiet_trainer
from tests.test_bad_options import CLIP, one_line_error
from unimodality.batch import GROUP, rows_key
from unimodality.example_data import IMAGE_CHANNELS
from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.encoders.cnn import CNNEncoder
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.plugins.setups.dino import CrossModalDINOSetup
from unimodality.plugins.sources.images import ImageSource
from unimodality.plugins.sources.table import TableSource
from unimodality.tower import Tower

PH = partial(TableSource, "example://phenomics.parquet", feature_prefix="feat_")


class EncoderRows(Callback):
    """Counts the rows the frozen tower's encoder is run on, per step, next to the source rows each step shows
    for the first time (train and validation)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set[int] = set()
        self.steps: list[tuple[str, int, int, int]] = []  # (stage, rows in batch, new rows, rows encoded)
        self.encoded = 0

    def on_fit_start(self, trainer, module) -> None:
        encoder = module.towers[self.name].encoder
        forward = encoder.forward

        def counting(x, *args, **kwargs):
            self.encoded += x.num_graphs if hasattr(x, "num_graphs") else len(x)
            return forward(x, *args, **kwargs)

        encoder.forward = counting

    def on_train_start(self, trainer, module) -> None:
        # input statistics are fitted as training starts, after the sanity check: its rows are encoded anew
        if module.towers[self.name].standardize:
            self.seen.clear()

    def _start(self, batch) -> None:
        rows = batch[rows_key(self.name)].tolist()
        self._new = len(set(rows) - self.seen)
        self._size = len(rows)
        self.seen |= set(rows)
        self._before = self.encoded

    def _end(self, stage: str) -> None:
        self.steps.append((stage, self._size, self._new, self.encoded - self._before))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start(batch)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._end("train")

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start(batch)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end("val")


def fit(cache: bool, data, encoders: dict, frozen: str, epochs: int = 3, **model_options):
    """Final weights, logged metrics and encoder-row counts of a seeded fit."""
    seed_everything(0)
    model = CrossModalSetup(encoders=encoders, embed_dim=16, modes={frozen: "frozen"}, cache_frozen=cache,
                            **model_options)
    counter = EncoderRows(frozen)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[counter], num_sanity_val_steps=2)
    trainer.fit(model, datamodule=data())
    metrics = {k: v.clone() for k, v in trainer.callback_metrics.items()}
    return model, metrics, counter


def assert_same_run(cached, plain, atol: float = 1e-6, train_passes: int = 1) -> None:
    """``train_passes``: forward passes of the towers per training step (2 under gradient caching)."""
    (model, metrics, counter), (expected_model, expected_metrics, expected_counter) = cached, plain
    state, expected = model.state_dict(), expected_model.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], atol=atol, rtol=1e-5, msg=key)
    assert "val/loss" in expected_metrics and "val/recall@1" in expected_metrics
    assert metrics.keys() == expected_metrics.keys()
    for key in expected_metrics:
        # rankings may swap a near tie: the frozen encoder run on fewer rows at a time (a different BLAS
        # kernel) gives embeddings a rounding error apart; everything else agrees to rounding
        ranked = any(part in key for part in ("/map/", "recall@", "/mrr"))
        torch.testing.assert_close(metrics[key], expected_metrics[key], atol=1e-3 if ranked else atol, rtol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")
    # the same batches, in the same order: the data stream is untouched by the cache
    assert [s[:3] for s in counter.steps] == [s[:3] for s in expected_counter.steps]
    # uncached: every row of every batch is encoded; cached: each source row once, at its first sight
    assert all(encoded == size * (train_passes if stage == "train" else 1)
               for stage, size, _, encoded in expected_counter.steps)
    assert all(encoded == new for _, _, new, encoded in counter.steps)
    assert counter.encoded < expected_counter.encoded


def test_a_frozen_mlp_tower_trains_as_without_the_cache():
    """With input standardisation on the frozen tower: the sanity check's rows, encoded before the statistics
    exist, must not be reused."""
    encoders = {"tx": partial(MLPEncoder, hidden_sizes=[32]), "ph": partial(MLPEncoder, hidden_sizes=[32],
                                                                            dropout=0.2)}
    options = dict(standardize={"ph": "zscore"})
    plain = fit(False, example_datamodule, encoders, "ph", **options)
    cached = fit(True, example_datamodule, encoders, "ph", **options)
    assert_same_run(cached, plain)
    model, _, counter = cached
    assert len(model.towers["ph"].cache) == len(counter.seen)
    # the last epoch's validation encodes nothing: every validation row was seen in the first epoch's
    last_val = [s for s in counter.steps if s[0] == "val"][-3:]
    assert last_val and all(encoded == 0 for *_, encoded in last_val)
    # the cache is no part of the checkpoint
    assert not any("cache" in key for key in model.state_dict())


def test_gradient_caching_with_the_cache():
    encoders = {"tx": partial(MLPEncoder, hidden_sizes=[32]), "ph": partial(MLPEncoder, hidden_sizes=[32])}
    plain = fit(False, example_datamodule, encoders, "ph", epochs=2, grad_cache_chunk=8)
    assert_same_run(fit(True, example_datamodule, encoders, "ph", epochs=2, grad_cache_chunk=8), plain,
                    train_passes=2)


def image_data() -> PairedDataModule:
    return PairedDataModule(
        {"ph": PH(), "img": ImageSource("example://phenomics.parquet", images="{stem}_images.npy",
                                        channels=list(IMAGE_CHANNELS))},
        keys=["smiles", "concentration"], split_column="split", batch_size=64)


@pytest.mark.slow
def test_a_frozen_cnn_tower_trains_as_without_the_cache():
    encoders = {"ph": partial(MLPEncoder, hidden_sizes=[32]),
                "img": partial(CNNEncoder, width=8, blocks=[1, 1], norm="batch", dropout=0.1)}
    plain = fit(False, image_data, encoders, "img", epochs=2)
    assert_same_run(fit(True, image_data, encoders, "img", epochs=2), plain)


@pytest.mark.slow
def test_a_frozen_gnn_tower_trains_as_without_the_cache():
    """Molecule graphs: the rows to encode are taken out of a torch_geometric batch."""
    pytest.importorskip("torch_geometric")
    pytest.importorskip("rdkit")
    from unimodality.plugins.encoders.gnn import GNNEncoder
    from unimodality.plugins.sources.molecules import MoleculeSource

    def data() -> PairedDataModule:
        return PairedDataModule({"ph": PH(), "mol": MoleculeSource("example://phenomics.parquet")},
                                keys=["smiles"], split_column="split", batch_size=32)

    encoders = {"ph": partial(MLPEncoder, hidden_sizes=[32]), "mol": partial(GNNEncoder, hidden_size=16,
                                                                             num_layers=2)}
    plain = fit(False, data, encoders, "mol", epochs=2)
    assert_same_run(fit(True, data, encoders, "mol", epochs=2), plain)


def test_validating_other_data_after_a_cached_fit_encodes_it(tmp_path):
    """Row numbers name rows of the files read: a validate on other files after a cached fit must not reuse
    the fit's representations."""
    import pandas as pd

    from unimodality.example_data import example_file
    from unimodality.plugins.sources.anndata import AnnDataSource

    encoders = {"tx": partial(MLPEncoder, hidden_sizes=[32]), "ph": partial(MLPEncoder, hidden_sizes=[32])}
    model, _, _ = fit(True, example_datamodule, encoders, "ph", epochs=1)
    table = pd.read_parquet(example_file("phenomics.parquet"))
    features = [c for c in table.columns if c.startswith("feat_")]
    table[features] = table[features] * -2.0 + 1.0
    table.to_parquet(tmp_path / "other.parquet")
    other = PairedDataModule(
        {"tx": AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"),
         "ph": TableSource(str(tmp_path / "other.parquet"), feature_prefix="feat_")},
        keys=["smiles", "concentration"], split_column="split", batch_size=32)
    uncached = CrossModalSetup(encoders=encoders, embed_dim=16, modes={"ph": "frozen"})
    uncached.build(model.schema)
    uncached.load_state_dict(model.state_dict())
    expected = quiet_trainer().validate(uncached, datamodule=other, verbose=False)[0]
    got = quiet_trainer().validate(model, datamodule=other, verbose=False)[0]
    assert got["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-5)


# -- the cache itself ---------------------------------------------------------------------------------------

def frozen_tower(**kwargs) -> Tower:
    torch.manual_seed(0)
    tower = Tower(6, 4, MLPEncoder(6, hidden_sizes=[8], dropout=0.5), mode="frozen", **kwargs)
    tower.cache_representations()
    return tower


def test_cached_representations_are_the_encoders_and_reset_when_weights_load():
    tower = frozen_tower()
    x = torch.randn(40, 6)
    expected = tower.represent(x)  # no rows: uncached
    assert len(tower.cache) == 0
    rows = torch.tensor([3, 3, 0, 17, 3, 39, 0])  # repeats, and rows past the cache's size so far
    torch.testing.assert_close(tower.represent(x[rows], rows), expected[rows])
    assert tower.cache.computed == 4 and len(tower.cache) == 4  # a row repeated in a batch is encoded once
    more = torch.arange(10, 30)
    torch.testing.assert_close(tower.represent(x[more], more), expected[more])
    assert tower.cache.computed == 4 + 19  # row 17 was cached already
    # a cached row is the cached value, whatever input comes with it
    torch.testing.assert_close(tower.represent(torch.zeros(2, 6), torch.tensor([3, 17])), expected[[3, 17]])

    other = frozen_tower()
    with torch.no_grad():
        for p in other.encoder.parameters():
            p.add_(1.0)
    tower.load_state_dict(other.state_dict())
    assert len(tower.cache) == 0
    torch.testing.assert_close(tower.represent(x[rows], rows), other.represent(x[rows]))


def test_standardisation_statistics_reset_the_cache():
    tower = frozen_tower()
    tower.standardize_inputs("zscore")
    x = torch.randn(5, 6) * 3 + 1
    tower.represent(x, torch.arange(5))
    tower.fit_standardization(x.mean(0), x.std(0))
    assert len(tower.cache) == 0
    torch.testing.assert_close(tower.represent(x, torch.arange(5)), tower.represent(x))


def test_only_a_frozen_tower_caches():
    with pytest.raises(ValueError, match="only a frozen tower"):
        Tower(6, 4, MLPEncoder(6, hidden_sizes=[8])).cache_representations()


def test_paired_batches_carry_source_rows():
    data = example_datamodule(batch_size=16)
    data.setup("fit")
    phenomics = data.sources["ph"].read_features()
    for split in ("train", "val"):
        batch = data.datasets[split].__getitems__(list(range(16)))
        rows = batch[rows_key("ph")].numpy()
        np.testing.assert_allclose(batch["ph"].numpy(), np.asarray(phenomics[rows], dtype=np.float32))
        assert batch[rows_key("tx")].shape == batch[GROUP].shape


# -- what it cannot serve: one line ---------------------------------------------------------------------

def test_streaming_is_refused(tmp_path):
    one_line_error(CLIP + ["--model.init_args.modes.ph", "frozen", "--model.init_args.cache_frozen", "true",
                           "--data.init_args.streaming", "true", "--data.init_args.cache_dir", str(tmp_path / "c"),
                           "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"],
                   r"model\.init_args\.cache_frozen: .*no source rows of modality 'ph'.*data\.streaming",
                   folder=tmp_path)


def test_no_frozen_tower_is_refused(tmp_path):
    one_line_error(CLIP + ["--model.init_args.cache_frozen", "true", "--trainer.fast_dev_run", "1"],
                   r"model\.init_args\.cache_frozen: no tower is frozen", folder=tmp_path)


def test_a_setup_with_its_own_embed_is_refused():
    with pytest.raises(ValueError, match=r"model\.init_args\.cache_frozen: CrossModalDINOSetup"):
        CrossModalDINOSetup(encoders={}, cache_frozen=True)
