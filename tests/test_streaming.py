"""Streaming training data: stores read the right rows, epochs are disjoint equal shards, memory is bounded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from tests.helpers import example_datamodule, quiet_trainer
from unimodality.datamodule import GROUP
from unimodality.plugins.datamodules.paired import PairedDataModule
from unimodality.plugins.datamodules.single import SingleDataModule
from unimodality.plugins.encoders.mlp import MLPEncoder
from unimodality.plugins.setups.cross_modal import CrossModalSetup
from unimodality.plugins.sources.anndata import AnnDataSource
from unimodality.plugins.sources.table import TableSource
from unimodality.sources import DataError
from unimodality.streaming import BufferSampler, H5Store, NpyStore, epoch_plan, open_store, table_cache

ROOT = Path(__file__).resolve().parents[1]


# -- the epoch plan ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_plan_shards_are_disjoint_equal_and_cover_the_data(world):
    n, batch, block, buffers = 1003, 16, 8, 4
    plans = [epoch_plan(n, batch, block, buffers, seed=0, epoch=0, rank=r, world=world) for r in range(world)]
    rows = [np.concatenate(p) for p in plans]
    assert len({len(r) for r in rows}) == 1  # equal length: no rank waits for another at the end
    assert len(rows[0]) % batch == 0 and len(rows[0]) == (n // (world * batch)) * batch
    everything = np.concatenate(rows)
    assert len(np.unique(everything)) == len(everything)  # no row twice in an epoch
    assert n - len(everything) < world * batch  # only the remainder is left out
    assert all(len(b) % batch == 0 and len(b) <= buffers * batch for p in plans for b in p)
    # each buffer is made of few contiguous runs: rows are read in blocks
    for buffer in plans[0]:
        runs = 1 + np.count_nonzero(np.diff(np.sort(buffer)) != 1)
        assert runs <= len(buffer) // block + 2


def test_epoch_plan_reshuffles_each_epoch_and_follows_the_seed():
    plan = partial(epoch_plan, 500, 10, 5, 3, rank=0, world=1)
    first, again = plan(seed=1, epoch=0), plan(seed=1, epoch=0)
    second, other = plan(seed=1, epoch=1), plan(seed=2, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other))
    # left-over rows differ between epochs, so every row is trained on over a few epochs
    seen = set(np.concatenate(first)) | set(np.concatenate(second)) | set(np.concatenate(plan(seed=1, epoch=2)))
    assert seen == set(range(500))


# -- stores ------------------------------------------------------------------------------------------------

@pytest.fixture
def matrix_files(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    dense = (rng.random((300, 40)) * (rng.random((300, 40)) < 0.3)).astype(np.float32)
    obs = pd.DataFrame({"key": [f"k{i // 3}" for i in range(300)], "split": "train"},
                       index=[f"c{i}" for i in range(300)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(40)])
    files = {}
    for name, X in (("dense", dense), ("csr", sp.csr_matrix(dense)), ("csc", sp.csc_matrix(dense))):
        files[name] = tmp_path / f"{name}.h5ad"
        ad.AnnData(X=X, obs=obs, var=var).write_h5ad(files[name])
    table = pd.DataFrame(dense, columns=[f"feat_{j}" for j in range(40)])
    table.insert(0, "key", obs["key"].to_numpy())
    files["parquet"] = tmp_path / "table.parquet"
    table.to_parquet(files["parquet"], row_group_size=64)
    files["dense_array"] = dense
    return files


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_h5_store_reads_rows_in_the_order_asked(matrix_files, kind):
    store = open_store(AnnDataSource(str(matrix_files[kind])))
    assert isinstance(store, H5Store) and (store.n_rows, store.n_features) == (300, 40)
    rows = np.array([0, 3, 4, 5, 30, 77, 150, 151, 299])  # runs, small and large gaps
    got = store.read_rows(rows)
    got = got.toarray() if sp.issparse(got) else got
    np.testing.assert_array_equal(got, matrix_files["dense_array"][rows])
    np.testing.assert_array_equal(
        np.asarray(store.read_range(10, 20).todense() if kind == "csr" else store.read_range(10, 20)),
        matrix_files["dense_array"][10:20],
    )


def test_csc_cannot_be_streamed(matrix_files):
    with pytest.raises(DataError, match="csc_matrix; streaming reads rows, so it needs CSR"):
        open_store(AnnDataSource(str(matrix_files["csc"])))


def test_table_cache_is_built_once_and_rebuilt_when_the_file_changes(matrix_files, tmp_path):
    source = TableSource(str(matrix_files["parquet"]), feature_prefix="feat_")
    cache = table_cache(source, tmp_path / "cache")
    store = NpyStore(cache)
    np.testing.assert_array_equal(store.read_rows(np.array([1, 5, 200])), matrix_files["dense_array"][[1, 5, 200]])
    built = cache.stat().st_mtime_ns
    assert table_cache(source, tmp_path / "cache").stat().st_mtime_ns == built  # reused
    # the source changes: the cache follows
    table = pd.read_parquet(matrix_files["parquet"])
    table["feat_0"] = -1.0
    table.to_parquet(matrix_files["parquet"])
    fresh = NpyStore(table_cache(TableSource(str(matrix_files["parquet"]), feature_prefix="feat_"), tmp_path / "cache"))
    assert np.all(fresh.read_range(0, 300)[:, 0] == -1.0)
    # another feature selection is another cache content
    narrow = NpyStore(table_cache(TableSource(str(matrix_files["parquet"]), features=["feat_3", "feat_1"]),
                                  tmp_path / "cache"))
    np.testing.assert_array_equal(narrow.read_range(0, 300), matrix_files["dense_array"][:, [3, 1]])
    meta = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert meta["n_features"] == 2


# -- datasets and loaders --------------------------------------------------------------------------------

def epoch_rows(data: SingleDataModule, num_workers: int, epoch: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    dataset = data.datasets["train"]
    dataset.shard(rank, world)
    sampler = BufferSampler(dataset, num_replicas=world, rank=rank, num_workers=num_workers)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers, collate_fn=lambda b: b)
    return [batch[GROUP].numpy() for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_single_streaming_epochs_with_workers_and_ranks(matrix_files, num_workers):
    """Rows are their own groups here, so batches name the rows they hold."""
    data = SingleDataModule(AnnDataSource(str(matrix_files["csr"])), val_fraction=0.0, test_fraction=0.0,
                            batch_size=16, streaming=True, block_size=8, buffer_batches=3)
    data.setup("fit")
    per_rank = [epoch_rows(data, num_workers, epoch=0, rank=r, world=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 300 // 32
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(np.unique(seen)) == len(seen) == (300 // 32) * 32
    expected = np.concatenate([np.concatenate(epoch_plan(300, 16, 8, 3, 0, 0, r, 2)) for r in range(2)])
    assert sorted(seen) == sorted(expected)  # workers serve exactly the planned rows
    # features are those of the rows the batch names
    batch = data.datasets["train"][(0, 0, 0)]
    np.testing.assert_array_equal(batch["x"].numpy(), matrix_files["dense_array"][batch[GROUP].numpy()])
    next_epoch = np.concatenate(epoch_rows(data, num_workers, epoch=1))
    assert not np.array_equal(next_epoch, np.concatenate(epoch_rows(data, num_workers, epoch=0)))


def served(data: SingleDataModule, num_workers: int, epoch: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, features) of each batch an epoch's DataLoader serves."""
    dataset = data.datasets["train"]
    dataset.shard(0, 1)
    sampler = BufferSampler(dataset, num_replicas=1, rank=0, num_workers=num_workers)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers, collate_fn=lambda b: b)
    return [(batch[GROUP].numpy(), batch["x"].numpy()) for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_next_buffer_is_read_ahead_and_serves_what_a_read_in_place_serves(matrix_files, num_workers,
                                                                            monkeypatch):
    from unimodality.streaming import StreamingDataset

    data = SingleDataModule(AnnDataSource(str(matrix_files["csr"])), val_fraction=0.0, test_fraction=0.0,
                            batch_size=16, streaming=True, block_size=8, buffer_batches=3)
    data.setup("fit")
    readers: list[str] = []
    read_buffer = StreamingDataset._read_buffer

    def recording(self, epoch, k):
        readers.append(threading.current_thread().name)
        return read_buffer(self, epoch, k)

    monkeypatch.setattr(StreamingDataset, "_read_buffer", recording)
    ahead = served(data, num_workers)
    if num_workers == 0:  # every buffer but the first was read by the read-ahead thread
        assert len(readers) == 6 and readers[0] == threading.current_thread().name
        assert all(name.startswith("unimodality-read-ahead") for name in readers[1:]), readers
    monkeypatch.setattr(StreamingDataset, "_read_ahead", lambda self, epoch, k: None)
    in_place = served(data, num_workers)
    assert len(ahead) == len(in_place) == 300 // 16
    for (rows, x), (rows_in_place, x_in_place) in zip(ahead, in_place):
        np.testing.assert_array_equal(rows, rows_in_place)
        np.testing.assert_array_equal(x, x_in_place)
        np.testing.assert_array_equal(x, matrix_files["dense_array"][rows])


@pytest.mark.parametrize("replicas, num_workers", [(1, 0), (2, 0), (1, 2)], ids=["one", "ddp-rank", "workers"])
def test_streamed_predict_rows_are_read_ahead_and_are_the_rows_asked_for(matrix_files, replicas, num_workers,
                                                                        monkeypatch):
    """Predict's batches step through the kept rows (by one, by the processes under DDP, by the workers'
    turns): each is read while the one before is embedded, and holds the file rows it says it holds."""
    from torch.utils.data import BatchSampler, DistributedSampler

    from unimodality.batch import INDEX, collate_batch
    from unimodality.plugins.datamodules.embed import EmbedDataset, StreamedRows

    source = AnnDataSource(str(matrix_files["csr"]), transform="none")
    names = source.feature_names()
    rows = np.flatnonzero(np.arange(300) % 3 != 1)  # as a filter leaves them: positions are not file rows
    readers: list[str] = []
    read = StreamedRows._read

    def recording(self, positions):
        readers.append(threading.current_thread().name)
        return read(self, positions)

    monkeypatch.setattr(StreamedRows, "_read", recording)
    dataset = EmbedDataset("x", StreamedRows(source, source.row_store(), names, names, rows), rows)
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=replicas - 1, shuffle=False)
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, 16, drop_last=False),
                        num_workers=num_workers, collate_fn=collate_batch)
    batches = list(loader)
    assert len(batches) == -(-len(rows) // replicas // 16)
    for batch in batches:
        np.testing.assert_array_equal(batch["x"].numpy(), matrix_files["dense_array"][batch[INDEX].numpy()])
    served = np.concatenate([batch[INDEX].numpy() for batch in batches])
    np.testing.assert_array_equal(served, rows[list(sampler)])
    if num_workers == 0:  # the first batch read in place, every later one by the thread, none read twice
        assert len(readers) == len(batches) and readers[0] == threading.current_thread().name, readers
        assert all(name.startswith("unimodality-read-ahead") for name in readers[1:]), readers


def test_a_bad_row_read_ahead_fails_when_its_buffer_is_served(tmp_path):
    """The read-ahead thread's error is raised in the training process, at the batch a read in place
    would have raised it (the batches before are served)."""
    X = np.ones((96, 4), dtype=np.float32)
    X[90, 2] = np.nan
    ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(96)])).write_h5ad(tmp_path / "n.h5ad")
    data = SingleDataModule(AnnDataSource(str(tmp_path / "n.h5ad")), val_fraction=0.0, test_fraction=0.0,
                            batch_size=8, streaming=True, block_size=96, buffer_batches=6)  # buffers: rows 0-47, 48-95
    data.setup("fit")
    dataset = data.datasets["train"]
    sampler = BufferSampler(dataset, num_replicas=1, rank=0, num_workers=0)
    first = [dataset[item] for item in list(sampler)[:6]]  # buffer 0, while buffer 1 is read ahead
    assert len(first) == 6 and dataset._ahead.pending
    with pytest.raises(DataError, match=r"n\.h5ad: .*row 90"):
        dataset[list(sampler)[6]]


def test_paired_streaming_pairs_replicates_of_the_same_key(tmp_path):
    """Each modality's first feature is its row's key id: a correct pairing puts equal values side by side."""
    rng = np.random.default_rng(1)
    key_a, key_b = np.repeat(np.arange(60), 4), rng.permutation(np.repeat(np.arange(60), 3))
    a = np.column_stack([key_a, rng.normal(size=(240, 5))]).astype(np.float32)
    b = np.column_stack([key_b, rng.normal(size=(180, 3))]).astype(np.float32)
    ad.AnnData(X=sp.csr_matrix(a), obs=pd.DataFrame({"key": key_a.astype(str)}, index=[f"a{i}" for i in range(240)]),
               var=pd.DataFrame(index=[f"f{j}" for j in range(6)])).write_h5ad(tmp_path / "a.h5ad")
    table = pd.DataFrame(b, columns=[f"feat_{j}" for j in range(4)])
    table["key"] = key_b.astype(str)
    table.to_parquet(tmp_path / "b.parquet")
    data = PairedDataModule(
        {"a": AnnDataSource(str(tmp_path / "a.h5ad")), "b": TableSource(str(tmp_path / "b.parquet"),
                                                                         feature_prefix="feat_")},
        keys=["key"], val_fraction=0.2, test_fraction=0.0, batch_size=8, streaming=True, block_size=4,
        buffer_batches=2, cache_dir=str(tmp_path / "cache"),
    )
    data.prepare_data()
    data.setup("fit")
    train = data.datasets["train"]
    assert train.name == "a"  # the larger file is streamed
    assert len(train) == 4 * 48  # every replicate of the 48 training keys
    for epoch in (0, 1):
        for batch in epoch_rows_full(train, epoch):
            np.testing.assert_array_equal(batch["a"][:, 0], batch["b"][:, 0])
    # validation stays in memory, and holds other keys
    assert type(data.datasets["val"]).__name__ == "PairedDataset"
    assert len(np.intersect1d(train.groups, data.datasets["val"].groups)) == 0


def epoch_rows_full(dataset, epoch):
    dataset.shard(0, 1)
    sampler = BufferSampler(dataset, num_replicas=1, rank=0, num_workers=0)
    sampler.set_epoch(epoch)
    return [dataset[item] for item in sampler]


def test_streaming_trains_like_in_memory(example_data_dir, tmp_path):
    """The same model learns from streamed data: CLIP on the example data reaches similar recall."""
    results = {}
    for streaming in (False, True):
        torch.manual_seed(0)
        data = example_datamodule(batch_size=32, streaming=streaming, cache_dir=str(tmp_path / "cache"))
        model = CrossModalSetup(
            encoders={"tx": partial(MLPEncoder, hidden_sizes=[256]), "ph": partial(MLPEncoder, hidden_sizes=[256])},
            embed_dim=64,
        )
        # the same number of steps (a streamed epoch has a step per transcriptomics row, not per perturbation)
        trainer = quiet_trainer(max_epochs=-1, max_steps=100, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=data)
        results[streaming] = quiet_trainer().validate(model, datamodule=data, verbose=False)[0]["val/recall@10"]
    assert results[True] > 0.4 and results[False] > 0.4  # chance: 10 of the 40 validation perturbations
    assert abs(results[True] - results[False]) < 0.2


def test_streaming_under_ddp_two_processes(example_data_dir, tmp_path):
    """Two gloo processes stream disjoint equal shards and finish every epoch (no hang at the end)."""
    result = subprocess.run(
        [sys.executable, "-m", "unimodality", "fit", "--config", str(ROOT / "configs" / "clip.yaml"),
         "--config", str(ROOT / "configs" / "trainer" / "ddp.yaml"), "--trainer.accelerator", "cpu",
         "--trainer.devices", "2", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
         "--data.streaming", "true", "--data.num_workers", "1", "--data.cache_dir", str(tmp_path / "cache"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")],
        cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pd.read_csv(next((tmp_path / "runs").rglob("metrics.csv")))
    assert metrics["epoch"].max() == 1 and metrics["val/recall@1"].notna().sum() == 2


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from unimodality.plugins.datamodules.single import SingleDataModule
    from unimodality.plugins.sources.anndata import AnnDataSource
    from unimodality.streaming import BufferSampler

    def hwm():  # peak resident memory so far, bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    path, streaming = sys.argv[1], sys.argv[2] == "1"
    data = SingleDataModule(AnnDataSource(path, transform="log1p"), val_fraction=0.0, test_fraction=0.0,
                            batch_size=256, streaming=streaming, block_size=64, buffer_batches=8)
    start = hwm()
    data.setup("fit")
    loader = data.train_dataloader()
    base = hwm()
    total = 0
    for batch in loader:
        total += float(batch["x"][:, 0].sum())
    print(json.dumps({"start": start, "base": base, "peak": hwm(), "buffer": 8 * 256 * 2000 * 4}))
""")


def test_streaming_memory_stays_within_four_buffers(tmp_path):
    """A 160 MB dense file: streaming holds two buffers (16 MB each: the one served and the next, read
    ahead) over the baseline, and up to about 3.5 while a read selects its rows from the runs it read;
    reading it all into memory holds the file's size."""
    X = np.random.default_rng(0).random((20000, 2000), dtype=np.float32)
    ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(20000)])).write_h5ad(tmp_path / "big.h5ad")
    del X
    figures = {}
    for streaming in ("1", "0"):
        result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "big.h5ad"), streaming],
                                capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        figures[streaming] = json.loads(result.stdout.strip().splitlines()[-1])
    streamed, loaded = figures["1"], figures["0"]
    assert streamed["base"] - streamed["start"] < streamed["buffer"], streamed  # setup reads no features
    assert streamed["peak"] - streamed["base"] <= 4 * streamed["buffer"], streamed
    assert loaded["peak"] - loaded["start"] >= 160e6  # the contrast: the in-memory path holds the file


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> Path:
    from unimodality.cli import main

    root = tmp_path_factory.mktemp("streaming-predict")
    with redirect_stdout(io.StringIO()):
        main(["fit", "--config", str(ROOT / "configs" / "clip.yaml"), "--trainer.max_epochs", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root)])
    return next(root.rglob("last.ckpt"))


KEEP_TWO_REPLICATES = '{"include": {"replicate": [1, 3]}}'  # rows of the file left out between those kept


@pytest.mark.parametrize("file, suffix, options", [
    ("example://transcriptomics.h5ad", ".h5ad", None),
    ("example://transcriptomics.h5ad", ".parquet", None),
    ("example://phenomics.parquet", ".parquet", None),
    ("example://transcriptomics.h5ad", ".h5ad", KEEP_TWO_REPLICATES),
    ("example://transcriptomics.h5ad", ".parquet", KEEP_TWO_REPLICATES),
    ("example://phenomics.parquet", ".parquet", KEEP_TWO_REPLICATES),
], ids=["h5ad", "h5ad-parquet", "parquet", "h5ad-filtered", "h5ad-parquet-filtered", "parquet-filtered"])
def test_streaming_predict_writes_what_in_memory_predict_writes(clip_checkpoint, tmp_path, file, suffix, options):
    from unimodality.cli import main
    from unimodality.outputs import OBSM_KEY

    outputs = {}
    for streaming in ("false", "true"):
        outputs[streaming] = tmp_path / f"{streaming}{suffix}"
        with redirect_stdout(io.StringIO()):
            main(["predict", "--ckpt_path", str(clip_checkpoint), "--data.path", file, "--data.output",
                  str(outputs[streaming]), "--data.streaming", streaming, "--data.batch_size", "100",
                  "--data.cache_dir", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false",
                  *(() if options is None else ("--data.source_options", options))])
    if options is not None:  # the filter kept some rows, not all: streaming must embed those rows, not the first ones
        kept = pd.read_parquet(outputs["true"]) if suffix == ".parquet" else ad.read_h5ad(outputs["true"]).obs
        assert set(kept["replicate"]) == {1, 3}
    if suffix == ".h5ad":
        memory, streamed = (ad.read_h5ad(outputs[s]) for s in ("false", "true"))
        np.testing.assert_allclose(streamed.obsm[OBSM_KEY], memory.obsm[OBSM_KEY], atol=1e-6)
        assert list(streamed.obs_names) == list(memory.obs_names)
        assert (streamed.X != memory.X).nnz == 0  # the copy keeps the counts as they were
        assert streamed.uns["unimodality"]["modality"] == "tx"
    else:
        memory, streamed = (pd.read_parquet(outputs[s]) for s in ("false", "true"))
        pd.testing.assert_frame_equal(streamed, memory, atol=1e-6)


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_predict_embeds_plates_like_the_single_file(clip_checkpoint, tmp_path, streaming):
    from tests.test_sharded_anndata import split_into_files
    from unimodality.cli import main
    from unimodality.outputs import OBSM_KEY
    from unimodality.paths import resolve_path

    whole = ad.read_h5ad(resolve_path("example://transcriptomics.h5ad"))
    plates = split_into_files(whole, tmp_path / "plates", 4)

    def predict(path: str, output: Path) -> Path:
        with redirect_stdout(io.StringIO()):
            main(["predict", "--ckpt_path", str(clip_checkpoint), "--data.path", path, "--data.output", str(output),
                  "--data.streaming", streaming, "--data.batch_size", "100", "--trainer.enable_progress_bar", "false"])
        return output

    single = pd.read_parquet(predict("example://transcriptomics.h5ad", tmp_path / "single.parquet"))
    sharded = pd.read_parquet(predict(str(tmp_path / "plates" / "plate_*.h5ad"), tmp_path / "plates.parquet"))
    pd.testing.assert_frame_equal(sharded, single, atol=1e-6, check_categorical=False)  # category order aside
    assert list(sharded["obs_names"]) == list(whole.obs_names)
    stacked = ad.read_h5ad(predict(str(plates[0].parent), tmp_path / "plates.h5ad"))  # obs + embeddings, no matrix
    assert list(stacked.obs_names) == list(whole.obs_names) and stacked.n_vars == 0
    np.testing.assert_allclose(stacked.obsm[OBSM_KEY], single.filter(like=f"{OBSM_KEY}_").to_numpy(), atol=1e-6)
    before = plates[2].read_bytes()
    with pytest.raises(SystemExit):  # an output that is one of the inputs
        with redirect_stdout(io.StringIO()):
            main(["predict", "--ckpt_path", str(clip_checkpoint), "--data.path", str(plates[0].parent),
                  "--data.output", str(plates[2]), "--data.overwrite", "true"])
    assert plates[2].read_bytes() == before
