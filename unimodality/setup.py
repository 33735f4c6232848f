"""The setup interface: a LightningModule that trains towers with a contrastive loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from unimodality.checkpoint import check_checkpoint, read_checkpoint, stamp
from unimodality.config import ConfigHyperparameters


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stops before the weights are updated with it."""


class Setup(ConfigHyperparameters, LightningModule):
    """Base class of setups (plugin group ``unimodality.setups``).

    It owns what every setup shares: the optimizer and learning-rate scheduler injected from config, and
    checkpoint hygiene, so that ``SomeSetup.load_from_checkpoint(path)`` rebuilds the model with no config
    and a reloaded model can be saved and reloaded again with ``weights_only=True``.

    Args:
        optimizer: optimizer class (with its init args) applied to the trainable parameters; biases, norm
            gains and scalars (e.g. a logit scale) get no weight decay.
        lr_scheduler: optional learning-rate scheduler class (with its init args).
        lr_scheduler_interval: step the scheduler every ``epoch`` or every optimizer ``step``.
        lr_scheduler_monitor: metric a ``ReduceLROnPlateau`` scheduler watches.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor

    #: what the data looks like (modality -> source settings and feature names); see ``DataModule.schema``
    schema: dict[str, dict[str, Any]] | None = None

    def build(self, schema: dict[str, dict[str, Any]]) -> None:
        """Create the modules that depend on the data (input sizes), then ``remember_schema(schema)``."""
        raise NotImplementedError

    def remember_schema(self, schema: dict[str, dict[str, Any]]) -> None:
        """Store the schema in the hyperparameters, so a checkpoint rebuilds the model with no config."""
        self.schema = schema
        self.hparams["schema"] = schema
        self._hparams_initial["schema"] = schema

    def setup(self, stage: str) -> None:
        if self.schema is not None:  # given at init (a checkpoint) or built already
            return
        schema = getattr(getattr(self.trainer, "datamodule", None), "schema", None)
        if schema is None:
            raise RuntimeError(
                f"{type(self).__name__} builds its modules from the data: train it with a unimodality "
                "datamodule, or load a trained checkpoint"
            )
        self.build(schema)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Setup:  # type: ignore[override]
        """Lightning's loader, after checking the file: readable, tensors only, a known format, this class."""
        if isinstance(checkpoint_path, str | Path) and "://" not in str(checkpoint_path):
            read_checkpoint(checkpoint_path, expected=cls)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def own_default(self, name: str, value: Any) -> Any:
        """``value``, copied when it is the signature's default object (e.g. a ``lazy_instance`` loss).

        A default object is created once, with the class: every model built without that argument would
        otherwise share it, and with it its learnable parameters (a second model in the same process
        would start from the first one's trained temperature).
        """
        import copy
        import inspect

        default = inspect.signature(type(self).__init__).parameters[name].default
        return copy.deepcopy(value) if value is default else value

    #: the terms of the last training loss (e.g. per modality pair), named in a non-finite loss error
    loss_terms: dict[str, torch.Tensor] | None = None

    def on_before_backward(self, loss: torch.Tensor) -> None:
        # checked every step, before backward: a NaN never reaches the weights (nor, so, a checkpoint)
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in (self.loss_terms or {}).items())
            raise NonFiniteLossError(
                f"training stopped at step {self.global_step} (epoch {self.current_epoch}): the loss is "
                f"{loss.item()}{f' ({terms})' if terms else ''}. The weights were not updated with it, and the "
                "last checkpoint saved holds finite weights. Common causes: a learning rate too high "
                "(model.optimizer.init_args.lr), fp16 overflow (use bf16-mixed or 32-true precision), or "
                "features with extreme values (consider a transform such as log1p)."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stamp(checkpoint)
        # the random streams too: a resumed run then draws the same data order, replicates and dropout
        # masks as an uninterrupted one would have
        checkpoint["unimodality"]["rng"] = random_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(checkpoint, "the checkpoint", expected=type(self))
        self.restore_config_hparams(checkpoint)
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"
        if resuming and "rng" in checkpoint.get("unimodality", {}):  # not when merely loading weights
            set_random_states(checkpoint["unimodality"]["rng"])

    def is_logging_step(self) -> bool:
        """Whether loggers record this training step's metrics (every ``trainer.log_every_n_steps``).

        Training metrics are logged on these steps only: each ``self.log`` call costs about half a
        millisecond of Python (a fifth of a small model's step) and, shown in the progress bar, a
        device-to-host sync on GPUs. What loggers write is the same either way.
        """
        every = self.trainer.log_every_n_steps
        return every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        # as in CLIP/open_clip: no weight decay on biases, norm gains and scalars such as the logit scale
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2]},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = self.optimizer([g for g in groups if g["params"]])
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


def random_states() -> dict[str, Any]:
    """The process's random generator states, as tensors and plain values (loadable with weights_only)."""
    import random

    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
