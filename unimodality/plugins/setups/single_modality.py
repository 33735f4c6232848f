"""What the one-modality setups (SimCLR, DINO) share: reading their modality from a batch, fixed
augmentations for evaluation batches, replicate retrieval at validation and test, and predict returning the
encoder's representation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from unimodality.batch import INDEX

#: seed of the augmentations of evaluation batches (the same views every epoch, whatever the training stream)
EVALUATION_SEED = 2020


class SingleModalitySteps:
    """Steps of a setup that learns one modality from augmented views of it.

    The setup provides ``make_encoder``, ``modality``, ``encoder``, ``retrieval`` (a `SameGroupRecall`) and
    ``_evaluation_step(batch, batch_idx, stage)``, which updates ``retrieval`` and returns the loss.
    """

    def _only_modality(self, schema: dict[str, dict[str, Any]], other: str = "") -> tuple[str, dict[str, Any]]:
        """The name and schema entry of the data's one modality; ``other`` suggests a setup for several."""
        if len(schema) != 1:
            raise ValueError(
                f"{type(self).__name__} learns one modality; the data has {sorted(schema)}: use a single-modality "
                f"datamodule such as SingleDataModule{other}"
            )
        if self.make_encoder is None:
            raise ValueError(f"{type(self).__name__} has no encoder: set model.encoder (e.g. MLPEncoder)")
        ((name, entry),) = schema.items()
        return name, entry

    def _new_encoder(self, entry: dict[str, Any]) -> Any:
        """A new encoder for the modality's features (one line when its input size disagrees)."""
        n_features = len(entry["features"])
        encoder = self.make_encoder(n_features)
        if encoder.in_features != n_features:
            raise ValueError(f"encoder expects {encoder.in_features} input features, data has {n_features}")
        return encoder

    def _input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.modality not in batch:
            raise ValueError(f"{type(self).__name__} learns modality {self.modality!r}; the batch holds {list(batch)}")
        return batch[self.modality]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The representation (encoder output) of ``x``: what ``predict`` returns."""
        return self.encoder(x)

    @contextlib.contextmanager
    def _evaluation_rng(self, batch_idx: int) -> Iterator[None]:
        """Fixed augmentations for evaluation batches, without touching the training random stream."""
        devices = [] if self.device.type == "cpu" else [self.device.index or 0]  # the CPU's is always forked
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(EVALUATION_SEED + 1_000_003 * self.global_rank + batch_idx)
            yield

    def _log_retrieval(self, stage: str) -> None:
        for name, value in self.retrieval.compute().items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "recall@1")
        self.retrieval.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluation_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluation_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {INDEX: batch[INDEX], "embedding": self.encoder(self._input(batch))}
