"""The setup interface: a LightningModule that trains towers with a contrastive loss."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from unimodality.checkpoint import check_checkpoint, read_checkpoint, stamp
from unimodality.cka import linear_cka
from unimodality.config import ConfigHyperparameters
from unimodality.distributed import gather
from unimodality.fused import fused_default
from unimodality.schedulers import WarmupCosineLR
from unimodality.standardization import METHODS, statistics

log = logging.getLogger(__name__)


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
        lr_scheduler_monitor: metric a ``ReduceLROnPlateau`` scheduler watches (any logged metric, e.g.
            ``val/loss`` or ``val/pert/mrr`` with the scheduler's ``mode: max``).
        tower_optim: learning rate and/or weight decay per tower, e.g. ``{tx: {lr: 1.0e-4, weight_decay:
            0.0}}``: that tower's trainable parameters get their own parameter groups with these settings
            (its biases, norm gains and scalars still get no weight decay); others keep the optimizer's.
        preservation: weight per tower of a term keeping its embedding's geometry close to its input's: the
            loss gains ``weight * (1 - CKA)``, with ``CKA`` the linear CKA (Kornblith et al. 2019) between
            the tower's input and its embedding over the global batch, logged as
            ``train/preservation/<tower>``. Weight 0 logs the CKA without changing training.
        standardize: per-feature standardisation of a tower's input, e.g. ``{ph: zscore}`` or ``{ph:
            robust}`` (median and IQR): statistics computed from the training rows (one pass over the training
            data when the fit starts), kept in the checkpoint, and applied wherever the tower embeds
            (`predict`, `validate`, `unimodality.load`); see `unimodality.standardization`.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        tower_optim: dict[str, dict[str, float]] | None = None,
        preservation: dict[str, float] | None = None,
        standardize: dict[str, Literal["zscore", "robust"]] | None = None,
    ) -> None:
        super().__init__()
        check_optimizer_settings(optimizer)  # before any data is read or a step is taken
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.tower_optim = check_tower_optim(tower_optim)
        self.preservation = check_preservation(preservation)
        self.standardize = dict(standardize or {})
        for tower, method in self.standardize.items():
            if method not in METHODS:
                raise ValueError(f"model.init_args.standardize.{tower} must be one of {', '.join(METHODS)}, got "
                                 f"{method!r}")

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
        if self.standardize:  # buffers before a checkpoint's state is loaded into them
            self.check_tower_names()
            for name, method in self.standardize.items():
                self.tower_modules()[name].standardize_inputs(method)

    def on_train_start(self) -> None:
        """Compute the input standardisation statistics of the towers ``standardize`` names, from one pass over
        the training batches (unless a resumed checkpoint holds them)."""
        towers = {name: self.tower_modules()[name] for name in self.standardize}
        todo = [name for name, tower in towers.items() if not bool(tower.input_standardized)]
        if not todo:
            return
        loader = self.trainer.datamodule.train_dataloader()
        rank, world = self.trainer.global_rank, self.trainer.world_size

        def rows(name: str):
            for i, batch in enumerate(loader):
                if i % world == rank:  # each batch on one process: together, one pass over the training rows
                    yield batch[name]

        for name in todo:
            center, scale = statistics(rows(name), self.standardize[name], towers[name].in_features, f"tower {name!r}")
            towers[name].fit_standardization(center.to(self.device), scale.to(self.device))

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
        if value is not default:
            return value
        if hasattr(value, "lazy_get_init_args"):
            # a fresh object of the real class: a deep copy of a lazy_instance would still run the original's
            # methods (jsonargparse binds its lazy __call__ on the shared dynamic class), so every default-built
            # model would compute its loss with the first one's parameters
            real = next(c for c in type(value).__mro__
                        if not c.__module__.startswith("jsonargparse") and not c.__name__.startswith("LazyInstance_"))
            return real(**value.lazy_get_init_args().as_dict())
        return copy.deepcopy(value)

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

    # -- towers by name: what tower_optim and preservation refer to ---------------------------------------
    def tower_modules(self) -> dict[str, nn.Module]:
        """The setup's towers by name (built from the data): ``self.towers`` when it is a ``ModuleDict``.

        A setup with differently named parts overrides this; ``tower_optim`` and ``preservation`` keys must
        be among these names.
        """
        towers = getattr(self, "towers", None)
        return dict(towers.items()) if isinstance(towers, nn.ModuleDict) else {}

    def check_tower_names(self) -> None:
        """One line naming the option, when ``tower_optim``, ``preservation`` or ``standardize`` names no tower."""
        towers = sorted(self.tower_modules())
        for option, settings in (("tower_optim", self.tower_optim), ("preservation", self.preservation),
                                 ("standardize", self.standardize)):
            unknown = sorted(set(settings) - set(towers))
            if unknown:
                raise ValueError(
                    f"model.init_args.{option} names {unknown}, which are not towers of this model; towers: {towers}"
                )

    def preservation_loss(
        self, inputs: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor], batch_size: int
    ) -> torch.Tensor | None:
        """``sum(weight * (1 - CKA(input, embedding)))`` over the towers ``preservation`` names, or None when
        no weight is positive; logs each CKA as ``train/preservation/<tower>`` on logging steps.

        Args:
            inputs: each named tower's input rows on this process (any shape ``(n, ...)``; flattened).
            embeddings: its embeddings of the *global* batch (gathered with gradients, as the loss gets).
            batch_size: rows on this process, for the logger.
        """
        total = None
        logging = self.is_logging_step()
        for name, weight in self.preservation.items():
            if weight == 0 and not logging:
                continue
            with torch.set_grad_enabled(weight > 0 and torch.is_grad_enabled()):
                cka = linear_cka(gather(inputs[name]), embeddings[name])
            if weight > 0:
                term = weight * (1 - cka)
                total = term if total is None else total + term
                self.loss_terms = {**(self.loss_terms or {}), f"preservation/{name}": cka.detach()}
            if logging:
                self.log(f"train/preservation/{name}", cka.detach(), batch_size=batch_size)
        return total

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: trainable parameters only (a frozen encoder's are in none),
        per-tower groups for ``tower_optim``, and no weight decay on biases, norm gains and scalars."""
        self.check_tower_names()
        towers = self.tower_modules()
        claimed: set[int] = set()
        named: list[tuple[str, list[nn.Parameter], dict[str, float]]] = []
        for name, settings in self.tower_optim.items():
            params = [p for p in towers[name].parameters() if p.requires_grad and id(p) not in claimed]
            claimed.update(id(p) for p in params)
            named.append((name, params, settings))
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in claimed]
        groups = []
        for name, params, settings in [("default", rest, {}), *named]:
            # as in CLIP/open_clip: no weight decay on biases, norm gains and scalars such as the logit scale
            decay = {"params": [p for p in params if p.ndim >= 2], **settings}
            no_decay = {"params": [p for p in params if p.ndim < 2], **settings, "weight_decay": 0.0}
            if self.tower_optim:  # names show in LearningRateMonitor; plain groups when nothing is per tower
                decay["name"], no_decay["name"] = name, f"{name}/no_decay"
            groups += [decay, no_decay]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        target, kwargs = factory_target(self.optimizer)
        optimizer = build("optimizer", self.optimizer, groups, **fused_default(target, kwargs, groups, self._trainer))
        if self.lr_scheduler is None:
            return optimizer
        scheduler = build("lr_scheduler", self.lr_scheduler, optimizer, **self._schedule_length())
        self._check_cosine_length(scheduler)
        config = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _check_cosine_length(self, scheduler: Any) -> None:
        """Warn when a ``CosineAnnealingLR`` is shorter than the run: its cosine is periodic, so the learning
        rate climbs back to its start after ``T_max`` (e.g. a config's ``T_max: 60`` with ``--trainer.max_epochs
        200``)."""
        if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or self._trainer is None:
            return
        step = self.lr_scheduler_interval == "step"
        if not step and self.trainer.max_steps not in (None, -1):
            return  # max_steps may end the run before max_epochs: its length in epochs is not known here
        total = self.trainer.estimated_stepping_batches if step else self.trainer.max_epochs
        if total is None or total < 0 or not math.isfinite(total) or total <= scheduler.T_max:
            return
        if not self.trainer.is_global_zero:  # once per run, not once per process
            return
        unit = "steps" if step else "epochs"
        log.warning(
            "model.init_args.lr_scheduler: CosineAnnealingLR's T_max (%d %s) is shorter than the run (%d %s), so "
            "the learning rate climbs back up after %d %s; set model.init_args.lr_scheduler.init_args.T_max to %d, "
            "or use WarmupCosineLR, which follows the run's length",
            scheduler.T_max, unit, int(total), unit, scheduler.T_max, unit, int(total),
        )

    def _schedule_length(self) -> dict[str, int]:
        """``total_steps`` of a ``WarmupCosineLR`` left unset: the run's length in scheduler steps."""
        target, kwargs = factory_target(self.lr_scheduler)
        if not (isinstance(target, type) and issubclass(target, WarmupCosineLR)) or kwargs.get("total_steps"):
            return {}
        trainer = self.trainer
        total = trainer.estimated_stepping_batches if self.lr_scheduler_interval == "step" else trainer.max_epochs
        if total is None or not math.isfinite(total) or total < 1:
            raise ValueError(
                f"WarmupCosineLR: the run's length is unknown (trainer.max_epochs/max_steps unset): set "
                f"model.init_args.lr_scheduler.init_args.total_steps (in {self.lr_scheduler_interval}s)"
            )
        return {"total_steps": int(total)}


#: optimizer settings that must be finite and non-negative (a NaN learning rate only shows as a NaN loss)
NON_NEGATIVE = ("lr", "weight_decay", "eps", "momentum", "dampening", "lr_decay", "initial_accumulator_value")


def check_tower_optim(settings: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]]:
    """``tower_optim`` as plain dicts, after refusing a key other than lr/weight_decay or a bad number."""
    out: dict[str, dict[str, float]] = {}
    for tower, values in (settings or {}).items():
        if not isinstance(values, dict):
            raise ValueError(f"model.init_args.tower_optim.{tower} must map lr and/or weight_decay to numbers, "
                             f"got {values!r}")
        for key, value in values.items():
            option = f"model.init_args.tower_optim.{tower}.{key}"
            if key not in TOWER_OPTIM_KEYS:
                raise ValueError(f"{option}: unknown setting; a tower can set {', '.join(TOWER_OPTIM_KEYS)}")
            number = _number(value)
            if number is None or not (math.isfinite(number) and number >= 0):
                raise ValueError(f"{option} must be a finite number >= 0, got {value!r}")
        out[str(tower)] = {key: float(value) for key, value in values.items()}
    return out


def check_preservation(weights: dict[str, float] | None) -> dict[str, float]:
    """``preservation`` as a plain dict, after refusing a negative, NaN or infinite weight."""
    out: dict[str, float] = {}
    for tower, weight in (weights or {}).items():
        number = _number(weight)
        if number is None or not (math.isfinite(number) and number >= 0):
            raise ValueError(f"model.init_args.preservation.{tower} must be a finite number >= 0, got {weight!r}")
        out[str(tower)] = number
    return out


#: what ``tower_optim`` may set per tower
TOWER_OPTIM_KEYS = ("lr", "weight_decay")


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


def build(setting: str, factory: Any, first: Any, **extra: Any) -> Any:
    """``factory(first, **extra)`` (an optimizer from parameter groups, a scheduler from an optimizer), or one
    line naming the class, the missing or refused arguments and the options that set them."""
    target, kwargs = factory_target(factory)
    kwargs = {**kwargs, **extra}
    option = f"model.init_args.{setting}.init_args"
    parameters = _parameters(target)
    missing = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ValueError(
            f"{setting} {_name(target)} needs {', '.join(missing)}: set "
            f"{', '.join(f'{option}.{name}' for name in missing)}"
        )
    try:
        return factory(first, **extra)
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
