"""PairedDataModule: pairing by key columns, replicate draws, splits, stages and errors.

The test files encode each row's provenance in its features (key id, replicate number, file row), so a
batch can be checked against the ground truth: both modalities of a pair must carry the same key id.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from unimodality.datamodule import GROUP, collate_batch
from unimodality.example_data import resolve_path
from unimodality.plugins.datamodules.paired import PairedDataModule, PairedDataset
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource
from unimodality.sources import DataError

KEYS = ["smiles", "concentration"]
# feature columns: 0 = key id, 1 = replicate number, 2 = row of the file, then noise
TX_FEATURES = ["key", "rep", "row", "n0", "n1"]
PH_FEATURES = ["feat_key", "feat_rep", "feat_row", "feat_n0"]
KEY, REP, ROW = 0, 1, 2


@dataclass
class Paired:
    tx: Path
    ph: Path
    keys: list[tuple[str, float]]  # key id -> key values
    shared: set[int]  # key ids present in both files
    split: dict[int, str]  # key id -> split (shared keys)
    rows: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # modality -> key id -> file rows
    tx_frame: pd.DataFrame | None = None
    ph_frame: pd.DataFrame | None = None

    def keys_in(self, split: str) -> set[int]:
        return {k for k, s in self.split.items() if s == split}

    def rows_in(self, modality: str, split: str) -> set[int]:
        return {r for k in self.keys_in(split) for r in self.rows[modality][k]}


def build_frames(seed: int = 0):
    """Ground truth: 16 shared keys (1-5 replicates per modality), 2 keys only in tx, 2 only in ph."""
    rng = np.random.default_rng(seed)
    shared = [(f"C{i}CO", c) for i in range(8) for c in (1.0, 10.0)]
    tx_only = [("TXONLY1", 1.0), ("TXONLY2", 10.0)]
    ph_only = [("PHONLY1", 1.0), ("PHONLY2", 0.5)]
    keys = shared + tx_only + ph_only
    n_shared = len(shared)
    split = {k: "train" if k < 10 else "val" if k < 13 else "test" for k in range(n_shared)}
    # replicate counts: cover 1 vs 5, 5 vs 1 and equal counts explicitly, the rest random
    tx_counts = rng.integers(1, 6, n_shared)
    ph_counts = rng.integers(1, 6, n_shared)
    tx_counts[[0, 10, 13]], ph_counts[[0, 10, 13]] = (1, 5, 3), (5, 1, 3)

    def frame(ids_counts, prefix):
        ids = np.repeat([k for k, _ in ids_counts], [n for _, n in ids_counts])
        rep = np.concatenate([np.arange(n) for _, n in ids_counts])
        order = rng.permutation(len(ids))  # rows of a key are scattered through the file
        ids, rep = ids[order], rep[order]
        df = pd.DataFrame({
            "smiles": [keys[k][0] for k in ids],
            "concentration": [keys[k][1] for k in ids],
            "split": [split.get(k, "train") for k in ids],
            "replicate": rep,
        })
        feats = np.column_stack([ids, rep, np.arange(len(ids)), rng.normal(size=(len(ids), len(prefix) - 3))])
        return df, feats.astype(np.float32)

    tx_ids = [(k, n) for k, n in enumerate(tx_counts)] + [(n_shared, 2), (n_shared + 1, 1)]
    ph_ids = [(k, n) for k, n in enumerate(ph_counts)] + [(n_shared + 2, 3), (n_shared + 3, 1)]
    tx_df, tx_x = frame(tx_ids, TX_FEATURES)
    ph_df, ph_x = frame(ph_ids, PH_FEATURES)
    return keys, set(range(n_shared)), split, (tx_df, tx_x), (ph_df, ph_x)


def write_tx(path: Path, df: pd.DataFrame, x: np.ndarray) -> Path:
    adata = ad.AnnData(X=sp.csr_matrix(x), obs=df.set_index(pd.Index([f"tx{i}" for i in range(len(df))])))
    adata.var_names = TX_FEATURES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(path)
    return path


def write_ph(path: Path, df: pd.DataFrame, x: np.ndarray) -> Path:
    table = df.copy()
    for j, name in enumerate(PH_FEATURES):
        table[name] = x[:, j]
    table.to_parquet(path, index=False)
    return path


def make_paired(tmp_path: Path, edit_tx=None, edit_ph=None) -> Paired:
    keys, shared, split, (tx_df, tx_x), (ph_df, ph_x) = build_frames()
    if edit_tx:
        tx_df = edit_tx(tx_df.copy())
    if edit_ph:
        ph_df = edit_ph(ph_df.copy())
    data = Paired(write_tx(tmp_path / "tx.h5ad", tx_df, tx_x), write_ph(tmp_path / "ph.parquet", ph_df, ph_x),
                  keys, shared, split, tx_frame=tx_df, ph_frame=ph_df)
    for name, x in (("tx", tx_x), ("ph", ph_x)):
        per_key: dict[int, list[int]] = {}
        for row, k in enumerate(x[:, KEY].astype(int)):
            per_key.setdefault(int(k), []).append(row)
        data.rows[name] = per_key
    return data


@pytest.fixture
def paired(tmp_path) -> Paired:
    return make_paired(tmp_path)


def make_dm(data: Paired, tx_kwargs=None, ph_kwargs=None, **kwargs) -> PairedDataModule:
    kwargs = {"keys": KEYS, "split_column": "split", "batch_size": 4, **kwargs}
    return PairedDataModule(
        {"tx": AnnDataSource(str(data.tx), **(tx_kwargs or {})),
         "ph": TableSource(str(data.ph), feature_prefix="feat_", **(ph_kwargs or {}))},
        **kwargs,
    )


def fetch_all(dataset: PairedDataset) -> dict[str, torch.Tensor]:
    return dataset.__getitems__(list(range(len(dataset))))


def key_of(batch, modality="tx") -> np.ndarray:
    return batch[modality][:, KEY].numpy().astype(int)


def assert_pairs_consistent(batch) -> None:
    """Both modalities of every pair carry the same key id; the group id stands for that key."""
    np.testing.assert_array_equal(key_of(batch, "tx"), key_of(batch, "ph"))
    assert batch[GROUP].dtype == torch.int64


def group_to_key(batches) -> dict[int, int]:
    mapping: dict[int, int] = {}
    for batch in batches:
        for g, k in zip(batch[GROUP].tolist(), key_of(batch)):
            assert mapping.setdefault(g, int(k)) == k, f"group {g} stands for two keys"
    assert len(set(mapping.values())) == len(mapping), "two groups stand for one key"
    return mapping


def split_keys(dm: PairedDataModule) -> dict[str, set[int]]:
    return {s: set(key_of(fetch_all(d)).tolist()) for s, d in dm.datasets.items()}


def member_file_rows(dataset: PairedDataset, modality: str) -> np.ndarray:
    """The file rows (from the row feature) of every member of the dataset's keys."""
    block = dataset.features[modality]
    block = block.toarray() if sp.issparse(block) else block
    return block[dataset.members[modality].rows, ROW].astype(int)


# -- pairing ---------------------------------------------------------------------------------------

def test_pairs_share_key_and_groups_are_consistent(paired, caplog):
    dm = make_dm(paired)
    with caplog.at_level(logging.WARNING, logger="unimodality"):
        dm.setup("fit")
        dm.setup("test")
    assert set(dm.datasets) == {"train", "val", "test"}
    batches = [fetch_all(d) for d in dm.datasets.values()]
    batches += [dm.datasets["train"].__getitems__([3, 0, 3])]
    for batch in batches:
        assert_pairs_consistent(batch)
    mapping = group_to_key(batches)  # one group id per key, the same in every split
    # keys present in only one modality are dropped; all shared keys are used
    assert set(mapping.values()) == paired.shared
    # the dropped rows are reported per modality
    tx_dropped = len(paired.rows["tx"][16]) + len(paired.rows["tx"][17])
    ph_dropped = len(paired.rows["ph"][18]) + len(paired.rows["ph"][19])
    assert re.search(rf"modality 'tx': {tx_dropped} of \d+ rows have a key absent from another modality", caplog.text)
    assert re.search(rf"modality 'ph': {ph_dropped} of \d+ rows have a key absent from another modality", caplog.text)


def test_batch_rows_belong_to_their_key(paired):
    """Beyond the key id: the file row a pair came from really holds that key in the metadata."""
    dm = make_dm(paired)
    dm.setup("fit")
    for dataset in dm.datasets.values():
        batch = fetch_all(dataset)
        for name, frame in (("tx", paired.tx_frame), ("ph", paired.ph_frame)):
            rows = batch[name][:, ROW].numpy().astype(int)
            meta = frame.iloc[rows]
            expected = [paired.keys[k] for k in key_of(batch)]
            assert list(zip(meta["smiles"], meta["concentration"])) == expected
            np.testing.assert_array_equal(meta["replicate"].to_numpy(), batch[name][:, REP].numpy())


def test_renamed_key_columns(tmp_path):
    renamed = {"smiles": "compound", "concentration": "dose"}
    data = make_paired(tmp_path, edit_ph=lambda df: df.rename(columns=renamed))
    dm = make_dm(data, ph_kwargs={"key_columns": ["compound", "dose"]})
    dm.setup("fit")
    batch = fetch_all(dm.datasets["val"])
    assert_pairs_consistent(batch)
    assert set(key_of(batch)) == data.keys_in("val")
    with pytest.raises(ValueError, match=r"modality 'ph': key_columns \['compound'\] must match keys"):
        make_dm(data, ph_kwargs={"key_columns": ["compound"]})


# -- training draws --------------------------------------------------------------------------------

def test_training_draws_cover_every_replicate(paired):
    dm = make_dm(paired)
    dm.setup("fit")
    train = dm.datasets["train"]
    train_keys = paired.keys_in("train")
    assert len(train) == len(train_keys)  # one example per perturbation
    seen = {"tx": set(), "ph": set()}
    fetches = []
    for _ in range(200):
        batch = fetch_all(train)
        assert_pairs_consistent(batch)
        # one example per key per pass
        assert sorted(key_of(batch)) == sorted(train_keys)
        assert len(set(batch[GROUP].tolist())) == len(train)
        for name, rows_seen in seen.items():
            rows = batch[name][:, ROW].numpy().astype(int)
            for k, r in zip(key_of(batch), rows):
                assert r in paired.rows[name][k]
            rows_seen.update(rows.tolist())
        fetches.append(batch["tx"][:, ROW].clone())
    # with at most 5 replicates and 200 draws, every replicate shows up; a fixed choice would not
    assert seen["tx"] == paired.rows_in("tx", "train")
    assert seen["ph"] == paired.rows_in("ph", "train")
    assert any(not torch.equal(fetches[0], f) for f in fetches[1:])  # redrawn at each fetch


def test_training_draws_follow_torch_seed(paired):
    dm = make_dm(paired)
    dm.setup("fit")
    train = dm.datasets["train"]
    torch.manual_seed(123)
    first = fetch_all(train)
    torch.manual_seed(123)
    again = fetch_all(train)
    for name in ("tx", "ph", GROUP):
        assert torch.equal(first[name], again[name])


def test_single_item_fetch(paired):
    dm = make_dm(paired)
    dm.setup("fit")
    item = dm.datasets["val"][0]
    assert item["tx"].shape == (len(TX_FEATURES),) and item["ph"].shape == (len(PH_FEATURES),)
    assert item[GROUP].ndim == 0
    assert int(item["tx"][KEY]) == int(item["ph"][KEY])


def test_train_dataloader_batches(paired):
    dm = make_dm(paired, batch_size=4)
    dm.setup("fit")
    n_train = len(paired.keys_in("train"))
    batches = list(dm.train_dataloader())
    # the last incomplete batch is kept unless under half a batch (see SplitDataModule._drop_last_batch)
    last = n_train % 4
    assert len(batches) == n_train // 4 + (last >= 2)
    assert sum(len(b[GROUP]) for b in batches) == n_train - (last if last < 2 else 0)
    for batch in batches:
        n = len(batch[GROUP])
        assert n in (4, last)
        assert batch["tx"].shape == (n, len(TX_FEATURES)) and batch["ph"].shape == (n, len(PH_FEATURES))
        assert batch["tx"].dtype == torch.float32 and batch[GROUP].shape == (n,)
        assert len(set(batch[GROUP].tolist())) == n  # distinct perturbations in a batch
        assert_pairs_consistent(batch)
    seen = [k for b in batches for k in key_of(b)]
    assert len(seen) == len(set(seen)) and set(seen) <= paired.keys_in("train")
    # perturbations are shuffled every epoch (not the dataset's order each time)
    torch.manual_seed(0)
    orders = [[int(g) for b in dm.train_dataloader() for g in b[GROUP]] for _ in range(3)]
    assert any(order != orders[0] for order in orders[1:])


# -- evaluation ------------------------------------------------------------------------------------

def test_evaluation_is_deterministic_and_covers_every_replicate(paired):
    dm = make_dm(paired)
    dm.setup("fit")
    val = dm.datasets["val"]
    val_keys = paired.keys_in("val")
    widths = {k: max(len(paired.rows["tx"][k]), len(paired.rows["ph"][k])) for k in val_keys}
    assert len(val) == sum(widths.values())
    first, second = fetch_all(val), fetch_all(val)
    for name in ("tx", "ph", GROUP):
        assert torch.equal(first[name], second[name])
    assert_pairs_consistent(first)
    assert set(key_of(first)) == val_keys
    assert set(first["tx"][:, ROW].int().tolist()) == paired.rows_in("tx", "val")
    assert set(first["ph"][:, ROW].int().tolist()) == paired.rows_in("ph", "val")
    # replicate j of one modality goes with replicate j mod n of the other (rows in file order)
    keys = key_of(first)
    for k in val_keys:
        at = keys == k
        assert at.sum() == widths[k]
        for name in ("tx", "ph"):
            rows = paired.rows[name][k]
            expected = [rows[j % len(rows)] for j in range(widths[k])]
            assert first[name][at, ROW].int().tolist() == expected


def test_eval_dataloader_matches_dataset_order(paired):
    dm = make_dm(paired, batch_size=4, eval_batch_size=3)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [len(b[GROUP]) for b in batches[:-1]] == [3] * (len(batches) - 1)
    joined = {name: torch.cat([b[name] for b in batches]) for name in ("tx", "ph", GROUP)}
    full = fetch_all(dm.datasets["val"])
    for name, values in joined.items():  # no shuffling, nothing dropped
        assert torch.equal(values, full[name])


# -- splits ----------------------------------------------------------------------------------------

def test_splits_from_column(paired):
    dm = make_dm(paired)
    dm.setup("fit")
    dm.setup("test")
    keys = split_keys(dm)
    for s in ("train", "val", "test"):
        assert keys[s] == paired.keys_in(s)
        for name in ("tx", "ph"):  # every row of a key lies in its key's split
            assert set(member_file_rows(dm.datasets[s], name)) == paired.rows_in(name, s)


def test_split_column_in_one_modality_only(tmp_path):
    data = make_paired(tmp_path, edit_ph=lambda df: df.drop(columns="split"))
    dm = make_dm(data)
    dm.setup("fit")
    dm.setup("test")
    assert split_keys(dm) == {s: data.keys_in(s) for s in ("train", "val", "test")}


def test_split_column_in_no_file(tmp_path):
    data = make_paired(tmp_path, edit_tx=lambda df: df.drop(columns="split"),
                       edit_ph=lambda df: df.drop(columns="split"))
    message = r"split column 'split' is in none of the files \(.*tx\.h5ad, .*ph\.parquet\)"
    with pytest.raises(DataError, match=message):
        make_dm(data).setup("fit")


def _first_row_of(df: pd.DataFrame, smiles: str, concentration: float) -> int:
    return int(np.flatnonzero((df["smiles"] == smiles) & (df["concentration"] == concentration))[0])


def test_key_in_two_splits_within_a_file(tmp_path):
    keys, *_ = build_frames()
    smiles, conc = keys[10]  # a val key with 5 tx replicates (see build_frames)

    def edit(df):
        df.loc[_first_row_of(df, smiles, conc), "split"] = "train"
        return df

    data = make_paired(tmp_path, edit_tx=edit)
    assert len(data.rows["tx"][10]) == 5  # 1 row now says train, 4 still say val
    message = (rf"1 keys appear in more than one split, e\.g\. "
               rf"\{{'smiles': '{smiles}', 'concentration': {conc}\}} in \['train', 'val'\]")
    with pytest.raises(DataError, match=message):
        make_dm(data).setup("fit")


def test_key_in_two_splits_across_files(tmp_path):
    keys, *_ = build_frames()
    smiles, conc = keys[2]  # a train key: the phenomics file says test

    def edit(df):
        df.loc[(df["smiles"] == smiles) & (df["concentration"] == conc), "split"] = "test"
        return df

    data = make_paired(tmp_path, edit_ph=edit)
    with pytest.raises(DataError, match=rf"'smiles': '{smiles}'.*\['test', 'train'\].*one split only"):
        make_dm(data).setup("validate")


@pytest.mark.parametrize("bad", ["training", "Val", None])
def test_invalid_split_values(tmp_path, bad):
    def edit(df):
        df.loc[[3, 7], "split"] = bad
        return df

    data = make_paired(tmp_path, edit_ph=edit)
    with pytest.raises(DataError, match=rf"ph\.parquet: column 'split' must hold train, val or test; "
                                        rf"found \['{bad}'\] in 2 rows"):
        make_dm(data).setup("fit")


def test_seeded_fractions_split_keys_not_rows(paired):
    def splits(seed):
        dm = make_dm(paired, split_column=None, val_fraction=0.25, test_fraction=0.125, seed=seed)
        dm.setup("fit")
        dm.setup("test")
        return dm, split_keys(dm)

    n_shared = len(paired.shared)
    dm, first = splits(0)
    # the file's split column is ignored: fractions of the shared keys are held out
    assert len(first["val"]) == round(0.25 * n_shared) and len(first["test"]) == round(0.125 * n_shared)
    assert len(first["train"]) == n_shared - len(first["val"]) - len(first["test"])
    assert first["train"] | first["val"] | first["test"] == paired.shared
    assert not (first["train"] & first["val"] or first["train"] & first["test"])
    assert not first["val"] & first["test"]
    for s in ("train", "val", "test"):
        for name in ("tx", "ph"):  # a key's rows all go to its split, none elsewhere
            expected = {r for k in first[s] for r in paired.rows[name][k]}
            assert set(member_file_rows(dm.datasets[s], name)) == expected

    _, again = splits(0)
    assert again == first  # same seed, same split
    others = [splits(seed)[1] for seed in (1, 2, 3)]
    assert any(o["val"] != first["val"] or o["test"] != first["test"] for o in others)


def test_zero_val_fraction_means_no_val_loader(paired, caplog):
    dm = make_dm(paired, split_column=None, val_fraction=0.0, test_fraction=0.25)
    with caplog.at_level(logging.INFO, logger="unimodality"):
        dm.setup("fit")
    assert set(dm.datasets) == {"train"}
    # training without validation is a supported mode: said once, not warned (the CLI skips the loop)
    assert "no validation split: training without validation" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "split" in r.getMessage()]
    assert dm.without_validation
    assert dm.val_dataloader() == []
    assert len(dm.datasets["train"]) == len(paired.shared) - round(0.25 * len(paired.shared))
    dm.teardown("fit")
    with caplog.at_level(logging.WARNING, logger="unimodality"):
        dm.setup("validate")  # nothing to validate on: no dataset, an empty loader
    assert dm.datasets == {} and dm.val_dataloader() == []


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (1.0, 0.0), (0.5, 0.5), (0.1, 1.2)])
def test_invalid_fractions(paired, val, test):
    with pytest.raises(ValueError, match="val_fraction, test_fraction and their sum < 1"):
        make_dm(paired, split_column=None, val_fraction=val, test_fraction=test)


def test_no_training_keys(tmp_path):
    data = make_paired(tmp_path, edit_tx=lambda df: df.assign(split=df["split"].replace("train", "val")),
                       edit_ph=lambda df: df.assign(split=df["split"].replace("train", "val")))
    with pytest.raises(DataError, match="training split holds no perturbation"):
        make_dm(data).setup("fit")


# -- errors ----------------------------------------------------------------------------------------

def test_no_key_overlap_reports_counts(tmp_path):
    # concentrations written as text in one file never equal the numbers of the other
    def as_text(df):
        return df.assign(concentration=df["concentration"].map("{} uM".format))

    data = make_paired(tmp_path, edit_ph=as_text)
    n_tx, n_ph = len(data.rows["tx"]), len(data.rows["ph"])
    with pytest.raises(DataError, match=rf"no key \['smiles', 'concentration'\] is present in every modality "
                                        rf"\(tx: {n_tx} keys, ph: {n_ph} keys\).*types"):
        make_dm(data).setup("fit")


def test_missing_key_column_names_file(paired):
    dm = make_dm(paired, keys=["smiles", "dose"])
    with pytest.raises(DataError, match=r"tx\.h5ad: obs has no column\(s\) \['dose'\]"):
        dm.setup("fit")
    dm = make_dm(paired, keys=["smiles", "concentration"],
                 tx_kwargs={"key_columns": ["smiles", "concentration"]},
                 ph_kwargs={"key_columns": ["smiles", "dose"]})
    with pytest.raises(DataError, match=r"ph\.parquet: has no column\(s\) \['dose'\]"):
        dm.setup("fit")


def test_missing_key_value_names_file_and_rows(tmp_path):
    def edit(df):
        df["smiles"] = df["smiles"].astype(object)
        df.loc[[4, 9], "smiles"] = None
        return df

    data = make_paired(tmp_path, edit_ph=edit)
    with pytest.raises(DataError, match=r"ph\.parquet: 2 rows have no value in key column\(s\) "
                                        r"\['smiles', 'concentration'\] \(e\.g\. rows \[4, 9\]\)"):
        make_dm(data).setup("fit")


def test_fewer_train_keys_than_batch_size(paired):
    dm = make_dm(paired, batch_size=64)
    dm.setup("fit")
    n_train = len(paired.keys_in("train"))
    message = rf"training split has {n_train} perturbations, fewer than batch_size=64"
    with pytest.raises(DataError, match=message):
        dm.train_dataloader()
    assert len(list(dm.val_dataloader())) == 1  # evaluation may hold a partial batch


def test_constructor_checks(paired):
    with pytest.raises(ValueError, match="at least two modalities"):
        PairedDataModule({"tx": AnnDataSource(str(paired.tx))}, keys=KEYS)
    with pytest.raises(ValueError, match="at least one key column"):
        make_dm(paired, keys=[])


# -- stages ----------------------------------------------------------------------------------------

def test_setup_validate_reads_only_val_rows(paired):
    dm = make_dm(paired)
    dm.setup("validate")
    assert set(dm.datasets) == {"val"}
    val = dm.datasets["val"]
    for name in ("tx", "ph"):
        block = val.features[name]
        block = block.toarray() if sp.issparse(block) else block
        assert block.shape[0] == len(paired.rows_in(name, "val"))
        assert set(block[:, ROW].astype(int)) == paired.rows_in(name, "val")
    assert dm.train_dataloader() == []  # nothing built for training

    dm.setup("fit")  # adds train; val stays as it was
    assert set(dm.datasets) == {"train", "val"} and dm.datasets["val"] is val
    train_block = dm.datasets["train"].features["ph"]
    assert set(train_block[:, ROW].astype(int)) == paired.rows_in("ph", "train")

    dm.setup("validate")  # already there: nothing re-read
    assert dm.datasets["val"] is val

    dm.teardown("fit")
    assert dm.datasets == {}
    assert dm.val_dataloader() == []


def test_setup_test_stage_and_predict(paired):
    dm = make_dm(paired)
    dm.setup("test")
    assert set(dm.datasets) == {"test"}
    assert split_keys(dm)["test"] == paired.keys_in("test")
    assert len(list(dm.test_dataloader())) >= 1
    with pytest.raises(ValueError, match="EmbedDataModule"):
        dm.setup("predict")


def test_schema_describes_each_modality(paired):
    schema = make_dm(paired, tx_kwargs={"transform": "log1p"}).schema
    assert set(schema) == {"tx", "ph"}
    assert schema["tx"]["features"] == TX_FEATURES
    assert schema["tx"]["init_args"]["transform"] == "log1p"
    assert schema["ph"]["features"] == PH_FEATURES
    assert schema["ph"]["init_args"]["features"] == PH_FEATURES


# -- example data and workers ----------------------------------------------------------------------

def test_example_data(tmp_path):
    dm = PairedDataModule(
        {"tx": AnnDataSource("example://transcriptomics.h5ad", transform="normalize_log1p"),
         "ph": TableSource("example://phenomics.parquet", feature_prefix="feat_")},
        keys=KEYS, split_column="split", batch_size=32, eval_batch_size=50,
    )
    tx = ad.read_h5ad(resolve_path("example://transcriptomics.h5ad"))
    obs, n_genes = tx.obs, tx.n_vars
    ph = pq.read_table(resolve_path("example://phenomics.parquet")).to_pandas()
    n_ph_features = sum(c.startswith("feat_") for c in ph.columns)
    per_split = {s: set(zip(f["smiles"], f["concentration"])) for s, f in obs.groupby("split", observed=True)}

    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(per_split["train"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["tx"].shape == (32, n_genes) and batch["ph"].shape == (32, n_ph_features)
    assert batch[GROUP].shape == (32,) and len(set(batch[GROUP].tolist())) == 32
    assert torch.isfinite(batch["tx"]).all() and torch.isfinite(batch["ph"]).all()
    # normalize_log1p: each transcriptomics row sums to 10,000 counts
    totals = torch.expm1(batch["tx"].double()).sum(1)
    torch.testing.assert_close(totals, torch.full((32,), 1e4, dtype=torch.float64), rtol=1e-3, atol=0)
    val_batches = list(dm.val_dataloader())
    assert val_batches[0]["tx"].shape == (50, n_genes)
    n_val_rows = sum(len(b[GROUP]) for b in val_batches)
    assert n_val_rows == len(dm.datasets["val"]) >= len(per_split["val"])
    assert set(torch.cat([b[GROUP] for b in val_batches]).tolist()) == set(dm.datasets["val"].groups.tolist())
    assert len(dm.datasets["val"].groups) == len(per_split["val"])


def test_dataset_pickles_and_workers(paired):
    dm = make_dm(paired, batch_size=3, num_workers=2)
    dm.setup("fit")
    restored = pickle.loads(pickle.dumps(dm.datasets["val"]))
    for name in ("tx", "ph", GROUP):
        assert torch.equal(fetch_all(restored)[name], fetch_all(dm.datasets["val"])[name])

    loader = dm.train_dataloader()
    assert loader.num_workers == 2
    batches = list(loader)
    assert len(batches) == len(paired.keys_in("train")) // 3
    for batch in batches:
        assert_pairs_consistent(batch)
    seen = [k for b in batches for k in key_of(b)]
    assert len(seen) == len(set(seen)) and set(seen) <= paired.keys_in("train")

    val = list(dm.val_dataloader())
    joined = {name: torch.cat([b[name] for b in val]) for name in ("tx", "ph", GROUP)}
    full = fetch_all(dm.datasets["val"])
    for name, values in joined.items():
        assert torch.equal(values, full[name])

    plain = DataLoader(restored, batch_size=5, num_workers=2, collate_fn=collate_batch)
    assert sum(len(b[GROUP]) for b in plain) == len(restored)
    del loader, batches


# -- splits by named values (held-out experiments) --------------------------------------------------------

@pytest.fixture
def experiments(tmp_path, example_data_dir):
    """The example files with an ``experiment_id`` column: train rows in EXP1-3, val in EXP7, test in EXP8."""
    tx = ad.read_h5ad(resolve_path("example://transcriptomics.h5ad"))
    ph = pd.read_parquet(resolve_path("example://phenomics.parquet"))
    name = {"val": "EXP7", "test": "EXP8"}
    for frame in (tx.obs, ph):
        rows = np.arange(len(frame))
        frame["experiment_id"] = [name.get(s, f"EXP{1 + r % 3}") for s, r in zip(frame["split"], rows)]
    return tx, ph, tmp_path


def experiment_dm(tx, ph, folder, **kwargs) -> PairedDataModule:
    tx.write_h5ad(folder / "tx.h5ad")
    ph.to_parquet(folder / "ph.parquet")
    return PairedDataModule(
        modalities={"tx": AnnDataSource(str(folder / "tx.h5ad")),
                    "ph": TableSource(str(folder / "ph.parquet"), feature_prefix="feat_")},
        keys=["smiles", "concentration"], batch_size=32, **kwargs,
    )


def test_named_experiments_held_out_give_the_split_columns_splits(experiments):
    tx, ph, folder = experiments
    by_name = experiment_dm(tx, ph, folder, split_column="experiment_id",
                            split_values={"val": ["EXP7"], "test": ["EXP8"]})
    by_label = experiment_dm(tx, ph, folder, split_column="split")
    for dm in (by_name, by_label):
        dm.setup("fit")
        dm.setup("test")
    for split in ("train", "val", "test"):
        assert np.array_equal(np.unique(by_name.datasets[split].groups), np.unique(by_label.datasets[split].groups))
    assert len(np.unique(by_name.datasets["val"].groups)) > 1


def test_a_perturbation_in_a_held_out_and_a_training_experiment_is_an_error(experiments):
    tx, ph, folder = experiments
    val_row = int(np.flatnonzero(ph["experiment_id"] == "EXP7")[0])
    ph.loc[val_row, "experiment_id"] = "EXP1"  # one replicate of a val perturbation measured in a train experiment
    dm = experiment_dm(tx, ph, folder, split_column="experiment_id", split_values={"val": ["EXP7"]})
    with pytest.raises(DataError, match=r"more than one split"):
        dm.setup("fit")


def test_a_held_out_value_found_nowhere_is_an_error(experiments):
    tx, ph, folder = experiments
    dm = experiment_dm(tx, ph, folder, split_column="experiment_id", split_values={"val": ["EXP77"]})
    with pytest.raises(DataError, match=r"split_values names \['EXP77'\], found in no row of column 'experiment_id'"):
        dm.setup("fit")


@pytest.mark.parametrize("options, message", [
    ({"split_values": {"val": ["EXP7"]}}, "needs split_column"),
    ({"split_column": "experiment_id", "split_values": {"holdout": ["EXP7"]}}, r"names \['holdout'\]"),
    ({"split_column": "experiment_id", "split_values": {"val": ["EXP7"], "test": ["EXP7"]}}, "both val and test"),
])
def test_split_values_settings_are_checked(experiments, options, message):
    tx, ph, folder = experiments
    with pytest.raises(ValueError, match=message):
        experiment_dm(tx, ph, folder, **options)
