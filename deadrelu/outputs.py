"""Writing output files atomically: a temporary file beside the target, then a rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from deadrelu.errors import UsageError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write `content` to `path` so that readers see the old file or the new one, never half."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    with atomic_file(path) as handle:
        handle.write(data)


def check_target(target: Path, flag: str, inputs: Iterable[Path] = (), written: Iterable[Path] = ()) -> None:
    """Refuse, before any work starts, an output path that cannot be written, that is one
    of the command's ``inputs`` (the model, the data, ...) or that another of its outputs
    (``written``) takes: a long scan never ends in that error, and deadrelu never
    replaces a file it reads."""
    directory = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"{flag} {target}: that is a directory; give a file path")
    if not directory.is_dir():
        raise UsageError(f"{flag} {target}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: directory {directory} is not writable")
    for source in inputs:
        if _same_file(target, source):
            raise UsageError(f"{flag} {target}: that is the input {source}; deadrelu never overwrites "
                             "what it reads, choose another path")
    for other in written:
        if _same_file(target, other):
            raise UsageError(f"{flag} {target}: another output of this command goes there; give another path")


def read_paths(*arguments: str | Path | None) -> tuple[Path, ...]:
    """The existing files among a command's path arguments (``file.py:function`` names
    file.py), for `check_target`."""
    found = []
    for argument in arguments:
        if argument is None:
            continue
        text = str(argument)
        for candidate in (text, text.rpartition(":")[0]):
            if candidate and Path(candidate).is_file():
                found.append(Path(candidate))
                break
    return tuple(found)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside `path`, renamed onto `path` when the block
    ends without an exception (and removed when it raises): for content written piece by piece."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"{path}: directory {directory} does not exist")
    if path.is_dir():
        raise UsageError(f"{path}: that is a directory; give a file path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write in {directory} ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
