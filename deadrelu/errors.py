"""One exception hierarchy for everything a user can get wrong, mapped to exit codes."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes, the contract with CI."""

    CLEAN = 0
    FINDINGS = 1  # a gate failed
    ERROR = 2  # usage, load, data or internal error
    INTERRUPTED = 130  # Ctrl-C: a partial report was written
    STDOUT_CLOSED = 141  # the reader of stdout went away (`| head`): 128 + SIGPIPE, as the shell gives


class DeadReluError(Exception):
    """Base of every error deadrelu reports as a one-line message (exit 2)."""

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(DeadReluError):
    """The command line or the API call is inconsistent."""


class ModelLoadError(DeadReluError):
    """A model file cannot be read, or is not what it claims to be."""


class UntrustedPickleError(ModelLoadError):
    """A file needs full unpickling (code execution) and the user did not allow it."""


class ArchitectureError(ModelLoadError):
    """`--arch` cannot be imported or does not fit the state_dict."""


class DataError(DeadReluError):
    """Calibration data cannot be read or does not fit the model."""


class ModelRunError(DeadReluError):
    """The model's forward pass raised."""


class ConfigError(UsageError):
    """`[tool.deadrelu]` (or `--config FILE`) is malformed; the message names the key."""


class SavedReportError(DeadReluError):
    """A saved JSON report (for `report`, `diff`, `--baseline`) cannot be read."""


def led_by(exc: DeadReluError, source: str) -> DeadReluError:
    """A new error of the same type (raise it ``from exc``), its message led by the file or
    data it came from unless it names that already (a model's or a source's own often does)."""
    message = str(exc)
    return type(exc)(message if source in message else f"{source}: {message}")


def one_line(message: str) -> str:
    """The line of an error message that says what went wrong. A DataLoader worker's
    error comes back as "Caught X in DataLoader worker process N. Original Traceback
    ...", ending with the original "pkg.X: message" line: that message is kept."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return message.strip()
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        last = lines[-1]
        kind, sep, rest = last.partition(": ")
        return rest if sep and " " not in kind else last
    return lines[0]
