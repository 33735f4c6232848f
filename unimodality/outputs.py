"""Files scientists already use: embeddings (``.h5ad`` / parquet) written after predict, and the results
table written after test.

Predict under several processes: every process writes its rows to a shard next to the output, and the
first process merges the shards in input order once all are written; the output file appears (by rename
from a temporary name) only when it is complete.
"""

from __future__ import annotations

import datetime
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from unimodality.batch import INDEX
from unimodality.config import config_form
from unimodality.errors import DataError
from unimodality.files import atomic_write

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

OBSM_KEY = "X_unimodality"
#: key of the provenance record in an output AnnData's ``uns`` and in a parquet file's schema metadata
RECORD_KEY = "unimodality"
OUTPUT_SUFFIXES = (".h5ad", ".parquet")
#: inputs that are AnnData (their obs index is written as ``obs_names``)
ANNDATA_SUFFIXES = (".h5ad", ".zarr")


def check_output_path(output: str | Path, overwrite: bool = True) -> Path:
    """``output`` as a path, refused unless it ends in ``.h5ad`` or ``.parquet``, its folder exists and is
    writable, and (without ``overwrite``) no file has that name yet: checked before any work is done."""
    output = Path(output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise DataError(f"output {output}: unsupported extension; use .h5ad or .parquet")
    if not output.parent.is_dir():
        raise DataError(f"output {output}: the folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise DataError(f"output {output}: the folder {output.parent} is not writable")
    if output.exists() and not overwrite:
        raise DataError(f"output {output} already exists; pass --data.overwrite true to replace it")
    return output


def _atomic_write(output: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file in the same folder, renamed into place only once complete (see
    `unimodality.files.atomic_path`); the temporary name ends in the output's suffix, which some
    writers need (``np.savez`` appends ``.npz`` otherwise)."""
    atomic_write(output, write, suffix=output.suffix)


def write_embeddings(
    input_path: Path,
    metadata: pd.DataFrame,
    rows: np.ndarray,
    embedding: np.ndarray,
    output: Path,
    record: dict[str, Any] | None = None,
    copy_input: bool = False,
    obs_index: bool | None = None,
) -> Path:
    """Write ``embedding`` (one row per entry of ``rows`` of the input file).

    With ``copy_input`` and every row of an ``.h5ad`` input embedded, the ``.h5ad`` output is a file copy
    of the input with the embedding added (the matrix never in memory); otherwise it is rebuilt in memory.

    ``.h5ad``: a copy of the input AnnData (its rows ``rows``; obs, var and layers preserved) with
    ``obsm["X_unimodality"]`` (dense float32, aligned to ``obs_names``) and the provenance ``record`` in
    ``uns["unimodality"]``; a table input becomes an AnnData with its metadata as ``obs``.
    ``.parquet``: the metadata columns (key columns included; plus ``obs_names`` for AnnData input) and
    one column per embedding dimension, ``X_unimodality_0`` ..., with the record as JSON in the file's
    schema metadata (key ``unimodality``).

    Args:
        input_path: the file that was embedded.
        metadata: its metadata (obs or table columns) of ``rows``, in that order.
        rows: row numbers in the input file of the embedded rows.
        embedding: ``(len(rows), d)`` embeddings.
        output: ``.h5ad`` or ``.parquet`` path.
        record: provenance (checkpoint, model config, date, version); see `prediction_record`.
        obs_index: whether ``metadata``'s index is an AnnData ``obs`` index (kept as ``obs_names``); by
            default, when ``input_path`` is an AnnData file.
    """
    output = check_output_path(output)
    embedding = np.ascontiguousarray(embedding, dtype=np.float32)
    if len(embedding) != len(rows) or len(metadata) != len(rows):
        raise ValueError(f"{len(rows)} rows, {len(embedding)} embeddings and {len(metadata)} metadata rows differ")
    record = {**(record or {}), "input": str(input_path), "obsm_key": OBSM_KEY,
              "n_obs": int(len(rows)), "embedding_dim": int(embedding.shape[1])}
    whole_file = len(rows) and np.array_equal(rows, np.arange(len(rows)))
    # several input files (a folder or pattern naming them) are no AnnData to copy: obs + embeddings
    one_anndata = input_path.suffix in ANNDATA_SUFFIXES and input_path.exists()
    obs_index = one_anndata if obs_index is None else obs_index
    if output.suffix == ".h5ad" and copy_input and input_path.suffix == ".h5ad" and input_path.is_file() and whole_file:
        _atomic_write(output, lambda tmp: _copy_with_embedding(input_path, tmp, embedding, record))
    elif output.suffix == ".h5ad":
        import anndata as ad

        if one_anndata:
            adata = ad.read_h5ad(input_path) if input_path.suffix == ".h5ad" else ad.read_zarr(input_path)
            adata = adata[rows].copy() if len(rows) != adata.n_obs or np.any(rows != np.arange(len(rows))) else adata
        else:
            adata = ad.AnnData(obs=metadata.reset_index(drop=True).set_axis(metadata.index.astype(str)))
        adata.obsm[OBSM_KEY] = embedding
        adata.uns[RECORD_KEY] = {key: _h5ad_value(value) for key, value in record.items()}
        _atomic_write(output, adata.write_h5ad)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(metadata, preserve_index=False)
        if obs_index:
            arrow = arrow.add_column(0, "obs_names", pa.array(metadata.index.astype(str), pa.string()))
        # one contiguous row of the transposed embedding per column: arrow takes each without a copy (a
        # DataFrame of the embedding concatenated to the metadata copied both, a third of the write's time)
        for i, column in enumerate(np.ascontiguousarray(embedding.T)):
            arrow = arrow.append_column(f"{OBSM_KEY}_{i}", pa.array(column))
        arrow = arrow.replace_schema_metadata(
            {**(arrow.schema.metadata or {}), RECORD_KEY.encode(): json.dumps(record, default=str).encode()}
        )
        # dictionary-encoded metadata (repeated SMILES, plates), not the embedding: pyarrow's default tries a
        # dictionary for every column, in vain for floats (7x the write time, a file 1.5x as large)
        dictionary = arrow.column_names[:arrow.num_columns - embedding.shape[1]]
        _atomic_write(output, lambda tmp: pq.write_table(arrow, tmp, use_dictionary=dictionary))
    return output


def _copy_with_embedding(input_path: Path, tmp: Path, embedding: np.ndarray, record: dict[str, Any]) -> None:
    """The input ``.h5ad`` copied file to file, then the embedding and record written into the copy: the
    matrix is never loaded (files larger than memory)."""
    import h5py  # imported when used: the command's --help need not pay for it
    from anndata.io import write_elem

    shutil.copyfile(input_path, tmp)
    with h5py.File(tmp, "a") as f:
        for key in (f"obsm/{OBSM_KEY}", f"uns/{RECORD_KEY}"):
            if key in f:
                del f[key]
        write_elem(f, f"obsm/{OBSM_KEY}", embedding)
        write_elem(f, f"uns/{RECORD_KEY}", {key: _h5ad_value(value) for key, value in record.items()})


def _h5ad_value(value: Any) -> Any:
    """A value h5ad can store in ``uns``: strings and numbers as they are, anything else as JSON text."""
    if isinstance(value, str | bool | int | float | np.integer | np.floating):
        return value
    return json.dumps(value, default=str)


def read_parquet_record(path: str | Path) -> dict[str, Any]:
    """The provenance record of a parquet file written by ``unimodality predict`` (``{}`` if none)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(RECORD_KEY.encode())
    return json.loads(raw) if raw else {}


def prediction_record(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """Where embeddings come from: checkpoint path, model config (JSON), date (UTC), unimodality version.

    Args:
        trainer: the trainer that ran predict (its ``ckpt_path``).
        pl_module: the model (its config-form hyperparameters).
    """
    from unimodality import __version__

    try:
        model = config_form(dict(pl_module.hparams))
    except TypeError:  # a model whose hyperparameters hold objects: record what can be written
        model = {key: repr(value) for key, value in pl_module.hparams.items()}
    if isinstance(model, dict) and "_class_path" in model:  # the form a checkpoint stores: as a config
        model = {"class_path": model["_class_path"],
                 "init_args": {k: v for k, v in model.items() if not k.startswith("_")}}
    model = _without_schema(model)
    return {
        "checkpoint": str(Path(trainer.ckpt_path).resolve()) if trainer.ckpt_path else "",
        "model_config": json.dumps(model, default=str),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "unimodality_version": __version__,
    }


def _without_schema(model: Any) -> Any:
    """The model config without its schema (every feature name: thousands of genes), kept short."""
    if isinstance(model, dict):
        return {key: _without_schema(value) for key, value in model.items() if key != "schema"}
    return model


# -- predict: per-process shards merged in input order -------------------------------------------------------
def write_shard(folder: Path, rank: int, index: np.ndarray, embedding: np.ndarray) -> Path:
    """Write one process's rows (``index``: row numbers in the input) and embeddings into ``folder``."""
    path = folder / f"rank{rank:05d}.npz"
    _atomic_write(path, lambda tmp: np.savez(tmp, index=index, embedding=embedding))  # tmp ends in .npz
    return path


def merge_shards(folder: Path, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of every process's shard in input order, each row once.

    A distributed sampler pads the processes' shares to equal length by repeating rows: repeats are
    dropped (the first copy is kept).

    Args:
        folder: where `write_shard` wrote the shards.
        world_size: number of processes; a missing shard is an error.
    """
    paths = [folder / f"rank{rank:05d}.npz" for rank in range(world_size)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"prediction shards {missing} are missing in {folder}: a process failed; nothing written")
    indices, embeddings = [], []
    for path in paths:
        with np.load(path) as shard:
            if len(shard["index"]):
                indices.append(shard["index"])
                embeddings.append(shard["embedding"])
    if not indices:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return unique_in_order(np.concatenate(indices), np.concatenate(embeddings))


def unique_in_order(index: np.ndarray, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ``index`` values with the embedding of each one's first occurrence."""
    if np.all(index[1:] > index[:-1]):  # already sorted and unique (one process): no copy of the embeddings
        return index, embedding
    unique, first = np.unique(index, return_index=True)
    return unique, embedding[first]


class EmbeddingWriter(Callback):
    """Collects ``predict_step`` outputs (``index`` + ``embedding``) and hands them, from every process and
    in input order, to the datamodule's ``write_predictions``.

    With one process the rows go straight to the writer. With several, each process writes a shard
    (``.<output name>.shards-*/rank<r>.npz`` next to the output: the folder must be shared by every
    node), all wait for each other, and the first process merges the shards, writes the output and
    removes them.
    """

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._index: list[torch.Tensor] = []
        self._embedding: list[torch.Tensor] = []

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, dict) and INDEX in outputs:
            self._index.append(outputs[INDEX].detach().cpu())
            self._embedding.append(outputs["embedding"].detach().float().cpu())

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        write = getattr(trainer.datamodule, "write_predictions", None)
        if write is None:  # the same on every process: no collective call is skipped by one alone
            return
        index = torch.cat(self._index).numpy() if self._index else np.zeros(0, dtype=np.int64)
        embedding = torch.cat(self._embedding).numpy() if self._embedding else np.zeros((0, 0), dtype=np.float32)
        self._index, self._embedding = [], []
        record = prediction_record(trainer, pl_module)
        if trainer.world_size > 1:
            rows, embedding = self._merge_through_shards(trainer, index, embedding)
        else:
            rows, embedding = unique_in_order(index, embedding)
        if trainer.is_global_zero and len(rows):
            kwargs = {"record": record} if "record" in inspect.signature(write).parameters else {}
            write(rows, embedding, **kwargs)

    @staticmethod
    def _merge_through_shards(
        trainer: Trainer, index: np.ndarray, embedding: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        output = getattr(trainer.datamodule, "output", None)
        parent = Path(output).parent if output is not None else Path.cwd()
        folder = None
        if trainer.is_global_zero:
            parent.mkdir(parents=True, exist_ok=True)
            name = Path(output).name if output is not None else "predictions"
            folder = tempfile.mkdtemp(prefix=f".{name}.shards-", dir=parent)
        folder = Path(trainer.strategy.broadcast(folder, src=0))
        write_shard(folder, trainer.global_rank, index, embedding)
        trainer.strategy.barrier("unimodality-prediction-shards")
        if not trainer.is_global_zero:
            return np.zeros(0, dtype=np.int64), embedding[:0]
        try:
            return merge_shards(folder, trainer.world_size)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


# -- test: the results table ---------------------------------------------------------------------------------
def run_directory(trainer: Trainer, prefer_checkpoint: bool = True) -> Path | None:
    """Where a run's files go: the run directory of the checkpoint being evaluated (``RUN/checkpoints/X.ckpt``
    -> ``RUN``, when writable) or the logger's directory; ``None`` when there is neither.

    Calls ``trainer.log_dir``, a collective call under DDP: call it on every process.

    Args:
        trainer: the trainer (its ``ckpt_path`` and loggers).
        prefer_checkpoint: the checkpoint's run directory first (evaluation); else the logger's (training).
    """
    # with no logger Lightning's log_dir is default_root_dir, the working directory: not a run's directory
    log_dir = Path(trainer.log_dir) if trainer.loggers and trainer.log_dir is not None else None
    ckpt_path = getattr(trainer, "ckpt_path", None)
    checkpoint_run = None
    if ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        folder = Path(ckpt_path).resolve().parent.parent
        checkpoint_run = folder if os.access(folder, os.W_OK) else None
    first, second = (checkpoint_run, log_dir) if prefer_checkpoint else (log_dir, checkpoint_run)
    return first or second


_LEVELS = {"pert": "perturbation", "map": "replicate"}


def results_table(metrics: dict[str, float], stage: str = "test") -> pd.DataFrame:
    """One row per metric, with its chance level beside it where there is one.

    Columns: ``level`` (``row``: every evaluation row queries the other modality; ``perturbation``:
    replicates averaged; ``replicate``: within-modality replicate retrieval; empty for the loss),
    ``metric`` (``recall@k``, ``mrr``, ``map``, ``loss``), ``target`` (``a->b``, a modality, or ``mean``),
    ``value``, ``chance`` (a random ranking's expected value) and ``n`` (perturbations evaluated).

    Args:
        metrics: logged values, e.g. ``{"test/pert/recall@1/tx->ph": 0.4, "test/pert/chance@1": 0.025}``.
        stage: the prefix to read (``test`` or ``val``).
    """
    import pandas as pd

    prefix = f"{stage}/"
    ours = {key[len(prefix):]: float(value) for key, value in metrics.items() if key.startswith(prefix)}
    rows = []
    for name, value in ours.items():
        parts = name.split("/")
        if parts[0] == "pert" and len(parts) > 1 and parts[1].startswith(("chance", "count")):
            continue  # shown beside the values they are the chance of
        if parts[0] == "map" and len(parts) > 1 and parts[1] == "chance":
            continue
        level, parts = (_LEVELS[parts[0]], parts[1:]) if parts[0] in _LEVELS and len(parts) > 1 else ("", parts)
        if level == "replicate":
            metric, target = "map", parts[0]
        else:
            metric, target = parts[0], "/".join(parts[1:]) or "mean"
            if level == "" and re.fullmatch(r"recall@\d+", metric):
                level = "row"
        chance, n = math.nan, math.nan
        if level == "perturbation":
            chance_key = "pert/chance_mrr" if metric == "mrr" else f"pert/chance@{metric.split('@')[-1]}"
            chance = ours.get(chance_key, math.nan)
            n = ours.get("pert/count", math.nan)
        elif level == "replicate":
            chance = ours.get(f"map/chance/{target}", math.nan)
        rows.append({"level": level, "metric": metric, "target": target, "value": value, "chance": chance, "n": n})
    table = pd.DataFrame(rows, columns=["level", "metric", "target", "value", "chance", "n"])
    # perturbation level first; recall@k by k, then mrr, map, loss; the mean after the directions
    levels = {"perturbation": 0, "replicate": 1, "row": 2, "": 3}
    metric_rank = table["metric"].map(lambda m: int(m.split("@")[1]) if re.fullmatch(r"recall@\d+", m)
                                      else {"mrr": 10**6, "map": 10**6 + 1}.get(m, 10**7))
    keys = pd.DataFrame({"level": table["level"].map(levels), "metric": metric_rank,
                         "mean": table["target"] == "mean", "target": table["target"]})
    return table.loc[keys.sort_values(list(keys.columns), kind="stable").index].reset_index(drop=True)


class ResultsWriter(Callback):
    """After ``test`` (or ``validate``): the results table (`results_table`) as CSV and JSON in the run
    directory (`run_directory`, else the checkpoint's folder): ``test_results.csv`` / ``.json``, or
    ``test_results_<checkpoint name>.*`` when testing a checkpoint (so testing ``best`` and ``last`` keeps
    both); ``val_results*`` for ``validate``.

    Args:
        stage: ``test`` or ``val``: the metrics (``test/...``, ``val/...``) and the files' prefix.
    """

    def __init__(self, stage: str = "test") -> None:
        if stage not in ("test", "val"):
            raise ValueError(f"ResultsWriter: stage must be 'test' or 'val', got {stage!r}")
        self.stage = stage
        self.written: list[Path] = []

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stage == "test":
            self._write(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stage == "val" and not trainer.sanity_checking:
            self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        folder = run_directory(trainer)  # collective: every process takes part
        if folder is None and trainer.ckpt_path and os.access(Path(trainer.ckpt_path).resolve().parent, os.W_OK):
            folder = Path(trainer.ckpt_path).resolve().parent  # a checkpoint outside a run directory: beside it
        if not trainer.is_global_zero or folder is None:
            return
        prefix = f"{self.stage}/"
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith(prefix)}
        if not metrics:
            return
        stem = f"{self.stage}_results" + (f"_{Path(trainer.ckpt_path).stem}" if trainer.ckpt_path else "")
        table = results_table(metrics, self.stage)
        from unimodality import __version__

        document = {
            "checkpoint": str(Path(trainer.ckpt_path).resolve()) if trainer.ckpt_path else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "unimodality_version": __version__,
            "metrics": metrics,
            "table": json.loads(table.to_json(orient="records")),  # NaN -> null
        }
        csv, js = folder / f"{stem}.csv", folder / f"{stem}.json"
        _atomic_write(csv, lambda tmp: table.to_csv(tmp, index=False))
        _atomic_write(js, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
        self.written = [csv, js]
        what = "Validation" if self.stage == "val" else "Test"
        print(f"\n{what} results written to {csv} and {js.name}", flush=True)
