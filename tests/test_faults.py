"""Everything users throw at the tool: a clear answer, exit 2, and nothing lost."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deadrelu import ScanOptions, scan
from deadrelu.cli import app
from deadrelu.errors import DataError, ModelLoadError, ModelRunError

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def cli(*args: object):
    return CliRunner().invoke(app, ["scan", *map(str, args)], env={"COLUMNS": "200"})


class OomAbove(nn.Module):
    """Raises CUDA out-of-memory for batches larger than `limit`, like a real GPU would."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 5)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return torch.relu(h - 0.5)


def test_out_of_memory_retries_in_halves() -> None:
    data = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    said: list[str] = []
    report = scan(OomAbove(5), data, ScanOptions(device="cpu", batch_size=16), notify=said.append)
    reference = scan(OomAbove(100), data, ScanOptions(device="cpu", batch_size=4))
    oom = [m for m in said if "out of memory" in m]  # (a first test to run also hears the kernel being built)
    assert len(oom) == 1 and "batch size 16" in oom[0], said
    assert report.data.samples == 40
    for a, b in zip(report.sites, reference.sites):
        np.testing.assert_array_equal(a.stats.positive, b.stats.positive)
        np.testing.assert_array_equal(a.stats.count, b.stats.count)  # no batch counted twice
        np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-6)
    assert any("out of memory" in w for w in report.warnings)


def test_out_of_memory_at_batch_size_one_is_an_error() -> None:
    with pytest.raises(ModelRunError, match="out of memory even at batch size 1"):
        scan(OomAbove(0), torch.randn(4, 6), ScanOptions(device="cpu"))


class MakesNonFinite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor([1.0, float("inf"), 1.0, 1.0])
        y = x * scale  # unit 1: +-inf (or nan where x == 0)
        y = torch.where(torch.arange(4) == 2, torch.where(x > 1.5, torch.nan, x), y)  # unit 2: some NaN
        return torch.relu(y)


def test_nan_and_inf_preactivations_are_counted_apart() -> None:
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    report = scan(MakesNonFinite(), x, ScanOptions(device="cpu"))
    site = report.sites[0]
    s = site.stats
    assert s.inf[1] == 50 and s.nan[1] == 0
    nan_rows = (x[:, 2] > 1.5).numpy()
    assert s.nan[2] == nan_rows.sum() > 0
    finite2 = x[~torch.from_numpy(nan_rows), 2].double().numpy()
    np.testing.assert_allclose(s.mean[2], finite2.mean(), rtol=1e-6)
    np.testing.assert_allclose(s.maximum[2], finite2.max(), rtol=1e-6)
    np.testing.assert_allclose(s.mean[0], x[:, 0].double().mean().item(), rtol=1e-6)  # unpoisoned
    doc = site.to_dict()
    assert doc["nonfinite"] == {"nan": int(nan_rows.sum()), "inf": 50}
    json.dumps(report.to_dict(), allow_nan=False)  # still valid JSON


def test_nonfinite_counts_are_shown_in_the_table() -> None:
    from deadrelu.formats.table import summary_lines

    report = scan(MakesNonFinite(), torch.randn(8, 4), ScanOptions(device="cpu"))
    assert any("non-finite" in line and "relu" in line for line in summary_lines(report))


def test_half_precision_models() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU())
    x = torch.randn(64, 8)
    reference = scan(model, x, ScanOptions(device="cpu"))
    for dtype in (torch.float16, torch.bfloat16):
        half = scan(nn.Sequential(*[m for m in __import__("copy").deepcopy(model)]).to(dtype), x, ScanOptions(device="cpu"))
        for a, b in zip(half.sites, reference.sites):
            assert a.stats.mean.dtype == np.float64
            np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=0.05, atol=0.02)
    forced = scan(model, x, ScanOptions(device="cpu", dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.float32  # restored
    np.testing.assert_allclose(forced.sites[0].stats.mean, reference.sites[0].stats.mean, rtol=0.05, atol=0.02)


@pytest.mark.parametrize(("data", "pattern"), [
    (np.ones((4, 3, 16, 16), np.int64), r"input 0 has dtype int64; the model's weights are float32"),
    (np.ones((4, 32), np.float32), r"input of shape \(4, 32\).*expects input \(N, 3, H, W\)"),
    (np.ones((4, 5, 16, 16), np.float32), r"in module 'stem.conv'.*\(4, 5, 16, 16\).*expects input \(N, 3, H, W\)"),
])
def test_data_that_does_not_fit(tmp_path: Path, data: np.ndarray, pattern: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, data)
    result = cli(FIX / "convnet.state_dict.pt", "--arch", "fixtures/fixture_models.py:ConvNet", "--data", path)
    assert result.exit_code == 2
    message = result.stderr.replace("\n", " ")
    assert __import__("re").search(pattern, message), message


class _RefusesOddWidths(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2 == 1:
            raise ValueError("odd feature counts are not supported")
        return torch.relu(self.fc(x))


@pytest.mark.parametrize(("model", "data", "pattern"), [
    # traced TorchScript: the interpreter blanks an op's error raised under our dispatch mode
    ("traced", np.ones((4, 31), np.float32), r"input of shape \(4, 31\): mat1 and mat2 shapes cannot be multiplied"),
    # scripted TorchScript with the model's own raise: the line that names it, not the wrapper
    ("scripted", np.ones((4, 5), np.float32), r"input of shape \(4, 5\): odd feature counts are not supported"),
    ("scripted", np.ones((4, 8), np.float32), r"input of shape \(4, 8\): mat1 and mat2 shapes cannot be multiplied"),
])
def test_torchscript_forward_errors_say_what_went_wrong(tmp_path: Path, model: str, data: np.ndarray,
                                                        pattern: str) -> None:
    net = _RefusesOddWidths()
    saved = torch.jit.trace(net, torch.ones(2, 6)) if model == "traced" else torch.jit.script(net)
    saved.save(str(tmp_path / "net.ts.pt"))
    np.save(tmp_path / "bad.npy", data)
    result = cli(tmp_path / "net.ts.pt", "--data", tmp_path / "bad.npy")
    message = result.stderr.replace("\n", " ")
    assert result.exit_code == 2 and "TorchScript interpreter" not in message, message
    assert __import__("re").search(pattern, message), message


def test_nonfinite_input_data(tmp_path: Path) -> None:
    data = np.ones((10, 32), np.float32)
    data[7, 3] = np.nan
    np.save(tmp_path / "nan.npy", data)
    with pytest.raises(DataError, match=r"nan\.npy: sample 7 holds NaN or Inf in input 0"):
        scan(FIX / "mlp.ts.pt", tmp_path / "nan.npy", ScanOptions(batch_size=4, device="cpu"))


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_infinite_input_data(tmp_path: Path, bad: float) -> None:
    data = np.ones((10, 32), np.float32)
    data[9, 0] = bad
    np.save(tmp_path / "inf.npy", data)
    with pytest.raises(DataError, match=r"inf\.npy: sample 9 holds NaN or Inf in input 0"):
        scan(FIX / "mlp.ts.pt", tmp_path / "inf.npy", ScanOptions(batch_size=4, device="cpu"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_finite_input_data_is_not_mistaken_for_infinite(tmp_path: Path, dtype: type) -> None:
    """The finite check sums each batch first: a sum that overflows from finite values
    (half the largest float times 320) must not read as Inf."""
    data = np.full((10, 32), np.finfo(dtype).max / 2, dtype)
    np.save(tmp_path / "huge.npy", data)
    report = scan(FIX / "mlp.ts.pt", tmp_path / "huge.npy", ScanOptions(batch_size=10, device="cpu"))
    assert report.data.samples == 10


def test_forward_that_raises_names_the_module() -> None:
    class Inner(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("boom: unsupported input")

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Sequential(nn.Identity(), Inner()))
    with pytest.raises(ModelRunError, match=r"in module '2\.1' on input of shape \(2, 3\): boom: unsupported input"):
        scan(model, [torch.randn(2, 3)], ScanOptions(device="cpu"))


def test_an_error_the_model_caught_itself_is_not_reported_for_a_later_one() -> None:
    """Our own error raised inside an op (here: a site whose width changed) that the model
    catches is no longer the forward's error when something else fails after it."""
    class CatchesThenFails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                torch.relu(x[:, : x.shape[0]])  # 2 units on the first batch, 3 on the second
            except Exception:
                pass
            if x.shape[0] == 3:
                raise ValueError("boom: the real failure")
            return x

    with pytest.raises(ModelRunError, match=r"on input of shape \(3, 4\): boom: the real failure"):
        scan(CatchesThenFails(), [torch.randn(2, 4), torch.randn(3, 4)], ScanOptions(device="cpu"))


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "plain_pickle"])
def test_code_running_pickle_is_never_unpickled(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    if writer == "torch_zip":
        torch.save(Evil(marker), path)
    elif writer == "torch_legacy":
        torch.save(Evil(marker), path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(Evil(marker)))
    assert not marker.exists()
    result = cli(path, "--data", FIX / "mlp.calib.npy")
    assert result.exit_code == 2
    assert "--trust-pickle" in result.stderr
    assert not marker.exists()


def test_corrupt_safetensors_and_pt2(tmp_path: Path) -> None:
    bad = tmp_path / "w.safetensors"
    bad.write_bytes((64).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [9999], "data_offsets": [0, 4]}}' + b" " * 10)
    result = cli(bad, "--data", FIX / "mlp.calib.npy", "--arch", "fixtures/fixture_models.py:MLP")
    assert result.exit_code == 2 and "w.safetensors" in result.stderr
    truncated = tmp_path / "m.pt2"
    truncated.write_bytes((FIX / "mlp.pt2").read_bytes()[:3000])
    result = cli(truncated, "--data", FIX / "mlp.calib.npy")
    assert result.exit_code == 2 and "m.pt2" in result.stderr and "Traceback" not in result.output


def test_safetensors_state_dict_with_arch(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = torch.load(FIX / "mlp.state_dict.pt", weights_only=True)
    save_file(state, str(tmp_path / "mlp.safetensors"))
    report = scan(tmp_path / "mlp.safetensors", FIX / "mlp.calib.npy", ScanOptions(arch="fixtures/fixture_models.py:MLP"))
    assert report.model.format == "state_dict"
    assert [list(s.verdict.dead) for s in report.sites] == [[3, 40], [17]]
    with pytest.raises(ModelLoadError, match="--arch"):
        scan(tmp_path / "mlp.safetensors", FIX / "mlp.calib.npy")


def test_ctrl_c_writes_a_partial_report(tmp_path: Path) -> None:
    started = tmp_path / "started"
    feeder = tmp_path / "slow_data.py"
    feeder.write_text(textwrap.dedent(f"""
        import time, pathlib, torch
        def batches():
            for i in range(10_000):
                if i == 3:
                    pathlib.Path({str(started)!r}).touch()
                time.sleep(0.02)
                yield torch.randn(4, 32)
    """))
    out = tmp_path / "partial.json"
    proc = subprocess.Popen([sys.executable, "-m", "deadrelu", "scan", str(FIX / "mlp.ts.pt"), "--data", f"{feeder}:batches",
                             "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=FIX.parent)
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert started.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    doc = json.loads(out.read_text())
    assert doc["partial"] is True
    assert doc["data"]["samples"] >= 12 and doc["data"]["samples"] % 4 == 0
    assert doc["sites"][0]["per_unit"]["count"][0] == doc["data"]["samples"]
    assert "PARTIAL" in stdout
    assert "Traceback" not in stderr


def test_ctrl_c_inside_a_torchscript_forward_is_an_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGINT handled inside deadrelu's dispatch hook while the TorchScript interpreter
    runs it comes back as an empty RuntimeError; it used to end the scan as 'model forward
    failed' (exit 2, the CI flake of test_ctrl_c_writes_a_partial_report) instead of a
    partial report."""
    from deadrelu.reductions import BatchReducer

    original, calls = BatchReducer.begin, []

    def begin(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the first site of the third batch
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BatchReducer, "begin", begin)
    batches = [torch.randn(4, 32) for _ in range(6)]
    report = scan(FIX / "mlp.ts.pt", batches, ScanOptions(device="cpu", compile="off"))
    assert report.partial and report.data.samples == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


@pytest.mark.parametrize("model", ["convnet.pt2", "convnet.ts.pt", "convnet.onnx"])
def test_a_forward_that_fails_names_the_model_file(tmp_path: Path, model: str) -> None:
    """Channels-last images given to a channels-first model: the line names the file, the
    shape it got and (PyTorch) what failed, for every format."""
    np.save(tmp_path / "nhwc.npy", np.zeros((4, 16, 16, 3), np.float32))
    result = cli(FIX / model, "--data", tmp_path / "nhwc.npy")
    errors = [line for line in result.stderr.splitlines() if line.startswith("deadrelu: error: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.stderr  # (a kernel-build notice may come first)
    assert errors[0].startswith(f"deadrelu: error: {FIX / model}: ") and "(4, 16, 16, 3)" in errors[0], errors


def test_importing_deadrelu_does_not_import_torch() -> None:
    """The package's API is imported on first use, so the command line's entry point runs
    before torch is imported (and can catch a Ctrl-C made while it is)."""
    code = ("import sys, deadrelu, deadrelu.__main__; print('torch' in sys.modules); "
            "from deadrelu import scan, ScanOptions; print('torch' in sys.modules, callable(scan))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]
    # the submodule deadrelu.scan imported first (as the command line does) does not shadow the function
    code = "import deadrelu.cli, deadrelu; from deadrelu import scan; print(callable(scan), callable(deadrelu.scan))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_ctrl_c_while_the_command_line_imports_torch_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in the second or two the command line spends importing torch: exit 130 and
    one line, as later, not a traceback. The console script is this entry point."""
    from importlib.metadata import entry_points

    import deadrelu.__main__ as entry

    class Importing:
        def __getattr__(self, name: str) -> None:
            raise KeyboardInterrupt  # as a Ctrl-C lands in the middle of `import torch`

    monkeypatch.setitem(sys.modules, "deadrelu.cli", Importing())
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 130
    assert capsys.readouterr().err == "deadrelu: error: interrupted\n"
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("deadrelu") == "deadrelu.__main__:main"


def _scan_cli(*args: object):
    return CliRunner().invoke(app, ["scan", str(FIX / "mlp.pt2"), "-d", str(FIX / "mlp.calib.npy"), "-q",
                                    *map(str, args)])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_stream_target_is_written_in_place_not_replaced(tmp_path: Path) -> None:
    """`--json` to a FIFO (as `/dev/null`, `/dev/stdout` or `>(cmd)` are streams): its reader
    gets the report and the FIFO stays a FIFO; before, a file was renamed over it."""
    import stat
    import threading

    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    done = _scan_cli("--json", fifo)
    reader.join(timeout=60)
    assert done.exit_code == 0, done.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert json.loads(received[0])["summary"]["dead"] == 3
    assert not [p for p in tmp_path.iterdir() if p != fifo]  # no temporary file left beside it


def test_a_symlinked_output_keeps_its_link(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert _scan_cli("--json", link).exit_code == 0
    assert link.is_symlink() and json.loads(real.read_text())["summary"]["dead"] == 3


@pytest.mark.parametrize("command", ["scan", "fix"])
def test_an_empty_json_path_is_refused(command: str) -> None:
    """`--json "$REPORT"` with REPORT unset: exit 2 and one line, not a run that writes nothing."""
    done = CliRunner().invoke(app, [command, str(FIX / "mlp.pt2"), "-d", str(FIX / "mlp.calib.npy"), "--json", ""])
    assert done.exit_code == 2
    assert done.stderr.strip() == "deadrelu: error: --json: the path is empty; give a file path, or '-' for stdout"


@pytest.mark.parametrize("argv, flag", [
    (["scan", "{m}", "-d", "{d}", "-o", ""], "'--output' / '-o'"),
    (["scan", "{m}", "-d", "{d}", "--baseline", ""], "'--baseline'"),
    (["scan", "{m}", "-d", "{d}", "--config", ""], "'--config'"),
    (["scan", "", "-d", "{d}"], "'model'"),
    (["fix", "{m}", "-d", "{d}", "--apply", "-o", ""], "'--output' / '-o'"),
    (["fix", "{m}", "--report", ""], "'--report'"),
    (["report", ""], "'report'"),
    (["diff", "", ""], "'old'"),
    (["merge", "", ""], "'reports'"),
])
def test_an_empty_path_is_refused_as_empty_not_as_the_directory_dot(argv: list[str], flag: str) -> None:
    """click turns '' into Path('.'): `-o "$OUT"` with OUT unset said "-o .: that is a directory"."""
    argv = [a.format(m=FIX / "mlp.pt2", d=FIX / "mlp.calib.npy") for a in argv]
    done = CliRunner().invoke(app, argv)
    assert done.exit_code == 2, done.output
    assert done.stderr.startswith(f"deadrelu: error: Invalid value for {flag}: the path is empty; give a file path")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["arch import", "arch factory", "data function"])
def test_user_code_calling_sys_exit_does_not_decide_the_exit_code(tmp_path: Path, where: str) -> None:
    """`sys.exit(0)` in an --arch module or a --data function exited 0 with no report, even
    under a gate; it is now exit 2 with one line naming the code."""
    torch.save(nn.Sequential(nn.Linear(4, 3), nn.ReLU()).state_dict(), tmp_path / "m.pt")
    np.save(tmp_path / "x.npy", np.ones((4, 4), np.float32))
    arch = "import sys, torch\n" + ("sys.exit(0)\n" if where == "arch import" else "") + \
        "def build():\n" + ("    sys.exit(0)\n" if where == "arch factory" else "") + \
        "    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())\n" \
        "def data():\n    sys.exit(0)\n"
    (tmp_path / "user.py").write_text(arch)
    data = f"{tmp_path / 'user.py'}:data" if where == "data function" else str(tmp_path / "x.npy")
    done = CliRunner().invoke(app, ["scan", str(tmp_path / "m.pt"), "--arch", f"{tmp_path / 'user.py'}:build",
                                    "-d", data, "--fail-on", "dead"])
    assert done.exit_code == 2, done.output
    assert "SystemExit(0)" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["no num_batches_tracked", "_orig_mod.module.", "module._orig_mod.", "meta device"])
def test_state_dicts_torch_loads_are_loaded(tmp_path: Path, case: str) -> None:
    """A BatchNorm state_dict without `num_batches_tracked` (old or converted checkpoints),
    both orders of the DDP/compile prefixes, and a factory that builds on the meta device
    (the fast-init idiom, for `load_state_dict(assign=True)`) load as torch loads them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()).eval()
    if case == "meta device":  # the weights half precision holds exactly, for the brute force below
        model.half().float()
    state = model.state_dict()
    if case == "no num_batches_tracked":
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    elif case == "meta device":  # saved in half precision: assigned, it must still be cast to the model's dtype
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    else:
        state = {case + k: v for k, v in state.items()}
    torch.save(state, tmp_path / "m.pt")
    on = "torch.device('meta')" if case == "meta device" else "contextlib.nullcontext()"
    (tmp_path / "arch.py").write_text(f"import contextlib, torch\ndef build():\n    with {on}:\n"
                                      "        return torch.nn.Sequential("
                                      "torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU())\n")
    x = torch.randn(16, 4)
    report = scan(tmp_path / "m.pt", [x], ScanOptions(arch=f"{tmp_path / 'arch.py'}:build", device="cpu"))
    with torch.no_grad():
        pre = model[1](model[0](x)).numpy()
    assert report.sites[0].units == 3
    assert np.allclose(report.sites[0].stats.maximum, pre.max(0), atol=1e-5)
    assert np.allclose(report.sites[0].stats.mean, pre.mean(0), atol=1e-5)


def test_a_shuffling_dataloader_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank would shuffle its own order: overlapping shards, live units reported dead.
    A single process (order does not matter there) takes it as before."""
    from torch.utils.data import DataLoader, TensorDataset

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    loader = DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=4, shuffle=True)
    assert scan(model, loader, ScanOptions(device="cpu")).data.samples == 12
    from deadrelu.data.sources import source_from_object

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DataError, match="shuffle=True under torchrun"):
        source_from_object(loader, "--data loaders.py:calib")
    source_from_object(DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=4), "--data loaders.py:calib")


@pytest.mark.parametrize("model", ["mlp.pt2", "convnet.ts.pt", "mlp.onnx"])
def test_arch_for_a_model_that_holds_its_architecture_is_refused(model: str) -> None:
    """As --weights-key is: an --arch the model would ignore is a mistake, said in one line."""
    if not (FIX / model).exists():
        pytest.skip(f"no fixture {model}")
    done = CliRunner().invoke(app, ["scan", str(FIX / model), "--arch", "does_not_exist.py:zz", "-d", "random",
                                    "--input-shape", "8"])
    assert done.exit_code == 2, done.output
    assert done.stderr.startswith("deadrelu: error: --arch does_not_exist.py:zz:") and "holds its own architecture" in done.stderr


def test_a_meta_device_model_with_a_buffer_the_weights_lack_is_refused(tmp_path: Path) -> None:
    """A non-persistent buffer is not in any state_dict: on the meta device it would stay
    without storage, so the load says so in one line instead of failing inside the scan."""
    (tmp_path / "arch.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 3)\n"
        "        self.register_buffer('scale', torch.ones(3), persistent=False)\n"
        "    def forward(self, x):\n"
        "        return torch.relu(self.fc(x) * self.scale)\n"
        "def build():\n"
        "    with torch.device('meta'):\n"
        "        return Net()\n")
    torch.save({f"fc.{k}": v for k, v in nn.Linear(4, 3).state_dict().items()}, tmp_path / "m.pt")
    done = CliRunner().invoke(app, ["scan", str(tmp_path / "m.pt"), "--arch", f"{tmp_path / 'arch.py'}:build",
                                    "-d", "random", "--input-shape", "4"])
    assert done.exit_code == 2, done.output
    assert done.stderr.startswith(f"deadrelu: error: {tmp_path / 'm.pt'}: the --arch model was built on the meta")
    assert "scale" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_model_on_the_meta_device_is_refused_by_the_api_and_as_a_pickle(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Given directly (the API) or in a full pickle, a model whose weights are on meta was
    an internal error ("Cannot copy out of meta tensor"; a bare NotImplementedError from
    the API): it is a one-line load error naming the tensors."""
    (tmp_path / "netmod.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 3)\n"
        "    def forward(self, x):\n"
        "        return torch.relu(self.fc(x))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import netmod

    with torch.device("meta"):
        model = netmod.Net()
    with pytest.raises(ModelLoadError, match=r"^<Net>: the model's fc\.bias, fc\.weight are on the meta device"):
        scan(model, torch.randn(8, 4))
    torch.save(model, tmp_path / "m.pickle.pt")
    for command in ("scan", "fix"):
        done = CliRunner().invoke(app, [command, str(tmp_path / "m.pickle.pt"), "--trust-pickle", "-d", "random",
                                        "--input-shape", "4"])
        assert done.exit_code == 2, done.output
        assert done.stderr.startswith(f"deadrelu: error: {tmp_path / 'm.pickle.pt'}: the model's fc.bias, fc.weight "
                                      "are on the meta device"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_frozen_torchscript_is_scanned(tmp_path: Path) -> None:
    """torch.jit.freeze (a deployment format) leaves modules with no `training` flag: the
    scan ended in "internal error: AttributeError ... no attribute 'training'"."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.bias[1] = -100.0  # unit 1 planted dead
    model = nn.Sequential(conv, nn.ReLU()).eval()
    torch.jit.save(torch.jit.freeze(torch.jit.script(model)), str(tmp_path / "frozen.ts.pt"))
    x = torch.randn(16, 3, 8, 8)
    report = scan(tmp_path / "frozen.ts.pt", x, ScanOptions(batch_size=5))
    with torch.no_grad():
        pre = conv(x).double()
    site, = report.sites
    assert site.units == 4 and site.unit_axis == 1
    assert list(site.verdict.dead) == [u for u in range(4) if not (pre[:, u] > 0).any()] == [1]
    np.testing.assert_allclose(site.stats.maximum, pre.amax(dim=(0, 2, 3)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(site.stats.mean, pre.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
