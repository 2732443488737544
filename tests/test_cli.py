"""The model-tool commands on saved files, including every bad-file case (exit 2, one line)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from batchnorm.cli import main

from .replicas import build


@pytest.fixture
def files(tmp_path):
    model, x = build("resnet_basic")
    torch.save(model, tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(copy.deepcopy(model).eval()), tmp_path / "scripted.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02 this is not a checkpoint")
    data = torch.randn(10, 3, 16, 16)
    torch.save(data, tmp_path / "data.pt")
    np.save(tmp_path / "data.npy", data.numpy())
    np.savez(tmp_path / "data.npz", labels=np.zeros(10), x=data.numpy())
    np.save(tmp_path / "flat.npy", np.zeros(5))
    (tmp_path / "data.txt").write_text("1 2 3")
    return tmp_path, model, x


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_inspect_table_json_and_torchscript(files, capsys):
    d, model, _ = files
    status, out, _ = run(capsys, "inspect", d / "model.pt")
    assert status == 0 and "layers.0.bn1" in out and "findings" in out
    status, out, _ = run(capsys, "inspect", d / "model.pt", "--input-shape", "2,3,16,16", "--json")
    data = json.loads(out)
    assert status == 0 and data["totals"]["bn_layers"] == 8 and data["model"].endswith("model.pt")
    assert {f["code"] for f in data["findings"]} == {"conv-bn-act"}
    status, out, _ = run(capsys, "inspect", d / "scripted.pt", "--json")
    assert status == 0 and len(json.loads(out)["layers"]) == 8 and json.loads(out)["approximate"]


def test_inspect_module_function(tmp_path, capsys, monkeypatch):
    (tmp_path / "zoo_for_cli_test.py").write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))\n"
        "def not_a_model():\n    return 3\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    status, out, _ = run(capsys, "inspect", "zoo_for_cli_test:build", "--json")
    assert status == 0 and [f["code"] for f in json.loads(out)["findings"]] == ["act-before-bn"]
    for spec, message in [
        ("zoo_for_cli_test:not_a_model", "to return an nn.Module (got int)"),
        ("zoo_for_cli_test:missing", "expected a function 'missing'"),
        ("no_such_module_xyz:build", "expected an importable module 'no_such_module_xyz'"),
    ]:
        status, out, err = run(capsys, "inspect", spec)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1


def test_fold_writes_an_equal_model(files, capsys):
    d, model, x = files
    status, out, _ = run(
        capsys,
        "fold",
        d / "model.pt",
        "-o",
        d / "folded.pt",
        "--input-shape",
        "2,3,16,16",
        "--json",
    )
    data = json.loads(out)
    assert (
        status == 0
        and data["folded"] == 8
        and data["rel_error"] < 1e-5
        and data["output"].endswith("folded.pt")
    )
    folded = torch.load(d / "folded.pt", weights_only=False)
    assert not hasattr(folded, "fold_report")
    with torch.no_grad():
        want = model.eval()(x)
        assert (folded(x) - want).abs().max() <= 1e-5 * want.abs().max()
    status, out, _ = run(capsys, "fold", d / "model.pt", "-o", d / "folded2.pt")
    assert status == 0 and "8 folded" in out and "wrote" in out


def test_fold_no_forward_leaves_a_bn_before_a_linear_frozen(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(16),
                          nn.Linear(16, 2))
    torch.save(model, tmp_path / "head.pt")
    for flag, want in (([], "next"), (["--no-forward"], None)):
        status, out, _ = run(capsys, "fold", tmp_path / "head.pt", "-o", tmp_path / "f.pt",
                             "--json", *flag)
        layer = json.loads(out)["layers"][0]
        assert status == 0 and layer["direction"] == want
        assert layer["action"] == ("folded" if want else "frozen")


def test_strip_bias_writes_a_leaner_model(tmp_path, capsys):
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    torch.save(model, tmp_path / "biased.pt")
    status, out, _ = run(
        capsys, "strip-bias", tmp_path / "biased.pt", "-o", tmp_path / "lean.pt", "--json"
    )
    assert status == 0 and json.loads(out)["parameters_saved"] == 4
    lean = torch.load(tmp_path / "lean.pt", weights_only=False)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(lean.eval()(x), model.eval()(x), atol=1e-6)


@pytest.mark.parametrize(
    "source, extra", [("data.pt", []), ("data.npy", []), ("data.npz", ["--key", "x"])]
)
def test_recalibrate_equals_update_bn(files, capsys, source, extra):
    d, model, _ = files
    status, out, _ = run(
        capsys,
        "recalibrate",
        d / "model.pt",
        "--data",
        d / source,
        "-o",
        d / "recal.pt",
        "--batch-size",
        "4",
        "--json",
        "--estimator",
        "average",
        *extra,
    )
    assert status == 0 and json.loads(out) == {
        "output": str(d / "recal.pt"),
        "batches": 3,
        "samples": 10,
        "skipped_samples": 0,
        "estimator": "average",
        "skipped_layers": [],
        "batches_all_ranks": None,
        "nonfinite": "raise",
        "skipped_batches": {},
    }
    want = copy.deepcopy(model)
    update_bn(list(torch.load(d / "data.pt").split(4)), want)
    got = torch.load(d / "recal.pt", weights_only=False)
    for k, v in want.state_dict().items():
        assert torch.allclose(got.state_dict()[k].double(), v.double(), atol=1e-6), k


def test_recalibrate_exact_by_default(files, capsys):
    from batchnorm.recalibration import recalibrate

    d, model, _ = files
    status, out, _ = run(capsys, "recalibrate", d / "model.pt", "--data", d / "data.pt", "-o",
                         d / "exact.pt", "--batch-size", "4", "--json")
    assert status == 0 and json.loads(out)["estimator"] == "exact"
    want = recalibrate(copy.deepcopy(model), list(torch.load(d / "data.pt").split(4)),
                       progress=False)
    got = torch.load(d / "exact.pt", weights_only=False)
    for k, v in want.state_dict().items():
        assert torch.allclose(got.state_dict()[k].double(), v.double(), atol=1e-6), k


def test_export_command(files, capsys):
    pytest.importorskip("onnxruntime")
    d, _, _ = files
    status, out, _ = run(
        capsys,
        "export",
        d / "model.pt",
        "-o",
        d / "model.onnx",
        "--input-shape",
        "1,3,16,16",
        "--json",
    )
    data = json.loads(out)
    assert (
        status == 0
        and (d / "model.onnx").exists()
        and data["max_error"] < 1e-4
        and data["folded"] == 8
    )


BAD = [
    # (argv after the command's own name, substring of the one-line error)
    (["inspect", "{d}/missing.pt"], "no such file"),
    (["inspect", "{d}"], "a directory"),
    (["inspect", "{d}/corrupt.pt"], "unreadable"),
    (["inspect", "{d}/tensor.pt"], "expected a model (nn.Module)"),
    (["inspect", "{d}/weights.pt"], "a state_dict"),
    (["inspect", "{d}/model.pt", "--input-shape", "1,x,3"], "expected --input-shape"),
    (["inspect", "{d}/model.pt", "--input-shape", "1,5,16,16"], "runs on example_input"),
    (["fold", "{d}/missing.pt", "-o", "{d}/out.pt"], "no such file"),
    (["fold", "{d}/corrupt.pt", "-o", "{d}/out.pt"], "unreadable"),
    (["fold", "{d}/weights.pt", "-o", "{d}/out.pt"], "a state_dict"),
    (["fold", "{d}/scripted.pt", "-o", "{d}/out.pt"], "TorchScript"),
    (["fold", "{d}/model.pt", "-o", "{d}/model.pt"], "different from the input"),
    (["fold", "{d}/model.pt", "-o", "{d}/./model.pt"], "different from the input"),
    (["fold", "{d}/model.pt", "-o", "{d}/nowhere/out.pt"], "no such folder"),
    (["fold", "{d}/model.pt", "-o", "{d}"], "a directory"),
    (["strip-bias", "{d}/tensor.pt", "-o", "{d}/out.pt"], "expected a model"),
    (["strip-bias", "{d}/model.pt", "-o", "{d}/model.pt"], "different from the input"),
    (["strip-bias", "{d}/scripted.pt", "-o", "{d}/out.pt"], "TorchScript"),
    (
        ["recalibrate", "{d}/model.pt", "--data", "{d}/missing.npy", "-o", "{d}/out.pt"],
        "no such file",
    ),
    (["recalibrate", "{d}/model.pt", "--data", "{d}/corrupt.pt", "-o", "{d}/out.pt"], "unreadable"),
    (["recalibrate", "{d}/model.pt", "--data", "{d}/model.pt", "-o", "{d}/out.pt"], "unreadable"),
    (["recalibrate", "{d}/model.pt", "--data", "{d}/flat.npy", "-o", "{d}/out.pt"], "rank >= 2"),
    (
        ["recalibrate", "{d}/model.pt", "--data", "{d}/data.txt", "-o", "{d}/out.pt"],
        ".pt, .npy or .npz",
    ),
    (
        ["recalibrate", "{d}/model.pt", "--data", "{d}/data.npz", "--key", "y", "-o", "{d}/out.pt"],
        "array 'y'",
    ),
    (
        ["recalibrate", "{d}/model.pt", "--data", "{d}/data.npy", "-o", "{d}/data.npy"],
        "different from the input",
    ),
    (
        ["recalibrate", "{d}/model.pt", "--data", "{d}/data.npy", "-o", "{d}/model.pt"],
        "different from the input",
    ),
    (["recalibrate", "{d}/corrupt.pt", "--data", "{d}/data.npy", "-o", "{d}/out.pt"], "unreadable"),
    (
        [
            "recalibrate",
            "{d}/model.pt",
            "--data",
            "{d}/data.npy",
            "-o",
            "{d}/out.pt",
            "--batch-size",
            "0",
        ],
        "--batch-size",
    ),
    (
        ["export", "{d}/missing.pt", "-o", "{d}/out.onnx", "--input-shape", "1,3,16,16"],
        "no such file",
    ),
    (
        ["export", "{d}/model.pt", "-o", "{d}/out.pt", "--input-shape", "1,3,16,16"],
        "ending in .onnx",
    ),
    (
        ["export", "{d}/scripted.pt", "-o", "{d}/out.onnx", "--input-shape", "1,3,16,16"],
        "TorchScript",
    ),
]


@pytest.mark.parametrize(
    "argv, message",
    BAD,
    ids=[" ".join(a[:1] + [a[1].split("/")[-1]]) + f"-{i}" for i, (a, _) in enumerate(BAD)],
)
def test_bad_files_give_one_line_and_status_2(files, capsys, argv, message):
    d, _, _ = files
    before = sorted(os.listdir(d))
    mtimes = {f: os.stat(d / f).st_mtime_ns for f in before}
    status, out, err = run(capsys, *[a.format(d=d) for a in argv])
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchnorm: error: expected"), err
    assert message in lines[0]
    assert "Traceback" not in err and out == ""
    assert sorted(os.listdir(d)) == before, "a bad call left a file behind"
    assert {f: os.stat(d / f).st_mtime_ns for f in before} == mtimes, "a bad call touched a file"


def test_console_script_has_no_traceback(files):
    d, _, _ = files
    for args in (
        ["inspect", str(d / "corrupt.pt")],
        ["fold", str(d / "model.pt"), "-o", str(d / "model.pt")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "batchnorm.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_help_has_examples(capsys):
    for command in ("inspect", "fold", "strip-bias", "recalibrate", "export"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and "Examples:" in out and f"batchnorm {command}" in out
        assert "trust" in out


def test_help_says_what_each_command_takes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "lesson" not in top and "inspect" in top and "demo" in top
    with pytest.raises(SystemExit):
        main(["warmup", "--help"])
    warmup = capsys.readouterr().out
    assert "MODEL" not in warmup and "trust" not in warmup and "batchnorm warmup" in warmup


@pytest.mark.parametrize("columns, widest", [("60", 60), ("150", 150)])
def test_piped_tables_follow_columns(files, capsys, monkeypatch, columns, widest):
    monkeypatch.setenv("COLUMNS", columns)
    d, _, _ = files
    status, out, _ = run(capsys, "inspect", d / "model.pt")
    longest = max(len(line) for line in out.splitlines())
    assert status == 0 and longest <= widest
    # the default (200 when piped) is wider than 60: the narrow table really was folded
    assert columns != "60" or longest > 40


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def test_written_files_follow_the_umask(files, capsys, umask_027):
    from batchnorm.tour.report import write_html, write_json

    d, _, _ = files
    assert run(capsys, "fold", d / "model.pt", "-o", d / "f.pt")[0] == 0
    assert run(capsys, "strip-bias", d / "model.pt", "-o", d / "s.pt")[0] == 0
    assert run(capsys, "export", d / "model.pt", "-o", d / "m.onnx", "--input-shape",
               "1,3,16,16")[0] == 0
    write_html(d, "t", "", [], "")
    write_json(d, {"a": 1})
    for name in ("f.pt", "s.pt", "m.onnx", "index.html", "results.json"):
        assert os.stat(d / name).st_mode & 0o777 == umask_027, name


def test_unwritable_output_folder_names_the_output(files, capsys, monkeypatch):
    import tempfile

    d, _, _ = files

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".x.pt.abc.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    status, _, err = run(capsys, "fold", d / "model.pt", "-o", d / "x.pt")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"{str(d / 'x.pt')!r}" in err and "Permission denied" in err and ".tmp" not in err


@pytest.mark.parametrize("opset", [13, 17])
def test_export_honours_the_opset(files, capsys, opset):
    import onnx

    d, _, _ = files
    status, out, _ = run(capsys, "export", d / "model.pt", "-o", d / "m.onnx", "--input-shape",
                         "1,3,16,16", "--opset", opset, "--json")
    assert status == 0 and json.loads(out)["opset"] == opset
    model = onnx.load(d / "m.onnx")
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]


def test_export_refuses_an_opset_it_cannot_write(files, capsys):
    d, _, _ = files
    status, out, err = run(capsys, "export", d / "model.pt", "-o", d / "m.onnx", "--input-shape",
                           "1,3,16,16", "--opset", 99)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--opset 99" in err
    assert out == "" and not (d / "m.onnx").exists()


def test_recalibrate_errors_are_one_line_and_a_last_single_sample_is_skipped(files, capsys):
    d, _, _ = files
    torch.save(torch.randn(9, 3, 16, 16), d / "nine.pt")  # batches of 4: 4 + 4 + 1
    torch.save(torch.randn(8, 5, 16, 16), d / "five.pt")  # the model takes 3 channels
    torch.save(torch.randn(8, 3, 16), d / "rank3.pt")
    status, out, err = run(capsys, "recalibrate", d / "model.pt", "--data", d / "nine.pt", "-o",
                           d / "r.pt", "--batch-size", 4)
    assert status == 0 and err == ""
    assert not out.startswith("\n") and " ".join(out.split()) == (
        f"wrote {d / 'r.pt'}: running statistics from 2 batches, 8 samples; skipped a last batch "
        "of 1 sample (BN in train mode needs more than one value per channel)")
    for name in ("five.pt", "rank3.pt"):
        status, out, err = run(capsys, "recalibrate", d / "model.pt", "--data", d / name, "-o",
                               d / "r2.pt")
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert "expected a model that runs on batch 1 of data" in err
        assert not (d / "r2.pt").exists()


def test_input_shape_values_that_look_like_options_and_shapes_too_big(files, capsys):
    d, _, _ = files
    status, out, err = run(capsys, "inspect", d / "model.pt", "--input-shape", "-1,3,16,16")
    assert status == 2 and "positive integers" in err and "'-1,3,16,16'" in err
    status, out, err = run(capsys, "fold", d / "model.pt", "-o", d / "f.pt", "--input-shape",
                           "100000,3,1000,1000")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "fits in memory" in err and "1.2 TB" in err and not (d / "f.pt").exists()


def test_python_dash_m_batchnorm_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "batchnorm", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("batchnorm ")


def test_piped_tables_keep_every_full_layer_name(files, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    d, model, _ = files
    status, out, _ = run(capsys, "inspect", d / "model.pt")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert status == 0 and len(names) == 8 and "more)" not in out
    findings = out[out.index("findings"):]
    assert all(name in findings for name in names), findings


def test_the_tour_without_its_extra_is_one_clear_line(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    for argv in (("demo", "--quick"), ("experiment", "figure1")):
        status, out, err = run(capsys, *argv)
        assert status == 2 and "batchnorm[tour]" in err and "no matplotlib" in err


def test_export_refuses_an_opset_below_onnxruntimes_in_one_line(files, capfd):
    d, _, _ = files
    capfd.readouterr()
    # capfd: onnxruntime's own warnings go to the process's stderr, not through sys.stderr
    status = main(["export", str(d / "model.pt"), "-o", str(d / "m.onnx"), "--input-shape",
                   "1,3,16,16", "--opset", "5"])
    out, err = capfd.readouterr()
    assert status == 2 and out == "" and not (d / "m.onnx").exists()
    assert err.splitlines() == [
        "batchnorm: error: expected --opset 7 or higher, the oldest onnxruntime supports "
        "(got --opset 5) (drop --opset for the exporter's default)"]


def test_qat_convert_writes_the_deployed_model(tmp_path, capsys):
    import batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    qat = batchnorm.qat_fold(model, bits=4)
    qat(torch.randn(4, 3, 6, 6))
    torch.save(qat, tmp_path / "qat.pt")
    torch.save(model, tmp_path / "float.pt")
    status, out, _ = run(capsys, "qat-convert", tmp_path / "qat.pt", "-o", tmp_path / "d.pt",
                         "--input-shape", "2,3,6,6", "--json")
    data = json.loads(out)
    assert status == 0 and data["converted"] == 1 and data["max_error"] == 0.0
    deployed = torch.load(tmp_path / "d.pt", weights_only=False)
    assert [type(m) for m in deployed] == [nn.Conv2d, nn.Identity, nn.ReLU]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(deployed(x), qat.eval()(x))
    status, out, _ = run(capsys, "qat-convert", tmp_path / "qat.pt", "-o", tmp_path / "e.pt")
    assert status == 0 and "1 conv/linear + BN pairs converted" in out and "wrote" in out
    for argv, message in [
        (["qat-convert", tmp_path / "float.pt", "-o", tmp_path / "f.pt"],
         "expected a model from batchnorm.qat_fold to convert"),
        (["qat-convert", tmp_path / "qat.pt", "-o", tmp_path / "qat.pt"],
         "different from the input"),
        (["qat-convert", tmp_path / "qat.pt", "-o", tmp_path / "g.pt", "--input-shape",
          "2,5,6,6"], "expected a model that runs on --input-shape"),
    ]:
        status, _, err = run(capsys, *argv)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.pt").exists() and not (tmp_path / "g.pt").exists()
