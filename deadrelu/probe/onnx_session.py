"""ONNX Runtime sessions of a rewritten graph, with external data and custom kernels."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from deadrelu.errors import ModelLoadError
from deadrelu.load.onnx_format import OnnxModel
from deadrelu.probe.kernel import DOMAIN as KERNEL_DOMAIN
from deadrelu.probe.onnx_graph import model_bytes, used_initializers

EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class SessionFactory:
    """Builds ONNX Runtime sessions for augmented versions of one model."""

    def __init__(self, model: OnnxModel, providers: list[Any], optimise: bool, kernel: Path | None = None) -> None:
        self.model = model
        self.providers = providers
        self.optimise = optimise
        self.kernel = kernel  # deadrelu's custom-op library, registered in every session's options
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        self._stack.close()

    def options(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: deadrelu reports ORT's errors itself, in one line
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimise
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        # The memory pattern pre-plans one block for every tensor of a run; with the taps'
        # temporaries its first-fit layout grew the peak by ~140 MiB on ResNet-50 (batch 8)
        # and bought no speed. The default execution order is kept: PRIORITY_BASED ran
        # the reductions late and held every tapped tensor (+800 MiB).
        options.enable_mem_pattern = False
        if self.kernel is not None:
            options.register_custom_ops_library(os.fspath(self.kernel))
        return options

    def session(self, head: onnx.ModelProto) -> Any:
        import onnxruntime as ort

        if self.kernel is not None and not any(o.domain == KERNEL_DOMAIN for o in head.opset_import):
            head.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
        data = model_bytes(head, used_initializers(head, self.model.proto.graph.initializer))
        options = self.options()
        if self.model.has_external_data:
            options.add_session_config_entry(EXTERNAL_FOLDER_KEY, os.fspath(self.model.base_dir))
        try:
            return ort.InferenceSession(data, options, providers=self.providers)
        except Exception as exc:
            if self.model.has_external_data and "external" in str(exc).lower():
                return self.session_in_tempdir(data)
            raise ModelLoadError(f"{self.model.path}: onnxruntime cannot load the model: {error_line(exc)}") from exc

    def session_in_tempdir(self, data: bytes) -> Any:
        """For onnxruntime builds without the external-data folder option: the augmented
        model goes to a temporary directory beside links to the external data files."""
        import onnxruntime as ort

        folder = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="deadrelu-onnx-")))
        for location in self.model.external_files:
            link = folder / location
            link.parent.mkdir(parents=True, exist_ok=True)
            _link(self.model.base_dir / location, link)
        path = folder / "augmented.onnx"
        path.write_bytes(data)
        try:
            return ort.InferenceSession(os.fspath(path), self.options(), providers=self.providers)
        except Exception as exc:
            raise ModelLoadError(f"{self.model.path}: onnxruntime cannot load the model: {error_line(exc)}") from exc


def _link(target: Path, link: Path) -> None:
    """A hard link where the file system allows it (newer onnxruntime builds refuse
    external data reached through a symbolic link out of the model's folder), else a
    symbolic link."""
    try:
        os.link(target, link)
    except OSError:
        os.symlink(target, link)


def error_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
