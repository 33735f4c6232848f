"""Paired modalities measured on the same perturbations, matched by key columns (many-to-many)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from unimodality.batch import rows_key
from unimodality.datamodule import GROUP, INDEX, SplitDataModule, check_sizes, collate_batch, take_rows
from unimodality.errors import DataError
from unimodality.paths import disk_size
from unimodality.sampling import BatchesOf, ReplicateBatchSampler
from unimodality.sources import Alternatives, Matrix, ModalitySource
from unimodality.splits import (
    KEY_DIGITS,
    check_fractions,
    check_named_values_found,
    check_split_values_option,
    held_out_split,
    named_splits,
    plain_key,
    read_keys,
    split_of_keys,
)
from unimodality.streaming import Partner, StreamingDataset, open_store

log = logging.getLogger(__name__)



@dataclass
class Members:
    """Rows of one modality grouped by key: rows of key ``k`` are ``rows[offsets[k]:offsets[k + 1]]``."""

    offsets: np.ndarray
    rows: np.ndarray

    @classmethod
    def from_codes(cls, codes: np.ndarray, n_keys: int) -> Members:
        order = np.argsort(codes, kind="stable")
        offsets = np.zeros(n_keys + 1, dtype=np.int64)
        np.cumsum(np.bincount(codes, minlength=n_keys), out=offsets[1:])
        return cls(offsets, order.astype(np.int64))

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


class PairedDataset(Dataset):
    """Examples of one split, fetched a batch at a time.

    ``random=True`` (training): one example per perturbation, with one replicate of each modality drawn
    anew at every fetch (torch's RNG, so it follows the seed and differs per worker and epoch).
    ``random=False`` (evaluation): every replicate appears, paired deterministically (replicate ``j`` of
    one modality with replicate ``j mod n`` of the other), so metrics are repeatable.

    ``source_rows`` maps a modality's positions in ``features`` to its source's rows; batches then carry
    each sample's source row under ``rows/<modality>`` (`unimodality.batch.rows_key`). Give it only for
    modalities whose input of a row is the same at every fetch.
    """

    def __init__(
        self, features: dict[str, Matrix], members: dict[str, Members], groups: np.ndarray, random: bool,
        source_rows: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.features = features
        self.members = members
        self.groups = groups
        self.random = random
        self.source_rows = dict(source_rows or {})
        if not random:
            counts = np.stack([m.counts() for m in members.values()])
            width = counts.max(axis=0)
            self._pair_key = np.repeat(np.arange(len(groups)), width)
            within = np.arange(width.sum()) - np.repeat(np.cumsum(width) - width, width)
            self._pair_rows = {
                name: m.rows[m.offsets[self._pair_key] + within % m.counts()[self._pair_key]]
                for name, m in members.items()
            }

    def __len__(self) -> int:
        return len(self.groups) if self.random else len(self._pair_key)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices)
        if self.random:
            keys = indices
            draw = torch.rand(len(self.members), len(indices), dtype=torch.float64).numpy()
            # a key repeated in the batch (replicates_per_key) gets consecutive replicates from one random start:
            # distinct ones while it has enough
            _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            order = np.argsort(inverse, kind="stable")
            occurrence = np.empty(len(keys), dtype=np.int64)  # 0 for a key's first place in the batch, 1, ...
            occurrence[order] = np.arange(len(keys)) - np.searchsorted(inverse[order], inverse[order])
            rows = {}
            for i, (name, m) in enumerate(self.members.items()):
                counts = m.counts()[keys]
                start = (draw[i][first][inverse] * counts).astype(np.int64)
                rows[name] = m.rows[m.offsets[keys] + (start + occurrence) % counts]
        else:
            keys = self._pair_key[indices]
            rows = {name: r[indices] for name, r in self._pair_rows.items()}
        batch = {name: take_rows(self.features[name], rows[name]) for name in self.members}
        for name, source_rows in self.source_rows.items():
            batch[rows_key(name)] = torch.from_numpy(source_rows[rows[name]])
        batch[GROUP] = torch.from_numpy(self.groups[keys])
        if not self.random:  # evaluation: lets metrics drop rows a distributed sampler repeats as padding
            batch[INDEX] = torch.from_numpy(indices)
        return batch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class PairedDataModule(SplitDataModule):
    """Two or more modalities paired by key columns, e.g. ``[smiles, concentration]``.

    A perturbation (key) may have several replicates in each modality. A training example is one
    perturbation with one replicate drawn from each modality, redrawn every epoch; batches carry the
    integer ``group`` id of the key. Splits come from a split column (values ``train``/``val``/``test``)
    or from a seeded held-out fraction of keys: a perturbation is never in two splits.

    Args:
        modalities: one source per modality, by modality name (``tx``, ``ph``, ...).
        keys: the key columns that pair rows across modalities.
        split_column: column holding each row's split (``train``/``val``/``test``, or with ``split_values``
            named values such as experiment ids); ``None`` draws held-out fractions of keys instead.
        split_values: the values of ``split_column`` held out per split, e.g. ``{val: [EXP7], test: [EXP8,
            EXP9]}``; rows of every other value train. A listed value found in no file is an error.
        val_fraction: fraction of keys held out for validation (without a split column).
        test_fraction: fraction of keys held out for testing (without a split column).
        seed: seed of the held-out draw.
        batch_size: training batch size (examples per step and process).
        replicates_per_key: replicate pairs of each drawn perturbation in a training batch (``batch_size`` must
            be a multiple): with ``k > 1`` a loss with ``use_groups`` sees positives within a modality too.
            Perturbations are distinct across all processes of a step; every process has as many steps.
        examples_per_key: how often each perturbation is drawn per epoch, each time with fresh replicates
            (oversampling: an epoch is that many passes over the perturbations).
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: pin batches for faster host-to-GPU copies.
        streaming: read the training split from disk during training instead of into memory (files larger
            than RAM). Every row of one modality (``stream_modality``) is then an example once per epoch,
            paired with a replicate of its key drawn from each other modality; rows are read in blocks of
            ``block_size`` consecutive rows, shuffled within buffers of ``buffer_batches`` batches.
            Validation and test splits are still read into memory. Tables are converted once to a
            row-major cache in ``cache_dir``.
        stream_modality: the modality to stream (default: the largest file of feature vectors).
        block_size: consecutive rows read (and shuffled) as a unit when streaming.
        buffer_batches: batches per shuffle buffer when streaming (memory: about one buffer per worker).
        cache_dir: where tables are cached for streaming (default ``$UNIMODALITY_CACHE_DIR`` or
            ``~/.cache/unimodality/streaming``).
        key_digits: numeric (floating-point) key values are compared rounded to this many significant digits,
            so a concentration stored as float32 in one file and float64 in another (0.1 vs
            0.10000000149) is one key; ``None`` compares them exactly.
        max_unmatched: the largest share of any modality's rows whose key is absent from another modality;
            more stops with an error showing unmatched keys of each side (a key written differently in
            two files otherwise silently loses rows). ``1.0`` allows any share.
    """

    def __init__(
        self,
        modalities: dict[str, ModalitySource],
        keys: list[str],
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
        stream_modality: str | None = None,
        block_size: int = 64,
        buffer_batches: int = 16,
        cache_dir: str | None = None,
        replicates_per_key: int = 1,
        examples_per_key: int = 1,
        key_digits: int | None = KEY_DIGITS,
        max_unmatched: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if key_digits is not None and key_digits < 1:
            raise ValueError(f"PairedDataModule: key_digits must be at least 1 (or null), got {key_digits}")
        if not 0 <= max_unmatched <= 1:
            raise ValueError(f"PairedDataModule: max_unmatched is a share of rows, from 0 to 1; got {max_unmatched}")
        self.key_digits = key_digits
        check_sizes("PairedDataModule", replicates_per_key=replicates_per_key, examples_per_key=examples_per_key)
        if batch_size % replicates_per_key:
            raise ValueError(f"PairedDataModule: batch_size={batch_size} must be a multiple of replicates_per_key="
                             f"{replicates_per_key} (each drawn perturbation fills {replicates_per_key} places)")
        if streaming and (replicates_per_key > 1 or examples_per_key > 1):
            raise ValueError("PairedDataModule: replicates_per_key and examples_per_key draw perturbations in memory; "
                             "with streaming every row of the streamed file is an example once per epoch")
        self.replicates_per_key = replicates_per_key
        self.examples_per_key = examples_per_key
        self.max_unmatched = max_unmatched
        self.set_loading(batch_size, eval_batch_size, num_workers, pin_memory, streaming, block_size, buffer_batches,
                         cache_dir)
        if len(modalities) < 2:
            raise ValueError(f"PairedDataModule needs at least two modalities, got {list(modalities)}")
        if not keys:
            raise ValueError("PairedDataModule: keys must name at least one key column")
        check_fractions("PairedDataModule", val_fraction, test_fraction)
        check_split_values_option("PairedDataModule", split_column, split_values)
        for name, source in modalities.items():
            if source.key_columns is not None and len(source.key_columns) != len(keys):
                raise ValueError(
                    f"modality {name!r}: key_columns {source.key_columns} must match keys {keys} one to one"
                )
        self.sources = modalities
        self.keys = list(keys)
        self.split_column = split_column
        self.split_values = split_values
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.stream_modality = stream_modality
        self.datasets: dict[str, PairedDataset | StreamingDataset] = {}

    @property
    def modalities(self) -> list[str]:
        return list(self.sources)

    @property
    def schema(self) -> dict[str, dict[str, Any]]:
        return {name: source.describe() for name, source in self.sources.items()}

    # -- pairing and splits ------------------------------------------------------------------------
    def _index(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[tuple]]:
        """Group id of every row per modality, shared group ids, their split, and the key values."""
        metas = {name: read_keys(source, self.keys, self.split_column, self.key_digits)
                 for name, source in self.sources.items()}
        stacked = pd.concat([m[self.keys] for m in metas.values()], ignore_index=True)
        codes, uniques = pd.MultiIndex.from_frame(stacked).factorize()
        uniques = [plain_key(u) for u in uniques]  # np.float64(1.0) -> 1.0 in messages
        bounds = np.cumsum([0] + [len(m) for m in metas.values()])
        row_codes = {name: codes[bounds[i]:bounds[i + 1]].copy() for i, name in enumerate(metas)}
        for name, source in self.sources.items():
            usable = source.usable_rows()  # e.g. rows of unparsable SMILES, dropped on request
            if usable is not None:
                row_codes[name][~usable] = -1

        shared = set(range(len(uniques)))
        for codes_m in row_codes.values():
            shared &= set(np.unique(codes_m).tolist())
        if not shared:
            counts = ", ".join(f"{name}: {len(np.unique(c))} keys" for name, c in row_codes.items())
            examples = "; ".join(
                f"{name} e.g. {[tuple(uniques[i]) for i in np.unique(c)[:2]]}" for name, c in row_codes.items()
            )
            raise DataError(
                f"no key {self.keys} is present in every modality ({counts}); {examples}. "
                "Check the key columns and their types (e.g. 1 vs 1.0, trailing spaces)."
            )
        shared_codes = np.array(sorted(shared), dtype=np.int64)
        self._check_unmatched(row_codes, shared_codes, uniques)
        split = self._splits(metas, row_codes, shared_codes, uniques)
        return row_codes, shared_codes, split, [tuple(u) for u in uniques]

    def _check_unmatched(self, row_codes: dict[str, np.ndarray], shared: np.ndarray, uniques: list[tuple]) -> None:
        """Rows whose key no other modality has are left out: logged, and an error past ``max_unmatched``."""
        unmatched = {name: ~np.isin(codes, shared) & (codes >= 0) for name, codes in row_codes.items()}
        too_many = [name for name, mask in unmatched.items()
                    if mask.sum() > self.max_unmatched * max(1, (row_codes[name] >= 0).sum())]
        for name, mask in unmatched.items():
            if mask.any():
                log.warning("modality %r: %d of %d rows have a key absent from another modality; left out", name,
                            mask.sum(), len(mask))
        if not too_many:
            return
        examples = "; ".join(
            f"{name} ({self.sources[name].file.name}): {mask.sum()} of {len(mask)} rows, e.g. "
            f"{[uniques[c] for c in pd.unique(row_codes[name][mask])[:3]]}"
            for name, mask in unmatched.items() if mask.any()
        )
        raise DataError(
            f"keys {self.keys}: rows without a partner in another modality exceed data.max_unmatched="
            f"{self.max_unmatched} in {too_many}: {examples}. Check how the keys are written in each file (types, "
            "spelling, precision: numeric keys are compared to data.key_digits significant digits); set "
            "data.max_unmatched 1.0 to train on the matched rows anyway"
        )

    def _splits(self, metas, row_codes, shared_codes, uniques) -> np.ndarray:
        if self.split_column is None:
            return held_out_split(len(shared_codes), self.val_fraction, self.test_fraction, self.seed)
        with_split = [name for name, meta in metas.items() if self.split_column in meta.columns]
        if not with_split:
            files = ", ".join(str(s.file) for s in self.sources.values())
            raise DataError(f"split column {self.split_column!r} is in none of the files ({files})")
        # rows left out (row filters, unusable rows: key code -1) belong to no split
        used = {name: row_codes[name] >= 0 for name in with_split}
        labels = {name: metas[name][self.split_column][used[name]] for name in with_split}
        if self.split_values is not None:
            check_named_values_found(self.split_values, self.split_column, labels.values(),
                                     ", ".join(str(self.sources[n].file) for n in with_split))
            labels = {name: named_splits(values, self.split_values) for name, values in labels.items()}
        labelled = [(self.sources[name].file, row_codes[name][used[name]], labels[name]) for name in with_split]
        return split_of_keys(labelled, self.split_column, shared_codes, self.keys, uniques)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "predict":
            raise ValueError(
                "PairedDataModule does not embed data; predict with EmbedDataModule (--data.path FILE)"
            )
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}[stage]
        wanted = tuple(s for s in wanted if s not in self.datasets)
        if not wanted:
            return
        row_codes, shared_codes, split, _ = self._index()
        for s in wanted:
            if not (split == s).any():
                if s == "train":
                    raise DataError("the training split holds no perturbation shared by all modalities")
                if s == "val" and stage == "fit":  # a supported mode (see docs/faq.md): no best.ckpt, last.ckpt kept
                    log.info("no validation split: training without validation; only checkpoints/last.ckpt is kept")
                else:
                    log.warning("the %r split holds no perturbation shared by all modalities", s)
        in_memory = tuple(s for s in wanted if not (self.streaming and s == "train"))
        if len(in_memory) < len(wanted):
            with_alternatives = [n for n, src in self.sources.items() if src.read_alternatives(np.zeros(0, int))]
            if with_alternatives:
                raise ValueError(f"modalities {with_alternatives}: alternative representations are drawn in memory; "
                                 "leave data.streaming off, or drop obsm_alternatives")
            self.datasets["train"] = self._streaming_train(row_codes, shared_codes[split == "train"])
        keep = shared_codes[np.isin(split, in_memory)]
        # read only the rows of the splits this stage needs; map file rows to rows of the read block
        features, local_codes, drawn, source_rows = {}, {}, {}, {}
        for name, source in self.sources.items():
            rows = np.flatnonzero(np.isin(row_codes[name], keep))
            source_rows[name] = rows
            features[name] = source.read_features(rows)
            local_codes[name] = row_codes[name][rows]
            alternatives = source.read_alternatives(rows) if "train" in in_memory else None
            if alternatives is not None:  # training draws among a source's representations
                drawn[name] = Alternatives([features[name], *alternatives[0]], alternatives[1])
            source.close()
        train_features = {**features, **drawn}
        for s in in_memory:
            codes = shared_codes[split == s]  # sorted, as shared_codes is
            if len(codes) == 0:
                continue
            if s != "train" and len(codes) == 1:
                log.warning("the %r split holds a single perturbation %s: its retrieval metrics are 1.0 by "
                            "construction (chance is 1.0 too); hold out more perturbations to measure retrieval",
                            s, tuple(self.keys))
            members = {name: members_of(codes, c) for name, c in local_codes.items()}
            # a row drawn among alternative representations is not the same input at every fetch: no source row
            stable = {n: r for n, r in source_rows.items() if s != "train" or n not in drawn}
            self.datasets[s] = PairedDataset(train_features if s == "train" else features, members, codes,
                                             random=(s == "train"), source_rows=stable)
        sizes = ", ".join(
            f"{s}: {len(np.unique(self.datasets[s].groups))} perturbations"
            + (f" ({len(d)} {d.name} rows streamed)" if isinstance(d, StreamingDataset) else "")
            for s in wanted if (d := self.datasets.get(s)) is not None
        )
        log.info("PairedDataModule %s", sizes)

    def train_dataloader(self) -> DataLoader | list:
        if self.replicates_per_key == 1 and self.examples_per_key == 1 or "train" not in self.datasets:
            return super().train_dataloader()
        dataset = self.datasets["train"]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ReplicateBatchSampler(dataset, self.batch_size // self.replicates_per_key, self.replicates_per_key,
                                        self.examples_per_key, num_replicas=world, rank=rank, seed=self.seed)
        if sampler.steps_per_pass() == 0:
            raise DataError(
                f"the training split has {len(dataset)} perturbations, fewer than batch_size={self.batch_size} / "
                f"replicates_per_key={self.replicates_per_key} x {world} processes; lower data.batch_size"
            )
        return DataLoader(BatchesOf(dataset), batch_size=None, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_batch)

    # -- streaming ---------------------------------------------------------------------------------------
    def streamed_modality(self) -> str:
        """The modality read from disk in blocks: ``stream_modality``, or the largest vector file."""
        if self.stream_modality is not None:
            if self.stream_modality not in self.sources:
                raise ValueError(f"data.stream_modality={self.stream_modality!r}: modalities are {self.modalities}")
            return self.stream_modality
        vectors = [n for n, s in self.sources.items() if s.input_kind == "vectors"]
        if not vectors:
            raise ValueError("streaming needs a modality of feature vectors to stream; none of "
                             f"{self.modalities} is one")
        return max(vectors, key=lambda n: sum(disk_size(f) for f in self.sources[n].files))

    def streamed_sources(self) -> list[ModalitySource]:
        return list(self.sources.values())

    def _streaming_train(self, row_codes: dict[str, np.ndarray], codes: np.ndarray) -> StreamingDataset:
        name = self.streamed_modality()
        partners = {}
        for other, source in self.sources.items():
            if other == name:
                continue
            rows = np.flatnonzero(np.isin(row_codes[other], codes))
            members = members_of(codes, row_codes[other][rows])
            if source.input_kind == "vectors":  # read from disk too: members hold file rows
                partners[other] = Partner(Members(members.offsets, rows[members.rows]), source,
                                          store=open_store(source, self.cache_dir))
            else:  # e.g. molecule graphs: each distinct one is kept in memory
                partners[other] = Partner(members, source, features=source.read_features(rows))
        rows = np.flatnonzero(np.isin(row_codes[name], codes))
        return StreamingDataset(
            name, self.sources[name], open_store(self.sources[name], self.cache_dir), rows,
            groups=row_codes[name][rows], batch_size=self.batch_size, block_size=self.block_size,
            buffer_batches=self.buffer_batches, seed=self.seed, partners=partners,
            key_index=np.searchsorted(codes, row_codes[name][rows]),
        )


def members_of(codes: np.ndarray, row_codes: np.ndarray) -> Members:
    """Rows (positions in ``row_codes``) of each key of ``codes`` (sorted); rows of other keys are left out."""
    position = np.minimum(np.searchsorted(codes, row_codes), len(codes) - 1)
    inside = codes[position] == row_codes
    m = Members.from_codes(position[inside], len(codes))
    return Members(m.offsets, np.flatnonzero(inside)[m.rows])
