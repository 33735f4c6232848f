"""SimCLR: vector augmentations, the single-modality datamodule, SimCLRSetup, checkpoints and the CLI."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import quiet_trainer
from unimodality.augmentation import Augmentation, Compose
from unimodality.cli import main
from unimodality.config import config_form
from unimodality.datamodule import GROUP, INDEX
from unimodality.encoder import load_state_dict_file
from unimodality.metrics import SameGroupRecall
from unimodality.outputs import OBSM_KEY
from unimodality.plugins.augmentations.vectors import FeatureMask, GaussianNoise, Mixup, RandomScaling
from unimodality.plugins.datamodules.embed import EmbedDataModule
from unimodality.plugins.datamodules.single import SingleDataModule
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.losses.ntxent import NTXentLoss
from unimodality.plugins.setups.simclr import SimCLRSetup
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource
from unimodality.sources import DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def all_augmentations() -> list[Augmentation]:
    return [FeatureMask(rate=0.2), GaussianNoise(std=0.3), RandomScaling(0.8, 1.2), Mixup(alpha=0.4)]


# -- augmentations ---------------------------------------------------------------------------------

def test_gaussian_noise_statistics():
    torch.manual_seed(0)
    x = torch.full((2000, 50), 3.0)
    y = GaussianNoise(std=0.5).augment(x)
    noise = y - x
    assert abs(noise.std().item() - 0.5) < 0.01 and abs(noise.mean().item()) < 0.01
    changed = (GaussianNoise(std=0.5, p=0.3).augment(x) != x).any(dim=1).float().mean().item()
    assert abs(changed - 0.3) < 0.04  # p acts per sample


def test_feature_mask_statistics():
    torch.manual_seed(0)
    x = torch.full((2000, 50), 2.0)
    y = FeatureMask(rate=0.25).augment(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}  # kept features unchanged (no rescaling by default)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01
    per_sample = (y == 0).float().mean(dim=1)
    assert per_sample.std() > 0.03  # masks are drawn per sample, not shared across the batch
    rescaled = FeatureMask(rate=0.25, rescale=True).augment(x)
    assert sorted(rescaled.unique().tolist()) == pytest.approx([0.0, 2.0 / 0.75])
    assert abs(rescaled.mean().item() - 2.0) < 0.03  # inverted dropout keeps the expected value
    some = FeatureMask(rate=0.5, p=0.2).augment(x)
    assert abs((some == 0).any(dim=1).float().mean().item() - 0.2) < 0.04


def test_random_scaling_statistics():
    torch.manual_seed(0)
    x = torch.rand(4000, 20) + 0.5
    y = RandomScaling(low=0.5, high=2.0).augment(x)
    factor = y / x
    torch.testing.assert_close(factor, factor[:, :1].expand_as(factor))  # one factor per sample
    factor = factor[:, 0]
    assert factor.min() >= 0.5 - 1e-6 and factor.max() <= 2.0 + 1e-6
    assert factor.min() < 0.52 and factor.max() > 1.98 and abs(factor.mean().item() - 1.25) < 0.03


def test_mixup_keeps_each_sample_itself_and_mixes_with_another():
    torch.manual_seed(0)
    n = 400
    x = torch.eye(n)  # row i is e_i: the mix of rows i and j is readable from the result
    y = Mixup(alpha=0.4).augment(x)
    own = y.diagonal()
    others = y - torch.diag(own)
    partner = others.argmax(dim=1)
    assert (own >= 0.5).all() and (own <= 1).all()
    assert (partner != torch.arange(n)).all()  # never mixed with itself
    torch.testing.assert_close(y.sum(dim=1), torch.ones(n))  # a convex combination of two samples
    torch.testing.assert_close(others.amax(dim=1), 1 - own)
    assert len(partner.unique()) > n / 2  # partners are drawn, not one fixed shift
    assert own.min() < 0.55 and (own < 0.99).float().mean() > 0.5  # lambda ~ Beta folded to [0.5, 1]
    light = Mixup(alpha=0.05).augment(x).diagonal()
    assert light.mean() > own.mean()  # small alpha mixes lightly
    half = Mixup(alpha=1.0, p=0.5).augment(x)
    assert abs((half.diagonal() < 1).float().mean().item() - 0.5) < 0.07
    single = torch.randn(1, 5)
    assert torch.equal(Mixup().augment(single), single)  # nothing to mix with


@pytest.mark.parametrize("augmentation", all_augmentations() + [Compose(all_augmentations())],
                         ids=lambda a: type(a).__name__)
def test_identity_in_eval_mode(augmentation):
    x = torch.randn(16, 8)
    assert not torch.equal(augmentation.train()(x), x)
    assert torch.equal(augmentation.eval()(x), x)
    assert not torch.equal(augmentation.augment(x), x)  # augment() acts whatever the mode


def test_seeds_reproduce_and_compose_applies_in_order():
    x = torch.rand(64, 30) + 1
    pipeline = Compose(all_augmentations())
    torch.manual_seed(7)
    first = pipeline.augment(x)
    torch.manual_seed(7)
    assert torch.equal(pipeline.augment(x), first)
    torch.manual_seed(8)
    assert not torch.equal(pipeline.augment(x), first)
    # order matters: noise after masking leaves no exact zeros, masking after noise leaves many
    torch.manual_seed(0)
    noise_last = Compose([FeatureMask(rate=0.5), GaussianNoise(std=0.1)]).augment(x)
    mask_last = Compose([GaussianNoise(std=0.1), FeatureMask(rate=0.5)]).augment(x)
    assert (noise_last == 0).float().mean() == 0 and (mask_last == 0).float().mean() > 0.4
    assert torch.equal(Compose([]).augment(x), x)


def test_augmentations_record_init_args_and_check_them():
    assert config_form(Compose([GaussianNoise(0.3), Mixup(alpha=1.0, p=0.5)])) == {
        "class_path": "unimodality.augmentation.Compose",
        "init_args": {"augmentations": [
            {"class_path": "unimodality.plugins.augmentations.vectors.GaussianNoise",
             "init_args": {"std": 0.3, "p": 1.0}},
            {"class_path": "unimodality.plugins.augmentations.vectors.Mixup", "init_args": {"alpha": 1.0, "p": 0.5}},
        ]},
    }
    for build in (lambda: GaussianNoise(std=-1), lambda: FeatureMask(rate=1.0), lambda: RandomScaling(2, 1),
                  lambda: Mixup(alpha=0), lambda: GaussianNoise(p=1.5)):
        with pytest.raises(ValueError):
            build()
    with pytest.raises(ValueError, match=r"shape \(batch, features\)"):
        GaussianNoise().augment(torch.zeros(3))


# -- SingleDataModule ------------------------------------------------------------------------------

def write_table(tmp_path: Path, n_keys: int = 30, seed: int = 0) -> tuple[Path, pd.DataFrame]:
    """Rows of ``n_keys`` perturbations (1-4 replicates, scattered); feature 0 = key id, 1 = file row."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n_keys), rng.integers(1, 5, n_keys))
    ids = ids[rng.permutation(len(ids))]
    frame = pd.DataFrame({
        "smiles": [f"C{k}O" for k in ids],
        "concentration": np.where(ids % 2 == 0, 1.0, 10.0),
        "split": np.where(ids < 20, "train", np.where(ids < 25, "val", "test")),
        "feat_key": ids.astype(np.float32),
        "feat_row": np.arange(len(ids), dtype=np.float32),
        "feat_noise": rng.normal(size=len(ids)).astype(np.float32),
    })
    path = tmp_path / "single.parquet"
    frame.to_parquet(path, index=False)
    return path, frame


def single_dm(path: Path, **kwargs) -> SingleDataModule:
    return SingleDataModule(TableSource(str(path), feature_prefix="feat_"), modality="ph", **kwargs)


def fetch_all(dataset) -> dict[str, torch.Tensor]:
    return dataset.__getitems__(list(range(len(dataset))))


def test_keys_give_groups_and_key_level_splits(tmp_path):
    path, frame = write_table(tmp_path)
    dm = single_dm(path, keys=["smiles", "concentration"], split_column="split", batch_size=8)
    dm.setup("fit")
    dm.setup("test")
    assert dm.schema["ph"]["features"] == ["feat_key", "feat_row", "feat_noise"]
    seen_rows, group_of_key = [], {}
    for split, dataset in dm.datasets.items():
        batch = fetch_all(dataset)
        keys = batch["ph"][:, 0].int().tolist()
        for g, k in zip(batch[GROUP].tolist(), keys):
            assert group_of_key.setdefault(k, g) == g  # replicates share their key's group id
        assert set(frame["split"].iloc[batch["ph"][:, 1].int().numpy()]) == {split}
        seen_rows += batch["ph"][:, 1].int().tolist()
    assert len(set(group_of_key.values())) == len(group_of_key) == frame["feat_key"].nunique()
    assert sorted(seen_rows) == list(range(len(frame)))  # every row once, in its key's split

    loader = dm.train_dataloader()
    batches = list(loader)
    n, last = len(dm.datasets["train"]), len(dm.datasets["train"]) % 8
    # the last incomplete batch is dropped only when under half a batch (SplitDataModule._drop_last_batch)
    assert len(batches) == n // 8 + (last >= 4)
    assert sorted({len(b[GROUP]) for b in batches}) == sorted({8} | ({last} if last >= 4 else set()))
    with pytest.raises(ValueError, match="EmbedDataModule"):
        dm.setup("predict")


def test_held_out_fractions_are_drawn_over_keys(tmp_path):
    path, frame = write_table(tmp_path, n_keys=40)
    dm = single_dm(path, keys=["smiles", "concentration"], val_fraction=0.25, test_fraction=0.25, seed=3)
    dm.setup("fit")
    dm.setup("test")
    keys = {s: set(fetch_all(d)["ph"][:, 0].int().tolist()) for s, d in dm.datasets.items()}
    assert len(keys["val"]) == len(keys["test"]) == 10 and len(keys["train"]) == 20
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
    assert sum(len(d) for d in dm.datasets.values()) == len(frame)  # all replicates go with their key


def test_a_key_in_two_splits_is_refused(tmp_path):
    path, frame = write_table(tmp_path)
    counts = frame.loc[frame["split"] == "val", "feat_key"].value_counts()
    key = counts.index[0]  # a validation key with several replicates: one of them now says train
    assert counts.iloc[0] > 1
    frame.loc[int(np.flatnonzero(frame["feat_key"].to_numpy() == key)[0]), "split"] = "train"
    frame.to_parquet(path, index=False)
    with pytest.raises(DataError, match=r"1 keys appear in more than one split.*\['train', 'val'\]"):
        single_dm(path, keys=["smiles", "concentration"], split_column="split").setup("fit")
    # without keys rows are independent: a row-level split column is fine
    dm = single_dm(path, split_column="split")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == (frame["split"] == "train").sum()


def test_without_keys_rows_are_groups_and_splits_are_over_rows(tmp_path):
    path, frame = write_table(tmp_path)
    dm = single_dm(path, val_fraction=0.2, test_fraction=0.1, batch_size=4)
    dm.setup("fit")
    dm.setup("test")
    rows = {s: fetch_all(d) for s, d in dm.datasets.items()}
    n = len(frame)
    assert len(rows["val"][GROUP]) == round(0.2 * n) and len(rows["test"][GROUP]) == round(0.1 * n)
    for batch in rows.values():  # group = the row of the file
        assert torch.equal(batch[GROUP], batch["ph"][:, 1].long())
    groups = torch.cat([b[GROUP] for b in rows.values()])
    assert sorted(groups.tolist()) == list(range(n))
    # a perturbation's replicates may now land in different splits (rows, not keys, are split)
    split_of_row = {g: s for s, b in rows.items() for g in b[GROUP].tolist()}
    spread = frame.assign(split=[split_of_row[i] for i in range(n)]).groupby("feat_key")["split"].nunique()
    assert spread.max() > 1
    big = single_dm(path, batch_size=999)
    big.setup("fit")
    with pytest.raises(DataError, match=r"training split has \d+ rows, fewer than batch_size=999"):
        big.train_dataloader()


# -- the retrieval metric ----------------------------------------------------------------------------

def test_same_group_recall_excludes_the_query_itself():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]])
    group = torch.tensor([0, 0, 1, 2])
    metric = SameGroupRecall(ks=(1, 2, 3))
    metric.update(x, group)
    result = metric.compute()
    # row 0: its nearest other is row 2 (another group), its positive row 1 ranks 2nd
    # row 1: its positive row 0 ranks 2nd (after row 2); rows 2 and 3 have no other sample of their group
    assert result["recall@1"] == 0 and result["recall@2"] == 1 and result["recall@3"] == 1
    alone = SameGroupRecall(ks=(1,))
    alone.update(x, torch.arange(4))
    assert alone.compute() == {}  # no query has anything to find


# -- SimCLRSetup -------------------------------------------------------------------------------------

def tx_datamodule(**kwargs) -> SingleDataModule:
    return SingleDataModule(
        AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"), modality="tx",
        keys=["smiles", "concentration"], split_column="split", **{"batch_size": 64, **kwargs},
    )


def python_built_model() -> SimCLRSetup:
    return SimCLRSetup(
        encoder=partial(MLPEncoder, hidden_sizes=[64, 32], norm="batch"),
        augmentations=[FeatureMask(rate=0.2), GaussianNoise(std=0.2), Mixup(alpha=0.5, p=0.5)],
        loss=NTXentLoss(temperature=0.2),
        embed_dim=16,
        projection_hidden=48,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )


def representation(model: SimCLRSetup, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_setup_trains_and_predicts_the_encoder_output(tmp_path):
    datamodule = tx_datamodule()
    model = python_built_model()
    trainer = quiet_trainer(limit_train_batches=4, limit_val_batches=2)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 4
    assert model.modality == "tx" and model.projection[-1].out_features == 16
    assert {"val/loss", "val/recall@1", "val/recall@10"} <= set(trainer.callback_metrics)
    # the two training views differ; evaluation views are fixed by a seed, so the loss repeats
    datamodule.setup("fit")  # fit's teardown freed the data
    x = datamodule.datasets["val"].__getitems__(list(range(32)))["tx"]
    model.train()
    a, b = model._views(x, model.augmentations)
    assert not torch.allclose(a, b)
    first = quiet_trainer(limit_val_batches=2).validate(model, datamodule=datamodule, verbose=False)
    again = quiet_trainer(limit_val_batches=2).validate(model, datamodule=datamodule, verbose=False)
    assert first == again

    output = tmp_path / "emb.parquet"
    embed = EmbedDataModule("example://transcriptomics.h5ad", output=str(output), n_samples=20)
    predictions = quiet_trainer().predict(model, datamodule=embed)
    embedding = torch.cat([p["embedding"] for p in predictions])
    assert embedding.shape == (20, 32)  # the encoder's width, not embed_dim
    assert torch.equal(torch.cat([p[INDEX] for p in predictions]), torch.arange(20))
    raw = torch.from_numpy(AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p")
                           .read_features(np.arange(20)).toarray())
    torch.testing.assert_close(embedding, representation(model, raw))


def test_python_built_model_round_trips_with_no_config(tmp_path):
    datamodule = tx_datamodule()
    model = python_built_model()
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=datamodule)
    path = tmp_path / "model.ckpt"
    model.trainer.save_checkpoint(path)

    stored = torch.load(path, weights_only=True)
    hparams = stored["hyper_parameters"]
    assert hparams["augmentations"][2] == {
        "class_path": "unimodality.plugins.augmentations.vectors.Mixup", "init_args": {"alpha": 0.5, "p": 0.5}}
    assert hparams["loss"]["init_args"]["temperature"] == 0.2
    assert hparams["schema"]["tx"]["features"][:2] == ["GENE0000", "GENE0001"]
    assert stored["datamodule_hyper_parameters"]["modality"] == "tx"

    loaded = SimCLRSetup.load_from_checkpoint(path)  # no config given
    assert [type(a) for a in loaded.augmentations.augmentations] == [FeatureMask, GaussianNoise, Mixup]
    assert isinstance(loaded.loss, NTXentLoss) and isinstance(loaded.configure_optimizers(), torch.optim.SGD)
    datamodule.setup("validate")  # fit's teardown freed the data
    x = datamodule.datasets["val"].__getitems__(list(range(16)))["tx"]
    torch.testing.assert_close(representation(loaded, x), representation(model, x))

    quiet_trainer(max_steps=1, limit_val_batches=0).fit(loaded.train(), datamodule=tx_datamodule())
    second = tmp_path / "second.ckpt"
    loaded.trainer.save_checkpoint(second)
    torch.load(second, weights_only=True)  # would fail if hparams held modules
    again = SimCLRSetup.load_from_checkpoint(second)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)

    # the trained encoder initialises another model's encoder (e.g. a CrossModalSetup tower)
    encoder = MLPEncoder(500, hidden_sizes=[64, 32], norm="batch")
    encoder.load_state_dict(load_state_dict_file(second, "encoder."))


def test_setup_refuses_several_modalities():
    model = SimCLRSetup(encoder=MLPEncoder)
    with pytest.raises(ValueError, match="learns one modality"):
        model.build({"tx": {"features": ["a"]}, "ph": {"features": ["b"]}})
    with pytest.raises(ValueError, match="no encoder"):
        SimCLRSetup().build({"tx": {"features": ["a"]}})


# -- the command line --------------------------------------------------------------------------------

def test_cli_fit_validate_predict(tmp_path, capsys):
    out = io.StringIO()
    with redirect_stdout(out):
        main(["fit", "--config", str(CONFIGS / "simclr_tx.yaml"), "--trainer.max_epochs", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    run_dir = Path(re.search(r"Run directory: (\S+)", out.getvalue()).group(1))
    assert run_dir.parent == tmp_path / "runs" / "simclr_tx"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    for column in ("train/loss", "val/loss", "val/recall@1", "train/alignment"):
        assert metrics[column].notna().any(), column
    last = run_dir / "checkpoints" / "last.ckpt"

    main(["validate", "--ckpt_path", str(last), "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    assert re.search(r"val/recall@1\s+0\.\d+", capsys.readouterr().out)

    output = tmp_path / "emb.h5ad"
    main(["predict", "--ckpt_path", str(last), "--trainer.enable_progress_bar", "false",
          "--data.path", "example://transcriptomics.h5ad", "--data.output", str(output), "--data.n_samples", "50"])
    result = ad.read_h5ad(output)
    assert result.n_obs == 50 and result.obsm[OBSM_KEY].shape == (50, 256)  # the encoder's representation
