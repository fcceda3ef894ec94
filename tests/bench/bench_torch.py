"""Cost of a PyTorch scan as a ratio to plain inference of the same model on the same data.

    python tests/bench/bench_torch.py [--model resnet18|resnet50|mlp] [--device cpu|cuda]
                                      [--batch 16] [--batches 4] [--repeats 5]
                                      [--compile off|on] [--compiled-plain]

Runs plain `torch.inference_mode()` forwards and deadrelu's scan path interleaved, several
times, and prints the median time of each and the median of the per-repeat ratios. With
`--compile on` the scan's per-site reductions are torch.compile'd (one fused kernel each);
`--compiled-plain` also times `torch.compile(model)` plain inference, the best plain run.
Nothing is asserted: speed is measured as a ratio in one run, never as an absolute time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
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


def scanned(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, compile: str = "off") -> float:
    loaded = LoadedModel(model, ModelFormat.PICKLE, "<bench>", "")
    sync(device)
    start = CLOCK()
    stream_torch(loaded, iter(ModelInput((b,)) for b in batches), device, None,
                 StreamSettings(compile=compile, large=True, notify=print))
    sync(device)
    return CLOCK() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", default="off", choices=["off", "on"])
    parser.add_argument("--compiled-plain", action="store_true")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(models, args.model)().eval().to(device)
    batches = [torch.randn(args.batch, *SHAPES[args.model], device=device) for _ in range(args.batches)]
    compiled = torch.compile(model) if args.compiled_plain else None
    plain(model, batches[:1], device)  # warm-up (and compilation)
    scanned(model, batches[:1], device, args.compile)
    if compiled is not None:
        plain(compiled, batches[:1], device)
    plain_times, scan_times, compiled_times, ratios = [], [], [], []
    for _ in range(args.repeats):
        p = plain(model, batches, device)
        s = scanned(model, batches, device, args.compile)
        plain_times.append(p)
        scan_times.append(s)
        ratios.append(s / p)
        if compiled is not None:
            compiled_times.append(plain(compiled, batches, device))
    samples = args.batch * args.batches
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={torch.get_num_threads()} "
          f"device={device} torch={torch.__version__}")
    print(f"model={args.model} batch={args.batch} batches={args.batches} repeats={args.repeats} clock={args.clock}")
    print(f"plain inference : {samples / statistics.median(plain_times):8.1f} samples/s")
    print(f"deadrelu scan   : {samples / statistics.median(scan_times):8.1f} samples/s")
    print(f"scan / plain    : {statistics.median(ratios):.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f})"
          f"  [scan reductions compile={args.compile}]")
    if compiled_times:
        best = statistics.median(compiled_times)
        print(f"compiled plain  : {samples / best:8.1f} samples/s")
        print(f"scan / compiled plain: {statistics.median(scan_times) / best:.3f}x")


if __name__ == "__main__":
    main()
