"""A loaded model as a function from a batch to its first output on the host (for
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

    def run(batch: ModelInput) -> np.ndarray:
        inputs = batch.map(lambda t: t.to(dtype) if t.is_floating_point() else t)
        with torch.inference_mode():
            return first_tensor(module(*inputs.args, **inputs.kwargs)).float().cpu().numpy()

    return run


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor in a model's output (a tensor, tuple, list or dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    for item in output:
        try:
            return first_tensor(item)
        except TypeError:
            continue
    raise TypeError("the model's output holds no tensor")
