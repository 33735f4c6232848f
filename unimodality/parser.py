"""The command line's argument parser: jsonargparse's, with one-line errors that name the culprit, and classes
switched on the command line (or by a later config) that start from their own defaults."""

from __future__ import annotations

import ast
import collections.abc
import contextlib
import contextvars
import difflib
import functools
import importlib
import os
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

from unimodality import registry

_RESOLUTION_ERRORS = ("import path", "subclass of", "Problem with given class_path")

#: set while a UnimodalityArgumentParser parses: jsonargparse's class-switch hook below applies only then
_parsing = contextvars.ContextVar("unimodality_parsing", default=False)
#: the command line being parsed, to find a dict's key that jsonargparse's messages leave out
_user_args: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("unimodality_args", default=None)


class UnimodalityArgumentParser(LightningArgumentParser):
    """jsonargparse's parser with one-line errors (``UNIMODALITY_DEBUG=1`` shows jsonargparse's full text),
    and a class switched by a later option or config that does not inherit the previous class's arguments."""

    def parse_args(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        with _parsing_context(list(sys.argv[1:] if args is None else args)):
            return super().parse_args(args, *rest, **kwargs)

    def parse_object(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        with _parsing_context():
            return super().parse_object(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        # nested parsers (of a class's arguments) raise, and the top level reports the whole chain once
        if not self.exit_on_error or os.environ.get("UNIMODALITY_DEBUG") or os.environ.get("JSONARGPARSE_DEBUG"):
            if self.exit_on_error and "Registered plugins" not in message and any(
                m in message for m in _RESOLUTION_ERRORS
            ):
                names = _unresolved_names(message)
                message = f"{message}\n\n{registry.unknown_name_hint(names[0] if names else '')}"
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        try:
            line = summarize(parser, message, ex)
        except Exception:  # a message we could not read must still be reported, not turned into a traceback
            line = _first_line(message)
        print(f"{_command(parser)}: error: {line}", file=sys.stderr, flush=True)
        parser.exit(2)


def _unresolved_names(message: str) -> list[str]:
    """The class names jsonargparse failed to resolve, as its message quotes them."""
    patterns = (r"import path string: ([\w.]+)", r"val='([\w.]+)'", r"Given value: ([\w.]+)\s*$")
    found = [m.group(1) for p in patterns for m in re.finditer(p, message, flags=re.MULTILINE)]
    return list(dict.fromkeys(found))


def _command(parser: ArgumentParser) -> str:
    """``unimodality fit`` for the fit subcommand's parser, or for the root parser while it parses ``fit``
    (whatever the program was started as)."""
    words = parser.prog.replace(" [options]", "").split()
    if len(words) > 1:
        return f"unimodality {words[-1]}"
    choices = getattr(getattr(parser, "_subcommands_action", None), "choices", None) or {}
    subcommand = next((arg for arg in _user_args.get() or [] if arg in choices), None)
    return f"unimodality {subcommand}" if subcommand else "unimodality"


def _first_line(message: str) -> str:
    return next((line.strip() for line in str(message).splitlines() if line.strip()), "invalid arguments")


# -- one line from jsonargparse's nested message ----------------------------------------------------------

_KEY = re.compile(r'^Parser key "([^"]+)"(?: element \d+)?:')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':")
_CALLABLE = re.compile(r"^Type .+ expects a function or a callable class:")
_UNION = "Does not validate against any of the Union subtypes"
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_UNRESOLVED = (
    re.compile(r"Expected a dot import path string: ([\w.]+)"),
    re.compile(r"Import path ([\w.]+) does not (?:correspond to a subclass of|implement protocol)"),
    re.compile(r"Expected '([\w.]+)' to be a (?:subclass|function|class)"),
)
_EXPECTED = re.compile(r"^Expected an? (.+?)\. Got value: (.*)$", re.DOTALL)


def summarize(parser: ArgumentParser, message: str, ex: BaseException | None) -> str:
    """jsonargparse's error as one line: what is wrong, the option's full dotted path, and the closest valid
    key or class name of that same place."""
    chain = _chain(ex)
    frames = _frames(chain)
    if not any(kind == "key" for kind, _ in frames):
        return _top_level(parser, message)
    place = _Place(parser)
    for kind, value in frames:
        place.enter(kind, value)
    leaf = next((e for e in reversed(chain) if str(e).strip()), message)
    return place.describe(leaf)


def _chain(ex: BaseException | None) -> list[BaseException]:
    """The exception and those it was raised from, outermost first (jsonargparse nests one per level)."""
    chain, seen = [], set()
    while ex is not None and id(ex) not in seen:
        seen.add(id(ex))
        chain.append(ex)
        ex = ex.__cause__ or (None if ex.__suppress_context__ else ex.__context__)
    return chain


def _frames(chain: list[BaseException]) -> list[tuple[str, Any]]:
    """``(kind, value)`` per level: ``key`` (a parameter), ``class`` (its class_path), ``given`` (the value a
    union was given, which names a dict's keys)."""
    frames: list[tuple[str, Any]] = []
    for error in chain:
        text = str(error)
        first = _first_line(text) if text.strip() else ""
        if match := _KEY.match(first):
            if frames[-1:] != [("key", match.group(1))]:  # each level is raised twice (TypeError, ArgumentError)
                frames.append(("key", match.group(1)))
        elif match := _CLASS.match(first):
            frames.append(("class", match.group(1)))
        elif _CALLABLE.match(first):
            class_path = _outer_class_path(text)
            if class_path:
                frames.append(("class", class_path))
        elif first == _UNION:
            frames.append(("given", text.rstrip().rsplit("Given value: ", 1)[-1]))
    return frames


def _outer_class_path(text: str) -> str | None:
    """The ``class_path`` of the outermost ``Namespace(...)`` of a message's last "Got value"."""
    _, _, value = text.rpartition("Got value: ")
    depth, quote, i = 0, "", 0
    while i < len(value):
        char = value[i]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 1 and value.startswith("class_path='", i):
            end = value.find("'", i + 12)
            return value[i + 12 : end] if end > 0 else None
        i += 1
    return None


class _Place:
    """Where in the config an error happened: the dotted path, and the parser and action found there."""

    def __init__(self, parser: ArgumentParser) -> None:
        self.parts: list[str | None] = []  # None: a dict's key, found later in what the user gave
        self.parser: ArgumentParser | None = parser
        self.action: Any = None
        self.typehint: Any = None  # of the value at the place: the action's, or its dict's values'
        self.class_path: str | None = None
        self.wants_dict_key = False

    def enter(self, kind: str, value: Any) -> None:
        if kind == "key":
            self.parts.append(value)
            self.action = _find_action(self.parser, value)
            self.typehint = getattr(self.action, "_typehint", None)
            self.wants_dict_key = _is_mapping(self.typehint)
        elif kind == "given" and self.wants_dict_key:
            self.enter_dict(_dict_key(value))
        elif kind == "class":
            if self.wants_dict_key:  # a dict of classes with no union message to name the key
                self.enter_dict(None)
            self.class_path = value
            self.parts.append("init_args")
            self.parser = _class_parser(value, _callable_arity(self.typehint))
            self.action = self.typehint = None

    def enter_dict(self, key: str | None) -> None:
        self.parts.append(key)
        self.wants_dict_key = False
        args = _args(_unwrap_optional(self.typehint))
        self.typehint = args[1] if len(args) == 2 else None

    def path(self, tail: str = "") -> str:
        """The dotted path so far (with ``init_args``), its dict keys looked up in the user's options."""
        parts = list(self.parts)
        for i, part in enumerate(parts):
            if part is None:
                parts[i] = _dict_key_in_input(parts[:i], [p for p in parts[i + 1 :] if p] + ([tail] if tail else []))
        return ".".join(p for p in parts if p)

    def describe(self, leaf: BaseException | str) -> str:
        text = str(leaf).strip()
        if self.wants_dict_key:
            self.enter_dict(None)
        if match := _NOT_ACCEPTED.search(text):
            name = match.group(1)
            return _unknown_key(self.path(name), name, _keys(self.parser), self.class_path)
        while self.parts and self.parts[-1] == "init_args":  # the setting itself is at fault, not an argument
            self.parts.pop()
        path = self.path()
        if isinstance(leaf, ImportError) and self.class_path:
            return f"option {path!r}: cannot import {self.class_path!r} ({_short(text)})"
        for pattern in _UNRESOLVED:
            if match := pattern.search(text):
                importable = pattern is not _UNRESOLVED[0]
                return _unknown_class(path, match.group(1), self.typehint, importable)
        if match := re.search(r"Multiple subclasses with name [^\n]*", text):
            return f"option {path!r}: {match.group(0)}"
        if match := re.match(r"the following arguments are required: (.+)", text):
            names = [n.strip() for n in match.group(1).split(",")]
            owner = f" (required by {self.class_path.rsplit('.', 1)[-1]})" if self.class_path else ""
            options = ", ".join(repr(f"{path}.init_args.{n}" if self.class_path else f"{path}.{n}") for n in names)
            return f"missing option {options}{owner}"
        if match := _EXPECTED.match(text):
            if match.group(2).strip().lower().lstrip("+-.") in ("nan", "inf", "infinity"):
                return f"option {path!r} must be a finite number, got {match.group(2).strip()!r}"
            typehint = self.typehint
            expected = _type_name(typehint) if typehint is not None else _clean_type(match.group(1))
            return f"option {path!r} expects {expected}, got {_short(match.group(2))!r}"
        return f"option {path!r}: {_short(_first_line(text))}"


def _top_level(parser: ArgumentParser, message: str) -> str:
    """One line for an error of the command's own options (no nested class at fault)."""
    first = _first_line(message)
    if match := re.match(r"unrecognized arguments: (.*)", first):
        options = [a for a in match.group(1).split() if a.startswith("--")]
        if not options:
            return f"unrecognized arguments: {match.group(1)}"
        key = options[0][2:].split("=", 1)[0]
        return _top_level_key(parser, key)
    if match := re.search(r"does not accept option '([^']+)'", first) or _NOT_ACCEPTED.search(first):
        return _top_level_key(parser, match.group(1))
    return _short(first, 300)


def _top_level_key(parser: ArgumentParser, key: str) -> str:
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    names = [k[len(prefix) :] for k in _keys(parser) if k.startswith(prefix) and "." not in k[len(prefix) :]]
    return _unknown_key(parent, name, names, None)


def _unknown_key(path: str, name: str, names: list[str], class_path: str | None) -> str:
    """``unknown option 'a.b'; did you mean 'a.c'?`` with the closest of the valid ``names`` at ``path``."""
    full = f"{path}.{name}" if path else name
    names = [n for n in names if n not in ("help", "config", "print_config")] if path else names
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        suggestion = f"{path}.{close[0]}" if path else close[0]
        return f"unknown option {full!r}; did you mean {suggestion!r}?"
    where = f" ({class_path})" if class_path else ""
    if not names and class_path:
        return f"unknown option {full!r}; {class_path} takes no options here"
    if names and len(names) <= 20:
        return f"unknown option {full!r}; {path or 'the command'}{where} takes: {', '.join(sorted(names))}"
    return f"unknown option {full!r}{where}"


def _unknown_class(path: str, name: str, typehint: Any, importable: bool = False) -> str:
    """An unresolvable class name: the closest name among the classes that fit there (plugins of the right
    group, or else the imported subclasses of the expected type); ``importable``: it exists, of another kind."""
    bases = _classes_in(typehint)
    groups = registry.groups_of(bases)
    expected = " or ".join(sorted({b.__name__ for b in bases})) or "class"
    if importable and "." in name:
        what = registry.singular(groups[0]) if groups else "class"
        article = "an" if what[:1] in "aeiou" else "a"
        return f"option {path!r}: {name!r} is not {article} {what} (a subclass of {expected})"
    if groups:
        return f"option {path!r}: {registry.name_hint(name, groups)}"
    known = sorted({c.__name__ for b in bases for c in _subclasses(b) if not c.__name__.startswith("_")})
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], known, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else " Give a class name or a full class path."
    return f"option {path!r}: unknown {expected} {name!r}.{hint}"


# -- what is valid at a place -----------------------------------------------------------------------------

def _find_action(parser: ArgumentParser | None, key: str) -> Any:
    for action in getattr(parser, "_actions", []):
        if action.dest == key:
            return action
    return None


def _keys(parser: ArgumentParser | None) -> list[str]:
    skip = {"help", "==SUPPRESS=="}
    return [a.dest for a in getattr(parser, "_actions", []) if a.dest not in skip and not a.dest.startswith("__")]


@functools.cache
def _class_parser(class_path: str, skip_positionals: int = 0) -> ArgumentParser | None:
    """A parser of a class's arguments (as jsonargparse builds for a subclass setting); None if it fails."""
    try:
        target = _import(class_path)
        parser = ArgumentParser(exit_on_error=False)
        skip: set[str | int] | None = {skip_positionals} if skip_positionals else None
        if isinstance(target, type):
            parser.add_class_arguments(target, skip=skip, fail_untyped=False)
        else:
            parser.add_function_arguments(target, skip=skip, fail_untyped=False)
        return parser
    except Exception:
        return None


def _args(typehint: Any) -> tuple[Any, ...]:
    return typing.get_args(typehint) if typehint is not None else ()


def _unwrap_optional(typehint: Any) -> Any:
    if typing.get_origin(typehint) in (typing.Union, types.UnionType):
        rest = [a for a in _args(typehint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typehint
    return typehint


def _is_mapping(typehint: Any) -> bool:
    origin = typing.get_origin(_unwrap_optional(typehint))
    return isinstance(origin, type) and issubclass(origin, collections.abc.Mapping)


def _callable_arity(typehint: Any) -> int:
    """How many positionals a ``Callable[[A, ...], R]`` setting leaves to the code (e.g. an optimizer's params)."""
    typehint = _unwrap_optional(typehint)
    if typing.get_origin(typehint) is collections.abc.Callable:
        args = _args(typehint)
        return len(args[0]) if args and isinstance(args[0], list) else 0
    return 0


def _classes_in(typehint: Any) -> list[type]:
    """The classes a type hint asks for (those in unions, containers and callables' return types)."""
    if isinstance(typehint, type) and typehint not in (object, type(None)) and not typing.get_args(typehint):
        return [typehint]
    found: list[type] = []
    args = _args(typehint)
    if typing.get_origin(typehint) is collections.abc.Callable and args:
        args = args[1:]  # what it returns, not what it takes
    elif _is_mapping(typehint) and typing.get_origin(typehint) not in (typing.Union, types.UnionType):
        args = args[1:]  # the values, not the keys
    for arg in args:
        if isinstance(arg, list):
            continue
        found += [c for c in _classes_in(arg) if c not in found]
    return found


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _dict_key(given: str) -> str | None:
    """The key of a dict setting a union was given: ``NestedArg(key='tx.init_args.x', ...)`` or ``{'tx': ..}``;
    None when that does not tell (several keys), to be looked up in the user's options."""
    if match := re.match(r"NestedArg\(key='([^'.]+)", given):
        return match.group(1)
    with contextlib.suppress(Exception):
        value = ast.literal_eval(given)
        if isinstance(value, dict) and len(value) == 1:
            return str(next(iter(value)))
    return None


def _dict_key_in_input(before: list[str | None], after: list[str]) -> str:
    """The key of a dict setting at ``before`` that the user's options (command line or config files) give
    with ``after`` below it; ``*`` when it cannot be told."""
    prefix = [p for p in before if p and p != "init_args"]
    tail = [p for p in after if p != "init_args"]
    found: dict[str, bool] = {}
    for key in _input_keys():
        parts = key.split(".")
        if len(parts) > len(prefix) and parts[: len(prefix)] == prefix:
            found.setdefault(parts[len(prefix)], False)
            if parts[len(prefix) + 1 :] == tail:
                found[parts[len(prefix)]] = True
    exact = [k for k, hit in found.items() if hit]
    if len(exact) == 1:
        return exact[0]
    return next(iter(found)) if len(found) == 1 else "*"


def _input_keys() -> list[str]:
    """Every key the user gave, dotted and without ``init_args``: options, then the keys of config files."""
    import yaml

    args, keys = _user_args.get() or [], []
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path is not None:
            with contextlib.suppress(Exception):
                keys += _flatten(yaml.safe_load(Path(path).read_text()))
        elif arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            keys.append(key.rstrip("+"))
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value.lstrip().startswith("{"):  # a JSON/YAML value: its keys lie below the option
                with contextlib.suppress(Exception):
                    keys += [f"{key}.{k}" for k in _flatten(yaml.safe_load(value))]
    return [".".join(p for p in k.split(".") if p != "init_args") for k in keys]


def _flatten(value: Any, prefix: str = "") -> list[str]:
    if not isinstance(value, dict):
        return [prefix] if prefix else []
    keys = [prefix] if prefix else []
    for key, item in value.items():
        keys += _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return keys


def _type_name(typehint: Any) -> str:
    if isinstance(typehint, type) and not typing.get_args(typehint):
        return typehint.__name__
    if typing.get_origin(typehint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in _args(typehint))
    if typing.get_origin(typehint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in _args(typehint))
    return _clean_type(str(typehint))


def _clean_type(text: str) -> str:
    text = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", text)
    return re.sub(r"\b(?:[a-z_][\w]*\.)+([A-Za-z_]\w*)", r"\1", text)


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- a switched class starts from its own defaults --------------------------------------------------------

@contextlib.contextmanager
def _parsing_context(args: list[str] | None = None) -> Iterator[None]:
    token = _parsing.set(True)
    # the outermost call's are the user's options (nested class parsers parse one generated option each)
    args_token = _user_args.set(args) if args is not None and _user_args.get() is None else None
    try:
        yield
    finally:
        _parsing.reset(token)
        if args_token is not None:
            _user_args.reset(args_token)


def _install_class_switch_hook() -> None:
    """jsonargparse keeps, when a setting's ``class_path`` changes (``--model.init_args.loss SigLipLoss`` after
    a config's ``ClipLoss``), the previous init_args the new class also accepts: SigLIP would train with CLIP's
    ``init_scale``, and SGD with AdamW's ``weight_decay`` (by design, see jsonargparse issue #460; there is no
    setting). While our parser parses, a changed class drops them all, so the new class starts from its own
    defaults and only what is given with or after the switch applies."""
    from jsonargparse import _typehints

    original = getattr(_typehints, "discard_init_args_on_class_path_change", None)
    if original is None or getattr(original, "_unimodality", False):
        return  # another jsonargparse layout: keep its behaviour (tests/test_bad_options.py notices)

    def discard(parser_or_action: Any, prev_val: Any, value: Any) -> None:
        original(parser_or_action, prev_val, value)
        if not _parsing.get() or not prev_val or "init_args" not in prev_val:
            return
        if not _switched(prev_val.get("class_path"), value.get("class_path")):
            return
        init_args = prev_val["init_args"]
        if isinstance(init_args, dict):
            init_args.clear()
        else:
            for key in list(vars(init_args)):
                delattr(init_args, key)

    discard._unimodality = True  # type: ignore[attr-defined]
    _typehints.discard_init_args_on_class_path_change = discard


def _switched(before: str | None, after: str | None) -> bool:
    """Whether two class paths name different classes (``torch.optim.AdamW`` is ``torch.optim.adamw.AdamW``)."""
    if not before or not after or before == after:
        return False
    try:
        return _import(before) is not _import(after)
    except Exception:  # cannot tell: treat as a switch, which starts from the class's own defaults
        return True


def _import(path: str) -> Any:
    """The object a dotted path names (a module's attribute, or an attribute of one)."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            target = getattr(target, name)
        return target
    raise ImportError(f"cannot import {path!r}")


_install_class_switch_hook()


# -- plugins imported when jsonargparse first looks for a class by name ------------------------------------

#: while False, jsonargparse's subclass look-ups do not import the plugins (a command line that only asks for
#: help, which lists the classes already imported, as it always has); see `plugins_on_demand`
_load_plugins = contextvars.ContextVar("unimodality_load_plugins", default=True)


def _install_plugin_hook() -> bool:
    """Import the plugins (`registry.load_plugins`) the first time jsonargparse lists a type's subclasses,
    which it does to resolve a short class name (``loss: ClipLoss``) and to show them in help, instead of
    on every command: a command line that names no class by its short name (an option error, ``--print_config``
    of full class paths) then never imports the plugins and what they import (pandas, anndata...). Returns
    whether the hook is in place (False for another jsonargparse layout: the CLI then loads them up front)."""
    from jsonargparse import _typehints

    original = getattr(_typehints, "get_all_subclass_paths", None)
    if original is None or not callable(getattr(_typehints, "resolve_class_path_by_name", None)):
        return False
    if getattr(original, "_unimodality", False):
        return True

    @functools.wraps(original)
    def get_all_subclass_paths(*args: Any, **kwargs: Any) -> list[str]:
        if _load_plugins.get():
            registry.load_plugins()  # cached: one import of the entry points per process
        return original(*args, **kwargs)

    get_all_subclass_paths._unimodality = True  # type: ignore[attr-defined]
    # resolve_class_path_by_name and the help's "known subclasses" call it through the module; the completion
    # modules hold their own reference
    for name, module in list(sys.modules.items()):
        if name.startswith("jsonargparse") and getattr(module, "get_all_subclass_paths", None) is original:
            module.get_all_subclass_paths = get_all_subclass_paths
    return True


#: whether plugins are imported on demand (else `unimodality.cli` imports them before parsing)
PLUGINS_ON_DEMAND = _install_plugin_hook()


@contextlib.contextmanager
def plugins_on_demand(enabled: bool) -> Iterator[None]:
    """Within this block, jsonargparse's subclass look-ups import the plugins first only if ``enabled``."""
    token = _load_plugins.set(enabled)
    try:
        yield
    finally:
        _load_plugins.reset(token)


# -- configs given one after the other: dicts of named classes merge ---------------------------------------

def compose_configs(args: list[str]) -> list[str]:
    """``--config base.yaml --config more.yaml``: jsonargparse merges nested settings but *replaces* a dict
    setting such as ``data.init_args.modalities`` or ``model.init_args.encoders``, so a second config naming
    one modality would drop the others (while ``--data.init_args.modalities.ph...`` on the command line
    merges). Here a later config's dicts of named classes (every value a mapping with ``class_path``) are
    completed with the entries of the earlier configs: same name, same class -> their settings merge (the
    later wins); another class -> the later entry replaces it. Returns the arguments with each such later
    config given as JSON text of what it sets."""
    import json

    import yaml

    seen: dict[str, Any] = {}
    out = list(args)
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path is None or not Path(path).is_file():
            continue
        with contextlib.suppress(Exception):
            config = yaml.safe_load(Path(path).read_text())
            if not isinstance(config, dict):
                continue
            completed, changed = _complete_named(config, seen)
            if changed:
                text = json.dumps(completed)
                if arg.startswith("--config="):
                    out[i] = f"--config={text}"
                else:
                    out[i + 1] = text
            seen = _merge(seen, config)
    return out


def _is_named(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(v, dict) and "class_path" in v for v in value.values())


def _complete_named(config: dict[str, Any], earlier: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``config`` with its dicts of named classes completed from ``earlier``'s same dicts."""
    changed = False
    out = dict(config)
    for key, value in config.items():
        before = earlier.get(key) if isinstance(earlier, dict) else None
        if _is_named(value) and _is_named(before):
            out[key] = {**before, **{name: _merge(before.get(name), entry) for name, entry in value.items()}}
            changed = changed or set(before) - set(value) != set() or out[key] != value
        elif isinstance(value, dict) and isinstance(before, dict):
            out[key], sub = _complete_named(value, before)
            changed = changed or sub
    return out, changed


def _merge(before: Any, after: Any) -> Any:
    """``after`` over ``before``: mappings merge key by key, except a class setting whose ``class_path``
    changes (the new class starts from its own defaults, as on the command line); anything else replaces."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return after
    if "class_path" in before and "class_path" in after and _short_name(before["class_path"]) != _short_name(
            after["class_path"]):
        return after
    merged = dict(before)
    for key, value in after.items():
        merged[key] = _merge(before.get(key), value)
    return merged


def _short_name(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1]
