"""The setup interface: a LightningModule that trains towers with a contrastive loss."""

from __future__ import annotations

import functools
import inspect
import math
import re
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
        check_optimizer_settings(optimizer)  # before any data is read or a step is taken
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
            saved = self.saved_checkpoint()
            # only claim a good checkpoint when one exists: a run can diverge before its first save
            kept = (f"and the last checkpoint saved ({saved}) holds finite weights" if saved else
                    "but no checkpoint was saved yet")
            raise NonFiniteLossError(
                f"training stopped at step {self.global_step} (epoch {self.current_epoch}): the loss is "
                f"{loss.item()}{f' ({terms})' if terms else ''}. The weights were not updated with it, {kept}. "
                "Common causes: a learning rate too high (model.init_args.optimizer.init_args.lr), fp16 overflow (use "
                "bf16-mixed or 32-true precision), or features with extreme values (consider a transform such "
                "as log1p)."
            )

    def saved_checkpoint(self) -> str | None:
        """The file (or DeepSpeed directory) a checkpoint callback of the trainer has written, if any."""
        trainer = getattr(self, "_trainer", None)
        for callback in getattr(trainer, "checkpoint_callbacks", None) or []:
            for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")):
                if path and Path(path).exists():
                    return str(path)
        return None

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
        optimizer = build("optimizer", self.optimizer, [g for g in groups if g["params"]])
        if self.lr_scheduler is None:
            return optimizer
        scheduler = build("lr_scheduler", self.lr_scheduler, optimizer)
        config = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


#: optimizer settings that must be finite and non-negative (a NaN learning rate only shows as a NaN loss)
NON_NEGATIVE = ("lr", "weight_decay", "eps", "momentum", "dampening", "lr_decay", "initial_accumulator_value")


def factory_target(factory: Any) -> tuple[Any, dict[str, Any]]:
    """The class an optimizer/scheduler setting builds, and the keyword arguments it passes: jsonargparse
    hands over ``partial(<instantiator>, cls, **init_args)``, Python code a class or a partial of one."""
    if isinstance(factory, functools.partial):
        classes = [arg for arg in (factory.func, *factory.args) if isinstance(arg, type)]
        return (classes[-1] if classes else factory.func), dict(factory.keywords)
    return factory, {}


def check_optimizer_settings(optimizer: Any) -> None:
    """Refuse a negative, NaN or infinite learning rate (or weight decay, eps, momentum) at once."""
    target, kwargs = factory_target(optimizer)
    for name in NON_NEGATIVE:
        number = _number(kwargs.get(name))
        if number is not None and not (math.isfinite(number) and number >= 0):
            raise ValueError(
                f"{_name(target)}: {name} must be a finite number >= 0, got {number} "
                f"(model.init_args.optimizer.init_args.{name})"
            )


def build(setting: str, factory: Any, first: Any) -> Any:
    """``factory(first)`` (an optimizer from parameter groups, a scheduler from an optimizer), or one line
    naming the class, the missing or refused arguments and the options that set them."""
    target, kwargs = factory_target(factory)
    option = f"model.init_args.{setting}.init_args"
    parameters = _parameters(target)
    missing = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ValueError(
            f"{setting} {_name(target)} needs {', '.join(missing)}: set "
            f"{', '.join(f'{option}.{name}' for name in missing)}"
        )
    try:
        return factory(first)
    except (TypeError, ValueError) as error:  # raised by torch (or a plugin's class), about the arguments
        text = " ".join(str(error).split())
        unset = [p.name for p in parameters if kwargs.get(p.name, p.default) is None]  # e.g. total_steps
        named = [name for name in unset if re.search(rf"\b{name}\b", text)]
        where = f"; set {' or '.join(f'{option}.{name}' for name in named)}" if named else f" (see {option})"
        raise ValueError(f"{setting} {_name(target)} could not be built: {text}{where}") from error


def _parameters(target: Any) -> list[inspect.Parameter]:
    """The named parameters of a class or function after the first (the parameters or the optimizer)."""
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p in parameters[1:] if p.kind in named]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    return None


def _name(target: Any) -> str:
    return getattr(target, "__name__", None) or repr(target)


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
