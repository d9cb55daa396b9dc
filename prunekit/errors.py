"""One exception tree. Every message names the problem and the next step.

The CLI maps each type to an exit code: 2 for a usage error (something the user typed or
pointed at is wrong), 1 for a failure while running.
"""

from __future__ import annotations


def did_you_mean(name: str, choices: list[str]) -> str:
    """'did you mean a, b? ' for the closest of ``choices``, or ''."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}? " if close else ""


class PrunekitError(Exception):
    """A failure with a message fit for the user; exit code 1."""

    exit_code = 1


class UsageError(PrunekitError):
    """The command line names something missing, unknown or out of range; exit code 2."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A pruner, model, dataset or parameter name that does not exist."""


class InputFileError(UsageError):
    """A file that is missing, unreadable, corrupt or refused as untrusted."""


class OutputExistsError(UsageError):
    """An output path that exists while --force was not given."""


class ModelMismatchError(PrunekitError):
    """Weights or data that do not fit the model's architecture."""


class PluginError(PrunekitError):
    """A plugin that cannot be imported, is declared twice, or breaks the contract."""


class NumericalError(PrunekitError):
    """NaN or Inf in statistics or scores."""


class OutOfMemoryError(PrunekitError):
    """The device ran out of memory even at the smallest chunk of samples."""


class GateError(PrunekitError):
    """A validation gate (--max-accuracy-drop, --min-cosine) failed."""
