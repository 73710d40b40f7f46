"""User-facing error types, importable without TensorFlow or Keras.

Every `LayerbeamError` is the user's to fix: the CLI prints its one-line message and exits
with code 2. Anything else is a bug or an infrastructure failure and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["LayerbeamError", "ConfigError", "ModelError", "SelectionError", "OutputError", "CommitError", "OutcomeError", "first_line"]


class LayerbeamError(ValueError):
    """An error in the user's input; the message names the value, the cause and the fix."""


class ConfigError(LayerbeamError):
    """A user error in the config or the command line."""


class ModelError(LayerbeamError):
    """The model cannot be loaded or traced."""


class SelectionError(LayerbeamError):
    """A layer selector matches nothing or is ambiguous."""


class OutputError(LayerbeamError):
    """A path given to read back is not a complete layerbeam output."""


class CommitError(RuntimeError):
    """The run's results do not add up, or its staged files are not as reported; nothing
    was committed. Not the user's input: it keeps its traceback."""


class OutcomeError(RuntimeError):
    """The run did its work but its outcome is not acceptable (no rows, or more dead letters
    than `output.max_dead_letter_fraction`); nothing was published, finished shards stay
    staged for a resumed run. The CLI prints it in one line (plus the top reasons) and exits
    with code 1. `counts` holds the run's counts (`records_read`, `rows_written`,
    `dead_letters`, `dead_letter_reasons`, `shard_errors`) where known."""

    def __init__(self, message: str, counts: dict | None = None):
        super().__init__(message)
        self.counts = counts or {}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors."""
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    line = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return line[:300]
