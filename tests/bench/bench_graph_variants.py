"""Where a compiled scan's time goes, against compiled plain inference (GPU or CPU).

    python tests/bench/bench_graph_variants.py [--device cuda] [--model resnet50] [--batch 128]
                                               [--variants onestage,twostage,unmasked,twostage+cudagraphs]
                                               [--profile]

Captures the model with every site's statistics (deadrelu.probe.torch_graph), compiles
it, and times, with device events and several interleaved repeats: compiled plain
inference and the compiled statistics program (which folds into float64 accumulators
itself). Variants change the per-site reduction (twostage: NaN/Inf masked, spatial axes
first per (sample, unit) row, the GPU default; onestage: masked, all axes at once;
unmasked: the CPU form), the compile mode (cudagraphs: "reduce-overhead") or the memory
format (channels_last), and combine with '+' (twostage+cudagraphs). `--profile` prints the top kernels of
one program run. Ratios only; nothing asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

from deadrelu.data import ModelInput  # noqa: E402
from deadrelu.probe import torch_graph  # noqa: E402
from deadrelu.probe.torch_probe import probing  # noqa: E402

SHAPES = {"resnet18": (3, 224, 224), "resnet50": (3, 224, 224), "mlp": (784,)}


def timed(fn, device: torch.device, repeats: int = 20) -> float:
    """Median seconds of one call."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(model: torch.nn.Module, x: torch.Tensor, variant: str) -> torch_graph.GraphScan:
    with torch.inference_mode(), probing(model) as (probe, _):
        probe.begin_pass()
        with probe:
            model(x)
        probe.commit_pass()
    shifts = {t.name: t.shift.float() for t in probe.taps.values()}
    parts = variant.split("+")
    # the per-site reduction that capture() attaches (it picks two-stage on a GPU, unmasked on CPU)
    chosen = (torch_graph.site_reductions_unmasked if "unmasked" in parts else
              torch_graph.site_reductions if "onestage" in parts else torch_graph.site_reductions_two_stage)
    original = torch_graph.site_reductions_two_stage, torch_graph.site_reductions_unmasked
    torch_graph.site_reductions_two_stage = torch_graph.site_reductions_unmasked = chosen
    try:
        with torch.inference_mode():
            graph = torch_graph.capture(model, ModelInput((x,)), probe.first_pass_calls, shifts,
                                        "reduce-overhead" if "cudagraphs" in parts else "default")
    finally:
        torch_graph.site_reductions_two_stage, torch_graph.site_reductions_unmasked = original
    graph.masked = True  # no per-batch host check in the timing: kernel cost only
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--variants", default="onestage,twostage,unmasked,twostage+cudagraphs")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = getattr(models, args.model)().eval().to(device)
    x = torch.randn(args.batch, *SHAPES[args.model], device=device)
    rows = []
    with torch.inference_mode():
        eager = timed(lambda: base(x), device)
        compiled_plain = torch.compile(base)
        for _ in range(3):
            compiled_plain(x)
        plain = timed(lambda: compiled_plain(x), device)
    rows.append(("eager plain", eager))
    rows.append(("compiled plain", plain))
    for variant in args.variants.split(","):
        model, inp = base, x
        if "channels_last" in variant.split("+"):
            model = base.to(memory_format=torch.channels_last)
            inp = x.contiguous(memory_format=torch.channels_last)
        graph = build(model, inp, variant)
        with torch.inference_mode():
            for _ in range(3):
                graph.run(ModelInput((inp,)))
            full = timed(lambda: graph.run(ModelInput((inp,))), device)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    graph.run(ModelInput((inp,)))
                    torch.cuda.synchronize()
                print(f"--- {variant}: top kernels of one program run")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
        rows.append((f"{variant}: program with fold", full))
        base = base.to(memory_format=torch.contiguous_format)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model={args.model} batch={args.batch} device={name} torch={torch.__version__}")
    for label, seconds in rows:
        print(f"{label:32s} {seconds * 1e3:8.2f} ms  {args.batch / seconds:9.1f} samples/s  "
              f"x eager {seconds / eager:5.3f}  x compiled plain {seconds / plain:5.3f}")


if __name__ == "__main__":
    main()
