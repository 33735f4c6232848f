"""Plugin registry: entry-point groups mapped to the classes they export.

Every plugin, built-in or third-party, is an entry point in one of :data:`GROUPS`. Loading them imports the
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
    for group in GROUPS:
        for ep in importlib.metadata.entry_points(group=group):
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
