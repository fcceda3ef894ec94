"""A scan in 1 process against the same scan in 2 torchrun processes (gloo on CPU).

    python tests/bench/bench_scaleout.py [--model fixtures/convnet.pt2] [--samples 2048]

Prints the wall time of each and their ratio, and checks the two reports agree (dead sets,
counts). On a 2-core machine each process gets one core, so expect little speed-up there:
the point is equality, and scaling on machines with cores (or GPUs) to spare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "fixtures" / "convnet.pt2"))
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "x.npy"
        base = np.load(ROOT / "fixtures" / "convnet.calib.npy")
        np.save(data, np.resize(base, (args.samples, *base.shape[1:])).astype(np.float32))
        scan = ["-m", "deadrelu", "scan", args.model, "--data", str(data), "--device", "cpu", "-b", "32", "-q"]
        one = run([sys.executable, *scan, "--json", f"{tmp}/one.json"], dict(os.environ))
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
        two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   *scan, "--json", f"{tmp}/two.json"], env)
        a, b = (json.loads(Path(f"{tmp}/{n}.json").read_text()) for n in ("one", "two"))
    same = all(x["dead_units"] == y["dead_units"] and x["per_unit"]["count"] == y["per_unit"]["count"]
               for x, y in zip(a["sites"], b["sites"]))
    print(f"machine: {platform.machine()} cpus={os.cpu_count()}")
    print(f"1 process : {one:7.2f} s   2 processes: {two:7.2f} s   2p / 1p: {two / one:.3f}   reports agree: {same}")


if __name__ == "__main__":
    main()
