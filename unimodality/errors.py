"""The errors unimodality reports as a problem with the user's input rather than a bug."""

from __future__ import annotations


class DataError(ValueError):
    """Input that cannot be used as it is (a file, a column, a setting); the message names the culprit."""


class CheckpointError(DataError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe, of another setup or a newer format."""
