"""The datamodule interface, and the split loaders datamodules share (batches: see `unimodality.batch`).

Streaming (``unimodality.streaming``, which reads files) is imported when a loader streams: the command's
``--help`` imports this module and need not pay for pandas, h5py and pyarrow.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from unimodality.batch import GROUP, INDEX, check_sizes, collate_batch, take_rows  # noqa: F401 - re-exported
from unimodality.config import ConfigHyperparameters
from unimodality.errors import DataError

log = logging.getLogger(__name__)

#: a last training batch smaller than this share of ``batch_size`` is dropped (see ``SplitDataModule._loader``)
SMALL_LAST_BATCH = 0.5
#: warn when more than this share of the training split is left out of every epoch
DROPPED_WARNING = 0.1


class DataModule(ConfigHyperparameters, LightningDataModule):
    """Base class of datamodules (plugin group ``unimodality.datamodules``).

    Subclasses read files in ``setup(stage)`` for the stages that need them and free them in ``teardown``.
    ``schema`` tells a setup what it needs to build towers, and is stored in checkpoints so new files can
    be embedded later: ``{modality: {"class_path", "init_args", "features"}}``.
    """

    @property
    def schema(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError


class SplitDataModule(DataModule):
    """A datamodule holding one dataset per split (``train``/``val``/``test``) in ``self.datasets``.

    Subclasses call `set_loading` in ``__init__``, fill ``self.datasets`` in ``setup`` and list
    their sources in ``streamed_sources``; the loaders, converting tables for streaming in
    ``prepare_data``, and freeing the data in ``teardown`` are shared.
    """

    #: what one training example is, for messages
    unit = "perturbations"
    datasets: dict[str, Dataset]

    def set_loading(
        self, batch_size: int, eval_batch_size: int | None, num_workers: int, pin_memory: bool, streaming: bool,
        block_size: int, buffer_batches: int, cache_dir: str | None,
    ) -> None:
        """Check and keep the settings of the loaders (see the subclasses' Args)."""
        owner = type(self).__name__
        check_sizes(owner, batch_size=batch_size, eval_batch_size=eval_batch_size, block_size=block_size,
                    buffer_batches=buffer_batches)
        if num_workers < 0:
            raise ValueError(f"{owner}: num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.streaming = streaming
        self.block_size = block_size
        self.buffer_batches = buffer_batches
        self.cache_dir = cache_dir

    @property
    def without_validation(self) -> bool:
        """Whether ``setup("fit")`` found no validation split: the fit trains without validating (no
        ``best.ckpt``, only ``last.ckpt``), a supported mode rather than an error."""
        return "train" in self.datasets and "val" not in self.datasets

    def streamed_sources(self) -> list[Any]:
        """The sources of the data (their tables are converted for streaming in ``prepare_data``)."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        if not self.streaming:
            return
        from unimodality.streaming import open_store

        for source in self.streamed_sources():  # tables converted once, on one process per node; others wait
            if source.input_kind == "vectors":
                open_store(source, self.cache_dir).close()

    def teardown(self, stage: str) -> None:
        self.datasets.clear()

    def _loader(self, split: str, train: bool) -> DataLoader | list:
        if split not in self.datasets:
            return []  # an empty split: Lightning skips the loop
        dataset = self.datasets[split]
        if hasattr(dataset, "shard"):  # a streaming dataset: its sampler plans whole buffers per rank and worker
            from unimodality.streaming import BufferSampler

            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            dataset.shard(rank, world)
            sampler = BufferSampler(dataset, num_replicas=world, rank=rank, num_workers=self.num_workers)
            if len(sampler) == 0:
                raise DataError(
                    f"the training split has {len(dataset)} rows, fewer than batch_size={dataset.batch_size} "
                    f"x {world} processes; lower data.batch_size"
                )
            return DataLoader(
                dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0, collate_fn=collate_batch,
            )
        batch_size = self.batch_size if train else self.eval_batch_size
        if train and len(dataset) < batch_size:
            raise DataError(
                f"the training split has {len(dataset)} {self.unit}, fewer than batch_size={batch_size}; "
                "lower data.batch_size"
            )
        drop_last = train and self._drop_last_batch(len(dataset), batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
        )

    def _drop_last_batch(self, n: int, batch_size: int) -> bool:
        """Whether the last, incomplete training batch is dropped: only when it is small (under half a batch:
        few negatives, a noisy step, and fewer than the 2 rows some losses need). Every process of a
        distributed run has the same number of rows (the sampler pads), so their last batches match either
        way. Warns when the rows dropped are more than a small share of the split."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        per_process = -(-n // world)
        remainder = per_process % batch_size
        drop = 0 < remainder < SMALL_LAST_BATCH * batch_size
        dropped = remainder * world if drop else 0
        if dropped > DROPPED_WARNING * n:
            log.warning(
                "%d of %d training %s (%.0f%%) are left out of every epoch: the last batch holds %d, under half of "
                "batch_size=%d, and is dropped; choose a batch_size that divides %d (per process) more evenly",
                dropped, n, self.unit, 100 * dropped / n, remainder, batch_size, per_process,
            )
        return drop

    def train_dataloader(self) -> DataLoader | list:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", train=False)

