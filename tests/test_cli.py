"""The command line: exit codes, streams, messages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deadrelu.cli import app

FIX = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args: str, columns: int = 200):
    return runner.invoke(app, ["scan", *map(str, args)], env={"COLUMNS": str(columns)})


def test_table_shows_planted_dead_units(runner: CliRunner) -> None:
    result = run(runner, FIX / "convnet.ts.pt", "--data", FIX / "convnet.calib.npy")
    assert result.exit_code == 0, result.output
    assert "14 dead (6.5%)" in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert rows["stem.relu"][1:6] == ["relu", "1", "8", "1", "0"]
    assert rows["layer2.relu_2"][4] == "2"
    assert rows["layer3.act_prelu"][1] == "prelu"


def test_table_fits_80_columns_and_folds_names(runner: CliRunner) -> None:
    result = run(runner, FIX / "convnet.ts.pt", "--data", FIX / "convnet.calib.npy", columns=80)
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    first_column = "".join(line[:14].strip() for line in lines if line.startswith(" "))
    assert "layer3.act_prelu" in first_column  # folded over lines, never cut


def test_output_to_no_terminal_keeps_every_site_name_whole(runner: CliRunner) -> None:
    """A pipe, a redirect, a CI log: no width to fit, so every name is whole on its row
    (grep finds it) and every column is shown; COLUMNS still sets a width when given."""
    args = ["scan", str(FIX / "convnet.ts.pt"), "--data", str(FIX / "convnet.calib.npy")]
    result = runner.invoke(app, args, env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(" ") and line.strip()}
    names = [name for name in rows if name not in {"site", "─" * len(name)}]
    assert names[:3] == ["stem.relu", "layer1.0.relu", "layer1.0.relu_1"] and len(names) == 13
    assert all(len(rows[name]) == 12 for name in names)  # name and 11 columns, none hidden
    assert rows["layer3.act_prelu"][1:6] == ["prelu", "1", "16", "1", "0"]


@pytest.mark.parametrize("columns", [79, 70, 60, 50, 40, 32])
def test_a_narrow_terminal_keeps_the_site_names_and_dead_counts(runner: CliRunner, columns: int) -> None:
    """Columns go (axis, then the moments) before the names and counts do; the title says which."""
    result = run(runner, FIX / "convnet.ts.pt", "--data", FIX / "convnet.calib.npy", columns=columns)
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and all(len(line) <= columns for line in lines)
    header = next(line for line in lines if line.lstrip().startswith("site "))
    assert header.split()[:1] == ["site"] and {"units", "dead", "near"} <= set(header.split())
    assert "hidden, too narrow: axis" in " ".join(result.stdout.split())
    width = header.index(header.split()[1])  # where the column after the names starts
    body = lines[lines.index(header) + 2:]
    first_column = "".join(line[:width].strip() for line in body if line.startswith(" ") and line.strip())
    assert "layer3.act_prelu" in first_column  # the name, folded, never dropped


def test_json_to_stdout_is_only_json(runner: CliRunner) -> None:
    result = run(runner, FIX / "mlp.pt2", "--data", FIX / "mlp.calib.npy", "--json", "-")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1 and doc["model"]["format"] == "exported_program"
    assert [s["dead_units"] for s in doc["sites"]] == [[3, 40], [17]]
    assert doc["sites"][0]["near_dead_units"] == [10]


def test_json_file_is_written(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = run(runner, FIX / "seqnet.ts.pt", "--data", FIX / "seqnet.calib.npy", "--json", out)
    assert result.exit_code == 0
    doc = json.loads(out.read_text())
    assert [(s["name"], s["unit_axis"], s["axis_source"]) for s in doc["sites"]] == [
        ("conv_act", 1, "conv"), ("relu", 2, "linear")]
    assert "conv_act" in result.stdout  # the table still goes to stdout


def test_random_data_warns(runner: CliRunner) -> None:
    result = run(runner, FIX / "mlp.ts.pt", "--data", "random", "--input-shape", "32", "--samples", "10", "--json", "-")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["data"]["samples"] == 10 and doc["data"]["random"] is True
    assert any("random data" in w for w in doc["warnings"])
    assert "deadrelu: warning: random data" in result.stderr  # stdout is JSON: the person reads stderr


def test_warnings_reach_stderr_unless_the_table_on_stdout_shows_them(runner: CliRunner, tmp_path: Path) -> None:
    args = (FIX / "mlp.ts.pt", "--data", "random", "--input-shape", "32", "--samples", "10")
    table = run(runner, *args)
    assert "warning: random data" in table.stdout and "warning" not in table.stderr
    for extra in (("--format", "json"), ("--format", "sarif", "-o", tmp_path / "r.sarif")):
        result = run(runner, *args, *extra)
        assert result.exit_code == 0, result.output
        assert "deadrelu: warning: random data" in result.stderr, extra
    quiet = run(runner, *args, "-q")  # -q: the summary line alone
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr and len(quiet.stderr.splitlines()) == 1


def test_samples_caps_the_data(runner: CliRunner) -> None:
    result = run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--samples", "50", "-b", "16", "--json", "-")
    doc = json.loads(result.stdout)
    assert doc["data"]["samples"] == 50
    assert doc["sites"][0]["per_unit"]["count"][0] == 50


def test_no_relu_model_says_so(runner: CliRunner) -> None:
    result = run(runner, FIX / "norelunet.ts.pt", "--data", FIX / "norelunet.calib.npy")
    assert result.exit_code == 0
    assert "No ReLU sites found" in result.stdout


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return " ".join(lines)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["missing.pt", "--data", FIX / "mlp.calib.npy"], r"missing\.pt: no such file"),
        ([FIX / "mlp.ts.pt", "--data", "nothere.npy"], r"nothere\.npy: no such data file"),
        ([FIX / "mlp.ts.pt", "--data", "random"], r"--input-shape"),
        ([FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--inputs", "3"],
         r"--inputs 3: the batch has only 1 element \(positions count from 0\)"),
        ([FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--ignore", "", "--max-dead", "0"],
         r"--ignore '': expected a site-name glob"),
        ([FIX / "mlp.ts.pt", "--data", FIX / "convnet.calib.npy"], r"input of shape \(32, 3, 16, 16\)"),
        ([FIX / "mlp.state_dict.pt", "--data", FIX / "mlp.calib.npy"], r"is a state_dict.*--arch"),
        ([FIX / "mlp.state_dict.pt", "--data", FIX / "mlp.calib.npy", "--arch", "fixtures/fixture_models.py:ConvNet"],
         r"does not fit the --arch model; missing keys: .*unexpected keys: layers\.0\.bias"),
        ([FIX / "mlp.state_dict.pt", "--data", FIX / "mlp.calib.npy", "--arch", "fixtures/fixture_models.py:Nope"],
         r"has no attribute 'Nope'"),
        ([FIX / "mlp.state_dict.pt", "--data", FIX / "mlp.calib.npy", "--arch", "no_such_pkg.mod:f"], r"cannot import no_such_pkg"),
        ([FIX / "mlp.pickle.pt", "--data", FIX / "mlp.calib.npy"], r"full pickle \(.*MLP.*\).*--trust-pickle"),
        ([FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--device", "tpu"], r"--device 'tpu'"),
        ([FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--tau", "inf"], r"--tau inf: expected a finite number"),
        ([FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--inputs", ","], r"--inputs ',': names no input"),
    ],
)
def test_errors_are_one_line_exit_2(runner: CliRunner, args: list, pattern: str) -> None:
    message = _error(run(runner, *args))
    assert re.search(pattern, message), message


def test_bad_model_files(runner: CliRunner, tmp_path: Path) -> None:
    data = FIX / "mlp.calib.npy"
    cases = {
        "empty.pt": (b"", "file is empty"),
        "text.pt": (b"hello, I am not a model\n", "not a recognised model file"),
        "truncated.pt": ((FIX / "mlp.ts.pt").read_bytes()[:2000], "truncated or damaged zip archive"),
        "truncated.pt2": ((FIX / "mlp.pt2").read_bytes()[:5000], "truncated or damaged zip archive"),
        "notes.zip": (_zip_bytes(tmp_path), "not a PyTorch archive"),
        # the layout aoti_compile_and_package writes (its names, as torch 2.13 writes them)
        "aoti.pt2": (_zip_bytes(tmp_path, ("m/data/aotinductor/model/c1.wrapper.so", "m/archive_format",
                                           "m/archive_version")),
                     "an AOTInductor package (compiled kernels, no graph to probe); scan the torch.export program"),
    }
    for name, (content, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        message = _error(run(runner, path, "--data", data))
        assert name in message and says in message, message


def _zip_bytes(tmp_path: Path, names: tuple[str, ...] = ("readme.txt",)) -> bytes:
    import zipfile

    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, "not a model")
    return path.read_bytes()


def test_bad_data_files(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"garbage")
    assert "bad.npy" in _error(run(runner, FIX / "mlp.ts.pt", "--data", bad))
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 32), np.float32))
    assert "holds no samples" in _error(run(runner, FIX / "mlp.ts.pt", "--data", empty))
    wrong = tmp_path / "data.csv"
    wrong.write_text("1,2,3")
    assert "expected .npy" in _error(run(runner, FIX / "mlp.ts.pt", "--data", wrong))


def _pickle_of_a_module(path: Path) -> None:
    import torch

    torch.save(torch.nn.Linear(2, 2), path)


def _torch_save(path: Path, how: str) -> None:
    import torch

    x = torch.ones(4, 32)
    torch.save(x.to_sparse() if how == "to_sparse" else x.to(how), path)


def _pickle_protocol_4(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps([1.0, 2.0], protocol=4))


@pytest.mark.parametrize(("name", "write", "expected"), [
    ("text.pt", lambda p: p.write_text("hello"), r"text\.pt: not a file written by torch\.save \(expected a tensor"),
    ("model.pt", _pickle_of_a_module, r"model\.pt: holds Python objects other than tensors \(it holds a "
                                      r"torch\.nn\.modules\.linear\.Linear\).*a model goes in the MODEL argument"),
    ("plain.pt", _pickle_protocol_4, r"plain\.pt: holds Python objects other than tensors; .*weights_only=True"),
    ("text.npz", lambda p: p.write_text("hello"), r"text\.npz: not an \.npz archive \(np\.savez writes a zip file"),
    ("sparse.pt", lambda p: _torch_save(p, "to_sparse"), r"sparse\.pt: tensor is a sparse_coo tensor, expected a "
                                                         r"dense one \(save tensor\.to_dense\(\)\)"),
    ("meta.pt", lambda p: _torch_save(p, "meta"), r"meta\.pt: tensor is on the meta device \(a shape, no data\)"),
    ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object)),
     r"objects\.npy: array has dtype object \(Python objects\), expected real numbers"),
])
def test_data_files_of_the_wrong_kind_say_what_they_are(runner: CliRunner, tmp_path: Path, name: str, write,
                                                        expected: str) -> None:
    path = tmp_path / name
    write(path)
    result = run(runner, FIX / "mlp.ts.pt", "--data", path)
    message = _error(result)
    assert re.search(expected, message), message
    assert "Warning" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.output


def test_usage_error_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(app, ["scan", str(FIX / "mlp.ts.pt")])
    assert result.exit_code == 2  # --data missing


def test_module_entry_point() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "deadrelu", "scan", str(FIX / "mlp.pt2"), "--data",
                           str(FIX / "mlp.calib.npy"), "--json", "-"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["dead"] == 3


def test_batches_that_hold_no_tensors_name_the_data(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "gen.py").write_text("def words():\n    yield 'abc'\n\ndef rows():\n    yield [[0.5] * 32] * 4\n")
    monkeypatch.chdir(tmp_path)
    for spec, pattern in (("gen.py:words", r"^deadrelu: error: gen\.py:words: a batch of type str: expected a tensor"),
                          ("gen.py:rows", r"^deadrelu: error: gen\.py:rows: batch element 0 is a list, expected a tensor")):
        message = _error(run(runner, FIX / "mlp.ts.pt", "--data", spec))
        assert re.search(pattern, message), message


def test_console_script_imports_modules_from_the_working_folder(tmp_path: Path) -> None:
    """`-d mod:fn` and `--arch mod:fn` find mod in the current folder as under `python -m`;
    the console script's sys.path starts with its bin folder, not the working folder."""
    import subprocess
    import sys

    shutil.copy(FIX / "fixture_models.py", tmp_path / "my_models.py")
    (tmp_path / "my_data.py").write_text("import numpy as np\n\ndef calib():\n"
                                         "    return np.load(%r)\n" % str(FIX / "mlp.calib.npy"))
    console_script = "import sys; del sys.path[0]; from deadrelu.cli import main; sys.argv[0] = 'deadrelu'; main()"
    proc = subprocess.run([sys.executable, "-c", console_script, "scan", str(FIX / "mlp.state_dict.pt"),
                           "--arch", "my_models:MLP", "--data", "my_data:calib", "--json", "-"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["dead"] == 3


def _checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    """A training checkpoint: the mlp fixture's weights under `state_dict`, and under `ema`
    the same weights with every unit of the first layer revived (bias +100)."""
    import torch

    weights = torch.load(FIX / "mlp.state_dict.pt", weights_only=True)
    ema = {k: v.clone() for k, v in weights.items()}
    ema["layers.0.bias"] += 100.0
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "state_dict": weights, "ema": {f"module.{k}": v for k, v in ema.items()},
                "optimizer": {"state": {}, "param_groups": []}}, path)
    torch.save(ema, tmp_path / "ema_only.pt")
    return path, ema


def test_a_checkpoint_with_several_weights_says_which_it_scanned(runner: CliRunner, tmp_path: Path) -> None:
    path, _ = _checkpoint(tmp_path)
    arch = ["--arch", "fixtures/fixture_models.py:MLP", "--data", FIX / "mlp.calib.npy", "--json", "-"]
    default = json.loads(run(runner, path, *arch).stdout)
    plain = json.loads(run(runner, FIX / "mlp.state_dict.pt", *arch).stdout)
    assert default["summary"]["dead"] == plain["summary"]["dead"] == 3
    assert default["warnings"] == [f"{path}: the checkpoint holds weights under 'state_dict' and 'ema'; scanned "
                                   "'state_dict' (choose with --weights-key)"]
    chosen = json.loads(run(runner, path, *arch, "--weights-key", "ema").stdout)
    alone = json.loads(run(runner, tmp_path / "ema_only.pt", *arch).stdout)
    assert chosen["warnings"] == []
    assert [s["dead_units"] for s in chosen["sites"]] == [s["dead_units"] for s in alone["sites"]]
    assert [s["dead_units"] for s in chosen["sites"]] != [s["dead_units"] for s in plain["sites"]]


def test_a_pickled_checkpoint_dict_scans_the_module_it_holds(runner: CliRunner, tmp_path: Path) -> None:
    """{'model': module, 'ema': module, 'optimizer': ...} as trainers save it: with
    --trust-pickle, the module under the first checkpoint key (or --weights-key), the same
    statistics as the state_dict with --arch; it used to be refused as "a dict"."""
    import torch

    import fixture_models

    model = fixture_models.MLP()
    model.load_state_dict(torch.load(FIX / "mlp.state_dict.pt", weights_only=True))
    revived = fixture_models.MLP()
    revived.load_state_dict(model.state_dict())
    with torch.no_grad():
        revived.layers[0].bias += 100.0
    torch.save({"epoch": 3, "model": model, "ema": revived, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    torch.save({"detector": revived}, tmp_path / "own_key.pt")
    data = ["--data", FIX / "mlp.calib.npy", "--json", "-"]
    plain = json.loads(run(runner, FIX / "mlp.state_dict.pt", "--arch", "fixtures/fixture_models.py:MLP", *data).stdout)
    default = json.loads(run(runner, tmp_path / "ckpt.pt", "--trust-pickle", *data).stdout)
    assert [s["per_unit"]["positive"] for s in default["sites"]] == [s["per_unit"]["positive"] for s in plain["sites"]]
    assert default["warnings"] == [f"{tmp_path / 'ckpt.pt'}: the checkpoint holds modules under 'model' and 'ema'; "
                                   "scanned 'model' (choose with --weights-key)"]
    ema = json.loads(run(runner, tmp_path / "ckpt.pt", "--trust-pickle", "--weights-key", "ema", *data).stdout)
    alone = json.loads(run(runner, tmp_path / "own_key.pt", "--trust-pickle", *data).stdout)
    assert ema["warnings"] == [] and ema["sites"] == alone["sites"] and ema["sites"] != plain["sites"]
    wrong = runner.invoke(app, ["scan", str(tmp_path / "ckpt.pt"), "--trust-pickle", "--weights-key", "epoch",
                                "--data", str(FIX / "mlp.calib.npy")])
    assert wrong.exit_code == 2 and "holds no nn.Module under 'epoch' (modules under: model, ema)" in wrong.output
    refused = runner.invoke(app, ["scan", str(tmp_path / "ckpt.pt"), "--data", str(FIX / "mlp.calib.npy")])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output


@pytest.mark.parametrize("model, key, message", [
    ("ckpt.pt", "epoch", r"--weights-key epoch: .*ckpt\.pt has no weights under 'epoch' \(it holds weights under "
                         r"'state_dict', 'ema'\)"),
    ("ema_only.pt", "ema", r"--weights-key ema: .*ema_only\.pt has no weights under 'ema' \(it holds a plain state_dict\)"),
    (FIX / "mlp.pt2", "ema", r"--weights-key ema: .*mlp\.pt2 is not a torch\.save file \(exported_program\)"),
])
def test_a_weights_key_that_holds_no_weights_is_one_line(runner: CliRunner, tmp_path: Path, model: object, key: str,
                                                          message: str) -> None:
    _checkpoint(tmp_path)
    for command in ("scan", "fix"):
        result = runner.invoke(app, [command, str(tmp_path / model), "--arch", "fixtures/fixture_models.py:MLP",
                                     "--data", str(FIX / "mlp.calib.npy"), "--weights-key", key])
        assert result.exit_code == 2, result.output
        assert re.search(message, " ".join(result.output.split())), result.output


def test_fix_plans_for_the_weights_key_it_is_given(tmp_path: Path) -> None:
    from deadrelu.fix import FixOptions, run_fix
    from deadrelu.scan import ScanOptions

    path, _ = _checkpoint(tmp_path)
    plans = {key: run_fix(path, str(FIX / "mlp.calib.npy"), FixOptions(),
                          ScanOptions(arch="fixtures/fixture_models.py:MLP", device="cpu", weights_key=key))
             for key in (None, "ema")}
    assert plans[None].scan.dead == 3 and "scanned 'state_dict'" in plans[None].scan.warnings[0]
    alone = run_fix(tmp_path / "ema_only.pt", str(FIX / "mlp.calib.npy"), FixOptions(),
                    ScanOptions(arch="fixtures/fixture_models.py:MLP", device="cpu"))
    assert plans["ema"].scan.dead == alone.scan.dead != 3 and not plans["ema"].scan.warnings
    assert [f.to_dict() for f in plans["ema"].plan] == [f.to_dict() for f in alone.plan]


def _to_closed_pipe(command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`deadrelu COMMAND mlp.pt2 --data mlp.calib.npy ARGS` with a stdout nobody reads."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "deadrelu", command, str(FIX / "mlp.pt2"), "--data",
                               str(FIX / "mlp.calib.npy"), *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write_end)


def _scan_to_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    return _to_closed_pipe("scan", *args)


def test_a_fix_to_a_closed_stdout_pipe_still_writes_its_json(tmp_path: Path) -> None:
    """`fix ... --apply -o fixed.pt2 --json fix.json | head`: the model and its JSON both."""
    proc = _to_closed_pipe("fix", "--apply", "-o", str(tmp_path / "fixed.pt2"), "--json", str(tmp_path / "fix.json"))
    assert proc.returncode == 141, proc.stderr
    assert json.loads((tmp_path / "fix.json").read_text())["applied"] is True
    assert (tmp_path / "fixed.pt2").is_file()


@pytest.mark.parametrize("extra", [[], ["--json", "-"], ["--format", "sarif"]])
def test_a_closed_stdout_pipe_exits_141_quietly(extra: list[str]) -> None:
    """`deadrelu scan ... | head`: not exit 1 (a gate's findings) nor a traceback: 128 + SIGPIPE."""
    proc = _scan_to_closed_pipe(*extra)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("gate, code", [([], 141), (["--fail-on", "dead"], 1), (["--fail-on", "dead", "--exit-zero"], 141)])
def test_a_closed_stdout_pipe_loses_no_file_output_and_no_failed_gate(tmp_path: Path, gate: list[str], code: int) -> None:
    """`scan ... --json r.json --fail-on dead | head`: the file is written whatever stdout's
    reader does, and a failed gate still exits 1 (the mlp fixture has dead units)."""
    proc = _scan_to_closed_pipe("--json", str(tmp_path / "r.json"), *gate)
    assert proc.returncode == code, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["dead"] == 3
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_stdout_is_one_line_exit_2() -> None:
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "deadrelu", "scan", str(FIX / "mlp.pt2"), "--data",
                               str(FIX / "mlp.calib.npy")], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith("deadrelu: error: writing the output: No space left on device"), proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


def test_onnx_cuda_request_names_the_package_to_install(runner: CliRunner) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    message = _error(run(runner, FIX / "mlp.onnx", "--data", FIX / "mlp.calib.npy", "--device", "cuda"))
    assert "onnxruntime-gpu" in message


def test_dtype_is_refused_for_onnx(runner: CliRunner) -> None:
    message = _error(run(runner, FIX / "mlp.onnx", "--data", FIX / "mlp.calib.npy", "--dtype", "float16"))
    assert "--dtype applies to PyTorch models" in message


@pytest.mark.parametrize("dtype", ["", "float128", "fp16"])
def test_a_dtype_not_offered_is_refused_even_when_empty(runner: CliRunner, dtype: str) -> None:
    """`--dtype "$DTYPE"` with DTYPE unset scanned as if no dtype were given."""
    message = _error(run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--dtype", dtype))
    assert message == f"deadrelu: error: --dtype '{dtype}': expected one of float32, float16, bfloat16, float64"


def test_one_gate_check_is_counted_in_the_singular(runner: CliRunner, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", report, "-q").exit_code == 0
    done = runner.invoke(app, ["diff", str(report), str(report), "--max-new-dead", "0"])
    assert done.exit_code == 0 and "deadrelu diff: PASSED 1 gate check; 0 units died" in done.stderr, done.stderr
    done = run(runner, FIX / "norelunet.ts.pt", "--data", FIX / "norelunet.calib.npy", "--max-dead", "0", "-f", "markdown")
    assert "**PASSED**: the 1 gate check (counting dead units)" in done.stdout, done.stdout
    assert "deadrelu: PASSED 1 gate check; 0 sites" in done.stderr, done.stderr


def test_written_files_are_ordinary_files(runner: CliRunner, tmp_path: Path) -> None:
    import os
    import stat

    out = tmp_path / "r.json"
    assert run(runner, FIX / "mlp.pt2", "--data", FIX / "mlp.calib.npy", "--json", out).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_outputs_never_replace_an_input_and_are_checked_before_the_scan(runner: CliRunner, tmp_path: Path) -> None:
    """-o/--json onto the model or the data, onto a directory, or into a read-only one:
    one line, exit 2, before any scan, and the inputs byte-identical."""
    model, data = tmp_path / "mlp.ts.pt", tmp_path / "mlp.calib.npy"
    model.write_bytes((FIX / "mlp.ts.pt").read_bytes())
    data.write_bytes((FIX / "mlp.calib.npy").read_bytes())
    (tmp_path / "folder").mkdir()
    cases = [
        (["-o", model], r"-o .*mlp\.ts\.pt: that is the input .*never overwrites"),
        (["--json", model], r"--json .*mlp\.ts\.pt: that is the input"),
        (["--json", data], r"--json .*mlp\.calib\.npy: that is the input"),
        (["-o", tmp_path / "folder"], r"-o .*folder: that is a directory"),
        (["--json", tmp_path / "folder"], r"--json .*folder: that is a directory"),
        (["-o", tmp_path / "r.txt", "--json", tmp_path / "r.txt"], r"--json .*r\.txt: another output of this command goes there"),
    ]
    for extra, pattern in cases:
        message = _error(run(runner, model, "--data", data, *extra))
        assert re.search(pattern, message), message
        assert "ReLU sites" not in message
    assert model.read_bytes() == (FIX / "mlp.ts.pt").read_bytes()
    assert data.read_bytes() == (FIX / "mlp.calib.npy").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "mlp.calib.npy", "mlp.ts.pt"]


def test_an_unwritable_output_folder_is_one_line(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writability is tried with a real file (permission bits say nothing for root, or on a
    read-only mount), before the scan."""
    import deadrelu.outputs as outputs

    real_mkstemp = outputs.tempfile.mkstemp
    locked = tmp_path / "locked"
    locked.mkdir()

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)
    message = _error(run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", locked / "r.json"))
    assert re.search(r"--json .*r\.json: directory .*locked is not writable \(Permission denied\)", message), message
    assert "ReLU sites" not in message and list(locked.iterdir()) == []


def test_outputs_never_land_on_or_among_any_input(runner: CliRunner, tmp_path: Path) -> None:
    """Not only the model and the data file: a file in a --data folder (or a new one
    there), an ONNX model's external data file, the --arch file and a file.py:function
    data file are inputs too. Each is refused in one line, before the scan, unchanged."""
    shards = tmp_path / "shards"
    shards.mkdir()
    calib = np.load(FIX / "mlp.calib.npy")
    np.save(shards / "a.npy", calib[:40])
    np.save(shards / "b.npy", calib[40:])
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    for name in ("external.onnx", "external.onnx.data"):
        shutil.copy(FIX / "onnx" / name, onnx_dir / name)
    np.save(tmp_path / "x8.npy", np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    arch = tmp_path / "arch.py"
    arch.write_text((FIX / "fixture_models.py").read_text())
    datafn = tmp_path / "datafn.py"
    datafn.write_text("import torch\ndef make():\n    return torch.randn(16, 32)\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    ts, sd = str(FIX / "mlp.ts.pt"), str(FIX / "mlp.state_dict.pt")
    cases = [
        ([ts, "--data", shards, "--json", shards / "a.npy"], r"--json .*a\.npy: that is inside the input folder .*shards"),
        ([ts, "--data", shards, "-o", shards / "new.txt"], r"-o .*new\.txt: that is inside the input folder"),
        ([onnx_dir / "external.onnx", "--data", tmp_path / "x8.npy", "--json", onnx_dir / "external.onnx.data"],
         r"--json .*external\.onnx\.data: that is the input"),
        ([sd, "--arch", f"{arch}:MLP", "--data", FIX / "mlp.calib.npy", "-o", arch], r"-o .*arch\.py: that is the input"),
        ([ts, "--data", f"{datafn}:make", "--json", datafn], r"--json .*datafn\.py: that is the input"),
    ]
    for args, pattern in cases:
        message = _error(runner.invoke(app, ["scan", *map(str, args)]))
        assert re.search(pattern, message), (args, message)
        assert "ReLU sites" not in message
    fix_cases = [
        [sd, "--arch", f"{arch}:MLP", "--data", FIX / "mlp.calib.npy", "--apply", "-o", tmp_path / "out.pt2", "--json", arch],
        [ts, "--data", shards, "--apply", "-o", shards / "fixed.pt2"],
        [onnx_dir / "external.onnx", "--data", tmp_path / "x8.npy", "--apply", "-o", onnx_dir / "external.onnx.data"],
    ]
    for args in fix_cases:
        message = _error(runner.invoke(app, ["fix", *map(str, args)]))
        assert re.search(r"that is (the input|inside the input folder)", message), (args, message)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_binary_reports_and_configs_are_one_line(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    (tmp_path / "deep.json").write_text("[" * 100000)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[tool]")
    report = tmp_path / "r.json"
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", report).exit_code == 0
    cases = [(["report", tmp_path / "bin.json"], r"bin\.json: not a text file"),
             (["report", tmp_path / "deep.json"], r"deep\.json: not a deadrelu report"),
             (["merge", report, tmp_path / "bin.json"], r"bin\.json: not a text file"),
             (["report", report, "--config", tmp_path / "bin.toml"], r"bin\.toml: not a text file \(expected TOML\)")]
    for args, pattern in cases:
        result = runner.invoke(app, [str(a) for a in args])
        message = _error(result)
        assert "internal error" not in message and re.search(pattern, message), message


def test_a_report_and_a_model_given_in_each_others_place_say_which_command_takes_them(
        runner: CliRunner, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", report).exit_code == 0
    for command in (["scan", report, "--data", FIX / "mlp.calib.npy"], ["fix", report]):
        result = runner.invoke(app, [str(a) for a in command])
        assert result.exit_code == 2
        assert _error(result) == (f"deadrelu: error: {report}: a deadrelu JSON report, not a model (`deadrelu report {report}` "
                                  f"re-judges it; `deadrelu fix MODEL --report {report}` fixes the model it came from)")
    result = runner.invoke(app, ["report", str(FIX / "mlp.ts.pt")])
    assert result.exit_code == 2 and "a model is scanned with `deadrelu scan`" in _error(result)


def test_dataloader_worker_errors_keep_the_original_message() -> None:
    from deadrelu.cli import one_line

    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 3, in f\n    raise DataError(m)\n'
               "deadrelu.errors.DataError: imgs/bad.jpg: not a readable image (cannot identify image file)\n")
    assert one_line(wrapped) == "imgs/bad.jpg: not a readable image (cannot identify image file)"
    assert one_line("first line\nsecond line") == "first line"


def test_report_flags_must_be_true_or_false(runner: CliRunner, tmp_path: Path) -> None:
    """"partial": "no" used to read as true (a PARTIAL report, exit 130)."""
    report = tmp_path / "r.json"
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", report).exit_code == 0
    doc = json.loads(report.read_text())
    assert runner.invoke(app, ["report", str(report)]).exit_code == 0
    for key, where in (("partial", doc), ("random", doc["data"])):
        where[key] = "no"
        (tmp_path / "bad.json").write_text(json.dumps(doc))
        message = _error(runner.invoke(app, ["report", str(tmp_path / "bad.json")]))
        assert "bad.json" in message and key in message and "not true or false" in message, message
        where[key] = False


def _set(doc: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for part in parents:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    if isinstance(doc, list):
        doc[int(last)] = value
    elif value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


_DELETE = object()


@pytest.mark.parametrize(("path", "value", "pattern"), [
    ("thresholds.near_dead", "abc", r"thresholds\.near_dead: expected a number from 0 to 1"),
    ("thresholds.tau", -1, r"thresholds\.tau: expected a number from 0 to inf"),
    ("warnings", 5, r"warnings: expected a list of strings"),
    ("sites.0.name", _DELETE, r"sites\[0\]\.name: missing or not a string"),
    ("sites.0.per_unit.count.0", -3, r"sites\[0\]\.per_unit\.count: expected counts"),
    ("sites.0.per_unit.positive.0", 2.5, r"sites\[0\]\.per_unit\.positive: expected counts"),
    ("sites.0.per_unit.positive.0", None, r"sites\[0\]\.per_unit\.positive: expected counts"),
    ("sites.0.per_unit.positive.0", 10 ** 9, r"sites\[0\]\.per_unit\.positive: more positive values"),
    ("sites.0.per_unit.mean.0", "1.5", r"sites\[0\]\.per_unit\.mean: expected numbers"),
    ("sites.0.per_unit.m2.0", -1.0, r"sites\[0\]\.per_unit\.m2: .*cannot be negative"),
    ("sites.0.per_unit.min.0", 1e9, r"sites\[0\]\.per_unit\.min: unit 0 has min 1e\+09 > max 4\.3"),
    ("sites.0.per_unit.max.0", 0.0, r"sites\[0\]\.per_unit\.positive: unit 0 has 122 positive values but max 0"),
    ("sites.0.nonfinite", None, None),  # optional: read only for a hint
    ("sites.0.dead_units", [0, 3, 40], r"sites\[0\]\.dead_units: lists units \[0, 3, 40\], but the report's per-unit "
                                       r"counts give \[3, 40\] \(unit 0 has 122 positive of 256 values\): the report "
                                       r"contradicts itself"),
    ("sites.1.dead_units", [], r"sites\[1\]\.dead_units: lists units \[\], but .* give \[17\] \(unit 17 has 0 positive"),
    ("sites.0.near_dead_units", [], r"sites\[0\]\.near_dead_units: lists units \[\], but .* give \[10\]"),
    ("sites.0.dead_units", _DELETE, None),  # optional: compared only where present
    ("sites.0.per_unit.nan", _DELETE, None),  # an older report: its verdicts may count non-finite values otherwise
    ("sites.0.units", -1, r"sites\[0\]\.units: expected an integer >= 0"),
    ("sites.0.unit_axis", -2, r"sites\[0\]\.unit_axis: expected an integer >= 0"),
    ("data.samples", -5, r"data\.samples: expected an integer >= 0"),
    ("data.parts", "ab", r"data\.parts: expected a list of strings"),
    ("data.part_summaries", "ab", r"data\.part_summaries: expected a list with one summary per part"),
    ("data.part_summaries", [{"samples": 1, "counts": "c", "sites": []}],
     r"data\.part_summaries: expected a list with one summary per part"),  # a scan has no parts
    ("sites.0.dead", 0, r"sites\[0\]\.dead: says 0, but the report's per-unit counts give 2: the report contradicts"),
    ("sites.0.near_dead", 7, r"sites\[0\]\.near_dead: says 7, but .* give 1"),
    ("summary.dead", 0, r"summary\.dead: says 0, but the report's sites give 3: the report contradicts itself"),
    ("summary.units", 95, r"summary\.units: says 95, but the report's sites give 96"),
    ("summary.sites", 1, r"summary\.sites: says 1, but the report's sites give 2"),
    ("summary", _DELETE, None),  # optional: compared only where present
    ("sites.0.per_unit.mean.0", 104.0, r"per_unit\.mean: unit 0 has mean 104, outside its min -4\.65\d* \.\. max 4\.3"),
    ("sites.0.per_unit.mean.0", None, r"per_unit\.mean: unit 0 saw 256 finite values, but its mean is null"),
    ("sites.0.per_unit.relu_mean.0", -1.0, r"per_unit\.relu_mean: unit 0 has relu_mean -1, below 0"),
    ("sites.0.per_unit.relu_mean.0", 50.0, r"per_unit\.relu_mean: unit 0 has relu_mean 50, outside max\(mean, 0\)"),
    ("sites.0.per_unit.m2.0", float("inf"), r"per_unit\.m2: unit 0 saw 256 finite values, but its m2 is Infinity"),
    ("sites.0.per_unit.m2.0", 1e9, r"per_unit\.m2: unit 0 has m2 1e\+09, a std of 1976\.\d+, more than half its range"),
    ("sites.0.per_unit.std.0", 99.0, r"per_unit\.std: unit 0 says 99, but its counts and sums give 1\.62"),
    ("sites.0.per_unit.active_rate.0", 0.5, r"per_unit\.active_rate: unit 0 says 0\.5, but .* give 0\.47"),
    ("sites.0.preact.std", 1.0, r"sites\[0\]\.preact\.std: says 1, but the per-unit statistics give 174"),
    ("sites.0.preact.max", 7.0, r"sites\[0\]\.preact\.max: says 7, but the per-unit statistics give 6\.35"),
    ("sites.0.active_rate", 0.9, r"sites\[0\]\.active_rate: says 0\.9, but the per-unit statistics give 0\.48"),
    ("sites.0.preact", _DELETE, None),  # optional: compared only where present
    ("sites.0.per_unit.std", _DELETE, None),
    ("sites.1.name", "layers.1", r"sites\[1\]\.name: 'layers\.1' is also the name of sites\[0\]; a report names "
                                 r"each site once"),
    ("sites.0.per_unit.count.0", 10 ** 400, r"sites\[0\]\.per_unit\.count\[0\]: an integer of 401 digits"),
    ("sites.0.per_unit.mean.3", 10 ** 400, r"sites\[0\]\.per_unit\.mean\[3\]: an integer of 401 digits"),
    ("data.samples", -10 ** 30, r"data\.samples: an integer of 31 digits \(-100000\.\.\.\)"),
    ("thresholds.tau", 10 ** 20, r"thresholds\.tau: an integer of 21 digits"),
])
def test_malformed_fields_of_a_saved_report_are_one_line_errors(runner: CliRunner, tmp_path: Path, path: str,
                                                                 value: object, pattern: str | None) -> None:
    report = tmp_path / "r.json"
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", report).exit_code == 0
    doc = json.loads(report.read_text())
    _set(doc, path, value)
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    result = runner.invoke(app, ["report", str(tmp_path / "bad.json")])
    if pattern is None:
        assert result.exit_code == 0, result.output
        return
    message = _error(result)
    assert "bad.json" in message and re.search(pattern, message), message


def test_a_report_with_an_integer_python_cannot_read_is_one_line(runner: CliRunner, tmp_path: Path) -> None:
    """An integer of more than 4300 digits is a ValueError in json.loads, not a JSON
    syntax error: it used to be an internal error."""
    report = tmp_path / "r.json"
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", report).exit_code == 0
    text = report.read_text().replace('"samples": ', '"samples": ' + "9" * 5000 + ", \"was\": ", 1)
    (tmp_path / "bad.json").write_text(text)
    message = _error(runner.invoke(app, ["report", str(tmp_path / "bad.json")]))
    assert "bad.json: not a deadrelu report (an integer with thousands of digits" in message, message


def test_a_report_naming_a_site_twice_is_refused_by_diff_and_baseline(runner: CliRunner, tmp_path: Path) -> None:
    """diff and --baseline pair sites by name: with a name repeated they paired the wrong
    sites and invented a died and a revived unit."""
    good, bad = tmp_path / "r.json", tmp_path / "twice.json"
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", good).exit_code == 0
    doc = json.loads(good.read_text())
    doc["sites"][1]["name"] = doc["sites"][0]["name"]
    bad.write_text(json.dumps(doc))
    for args in (["diff", str(good), str(bad)], ["diff", str(bad), str(good)],
                 ["scan", str(FIX / "mlp.ts.pt"), "--data", str(FIX / "mlp.calib.npy"), "--baseline", str(bad)],
                 ["merge", str(good), str(bad), "-o", str(tmp_path / "m.json")]):
        message = _error(runner.invoke(app, args))
        assert "twice.json: sites[1].name: 'layers.1' is also the name of sites[0]" in message, (args, message)
    assert not (tmp_path / "m.json").exists()


def test_a_report_rejudged_and_saved_again_reads_back(runner: CliRunner, tmp_path: Path) -> None:
    """Near-dead units are compared only under the file's own thresholds: a report re-judged
    with others, and the report it saves, both read."""
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", tmp_path / "r.json").exit_code == 0
    again = runner.invoke(app, ["report", str(tmp_path / "r.json"), "--near-dead", "0.5", "-f", "json", "-o",
                                str(tmp_path / "s.json")])
    assert again.exit_code == 0, again.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert len(saved["sites"][0]["near_dead_units"]) > 1
    for args in (["report", str(tmp_path / "s.json")], ["report", str(tmp_path / "s.json"), "--near-dead", "0.01"]):
        assert runner.invoke(app, args).exit_code == 0, args


def test_a_report_whose_only_positives_are_infinities_reads_back(runner: CliRunner, tmp_path: Path) -> None:
    """+Inf counts as > 0 but stays out of min/max: a unit whose positives all overflowed
    has a negative max, and the report saying so is no contradiction for report or
    --baseline. (One more positive than infinities with that max still is.)"""
    import torch

    class Overflowing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x * 1e30 * 1e10)  # float32 overflow: x > 0 gives +Inf

    x = np.full((20, 2), -1e-38, np.float32)
    x[:3, 0] = 1.0  # unit 0: three +Inf, seventeen -100
    np.save(tmp_path / "x.npy", x)
    torch.jit.save(torch.jit.script(Overflowing()), str(tmp_path / "m.ts.pt"))
    saved = tmp_path / "scan.json"
    assert run(runner, tmp_path / "m.ts.pt", "--data", tmp_path / "x.npy", "--json", saved, "-q").exit_code == 0
    unit = json.loads(saved.read_text())["sites"][0]["per_unit"]
    assert (unit["positive"][0], unit["inf"][0], unit["max"][0]) == (3, 3, -100.0)
    assert runner.invoke(app, ["report", str(saved), "-q"]).exit_code == 0
    gated = run(runner, tmp_path / "m.ts.pt", "--data", tmp_path / "x.npy", "--baseline", saved, "--fail-on", "dead", "-q")
    assert gated.exit_code == 0, gated.output
    edited = json.loads(saved.read_text())
    edited["sites"][0]["per_unit"]["positive"][0] = 4
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    refused = runner.invoke(app, ["report", str(tmp_path / "edited.json")])
    assert refused.exit_code == 2 and "unit 0 has 4 positive values but max -100" in refused.stderr, refused.output


@pytest.mark.parametrize(("args", "pattern"), [
    (["scan", "m.pt", "--bogus"], r"^deadrelu: error: No such option: --bogus \(see 'deadrelu scan --help'\)$"),
    (["scan", "m.pt", "--batch-size", "abc"], r"^deadrelu: error: Invalid value for '--batch-size' / '-b': .*integer"),
    (["scan"], r"^deadrelu: error: Missing argument 'model'"),
    (["nonsense"], r"^deadrelu: error: No such command 'nonsense'\. \(see 'deadrelu --help'\)$"),
    (["diff", "a.json"], r"^deadrelu: error: Missing argument"),
    (["diff", "a.json", "b.json", "-f", "sarif"], r"'sarif' is not one of 'table', 'json', 'markdown', 'github'"),
    (["scan", "m.pt", "--near-dead", "nan"], r"'--near-dead': expected a number in \[0, 1\], got nan \("),
    (["scan", "m.pt", "--max-dead-fraction", "1.5"], r"'--max-dead-fraction': expected a number in \[0, 1\], got 1.5"),
    (["scan", "m.pt", "--max-site-dead-fraction", "-nan"], r"expected a number in \[0, 1\], got -nan"),
    (["report", "r.json", "--tau", "nan"], r"'--tau': expected a number >= 0, got nan \("),
    (["scan", "m.pt", "--tau", "-0.5"], r"'--tau': expected a number >= 0, got -0.5"),
    (["fix", "m.pt", "--slope", "nan"], r"'--slope': expected a number in \[0, 1\], got nan"),
    (["fix", "m.pt", "--min-dead-fraction", "half"], r"'--min-dead-fraction': expected a number, got 'half'"),
    (["scan", "m.pt", "--unit-axis", "layer1"], r"'--unit-axis': expected GLOB=DIM, e.g. 'blocks.\*.act=2'"),
    (["scan", "m.pt", "--unit-axis", "=2"], r"'--unit-axis': expected GLOB=DIM"),
    (["fix", "m.pt", "--unit-axis", "act=0"], r"'--unit-axis': act=0: dim 0 holds the samples"),
])
def test_usage_errors_are_one_line(runner: CliRunner, args: list[str], pattern: str) -> None:
    result = runner.invoke(app, args, prog_name="deadrelu")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr
    assert "╭" not in result.output and result.stdout == ""


def test_plain_deadrelu_prints_the_help(runner: CliRunner) -> None:
    result = runner.invoke(app, [])
    assert "Usage" in result.stdout and "scan" in result.stdout


def test_report_and_diff_never_overwrite_what_they_read(runner: CliRunner, tmp_path: Path) -> None:
    old, new, base = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "base.json"
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", old).exit_code == 0
    shutil.copy(old, new)
    shutil.copy(old, base)
    config = tmp_path / "pyproject.toml"
    config.write_text(f'[tool.deadrelu]\nbaseline = "{base}"\n')
    before = {p: p.read_bytes() for p in (old, new, base, config)}
    cases = [["diff", old, new, "-f", "markdown", "-o", new],
             ["report", old, "-o", old],
             ["report", new, "--baseline", base, "-o", base],
             ["report", new, "--config", config, "-o", config],
             ["report", new, "--config", config, "-o", base]]  # the baseline named by the config
    for args in cases:
        message = _error(runner.invoke(app, [str(a) for a in args]))
        assert "never overwrites what it reads" in message, (args, message)
    assert {p: p.read_bytes() for p in before} == before


def test_a_saved_partial_report_exits_by_its_gates(runner: CliRunner, tmp_path: Path) -> None:
    """Exit 130 is for a scan interrupted now; re-rendering a saved partial one is not."""
    report = tmp_path / "r.json"
    assert run(runner, FIX / "mlp.ts.pt", "--data", FIX / "mlp.calib.npy", "--json", report).exit_code == 0
    doc = json.loads(report.read_text())
    doc["partial"] = True
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(doc))
    clean = runner.invoke(app, ["report", str(partial), "-q"])
    assert clean.exit_code == 0 and "PARTIAL report" in clean.stderr
    assert runner.invoke(app, ["report", str(partial), "-q", "--max-dead", "0"]).exit_code == 1
    assert runner.invoke(app, ["report", str(partial), "-q", "--max-dead", "0", "--exit-zero"]).exit_code == 0
    diffed = runner.invoke(app, ["diff", str(report), str(partial)])
    assert diffed.exit_code == 0 and "partial.json is a PARTIAL report" in " ".join(diffed.stderr.split())


@pytest.mark.parametrize("command, extra, code", [
    ("scan", [], 2), ("scan", ["--json", "-"], 2), ("scan", ["--format", "json"], 2),
    ("scan", ["-q"], 0), ("scan", ["-o", "{tmp}/r.txt"], 0), ("fix", [], 2), ("fix", ["--json", "{tmp}/f.json"], 0),
])
def test_a_closed_stdout_is_refused_before_the_scan(tmp_path: Path, command: str, extra: list[str], code: int) -> None:
    """`deadrelu scan ... >&-`: the report would vanish with exit 0; it is refused, in one
    line saying where else it can go, unless -q, -o or --json FILE needs no stdout."""
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "deadrelu", command, str(FIX / "mlp.pt2"), "--data", str(FIX / "mlp.calib.npy"),
            *(a.format(tmp=tmp_path) for a in extra)]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # stderr is a log: one summary line
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1), env=env)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if code == 2:
        assert lines == [lines[0]] and lines[0].startswith("deadrelu: error: stdout is closed, so the report has nowhere "
                                                           "to go: write it with "), proc.stderr
    else:
        assert "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr
        assert any(tmp_path.iterdir()) == bool(extra[1:])  # -o / --json wrote their file


def test_data_without_a_sample_axis_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    """One sample's worth of data (a (32,) vector for a Linear(32, .), a (3, 16, 16) image
    for a Conv2d) runs in PyTorch as one unbatched sample; its 32 (or 3) "samples" must
    not become a report of one unit, or of the image's rows as channels."""
    vector = tmp_path / "vector.npy"
    np.save(vector, np.load(FIX / "mlp.calib.npy")[0])
    image = tmp_path / "image.npy"
    np.save(image, np.load(FIX / "convnet.calib.npy")[0])
    (tmp_path / "arch.py").write_text("import torch\n\ndef conv():\n"
                                      "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())\n")
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).state_dict(), tmp_path / "conv.pt")
    for args in ([FIX / "mlp.ts.pt", "--data", vector, "-b", "64"],
                 [FIX / "mlp.state_dict.pt", "--arch", "fixtures/fixture_models.py:MLP", "--data", vector, "-b", "64"],
                 [tmp_path / "conv.pt", "--arch", f"{tmp_path / 'arch.py'}:conv", "--data", image]):
        message = _error(run(runner, *args))
        assert "ran on one unbatched sample" in message and "the data's first axis is taken as the samples" in message


def test_units_a_permute_moves_to_dim_0_are_still_scanned() -> None:
    """A convolution's channels moved to dim 0 on purpose (``transpose(0, 1)``) are units,
    not a lost sample axis: the dead channel is found, positives match a brute force."""
    from deadrelu import ScanOptions, scan

    class ChannelsFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            with torch.no_grad():
                self.conv.weight[2].zero_()
                self.conv.bias[2] = -1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x).transpose(0, 1))

    torch.manual_seed(0)
    model, x = ChannelsFirst().eval(), torch.randn(6, 3, 8, 8)
    report = scan(model, [x[:4], x[4:]], ScanOptions(device="cpu"))
    with torch.no_grad():
        pre = model.conv(x)
    (site,) = report.sites
    assert site.stats.units == 4
    assert site.stats.positive.tolist() == (pre > 0).sum(dim=(0, 2, 3)).tolist()
    assert [u for u in range(4) if site.stats.positive[u] == 0] == [2]


@pytest.mark.parametrize("command", ["scan", "fix", "merge", "report", "diff"])
def test_help_shows_no_type_for_flags_and_command_line_names_for_values(runner: CliRunner, command: str) -> None:
    """A flag takes no value: `--quiet <bool>` in the help would say it does."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.stdout
    assert "--help" in result.stdout
    # nor Python annotations for the values of the others: PATH, TEXT, N as help says them
    assert not re.search(r"<(Path|str|int|float|list\[\w+\])( range)?>", result.stdout), result.stdout
    assert re.search(r"\bPATH\b", result.stdout), result.stdout
