"""Peak memory of a scan at 1x and 10x the data: it must stay flat (target: within 5%).

    python tests/bench/bench_memory.py [--model fixtures/mlp.ts.pt] [--samples 20000] [--width 32]

Each scan runs in its own process (peak RSS: VmHWM, which unlike getrusage's ru_maxrss
does not carry the parent's peak over fork + exec); the data are .npy files read a batch
at a time. Prints both peaks, the engine each scan ran on (``--compile auto`` may compile
the larger scan only) and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROBE = """
import re, resource, sys
from pathlib import Path
from deadrelu import ScanOptions, scan
report = scan(sys.argv[1], sys.argv[2], ScanOptions(device="cpu", batch_size=256))
status = Path("/proc/self/status")
hwm = re.search(r"VmHWM:\\s+(\\d+)", status.read_text()) if status.exists() else None
print(report.data.samples, report.engine, hwm.group(1) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak(model: str, data: Path) -> tuple[int, str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, model, str(data)], capture_output=True, text=True, check=True)
    samples, engine, rss = out.stdout.split()[-3:]
    return int(samples), engine, int(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "fixtures" / "mlp.ts.pt"))
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=32, help="features per sample (the model's input width)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for scale in (1, 10):
            path = Path(tmp) / f"x{scale}.npy"
            np.save(path, rng.normal(size=(args.samples * scale, args.width)).astype(np.float32))
            results[scale] = peak(args.model, path)
    print(f"machine: {platform.machine()} {platform.python_implementation()} {platform.python_version()}")
    for scale, (samples, engine, rss) in results.items():
        print(f"{scale:>2}x data: {samples:>9} samples, peak RSS {rss / 1024:8.1f} MiB ({engine})")
    print(f"peak RSS 10x / 1x: {results[10][2] / results[1][2]:.3f}")


if __name__ == "__main__":
    main()
