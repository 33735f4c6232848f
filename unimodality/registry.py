"""Plugin registry: entry-point groups mapped to the classes they export.

Every plugin, built-in or third-party, is an entry point in one of `GROUPS`. Loading them imports the
classes, which is all jsonargparse needs to resolve short class names (``loss: ClipLoss``) in configs.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import warnings
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: entry-point group -> what its plugins are (for messages)
GROUPS: dict[str, str] = {
    "unimodality.datamodules": "datamodules",
    "unimodality.encoders": "encoders",
    "unimodality.losses": "losses",
    "unimodality.setups": "setups",
    "unimodality.augmentations": "augmentations",
    "unimodality.sources": "sources",
    "unimodality.evaluators": "evaluators",
}


class PluginLoadWarning(UserWarning):
    """A plugin's entry point could not be imported and was skipped."""


@dataclass(frozen=True)
class Plugin:
    name: str
    group: str
    cls: type
    dist: str | None

    @property
    def class_path(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


_loaded: dict[str, dict[str, list[Plugin]]] | None = None


def load_plugins(reload: bool = False) -> dict[str, dict[str, list[Plugin]]]:
    """Import every entry point of every group; skip (with a warning) those that fail to import.

    Returns ``{group: {name: [Plugin, ...]}}``; a name maps to several plugins when two packages export it.
    """
    global _loaded
    if _loaded is not None and not reload:
        return _loaded
    loaded: dict[str, dict[str, list[Plugin]]] = {group: {} for group in GROUPS}
    every = importlib.metadata.entry_points()  # one scan of the installed packages, not one per group
    for group in GROUPS:
        for ep in every.select(group=group):
            dist = ep.dist.name if ep.dist is not None else None
            try:
                cls = ep.load()
            except Exception as err:  # a broken third-party plugin must not break the CLI
                warnings.warn(
                    f"unimodality: skipping plugin {ep.name!r} ({ep.value}) of group {group!r}"
                    f"{f' from package {dist!r}' if dist else ''}: {type(err).__name__}: {err}",
                    PluginLoadWarning,
                    stacklevel=2,
                )
                continue
            plugins = loaded[group].setdefault(ep.name, [])
            # the same distribution can be visible twice (e.g. editable install + PYTHONPATH)
            if all(p.cls is not cls for p in plugins):
                plugins.append(Plugin(ep.name, group, cls, dist))
    _loaded = loaded
    return loaded


def registered(group: str) -> dict[str, list[Plugin]]:
    """Plugins of one group (``"losses"`` or ``"unimodality.losses"``) by name."""
    return load_plugins()[_group(group)]


def _group(group: str) -> str:
    full = group if group in GROUPS else f"unimodality.{group}"
    if full not in GROUPS:
        raise KeyError(f"Unknown plugin group {group!r}; groups are {', '.join(GROUPS)}")
    return full


def describe(group: str) -> str:
    """One line listing the registered names of a group, e.g. ``losses: ClipLoss, SigLipLoss``."""
    names = sorted(registered(group))
    return f"{GROUPS[_group(group)]}: {', '.join(names) if names else '(none registered)'}"


def unknown_name_hint(name: str) -> str:
    """Explain an unresolvable class name: the closest registered name, ambiguity, and every group's list."""
    short = name.rsplit(".", 1)[-1]
    lines = []
    everything = {n: ps for group in GROUPS for n, ps in registered(group).items()}
    if short in everything and len(everything[short]) > 1:
        paths = ", ".join(p.class_path for p in everything[short])
        lines.append(f"{short!r} is exported by several plugins ({paths}): use the full class path.")
    else:
        close = difflib.get_close_matches(short, list(everything), n=1, cutoff=0.6)
        if close:
            lines.append(f"Did you mean {close[0]!r}?")
    lines.append("Registered plugins (`unimodality plugins` lists them with their packages):")
    lines.extend(f"  {describe(group)}" for group in GROUPS)
    return "\n".join(lines)


def singular(group: str) -> str:
    """What one plugin of a group is called in messages: ``loss`` for ``losses``."""
    plural = GROUPS[_group(group)]
    return plural[:-2] if plural.endswith("sses") else plural.removesuffix("s")


def groups_of(bases: list[type]) -> list[str]:
    """The groups whose plugins fit a setting that asks for one of ``bases`` (e.g. ``Encoder``: encoders)."""
    bases = [b for b in bases if isinstance(b, type) and b is not object]
    if not bases:
        return []
    return [
        group for group in GROUPS
        if any(isinstance(p.cls, type) and issubclass(p.cls, tuple(bases))
               for plugins in registered(group).values() for p in plugins)
    ]


def name_hint(name: str, groups: list[str]) -> str:
    """One line for a class name that does not resolve where a plugin of ``groups`` is expected: the closest
    name of those groups only (a loss is no answer for an encoder), ambiguity, and the registered names."""
    short = name.rsplit(".", 1)[-1]
    what = singular(groups[0]) if groups else "plugin"
    names = {n: ps for group in groups for n, ps in registered(group).items()}
    others = {n: group for group in GROUPS if group not in groups for n in registered(group)}
    if short in names and len(names[short]) > 1:
        paths = ", ".join(p.class_path for p in names[short])
        line = f"{short!r} is exported by several plugins ({paths}): use the full class path."
    elif short in others and short not in names:
        line = f"{short!r} is {_a(singular(others[short]))}, not {_a(what)}."
    else:
        line = f"unknown {what} {name!r}."
        close = difflib.get_close_matches(short, list(names), n=1, cutoff=0.6)
        if close:
            line += f" Did you mean {close[0]!r}?"
    listing = "; ".join(describe(group) for group in [*groups, *(g for g in GROUPS if g not in groups)])
    return f"{line} Registered plugins (`unimodality plugins` lists them): {listing}"


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"
