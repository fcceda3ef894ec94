"""Calibration data sources behind one protocol: an iterator of model inputs.

`open_data` (`files`) turns a ``--data`` spec into a `CalibrationSource` (`sources`):

* ``file.npy`` -- read a batch at a time by seeking in the file (memory stays flat);
* ``file.npz`` / ``file.safetensors`` -- one array per model input (by input name; names
  ``arr_0, arr_1, ...`` or a single array are positional); read by rows in place (an
  ``np.savez_compressed`` archive whole);
* ``file.pt`` -- a tensor, a tuple of tensors or a dict of tensors (``weights_only=True``);
* a folder of ``.npy`` shards -- streamed shard after shard, batches spanning shards;
* a folder of images (JPEG/PNG, flat or one sub-folder per class) -- decoded with Pillow
  in `DataLoader` worker processes;
* ``pkg.module:function`` or ``path/to/file.py:function`` -- the function (your code)
  returns a `DataLoader`, a `Dataset`, or any iterable of batches;
* ``random`` -- seeded Gaussian inputs of ``--input-shape``.

A batch may be a tensor, a tuple/list of tensors (positional inputs) or a dict (keyword
inputs). Which elements of a tuple batch are model inputs: `InputSelector` (`inputs`) -- by default
the leading elements, as many as the model's forward takes positionally, so the usual
``(inputs, labels)`` batch of a classification `DataLoader` feeds only ``inputs``.
"""

from deadrelu.data.files import RANDOM, DataOptions, WantedEntries, open_data
from deadrelu.data.inputs import ExactBatches, InputSelector, ModelInput
from deadrelu.data.sources import (IMAGE_SUFFIXES, NORMALISATIONS, ArraySource, CalibrationSource, ImageFiles,
                                   ImageOptions, IterableSource, NpyRows, RandomSource, ShardSource,
                                   parse_normalisation, source_from_object)

__all__ = ["IMAGE_SUFFIXES", "NORMALISATIONS", "RANDOM", "ArraySource", "CalibrationSource", "DataOptions", "ExactBatches", "WantedEntries", "ImageFiles",
           "ImageOptions", "InputSelector", "IterableSource", "ModelInput", "NpyRows", "RandomSource", "ShardSource",
           "open_data", "parse_normalisation", "source_from_object"]
