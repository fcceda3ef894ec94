"""PyTorch formats: TorchScript, torch.export programs, state_dicts with an architecture,
and full pickles (only when trusted)."""

from __future__ import annotations

import contextlib
import io
import logging
import pickletools
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from deadrelu.errors import ArchitectureError, ModelLoadError, UntrustedPickleError, UsageError
from deadrelu.load.arch import build_architecture
from deadrelu.load.detect import ModelFormat

# Keys under which training scripts commonly nest the weights.
# In this order: the first that holds weights is loaded, unless --weights-key names another.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "ema",
                   "model_ema", "state_dict_ema", "ema_state_dict")


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's own notice
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, zip errors, ...
        raise ModelLoadError(f"{path}: cannot read TorchScript archive: {_first_line(exc)}") from exc


def load_exported(path: Path) -> tuple[torch.fx.GraphModule, Any]:
    try:
        with quiet_torch_logs():
            program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read torch.export program: {_first_line(exc)}") from exc
    module = program.module()
    _take_keywords_by_position(module)
    return module, program


def _take_keywords_by_position(module: torch.fx.GraphModule) -> None:
    """Let a program exported with keyword inputs (`export(m, (), {"x": x, "mask": m})`)
    take them by position too, in the order it was exported with: the scan passes inputs
    by position, and an exported module refuses positional arguments for them. A hook
    names them before the module's own input check; keyword calls work as before."""
    keywords = keyword_inputs(module)
    if keywords is None:
        return
    leading, names = keywords

    def by_name(_: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs or len(args) != leading + len(names):
            return None
        return args[:leading], dict(zip(names, args[leading:]))

    module.register_forward_pre_hook(by_name, with_kwargs=True, prepend=True)


def keyword_inputs(module: Any) -> tuple[int, tuple[str, ...]] | None:
    """(positional count, keyword names) of an exported module called with keyword
    tensors, from its input spec; None when it takes none (or nests them)."""
    spec = getattr(module, "_in_spec", None)
    if spec is None or spec.num_children != 2:
        return None
    args_spec, kwargs_spec = spec.child(0), spec.child(1)
    if kwargs_spec.num_children == 0 or not all(
            child.is_leaf() for part in (args_spec, kwargs_spec) for child in part.children()):
        return None
    return args_spec.num_children, tuple(kwargs_spec.context)


_TORCH_EXPORT_LOGGERS = ("torch._export.serde.serialize", "torch.export.pt2_archive._package", "torch._export",
                         "torch.export", "torch._export.non_strict_utils", "torch.fx.experimental.symbolic_shapes")


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch.export's (de)serialiser and tracer log notices (unused symbols, archive names,
    a dim specialised to the example's size) that are not the user's concern; keep them
    off stderr. A filter, not a level: torch resets its loggers' levels while it exports.
    A failed export also prints its partial graph to stderr (dozens of lines) before it
    raises: what it prints goes nowhere, the error still reaches the caller."""
    loggers = [logging.getLogger(name) for name in _TORCH_EXPORT_LOGGERS]
    for logger in loggers:
        logger.addFilter(_below_error)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(_below_error)


def load_torch_save(path: Path, arch: str | None, trust_pickle: bool,
                    weights_key: str | None = None) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """A torch.save file: a state_dict/checkpoint (with --arch) or a pickled module; with
    the notes the report should carry (which of several weights a checkpoint holds was used)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's protocol notices are not the user's concern
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _needs_full_unpickle(exc):
            raise ModelLoadError(f"{path}: cannot read torch.save file: {_first_line(exc)}") from exc
        return _load_pickled_module(path, trust_pickle, weights_key)
    state, notes = checkpoint_weights(obj, path, weights_key)
    if state is None:
        raise ModelLoadError(
            f"{path}: holds a {type(obj).__name__}, expected a state_dict, a checkpoint dict with "
            f"one of the keys {', '.join(CHECKPOINT_KEYS)}, or a pickled nn.Module"
        )
    if not arch:
        raise ArchitectureError(
            f"{path}: is a state_dict ({len(state)} tensors); pass --arch pkg.module:factory or "
            "--arch path/to/file.py:factory to build the model it belongs to"
        )
    model = build_architecture(arch)
    load_weights(model, state, path)
    return model, notes


def checkpoint_weights(obj: Any, path: Path, key: str | None) -> tuple[dict[str, torch.Tensor] | None, tuple[str, ...]]:
    """The state_dict a torch.save file holds, and a note when a checkpoint holds several
    (`state_dict` and `ema`, say): the first of `CHECKPOINT_KEYS` is used, or `key`."""
    plain = isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
    holders = [] if plain or not isinstance(obj, Mapping) else \
        [k for k in obj if isinstance(k, str) and isinstance(obj[k], Mapping) and find_state_dict(obj[k])]
    if key is not None:
        if key not in holders:
            held = f"weights under {', '.join(map(repr, holders))}" if holders else \
                "a plain state_dict" if plain else "no weights under any key"
            raise UsageError(f"--weights-key {key}: {path} has no weights under {key!r} (it holds {held})")
        return find_state_dict(obj[key]), ()
    state = find_state_dict(obj)
    known = [k for k in CHECKPOINT_KEYS if k in holders]
    if state is None or len(holders) < 2 or not known:
        return state, ()
    others = ", ".join(repr(k) for k in holders if k != known[0])
    return state, (f"{path}: the checkpoint holds weights under {known[0]!r} and {others}; scanned {known[0]!r} "
                   "(choose with --weights-key)",)


def load_safetensors(path: Path, arch: str | None) -> torch.nn.Module:
    """A state_dict stored as .safetensors (never executes code), built with --arch."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({_first_line(exc)})") from exc
    if not arch:
        raise ArchitectureError(
            f"{path}: is a .safetensors state_dict ({len(state)} tensors); pass --arch pkg.module:factory "
            "or --arch path/to/file.py:factory to build the model it belongs to"
        )
    model = build_architecture(arch)
    load_weights(model, _strip_prefix(state), path)
    return model


def saved_kind(module: Any, fmt: ModelFormat) -> ModelFormat:
    """Refine TORCH_SAVE into state_dict or pickle for the report."""
    if fmt is ModelFormat.SAFETENSORS:
        return ModelFormat.STATE_DICT
    if fmt is not ModelFormat.TORCH_SAVE:
        return fmt
    return ModelFormat.PICKLE if getattr(module, "_deadrelu_from_pickle", False) else ModelFormat.STATE_DICT


def find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensor mapping inside a checkpoint, `module.` prefixes (DataParallel/DDP) stripped."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip_prefix(dict(obj))
    for key in CHECKPOINT_KEYS:
        inner = obj.get(key)
        found = find_state_dict(inner) if isinstance(inner, Mapping) else None
        if found:
            return found
    return None


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped:  # in either order: DDP of a compiled model, or a compiled DDP
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    # BatchNorm's step counter, absent from old (torch < 0.4.1) or converted checkpoints:
    # torch fills it in, and it does nothing in eval mode
    state = {**{k: torch.zeros((), dtype=torch.long) for k in expected
                if k.endswith("num_batches_tracked") and k not in state}, **state}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if wrong:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5]]
            parts.append(f"shape mismatch: {', '.join(shapes)}")
        raise ArchitectureError(f"{path}: state_dict does not fit the --arch model; " + "; ".join(parts))
    on_meta = _on_meta(model)
    if on_meta:  # assigned tensors keep their dtype; copied ones take the model's, as torch does
        state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    # a factory that builds on the meta device (the fast-init idiom) wants the weights assigned,
    # not copied into storage that does not exist
    model.load_state_dict(state, strict=True, assign=bool(on_meta))
    left_on_meta = _on_meta(model)
    if left_on_meta:
        raise ArchitectureError(f"{path}: the --arch model was built on the meta device and the state_dict "
                                f"does not hold {_names(left_on_meta)} (non-persistent buffers); "
                                "build it on a real device")


def refuse_meta(model: torch.nn.Module, source: str) -> None:
    """A model with parameters or buffers on the meta device has no values to run."""
    on_meta = _on_meta(model)
    if on_meta:
        raise ModelLoadError(f"{source}: the model's {_names(on_meta)} are on the meta device (they hold no "
                             "values); load its weights first (load_state_dict(..., assign=True)) or build it on "
                             "a real device")


def _on_meta(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers that have no storage (built under ``torch.device('meta')``)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return sorted(name for name, tensor in tensors if tensor.is_meta)


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _needs_full_unpickle(exc: Exception) -> bool:
    import pickle

    return isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc)


def _load_pickled_module(path: Path, trust_pickle: bool,
                         weights_key: str | None) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """A pickled nn.Module, or one inside a pickled checkpoint dict (``{'model': module,
    'optimizer': ...}``, as YOLO-style trainers save): the module under `weights_key`, else
    under the first of `CHECKPOINT_KEYS` that holds one; a note says which when several do."""
    classes = pickled_globals(path)
    shown = ", ".join(sorted(classes)[:4]) or "Python objects"
    if not trust_pickle:
        raise UntrustedPickleError(
            f"{path}: is a full pickle ({shown}); loading it runs code from the file. "
            "Re-run with --trust-pickle only if you trust its source, or save a state_dict and use --arch"
        )
    sys.path[:0] = [str(path.parent.resolve()), str(Path.cwd())]
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot unpickle: {_first_line(exc)}") from exc
    finally:
        del sys.path[:2]
    module, notes = _pickled_module(obj, path, weights_key)
    refuse_meta(module, str(path))
    module._deadrelu_from_pickle = True  # type: ignore[attr-defined]
    return module, notes


def _pickled_module(obj: Any, path: Path, key: str | None) -> tuple[torch.nn.Module, tuple[str, ...]]:
    if isinstance(obj, torch.nn.Module) and key is None:
        return obj, ()
    if not isinstance(obj, dict):
        if key is not None:
            raise UsageError(f"--weights-key {key}: {path} is a pickled {type(obj).__name__}, not a checkpoint dict")
        raise ModelLoadError(f"{path}: the pickle holds a {type(obj).__name__}, expected an nn.Module")
    if key is not None:
        if not isinstance(obj.get(key), torch.nn.Module):
            held = ", ".join(k for k, v in obj.items() if isinstance(v, torch.nn.Module)) or "none"
            raise UsageError(f"--weights-key {key}: {path} holds no nn.Module under {key!r} (modules under: {held})")
        return obj[key], ()
    found = [k for k in CHECKPOINT_KEYS if isinstance(obj.get(k), torch.nn.Module)]
    if not found:  # one module under a key of its own ('detector')
        found = [k for k, v in obj.items() if isinstance(v, torch.nn.Module)][:2]
        found = found if len(found) == 1 else []
    if not found:
        raise ModelLoadError(f"{path}: the pickle holds a dict with no nn.Module under any of the keys "
                             f"{', '.join(CHECKPOINT_KEYS)}, nor one alone (it has {', '.join(map(str, obj))}); "
                             "name its key with --weights-key")
    notes = (f"{path}: the checkpoint holds modules under {' and '.join(map(repr, found))}; scanned {found[0]!r} "
             "(choose with --weights-key)",) if len(found) > 1 else ()
    return obj[found[0]], notes


def pickled_globals(path: Path) -> set[str]:
    """Qualified names the pickle would import, read with pickletools (nothing executed)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(name)
    except (zipfile.BadZipFile, StopIteration, OSError):
        data = path.read_bytes()
    found: set[str] = set()
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(str(arg))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
            elif opcode.name == "GLOBAL":
                found.add(str(arg).replace(" ", "."))
    except Exception:
        pass
    return {g for g in found if not g.startswith(("torch._utils", "collections.OrderedDict", "torch.FloatStorage", "torch._tensor"))}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
