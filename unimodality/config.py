"""Config form of objects: ``{"class_path": ..., "init_args": ...}``, as jsonargparse writes it.

Checkpoints store hyperparameters in this form so they load with ``weights_only=True`` and rebuild the
model with no config at hand, whether the model came from the CLI or was built in Python.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import warnings
from typing import Any

from jsonargparse import Namespace
from jsonargparse import typing as jsonargparse_typing

_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class RecordsInitArgs:
    """Mixin that remembers the arguments an object was built with, so it can be written as config."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            if "_init_config" not in self.__dict__:  # the outermost subclass records, its bases don't
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(list(bound.arguments.items())[1:])
                # jsonargparse's lazy_instance defaults are dynamic subclasses: record the real class
                real = next(
                    c for c in type(self).__mro__
                    if not c.__module__.startswith("jsonargparse") and not c.__name__.startswith("LazyInstance_")
                )
                self.__dict__["_init_config"] = {"class_path": class_path(real), "init_args": arguments}
            init(self, *args, **kw)

        cls.__init__ = recording_init


def lazy_default(class_type: type, **init_args: Any) -> Any:
    """jsonargparse's ``lazy_instance(class_type, **init_args)``, for a default argument of a plugin's
    ``__init__`` (e.g. ``loss: ContrastiveLoss = lazy_default(ClipLoss)``).

    The same object as jsonargparse builds, without the ``inspect.stack()`` its version calls to find the
    caller's module: that reads every frame's source line, 0.1-0.2 s per default at import time, which every
    command that loads the plugins paid.
    """
    base = getattr(jsonargparse_typing, "_LazyInitBaseClass", None)
    if base is None:  # jsonargparse changed its internals: its own (slower) function still works
        return jsonargparse_typing.lazy_instance(class_type, **init_args)
    module = sys.modules.get(sys._getframe(1).f_globals.get("__name__", ""))
    name = f"LazyInstance_{class_type.__name__}"
    lazy_class = getattr(module, name, None)
    if lazy_class is None:
        lazy_class = type(name, (base, class_type), {"__doc__": f"Class for lazy instances of {class_type}"})
        if module is not None:
            lazy_class.__module__ = module.__name__
            setattr(module, name, lazy_class)
    return lazy_class(class_type, init_args)


def config_form(value: Any) -> Any:
    """Turn objects (classes, partials, objects that record their init args) into plain config data."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Namespace):  # jsonargparse converts config dicts it parses in place
        return config_form(value.as_dict())
    if isinstance(value, dict):
        return {key: config_form(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [config_form(item) for item in value]
    if isinstance(value, type):
        return {"class_path": class_path(value)}
    if isinstance(value, functools.partial):
        # jsonargparse's callables are partial(<helper>, <helper>, cls, **init_args)
        classes = [arg for arg in (value.func, *value.args) if isinstance(arg, type)]
        if classes:
            return {"class_path": class_path(classes[-1]), "init_args": config_form(dict(value.keywords))}
    if "_init_config" in getattr(value, "__dict__", {}):
        return config_form(value.__dict__["_init_config"])
    raise TypeError(
        f"cannot store {value!r} ({type(value).__name__}) as a hyperparameter: pass a class, a "
        "functools.partial of a class, or an object whose class derives from a unimodality base"
    )


def is_plain(value: Any) -> bool:
    """True when ``value`` is already config data (no objects)."""
    try:
        return config_form(value) == value
    except TypeError:
        return False


class ConfigHyperparameters:
    """Mixin for LightningModules/DataModules: ``save_hyperparameters()`` keeps config data, not objects.

    From the CLI, Lightning already hands over the parsed config. Built in Python, the objects are turned
    into config data here, and Lightning is told to rebuild them with jsonargparse on load, exactly as for
    a CLI-built model. After such a load ``__init__`` saw objects again, so the stored config is put back
    (``restore_config_hparams``): the next save is again loadable with ``weights_only=True``.
    """

    def save_hyperparameters(self, *args: Any, frame: Any = None, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # objects are turned into config below, so Lightning's advice to leave modules out is moot
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            super().save_hyperparameters(*args, frame=frame or inspect.currentframe().f_back, **kwargs)
        hparams = dict(self.hparams)
        if not is_plain(hparams):
            hparams = config_form(hparams)
            hparams["_class_path"] = class_path(type(self))
            hparams["_instantiator"] = _INSTANTIATOR
        self.set_config_hparams(hparams)

    def set_config_hparams(self, hparams: dict[str, Any]) -> None:
        self.hparams.clear()
        self.hparams.update(hparams)
        self._hparams_initial = copy.deepcopy(self.hparams)

    def restore_config_hparams(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if stored:
            self.set_config_hparams(config_form(dict(stored)))
