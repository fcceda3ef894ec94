"""Importing the user's architecture factory for `--arch` (this runs the user's code)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from deadrelu.errors import ArchitectureError


def import_callable(spec: str, what: str) -> Any:
    """Resolve 'pkg.module:attr' or 'path/to/file.py:attr' to the attribute."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ArchitectureError(f"{what} '{spec}': expected pkg.module:name or path/to/file.py:name")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target), what, spec)
    else:
        try:
            with _on_path(Path.cwd()):  # as under `python -m`: the console script's path lacks it
                module = importlib.import_module(target)
        except (Exception, SystemExit) as exc:
            raise ArchitectureError(f"{what} '{spec}': cannot import {target}: {user_error(exc)}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ArchitectureError(f"{what} '{spec}': {target} has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def user_error(exc: BaseException) -> str:
    """The user's code's error, in words; a `sys.exit` there (an argparse at import) is one
    too: it must not decide deadrelu's exit code."""
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}) (the code calls sys.exit, e.g. argparse at import)"
    return str(exc)


def _import_file(path: Path, what: str, spec: str) -> Any:
    if not path.is_file():
        raise ArchitectureError(f"{what} '{spec}': {path} does not exist")
    name = f"_deadrelu_user_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ArchitectureError(f"{what} '{spec}': cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        with _on_path(path.parent.resolve()):
            module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        raise ArchitectureError(f"{what} '{spec}': importing {path} raised: {user_error(exc)}") from exc
    return module


@contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """``folder`` first on sys.path while the user's module imports (and its own imports)."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def build_architecture(spec: str) -> torch.nn.Module:
    factory = import_callable(spec, "--arch")
    try:
        model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    except (Exception, SystemExit) as exc:
        raise ArchitectureError(f"--arch '{spec}': calling the factory raised: {user_error(exc)}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ArchitectureError(f"--arch '{spec}': returned {type(model).__name__}, expected an nn.Module")
    return model
