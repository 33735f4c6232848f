"""What a config or a checkpoint may name: the classes it may make unimodality build.

A ``class_path`` in a config or a checkpoint is resolved here, before jsonargparse or Lightning imports or
calls anything, and accepted only when it names a class that is

* a registered plugin (an entry point of a ``unimodality.*`` group), or
* a subclass of one of the interfaces unimodality builds: its own plugin bases (`INTERFACES`) and the
  torch/Lightning classes a config chooses (optimizers, schedulers, loggers, callbacks, strategies, ...),

and, in a slot whose kind is known (``encoders``, ``loss``, ``optimizer``, ...), a subclass of that slot's
base. Functions (``os.system``, ``builtins.eval``) and other classes (``subprocess.Popen``) are refused.

A config may import the module a class lives in (installed code the user chose to run). A checkpoint may
not: it names only classes of modules already imported (every registered plugin is) or of ``torch`` and
``lightning``, so reading a checkpoint never runs an import it asks for.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Iterator
from typing import Any

from unimodality import registry
from unimodality.errors import DataError

#: the instantiator Lightning's ``load_from_checkpoint`` imports from a checkpoint's hyper-parameters
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
#: class paths of built-in plugins that moved, as older checkpoints and configs name them
MOVED = {
    "unimodality.sources.AnnDataSource": "unimodality.plugins.sources.anndata.AnnDataSource",
    "unimodality.sources.TableSource": "unimodality.plugins.sources.table.TableSource",
    "unimodality.molecules.MoleculeSource": "unimodality.plugins.sources.molecules.MoleculeSource",
    "unimodality.images.ImageSource": "unimodality.plugins.sources.images.ImageSource",
}
#: modules a checkpoint may have imported to resolve a class
TRUSTED_PREFIXES = ("torch.", "lightning.", "lightning_fabric.", "pytorch_lightning.", "torchmetrics.")


class UntrustedClassError(DataError):
    """A config or checkpoint names something unimodality must not build."""


@functools.cache
def _bases() -> dict[str, tuple[type, ...]]:
    """Slot kind -> the classes a value in that slot must derive from."""
    import torch
    from lightning.pytorch import Callback
    from lightning.pytorch.accelerators import Accelerator
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.plugins import CheckpointIO, LayerSync, Precision
    from lightning.pytorch.plugins.environments import ClusterEnvironment
    from lightning.pytorch.profilers import Profiler
    from lightning.pytorch.strategies import Strategy

    from unimodality.augmentation import Augmentation
    from unimodality.datamodule import DataModule
    from unimodality.encoder import Encoder
    from unimodality.evaluation import Evaluator
    from unimodality.loss import ContrastiveLoss
    from unimodality.setup import Setup
    from unimodality.sources import ModalitySource

    schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    kinds = {
        "setup": (Setup,),
        "datamodule": (DataModule,),
        "encoder": (Encoder,),
        "loss": (ContrastiveLoss,),
        "augmentation": (Augmentation,),
        "source": (ModalitySource,),
        "evaluator": (Evaluator,),
        "optimizer": (torch.optim.Optimizer,),
        "lr_scheduler": schedulers,
        "logger": (Logger,),
        "callback": (Callback,),
        "strategy": (Strategy,),
        "accelerator": (Accelerator,),
        "plugin": (Precision, ClusterEnvironment, CheckpointIO, LayerSync),
        "profiler": (Profiler,),
    }
    kinds["any"] = tuple(base for bases in kinds.values() for base in bases)
    return kinds


#: a config key -> the kind of the classes its value (or each item or entry of it) names
SLOTS = {
    "model": "setup", "data": "datamodule", "encoders": "encoder", "encoder": "encoder", "loss": "loss",
    "augmentations": "augmentation", "augmentation": "augmentation", "modalities": "source",
    "schema": "source", "source": "source", "optimizer": "optimizer", "lr_scheduler": "lr_scheduler",
    "logger": "logger", "callbacks": "callback", "strategy": "strategy", "accelerator": "accelerator",
    "plugins": "plugin", "profiler": "profiler", "evaluators": "evaluator",
}
#: slots where a plain name is Lightning's own registry name ("ddp", "gpu", "simple"), not a class
NAMED_SLOTS = {"strategy", "accelerator", "profiler", "plugin"}
#: keys holding one entry per modality
NAMED_ENTRIES = {"encoders", "modalities", "schema"}


def check_config(config: Any, origin: str, imports: bool = True) -> None:
    """Refuse ``config`` (a parsed config, or a checkpoint's hyper-parameters) when it names anything but
    the classes described in this module; ``origin`` names the file or option in the message."""
    for where, kind, name in _named_classes(config, (), "any"):
        check_class(name, kind, origin, ".".join(where), imports=imports)
    for where, name in _callable_arguments(config, (), imports):
        check_class(name, "any", origin, ".".join(where), imports=imports)


def upgrade_class_paths(config: Any) -> Any:
    """``config`` with the class paths of moved built-in plugins (`MOVED`) replaced by their new ones."""
    if isinstance(config, dict):
        return {key: MOVED.get(value, value) if key in ("class_path", "_class_path") and isinstance(value, str)
                else upgrade_class_paths(value) for key, value in config.items()}
    if isinstance(config, list):
        return [upgrade_class_paths(item) for item in config]
    return config


def check_checkpoint_classes(checkpoint: dict[str, Any], path: Any) -> None:
    """Every class a checkpoint names (model, data, and what they hold), resolved without imports."""
    origin = str(path)
    for key, kind in (("hyper_parameters", "setup"), ("datamodule_hyper_parameters", "datamodule")):
        hparams = checkpoint.get(key)
        if not isinstance(hparams, dict):
            continue
        instantiator = hparams.get("_instantiator")
        if instantiator is not None and instantiator != INSTANTIATOR:
            raise UntrustedClassError(
                f"{origin}: {key}._instantiator is {instantiator!r}; unimodality only rebuilds models with "
                f"{INSTANTIATOR}, so this checkpoint is refused"
            )
        if "_class_path" in hparams:
            check_class(hparams["_class_path"], kind, origin, f"{key}._class_path", imports=False)
        body = {k: v for k, v in hparams.items() if not k.startswith("_")}
        for where, slot, name in _named_classes(body, (key,), "any"):
            check_class(name, slot, origin, ".".join(where), imports=False)
        for where, name in _callable_arguments(body, (key,), imports=False):
            check_class(name, "any", origin, ".".join(where), imports=False)


def check_class(name: Any, kind: str, origin: str, where: str, imports: bool = True) -> type:
    """The class ``name`` (a short plugin name or a dotted path) if it may fill a slot of ``kind``."""
    bases = _bases()[kind]
    if not isinstance(name, str) or not name:
        raise UntrustedClassError(f"{origin}: {where}: a class_path must be a class name, got {name!r}")
    found = _lookup(name, bases, imports)
    if isinstance(found, str):
        raise UntrustedClassError(f"{origin}: {where}: {name!r} {found}{_expected(kind)}")
    if not isinstance(found, type):
        raise UntrustedClassError(
            f"{origin}: {where}: {name!r} is a {type(found).__name__}, not a class; only plugins and classes of "
            f"the expected interfaces can be named{_expected(kind)}"
        )
    if not issubclass(found, bases):
        what = " or ".join(b.__name__ for b in bases) if kind != "any" else "a unimodality, torch or Lightning base"
        raise UntrustedClassError(f"{origin}: {where}: {name!r} is not a subclass of {what}{_expected(kind)}")
    return found


#: slot kind -> its plugin group
GROUP_OF = {"setup": "setups", "datamodule": "datamodules", "encoder": "encoders", "loss": "losses",
            "augmentation": "augmentations", "source": "sources", "evaluator": "evaluators"}


def _expected(kind: str) -> str:
    return f" (registered {registry.describe(GROUP_OF[kind])})" if kind in GROUP_OF else ""


def _lookup(name: str, bases: tuple[type, ...], imports: bool) -> Any:
    """The object ``name`` refers to, or a sentence saying why it cannot be had."""
    loaded = registry.load_plugins()  # imports every plugin's module: those a checkpoint names are then found
    name = MOVED.get(name, name)
    if "." not in name:
        plugins = {p.cls for group in loaded.values() for p in group.get(name, [])}
        matches = {c for c in plugins | set(_known_subclasses()) if c.__name__ == name and issubclass(c, bases)}
        if len(matches) == 1:
            return matches.pop()
        if matches:
            paths = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in matches))
            return f"is ambiguous: several classes have that name ({paths}); use the full class path"
        return "is not a registered plugin or known class"
    module, _, attribute = name.rpartition(".")
    if module not in sys.modules:
        if not imports and not (module + ".").startswith(TRUSTED_PREFIXES):
            return (f"is in the module {module!r}, which is not imported: a checkpoint may only name registered "
                    "plugins and torch or Lightning classes")
        try:
            importlib.import_module(module)
        except Exception as error:  # a broken or absent module is the user's to hear about
            return f"cannot be imported ({type(error).__name__}: {error})"
    found = getattr(sys.modules[module], attribute, None)
    return found if found is not None else f"is not defined in the module {module!r}"


def _known_subclasses() -> Iterator[type]:
    seen: set[type] = set()
    stack = list(_bases()["any"])
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        yield cls
        stack.extend(cls.__subclasses__())


def _named_classes(value: Any, where: tuple[str, ...], kind: str) -> Iterator[tuple[tuple[str, ...], str, Any]]:
    """``(key path, slot kind, class name)`` of every class a config names."""
    if hasattr(value, "as_dict") and not isinstance(value, dict):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, dict):
        if "class_path" in value:
            yield (*where, "class_path"), kind, value["class_path"]
        for key, item in value.items():
            if key == "class_path":
                continue
            if key == "init_args":
                yield from _named_classes(item, (*where, key), "any")
                continue
            slot = SLOTS.get(str(key))
            if slot is None:
                yield from _named_classes(item, (*where, str(key)), "any")
            elif key in NAMED_ENTRIES and isinstance(item, dict) and "class_path" not in item:
                for name, entry in item.items():  # named entries: {tx: {class_path: ...}, ph: ...}
                    yield from _slot_value(entry, (*where, str(key), str(name)), slot)
            else:
                yield from _slot_value(item, (*where, str(key)), slot)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _named_classes(item, (*where, str(i)), kind)


def _callable_arguments(value: Any, where: tuple[str, ...], imports: bool) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(key path, import path)`` of every string given to a callable- or class-typed argument of a class a
    config builds (e.g. a scheduler's ``lr_lambda``): jsonargparse imports and passes such a string, and the
    class then calls it, so it must name an accepted class too, never a function such as ``builtins.print``."""
    if hasattr(value, "as_dict") and not isinstance(value, dict):
        value = value.as_dict()
    if isinstance(value, dict):
        init_args = value.get("init_args")
        if isinstance(value.get("class_path"), str) and isinstance(init_args, dict):
            typed = _callable_parameters(value["class_path"], imports)
            for name, argument in init_args.items():
                if name in typed:
                    for i, item in enumerate(argument if isinstance(argument, list | tuple) else [argument]):
                        path = (*where, "init_args", str(name), *([str(i)] if argument is not item else []))
                        if isinstance(item, str) and "." in item:
                            yield path, item
                        elif callable(item) and hasattr(item, "__qualname__"):  # already imported by the parser
                            yield path, f"{getattr(item, '__module__', None) or 'builtins'}.{item.__qualname__}"
        for key, item in value.items():
            yield from _callable_arguments(item, (*where, str(key)), imports)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _callable_arguments(item, (*where, str(i)), imports)


def _callable_parameters(class_path: str, imports: bool) -> set[str]:
    """The parameters of a class's ``__init__`` typed as a callable or a class (from their annotations)."""
    import inspect

    found = _lookup(class_path, (object,), imports)
    if not isinstance(found, type):
        return set()  # refused on its own by check_class
    try:
        parameters = inspect.signature(found.__init__).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in parameters if any(word in str(p.annotation) for word in ("Callable", "type[", "Type["))}


def _slot_value(value: Any, where: tuple[str, ...], kind: str) -> Iterator[tuple[tuple[str, ...], str, Any]]:
    if isinstance(value, str):
        # a class named by a string (jsonargparse also calls a plain import path given to a Callable-typed
        # argument); not a Lightning registry name ("ddp", "gpu") nor a path to a sub-config file
        if (kind not in NAMED_SLOTS or "." in value) and not value.endswith((".yaml", ".yml", ".json")):
            yield where, kind, value
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _slot_value(item, (*where, str(i)), kind)
        return
    yield from _named_classes(value, where, kind)
