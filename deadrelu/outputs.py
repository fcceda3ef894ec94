"""Writing output files atomically: a temporary file beside the target, then a rename.

A target that is no regular file -- a device (`/dev/null`), a FIFO, a pipe or terminal
reached through `/dev/stdout` or `/dev/fd/N` (process substitution) -- is a stream: it is
written in place, never replaced by a file. A symbolic link to a file keeps its link: the
file it points to is replaced.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
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


def is_stream(path: Path) -> bool:
    """Whether ``path`` exists and is no regular file or folder (a device, FIFO, socket)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_stdout_open(instead: str) -> None:
    """Refuse, before any work starts, a report bound for a closed stdout (`>&-`): it would
    vanish with exit 0. ``instead`` says where else it can go."""
    if sys.stdout is None:
        raise UsageError(f"stdout is closed, so the report has nowhere to go: {instead}")


def silence_stdout() -> None:
    """Point stdout at devnull once its reader has gone (`| head`), so that no later write
    or Python's last flush raises."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def check_target(target: Path, flag: str, inputs: Iterable[Path] = (), written: Iterable[Path] = ()) -> None:
    """Refuse, before any work starts, an output path that cannot be written, that is one
    of the command's ``inputs`` (the model, its external weights, the data, the arch file,
    ...) or lies inside an input folder (a --data folder), or that another of its outputs
    (``written``) takes: a long scan never ends in that error, and deadrelu never replaces
    or adds to what it reads."""
    directory = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"{flag} {target}: that is a directory; give a file path")
    if is_stream(target):
        return  # written in place: nothing beside it is created, and it is none of the inputs
    if not directory.is_dir():
        raise UsageError(f"{flag} {target}: directory {directory} does not exist")
    _check_writable(directory, target, flag)
    for source in inputs:
        if source.is_dir() and _inside(target, source):
            raise UsageError(f"{flag} {target}: that is inside the input folder {source}; deadrelu never "
                             "writes among what it reads, choose another path")
        if _same_file(target, source):
            raise UsageError(f"{flag} {target}: that is the input {source}; deadrelu never overwrites "
                             "what it reads, choose another path")
    for other in written:
        if _same_file(target, other):
            raise UsageError(f"{flag} {target}: another output of this command goes there; give another path")


def _check_writable(directory: Path, target: Path, flag: str) -> None:
    """Create and remove a file in ``directory``: permission bits say nothing for root, or
    on a read-only mount, and an unwritable place must fail now, not after the scan."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=directory)
    except OSError as exc:
        raise UsageError(f"{flag} {target}: directory {directory} is not writable ({exc.strerror})") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def read_paths(*arguments: str | Path | None) -> tuple[Path, ...]:
    """The existing files and folders among a command's path arguments, for `check_target`:
    ``file.py:function`` names file.py, a folder (of images or shards) stands for everything
    in it, and an ONNX model brings the external data files it references."""
    found: list[Path] = []
    for argument in arguments:
        if argument is None:
            continue
        text = str(argument)
        for candidate in (text, text.rpartition(":")[0]):
            path = Path(candidate) if candidate else None
            if path is not None and (path.is_file() or path.is_dir()):
                found.append(path)
                found.extend(_external_data(path))
                break
    return tuple(found)


def _external_data(model: Path) -> tuple[Path, ...]:
    if model.suffix.lower() != ".onnx" or not model.is_file():
        return ()
    from deadrelu.load.onnx_format import external_data_files

    return external_data_files(model)


def _inside(target: Path, folder: Path) -> bool:
    return folder.resolve() in target.resolve().parents


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside `path`, renamed onto `path` when the block
    ends without an exception (and removed when it raises): for content written piece by piece.
    A stream target is written in place; a symbolic link's file is replaced, not the link."""
    if is_stream(path):
        with open(path, "wb") as stream:
            yield stream
        return
    if path.is_symlink() and path.resolve().is_file():
        path = path.resolve()
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
