"""The command line's argument parser: jsonargparse's, with errors that name the culprit and the plugins."""

from __future__ import annotations

import re

from lightning.pytorch.cli import LightningArgumentParser

from unimodality import registry

_RESOLUTION_ERRORS = ("import path", "subclass of", "Problem with given class_path")


class UnimodalityArgumentParser(LightningArgumentParser):
    """Adds the registered plugin names (and the closest match) to class-resolution errors."""

    def error(self, message: str, ex: Exception | None = None):
        if "Registered plugins" not in message and any(m in message for m in _RESOLUTION_ERRORS):
            names = _unresolved_names(message)
            message = f"{message}\n\n{registry.unknown_name_hint(names[0] if names else '')}"
        return super().error(message, ex)


def _unresolved_names(message: str) -> list[str]:
    """The class names jsonargparse failed to resolve, as its message quotes them."""
    patterns = (r"import path string: ([\w.]+)", r"val='([\w.]+)'", r"Given value: ([\w.]+)\s*$")
    found = [m.group(1) for p in patterns for m in re.finditer(p, message, flags=re.MULTILINE)]
    return list(dict.fromkeys(found))
