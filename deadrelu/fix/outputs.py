"""A loaded model as a function from a batch to all its outputs on the host (for
comparing a rewritten model with the original)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deadrelu.data import ModelInput
from deadrelu.fix.verify import OutputFn
from deadrelu.load import LoadedModel
from deadrelu.load.detect import ModelFormat
from deadrelu.probe.torch_stream import model_dtype


def output_function(loaded: LoadedModel) -> OutputFn:
    if loaded.format is ModelFormat.ONNX:
        from deadrelu.fix.onnx_rewrite import onnx_output_function

        return onnx_output_function(loaded)
    module = loaded.module
    if not (isinstance(module, torch.fx.GraphModule)):
        module.eval()
    dtype = model_dtype(module)

    def run(batch: ModelInput) -> list[np.ndarray]:
        inputs = batch.map(lambda t: t.to(dtype) if t.is_floating_point() else t)
        with torch.inference_mode():
            found = all_tensors(module(*inputs.args, **inputs.kwargs))
        return [t.double().cpu().numpy() for t in found]

    return run


def all_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in all_tensors(item)]
    return []
