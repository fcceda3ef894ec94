"""Memory does not grow with the dataset: 20x the data, about the same peak RSS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIX = Path(__file__).resolve().parent.parent / "fixtures"

PROBE = """
import resource, sys
from deadrelu import ScanOptions, scan
report = scan(sys.argv[1], sys.argv[2], ScanOptions(device="cpu", batch_size=512))
assert report.data.samples == int(sys.argv[3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(data: Path, samples: int) -> int:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(FIX / "mlp.ts.pt"), str(data), str(samples)],
                          capture_output=True, text=True, timeout=300, check=True)
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".safetensors"])
def test_peak_memory_is_flat_in_dataset_size(tmp_path: Path, suffix: str) -> None:
    """.npy, the arrays of an .npz written by np.savez (stored, not compressed) and the
    tensors of a .safetensors file: read by rows in place."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    small, large = 20_000, 400_000  # 2.6 MB and 51 MB of float32 rows of 32
    for name, rows in (("small", small), ("large", large)):
        array = rng.normal(size=(rows, 32)).astype(np.float32)
        if suffix == ".npy":
            np.save(tmp_path / f"{name}.npy", array)
        elif suffix == ".npz":
            np.savez(tmp_path / f"{name}.npz", x=array)
        else:
            save_file({"x": array}, str(tmp_path / f"{name}.safetensors"))
    base = peak_rss_kib(tmp_path / f"small{suffix}", small)
    grown = peak_rss_kib(tmp_path / f"large{suffix}", large)
    # The large file is 49 MB bigger; growing with it would show as +49 MB or more.
    assert grown - base < 15 * 1024, f"peak RSS {base} KiB -> {grown} KiB"
