"""One modality from one file: the data of single-modality (self-supervised) setups such as SimCLR."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from unimodality.datamodule import GROUP, SplitDataModule, take_rows
from unimodality.errors import DataError
from unimodality.sources import Matrix, ModalitySource
from unimodality.splits import (
    check_fractions,
    check_named_values_found,
    check_split_values,
    check_split_values_option,
    held_out_split,
    named_splits,
    plain_key,
    read_keys,
    split_of_keys,
)
from unimodality.streaming import StreamingDataset, open_store

log = logging.getLogger(__name__)


class SingleDataset(Dataset):
    """Rows of one split, fetched a batch at a time, with the group id of each row.

    ``rows`` index into ``features`` (a block that may hold the rows of other splits too).
    """

    def __init__(self, modality: str, features: Matrix, rows: np.ndarray, groups: np.ndarray) -> None:
        self.modality = modality
        self.features = features
        self.rows = rows
        self.groups = groups

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices)
        return {
            self.modality: take_rows(self.features, self.rows[indices]),
            GROUP: torch.from_numpy(self.groups[indices]),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class SingleDataModule(SplitDataModule):
    unit = "rows"

    """The rows of one file of one modality; every row is a training example, every epoch.

    With ``keys`` (e.g. ``[smiles, concentration]``), batches carry the integer ``group`` id of each row's
    perturbation, so a loss with ``use_groups`` treats replicates as positives, and splits are drawn over
    perturbations: a perturbation is never in two splits. Without keys every row is its own group and
    splits are drawn over rows. Splits come from a split column (values ``train``/``val``/``test``) or
    from seeded held-out fractions (of keys, or of rows without keys).

    Args:
        source: the file and how to read it.
        modality: the modality's name: the batch key, and the name the model's schema records.
        keys: the key columns naming each row's perturbation; ``None``: rows are independent samples.
        split_column: column holding each row's split (``train``/``val``/``test``, or with ``split_values``
            named values such as experiment ids); ``None`` draws held-out fractions instead.
        split_values: the values of ``split_column`` held out per split, e.g. ``{val: [EXP7], test: [EXP8]}``;
            rows of every other value train. A listed value found in no row is an error.
        val_fraction: fraction of keys (or rows) held out for validation (without a split column).
        test_fraction: fraction of keys (or rows) held out for testing (without a split column).
        seed: seed of the held-out draw.
        batch_size: training batch size (rows per step); the last incomplete batch is dropped.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: pin batches for faster host-to-GPU copies.
        streaming: read the training split from disk during training instead of into memory (files larger
            than RAM): blocks of ``block_size`` consecutive rows, shuffled within buffers of
            ``buffer_batches`` batches. Validation and test splits are still read into memory. Tables are
            converted once to a row-major cache in ``cache_dir``.
        block_size: consecutive rows read (and shuffled) as a unit when streaming.
        buffer_batches: batches per shuffle buffer when streaming (memory: about one buffer per worker).
        cache_dir: where tables are cached for streaming (default ``$UNIMODALITY_CACHE_DIR`` or
            ``~/.cache/unimodality/streaming``).
    """

    def __init__(
        self,
        source: ModalitySource,
        modality: str = "x",
        keys: list[str] | None = None,
        split_column: str | None = None,
        split_values: dict[str, list[str | int | float]] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        streaming: bool = False,
        block_size: int = 64,
        buffer_batches: int = 16,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.set_loading(batch_size, eval_batch_size, num_workers, pin_memory, streaming, block_size, buffer_batches,
                         cache_dir)
        check_fractions("SingleDataModule", val_fraction, test_fraction)
        check_split_values_option("SingleDataModule", split_column, split_values)
        if keys is not None and not keys:
            raise ValueError("SingleDataModule: keys must name at least one key column, or be left unset")
        if keys is not None and source.key_columns is not None and len(source.key_columns) != len(keys):
            raise ValueError(f"SingleDataModule: key_columns {source.key_columns} must match keys {keys} one to one")
        self.source = source
        self.modality = modality
        self.keys = list(keys) if keys is not None else None
        self.split_column = split_column
        self.split_values = split_values
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.datasets: dict[str, SingleDataset | StreamingDataset] = {}

    @property
    def schema(self) -> dict[str, dict[str, Any]]:
        return {self.modality: self.source.describe()}

    # -- groups and splits ---------------------------------------------------------------------------
    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """Group id and split of every row of the file."""
        if self.keys is None:
            n = self.source.num_rows()
            groups = np.arange(n, dtype=np.int64)
            if self.split_column is None:
                return groups, held_out_split(n, self.val_fraction, self.test_fraction, self.seed)
            values = self._labels(self._split_values())
            check_split_values(self.source.file, self.split_column, values)
            return groups, values.to_numpy(dtype=object)
        meta = read_keys(self.source, self.keys, self.split_column)
        codes, uniques = pd.MultiIndex.from_frame(meta[self.keys]).factorize()
        codes = codes.astype(np.int64)
        all_codes = np.arange(len(uniques), dtype=np.int64)
        if self.split_column is None:
            key_split = held_out_split(len(uniques), self.val_fraction, self.test_fraction, self.seed)
        else:
            if self.split_column not in meta.columns:
                raise DataError(f"{self.source.file}: split column {self.split_column!r} not found")
            uniques = [plain_key(u) for u in uniques]
            labelled = [(self.source.file, codes, self._labels(meta[self.split_column]))]
            key_split = split_of_keys(labelled, self.split_column, all_codes, self.keys, uniques)
        return codes, key_split[codes]

    def _labels(self, values: pd.Series) -> pd.Series:
        """Split labels from the split column: as they are, or from named values (``split_values``)."""
        if self.split_values is None:
            return values
        check_named_values_found(self.split_values, self.split_column, [values], str(self.source.file))
        return named_splits(values, self.split_values)

    def _split_values(self) -> pd.Series:
        if self.split_column not in self.source.read_metadata().columns:
            raise DataError(f"{self.source.file}: split column {self.split_column!r} not found")
        return self.source.read_metadata([self.split_column])[self.split_column].reset_index(drop=True)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def streamed_sources(self) -> list[ModalitySource]:
        return [self.source]

    def setup(self, stage: str) -> None:
        if stage == "predict":
            raise ValueError(
                "SingleDataModule does not embed data; predict with EmbedDataModule (--data.path FILE)"
            )
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}[stage]
        wanted = tuple(s for s in wanted if s not in self.datasets)
        if not wanted:
            return
        groups, split = self._index()
        for s in wanted:
            if not (split == s).any():
                if s == "train":
                    raise DataError(f"{self.source.file}: the training split holds no row")
                if s == "val" and stage == "fit":  # a supported mode (see docs/faq.md): no best.ckpt, last.ckpt kept
                    log.info("no validation split: training without validation; only checkpoints/last.ckpt is kept")
                else:
                    log.warning("the %r split holds no row", s)
        usable = self.source.usable_rows()  # e.g. rows of unparsable SMILES, dropped on request
        usable = np.ones(len(split), dtype=bool) if usable is None else usable
        in_memory = tuple(s for s in wanted if not (self.streaming and s == "train"))
        if len(in_memory) < len(wanted):
            train = np.flatnonzero((split == "train") & usable)
            self.datasets["train"] = StreamingDataset(
                self.modality, self.source, open_store(self.source, self.cache_dir), train, groups[train],
                batch_size=self.batch_size, block_size=self.block_size, buffer_batches=self.buffer_batches,
                seed=self.seed,
            )
        rows = np.flatnonzero(np.isin(split, in_memory) & usable)
        features = self.source.read_features(rows)  # only the rows of the splits this stage needs
        self.source.close()
        for s in in_memory:
            local = np.flatnonzero(split[rows] == s)
            if len(local) == 0:
                continue
            self.datasets[s] = SingleDataset(self.modality, features, local, groups[rows[local]])
        sizes = ", ".join(
            f"{s}: {len(d)} rows" + (f" of {len(np.unique(d.groups))} perturbations" if self.keys else "")
            for s, d in self.datasets.items() if s in wanted
        )
        log.info("SingleDataModule %s", sizes)

