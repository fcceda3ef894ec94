"""Cost of a PyTorch scan as a ratio to plain inference of the same model on the same data.

    python tests/bench/bench_torch.py [--model resnet18|resnet50|mlp] [--device cpu|cuda]
                                      [--batch 16] [--batches 4] [--repeats 5]
                                      [--compile off|on] [--compiled-plain]

One scan streams the data; before each repeat's batches reach it, plain
`torch.inference_mode()` forwards run over the same batches, so plain and scan alternate and
the per-repeat ratios see the same machine load. The first repeat warms up (and compiles)
and is not counted. With `--compile on` the scan compiles the whole model with every
site's statistics into one program (TorchScript: the per-site reductions);
`--compiled-plain` also times `torch.compile(model)` plain inference, the best plain run.
Nothing is asserted: speed is measured as a ratio in one run, never as an absolute time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

from deadrelu.data import ModelInput  # noqa: E402
from deadrelu.load import LoadedModel  # noqa: E402
from deadrelu.load.detect import ModelFormat  # noqa: E402
from deadrelu.probe.torch_stream import StreamSettings, stream_torch  # noqa: E402

SHAPES = {"resnet18": (3, 224, 224), "resnet50": (3, 224, 224), "mlp": (784,)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock cpu: process CPU time, steadier on a shared, noisy machine


def plain(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    sync(device)
    start = CLOCK()
    with torch.inference_mode():
        for batch in batches:
            model(batch)
    sync(device)
    return CLOCK() - start


def interleaved(model: torch.nn.Module, compiled: torch.nn.Module | None, batches: list[torch.Tensor],
                device: torch.device, repeats: int, timings: dict[str, list[float]]) -> Iterator[ModelInput]:
    """The scan's data: each repeat times plain inference over `batches`, then yields them
    to the scan and times how long the scan takes over them. One scan runs throughout, so
    a compiled scan compiles once (during the warm-up repeat, which is not counted)."""
    for repeat in range(repeats + 1):
        p = plain(model, batches, device)
        c = plain(compiled, batches, device) if compiled is not None else None
        sync(device)
        start = CLOCK()
        for batch in batches:
            yield ModelInput((batch,))
        sync(device)
        s = CLOCK() - start
        if repeat:  # the first repeat warms up (and compiles)
            timings["plain"].append(p)
            timings["scan"].append(s)
            if c is not None:
                timings["compiled"].append(c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", default="off", choices=["off", "auto", "on"],
                        help="off: PyTorch operators only; auto: the eager probe with deadrelu's C kernel on CPU; on: the whole model compiled")
    parser.add_argument("--compiled-plain", action="store_true")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--graph-mode", default=None, help="torch.compile mode of the scan's program (default: deadrelu's choice)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(models, args.model)().eval().to(device)
    batches = [torch.randn(args.batch, *SHAPES[args.model], device=device) for _ in range(args.batches)]
    compiled = torch.compile(model) if args.compiled_plain else None
    timings: dict[str, list[float]] = {"plain": [], "scan": [], "compiled": []}
    loaded = LoadedModel(model, ModelFormat.PICKLE, "<bench>", "")
    stream_torch(loaded, interleaved(model, compiled, batches, device, args.repeats, timings), device, None,
                 StreamSettings(compile=args.compile, large=True, notify=lambda m: print(f"[deadrelu] {m}"),
                                **({"graph_mode": args.graph_mode} if args.graph_mode else {})))
    ratios = [s / p for s, p in zip(timings["scan"], timings["plain"])]
    samples = args.batch * args.batches
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={torch.get_num_threads()} "
          f"device={device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} torch={torch.__version__}")
    print(f"model={args.model} batch={args.batch} batches={args.batches} repeats={args.repeats} clock={args.clock}")
    print(f"plain inference : {samples / statistics.median(timings['plain']):8.1f} samples/s")
    print(f"deadrelu scan   : {samples / statistics.median(timings['scan']):8.1f} samples/s")
    print(f"scan / plain    : {statistics.median(ratios):.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f})"
          f"  [scan compile={args.compile}]")
    if timings["compiled"]:
        best = statistics.median(timings["compiled"])
        print(f"compiled plain  : {samples / best:8.1f} samples/s")
        print(f"scan / compiled plain: {statistics.median(timings['scan']) / best:.3f}x")


if __name__ == "__main__":
    main()
