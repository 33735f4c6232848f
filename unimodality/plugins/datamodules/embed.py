"""Embedding new data of one modality with a trained model (the data of ``unimodality predict``)."""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from unimodality import trust
from unimodality.datamodule import INDEX, DataModule, check_sizes, collate_batch, take_rows
from unimodality.errors import DataError
from unimodality.outputs import ANNDATA_SUFFIXES, OBSM_KEY, check_output_path, write_embeddings
from unimodality.paths import resolve_path, same_file
from unimodality.plugins.sources.anndata import AnnDataSource, anndata_files
from unimodality.plugins.sources.formats import source_for
from unimodality.plugins.sources.table import TableSource
from unimodality.sources import Matrix, ModalitySource, align_features
from unimodality.streaming import NpyStore, ReadAhead, table_cache

log = logging.getLogger(__name__)
#: settings every source has: kept when a file of another format is read for a tower (see ``_source_for_file``)
SHARED_SETTINGS = ("key_columns", "transform", "include", "exclude", "metadata_features")


class EmbedDataset(Dataset):
    """Rows of one modality with their row number in the input file."""

    def __init__(self, modality: str, features: Matrix, rows: np.ndarray) -> None:
        self.modality = modality
        self.features = features
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices)
        if (len(indices) and (isinstance(self.features, np.ndarray) or sp.issparse(self.features))
                and indices[-1] - indices[0] == len(indices) - 1 and np.all(np.diff(indices) == 1)):
            # a run of rows (predict's batches): a slice, not the gather of a list of rows
            indices = slice(int(indices[0]), int(indices[-1]) + 1)
        return {self.modality: take_rows(self.features, indices), INDEX: torch.from_numpy(self.rows[indices])}


class StreamedRows:
    """Rows of a file read from disk batch by batch (``take``), aligned by name to the model's features.

    For files larger than memory: nothing but the row pointers of a CSR matrix is held. Indexed like the
    in-memory matrix it stands for: position ``i`` is file row ``rows[i]`` (the rows filters keep). While a
    batch is embedded, the batch asked for next is read in a thread (`unimodality.streaming.ReadAhead`).
    """

    def __init__(self, source: ModalitySource, store: Any, names: list[str], align_to: list[str],
                 rows: np.ndarray) -> None:
        self.source = source
        self.store = store
        self.names = names
        self.align_to = align_to
        self.rows = rows
        self.ahead = ReadAhead()
        # the alignment is checked (and a missing-features warning given) once, not per batch
        align_features(np.zeros((0, len(names)), np.float32), names, align_to, source.file)

    def take(self, positions: np.ndarray) -> torch.Tensor:
        positions = np.asarray(positions)
        batch = self.ahead.take(positions.tobytes(), self._read, positions)
        following = self._following(positions)
        if following is not None:
            self.ahead.start(following.tobytes(), self._read, following)
        return batch

    def _read(self, positions: np.ndarray) -> torch.Tensor:
        unique, where = np.unique(self.rows[positions], return_inverse=True)
        raw = self.store.read_rows(unique)
        if self.names != self.align_to:
            raw = align_features(raw, self.names, self.align_to, self.source.file, warn_missing=False)
        return take_rows(self.source.finish(raw, unique, self.align_to, empty_rows="warn"), where)

    def _following(self, positions: np.ndarray) -> np.ndarray | None:
        """The positions this process (or DataLoader worker) will be asked for next, when its batches step
        evenly through the rows as predict's do (by 1, or by the number of processes under DDP): the same
        pattern, moved on past the batches the other workers serve in between."""
        if len(positions) < 2:
            return None
        step = int(positions[1] - positions[0])
        if step <= 0 or not np.all(np.diff(positions) == step):
            return None
        info = torch.utils.data.get_worker_info()
        following = positions + step * len(positions) * (info.num_workers if info is not None else 1)
        following = following[following < len(self.rows)]
        return following if len(following) else None

    def close(self) -> None:
        """Let a read still running finish before the store goes."""
        self.ahead.discard()


class EmbedDataModule(DataModule):
    """One file of one modality, read the way the model's training data was read.

    The model's checkpoint records, per modality, how its files were read (source class and settings)
    and the feature names it was trained on. Features are aligned by name: another column order or a
    subset works; features the file lacks are zero-filled (with a warning counting them), and a file
    sharing no feature with the model is an error.

    Args:
        path: the file to embed (``.h5ad`` or a table); or several ``.h5ad`` files read as one (a folder, a
            glob pattern, a list), embedded into one output.
        modality: which tower embeds it; by default the only modality whose training files had this
            file's type.
        output: where to write the embeddings: ``.h5ad`` (a copy of the input with
            ``obsm["X_unimodality"]``; for several input files, their stacked ``obs`` with the embeddings and
            no matrix) or ``.parquet`` (metadata + embedding columns). Default:
            ``<input name>_embeddings.h5ad|.parquet`` in the working directory (``.parquet`` for several files).
        n_samples: embed only the first ``n_samples`` rows (a quick look at a large file).
        overwrite: replace ``output`` if it exists (by default an existing file is an error, left untouched).
        streaming: read the rows batch by batch instead of the whole file (files larger than memory; feature
            vectors only). An ``.h5ad`` is read in place; a table is first converted to a cache in
            ``cache_dir`` (see ``PairedDataModule``). An ``.h5ad`` output is then a file copy of the input
            with the embeddings added, never the whole matrix in memory.
        cache_dir: where tables are cached when streaming.
        source_options: settings of the modality's source that replace those recorded in the checkpoint,
            for a file laid out differently, e.g. ``{"smiles_column": "canonical_smiles", "invalid": "drop"}``
            or ``{"key_columns": null}``. Settings that change the features (transforms) are best left alone.
        batch_size: rows per forward pass.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        path: str | list[str],
        modality: str | None = None,
        output: str | None = None,
        n_samples: int | None = None,
        source_options: dict[str, Any] | None = None,
        overwrite: bool = False,
        streaming: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 512,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_sizes("EmbedDataModule", n_samples=n_samples, batch_size=batch_size)
        self.path = path
        self.modality = modality
        self.n_samples = n_samples
        self.source_options = dict(source_options or {})
        self.streaming = streaming
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.output = self._output_path(path, output, overwrite)
        self.written: Path | None = None
        self.dataset: EmbedDataset | None = None
        self.source: ModalitySource | None = None

    @staticmethod
    def _output_path(path: str | list[str], output: str | None, overwrite: bool) -> Path | None:
        """The output file, checked before any work is done (see ``output``)."""
        several = source_for(path) is AnnDataSource and AnnDataSource(path).is_sharded
        inputs = anndata_files(path) if several else [resolve_path(path)]
        if output is None:
            name = resolve_path(path[0] if isinstance(path, list | tuple) else path)
            name = name.parent if glob.has_magic(str(name)) or isinstance(path, list | tuple) else name
            suffix = ".h5ad" if name.suffix in ANNDATA_SUFFIXES and not several else ".parquet"
            output = str(Path.cwd() / f"{name.name.split('.')[0]}_embeddings{suffix}")
        checked = check_output_path(output, overwrite=overwrite)
        for file in inputs:
            if same_file(checked, file):
                raise DataError(f"output {output} is the input file {file}: predict never writes over its input, "
                                "even with --data.overwrite true; choose another --data.output")
        return checked

    @property
    def schema(self) -> dict[str, dict[str, Any]]:
        raise RuntimeError("EmbedDataModule reads data for a trained model; it cannot define a new model")

    def _choose(self, schema: dict[str, dict[str, Any]]) -> str:
        if self.modality is not None:
            if self.modality not in schema:
                raise ValueError(f"data.modality={self.modality!r}: the model has towers {sorted(schema)}")
            return self.modality
        if len(schema) == 1:  # a single-modality model (SimCLR): its one tower
            return next(iter(schema))
        reader = source_for(self.path)
        matches = [name for name, entry in schema.items() if entry["class_path"].endswith(reader.__name__)]
        if len(matches) != 1:
            raise ValueError(
                f"{self.path}: cannot tell which tower embeds it (model towers: "
                f"{ {n: e['class_path'].rsplit('.', 1)[-1] for n, e in schema.items()} }); set data.modality"
            )
        return matches[0]

    def setup(self, stage: str) -> None:
        if stage != "predict":
            raise ValueError("EmbedDataModule serves predict only; train with a datamodule such as PairedDataModule")
        model = self.trainer.lightning_module if self.trainer is not None else None
        schema = getattr(model, "schema", None)
        if not schema:
            raise RuntimeError("the model has no data schema: predict with a checkpoint of a trained model")
        name = self._choose(schema)
        entry = schema[name]
        cls_name = entry["class_path"].rsplit(".", 1)[-1]
        source_cls = trust.check_class(entry["class_path"], "source", "the checkpoint", f"schema.{name}.class_path",
                                       imports=False)
        unknown = sorted(set(self.source_options) - set(entry["init_args"]))
        if unknown:
            raise ValueError(
                f"data.source_options names {unknown}, not settings of the {name!r} tower's "
                f"{cls_name}; its settings: {sorted(entry['init_args'])}"
            )
        self.source = self._source_for_file(name, source_cls, {**entry["init_args"], **self.source_options},
                                            entry["features"])
        self.source.recorded_filters = {"include", "exclude"} - set(self.source_options)
        n_rows = self.source.num_rows()
        usable = self.source.usable_rows()  # rows a source cannot use (and was told to drop) get no embedding
        rows = np.arange(n_rows) if usable is None else np.flatnonzero(usable)
        rows = rows[:self.n_samples]
        if not len(rows):
            raise DataError(f"{self.source.file}: has no rows to embed ({n_rows} rows"
                            f"{', none usable' if n_rows else ''}); nothing written")
        self._check_output_columns()
        if self.streaming:
            features = self._streamed(entry["features"], rows)
        else:
            features = self.source.read_features(rows, align_to=entry["features"], empty_rows="warn")
        self.dataset = EmbedDataset(name, features, rows)
        log.info("embedding %d of %d rows of %s with the %r tower", len(rows), n_rows, self.path, name)

    def _source_for_file(self, name: str, source_cls: type[ModalitySource], settings: dict[str, Any],
                         features: list[str]) -> ModalitySource:
        """The tower's source reading ``path``: its own class, or, for a file of the other feature-vector
        format (an ``.h5ad`` for a tower trained on a table, a table for one trained on an ``.h5ad``), that
        format's source with the settings both share: the features are then found by name (``var_names``,
        or the table's columns)."""
        try:
            reader = source_for(self.path)
        except DataError:
            reader = None  # not a built-in format (e.g. a folder of images): the tower's own source decides
        vectors = (AnnDataSource, TableSource)
        if reader is None or issubclass(source_cls, reader) or not source_cls.suffixes:  # e.g. SMILES in a table
            return source_cls(path=self.path, **settings)
        if source_cls in vectors and reader in vectors:
            shared = {k: settings[k] for k in SHARED_SETTINGS if k in settings}
            if reader is TableSource:
                # the features by their names in the model (an obsm tower's are <key>_<i>)
                shared["features"] = source_cls(path=self.path, **settings).matrix_part(features)
            return reader(path=self.path, **shared)
        readable = ", ".join(source_cls.suffixes)
        raise DataError(f"{self.path}: the {name!r} tower ({source_cls.__name__}) reads {readable} files, not "
                        f"{reader.__name__} files")

    def _check_output_columns(self) -> None:
        """Columns the output adds must not be in the input's metadata (found before embedding, not after)."""
        if self.output is None or self.output.suffix != ".parquet":
            return
        metadata = self.source.read_metadata().columns
        taken = [c for c in metadata if c == "obs_names" and isinstance(self.source, AnnDataSource)]
        taken += [c for c in metadata if str(c).startswith(f"{OBSM_KEY}_")]
        if taken:
            raise DataError(
                f"{self.source.file}: has metadata column(s) {taken[:5]}, names the parquet output gives to "
                f"{'the obs index and ' if 'obs_names' in taken else ''}the embedding columns ({OBSM_KEY}_<i>); "
                "rename them, or write an .h5ad output"
            )

    def _streamed(self, inputs: list[str], rows: np.ndarray) -> StreamedRows:
        source = self.source
        align_to = source.matrix_part(inputs)  # metadata features are appended to the rows read (finish)
        if isinstance(source, AnnDataSource):
            return StreamedRows(source, source.row_store(), source.feature_names(), align_to, rows)
        if isinstance(source, TableSource):
            # cache only the model's columns this file has; the others are zero-filled when aligned
            present = source._own_columns(align_to)
            if not present:
                align_features(np.zeros((0, 0), np.float32), [], align_to, source.file)  # the no-overlap error
            store = NpyStore(table_cache(TableSource(str(source.file), features=present), self.cache_dir))
            return StreamedRows(source, store, present, align_to, rows)
        raise ValueError(f"data.streaming reads feature vectors; the {type(source).__name__} tower's input "
                         "is read into memory: leave data.streaming off")

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_batch
        )

    def write_predictions(
        self, rows: np.ndarray, embedding: np.ndarray, record: dict[str, Any] | None = None
    ) -> None:
        """Write the embeddings of ``rows`` (called by `EmbeddingWriter`).

        Args:
            rows: row numbers in the input file, ascending, each once.
            embedding: ``(len(rows), d)`` embeddings.
            record: provenance written with them (checkpoint, model config, date, version).
        """
        if len(rows) != len(self.dataset) or not np.array_equal(rows, np.sort(self.dataset.rows)):
            raise RuntimeError(
                f"got embeddings for {len(rows)} of the {len(self.dataset)} rows to embed (or other rows); "
                "nothing written"
            )
        if isinstance(self.dataset.features, StreamedRows):
            self.dataset.features.close()
        self.dataset.features = None  # the rows are embedded: their matrix need not be held while writing
        metadata = self.source.read_metadata()
        if len(rows) != len(metadata) or not np.array_equal(rows, np.arange(len(rows))):
            metadata = metadata.iloc[rows]
        record = {**(record or {}), "modality": self.dataset.modality}
        self.written = write_embeddings(self.source.file, metadata, rows, embedding, self.output, record,
                                        copy_input=self.streaming, obs_index=isinstance(self.source, AnnDataSource))

    def teardown(self, stage: str) -> None:
        if self.dataset is not None and isinstance(self.dataset.features, StreamedRows):
            self.dataset.features.close()  # before its store is closed
        if self.source is not None:
            self.source.close()
        self.dataset = None


class InMemoryEmbedDataModule(EmbedDataModule):
    """``EmbedDataModule`` that keeps the embeddings in ``rows`` / ``embedding`` instead of writing a file
    (``unimodality.api.Model.embed``): the same reading, alignment, filters and warnings as ``predict``.

    Args:
        path: the file to embed (see ``EmbedDataModule``).
        modality: which tower embeds it.
        source_options: settings replacing those recorded in the checkpoint.
        batch_size: rows per forward pass.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, path: str | list[str], modality: str | None = None,
                 source_options: dict[str, Any] | None = None, batch_size: int = 512, num_workers: int = 0) -> None:
        super().__init__(path, modality=modality, source_options=source_options, batch_size=batch_size,
                         num_workers=num_workers)
        self.rows: np.ndarray | None = None
        self.embedding: np.ndarray | None = None

    @staticmethod
    def _output_path(path: str | list[str], output: str | None, overwrite: bool) -> Path | None:
        return None

    def write_predictions(
        self, rows: np.ndarray, embedding: np.ndarray, record: dict[str, Any] | None = None
    ) -> None:
        """Keep the embeddings of ``rows`` (called by ``EmbeddingWriter``, as predict's writer is)."""
        if len(rows) != len(self.dataset) or not np.array_equal(rows, np.sort(self.dataset.rows)):
            raise RuntimeError(f"got embeddings for {len(rows)} of the {len(self.dataset)} rows to embed (or other "
                               "rows)")
        self.rows = np.asarray(rows)
        self.embedding = np.ascontiguousarray(embedding, dtype=np.float32)
