"""diagnose: drift per BN layer against statistics measured independently here, the perturbed
layer found (and only it), the ranking by the measured output effect, the model unchanged; and
the ``batchnorm diagnose`` command."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchNormError
from batchnorm.cli import main as cli_main

from .replicas import build


def _calibrated(ours=False):
    model, x = build("resnet_basic")
    if ours:
        model = batchnorm.convert(model)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, *x.shape[1:], generator=g) for _ in range(3)]
    batchnorm.recalibrate(model, data, progress=False)  # the statistics of exactly this data
    return model.eval(), data


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in
                                                                    model.modules()]


@pytest.mark.parametrize("ours", [False, True])
def test_statistics_of_the_data_itself_do_not_drift_and_nothing_changes(ours):
    model, data = _calibrated(ours)
    state, flags = _state(model)
    result = batchnorm.diagnose(model, data, progress=False)
    assert result.verdict == "running statistics describe this data" and not result.drifting
    assert len(result.layers) == 8 and result.batches == 3 and result.samples == 96
    for layer in result.layers:
        assert abs(layer.shift_worst) < 1e-4 and abs(layer.log_ratio_worst) < 1e-4
    after, after_flags = _state(model)
    assert after_flags == flags
    for key, value in state.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("ours", [False, True])
@pytest.mark.parametrize("how", ["mean", "variance"])
def test_the_perturbed_layer_is_found_and_ranked_by_its_effect(ours, how):
    model, data = _calibrated(ours)
    name = "layers.0.bn2"
    bn = model.get_submodule(name)
    with torch.no_grad():
        if how == "mean":
            bn.running_mean += 3 * bn.running_var.sqrt()
        else:
            bn.running_var *= 4.0
    result = batchnorm.diagnose(model, data, progress=False)
    assert result.drifting == [name]
    assert result.verdict == f"recalibrate: layers {name} drift"
    effects = [layer.effect for layer in result.layers]
    assert effects == sorted(effects, reverse=True) and result.layers[0].name == name
    top = result.layers[0]
    if how == "mean":
        assert top.shift_median == pytest.approx(3.0, rel=1e-3)
    else:
        assert abs(top.log_ratio_worst) == pytest.approx(math.log(4.0), rel=1e-3)
    # the effect, measured here: eval against eval with this layer alone on batch statistics
    with torch.no_grad():
        ref = torch.cat([model(x) for x in data])
        switched = copy.deepcopy(model)
        layer = switched.get_submodule(name)
        layer.train()
        layer.momentum = 0.0
        got = torch.cat([switched(x) for x in data])
    want = float((got - ref).norm() / ref.norm())
    assert top.effect == pytest.approx(want, rel=1e-5)


def test_drift_is_the_statistics_seen_against_the_running_ones():
    """The per-channel measures against a direct computation on the layer's input."""
    bn = nn.BatchNorm1d(4, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.0, 2.0, 0.5, 4.0]))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, 4, generator=g) * 1.5 + 0.3 for n in (10, 30)]
    (layer,) = batchnorm.diagnose(nn.Sequential(bn), data, progress=False).layers
    x = torch.cat(data).double()
    shift = (x.mean(0) - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + 1e-3)
    ratio = torch.log((x.var(0) + 1e-3) / (bn.running_var.double() + 1e-3))
    torch.testing.assert_close(torch.tensor(layer.shift, dtype=torch.float64), shift)
    torch.testing.assert_close(torch.tensor(layer.log_ratio, dtype=torch.float64), ratio)
    assert layer.shift_worst == pytest.approx(float(shift[shift.abs().argmax()]))


def test_bad_arguments_and_models():
    model, data = _calibrated()
    for kwargs, match in (({"batches": 0}, "batches"), ({"input_fn": 1}, "input_fn")):
        with pytest.raises(BatchNormError, match=match):
            batchnorm.diagnose(model, data, progress=False, **kwargs)
    with pytest.raises(BatchNormError, match="at least one batch"):
        batchnorm.diagnose(model, [], progress=False)
    with pytest.raises(BatchNormError, match="BN layers that keep running statistics"):
        batchnorm.diagnose(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)
    with pytest.raises(BatchNormError, match="runs on batch 1"):
        batchnorm.diagnose(model, [torch.randn(2, 5, 16, 16)], progress=False)


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data = _calibrated()
    bn = model.layers[0].bn2
    with torch.no_grad():
        bn.running_mean += 3 * bn.running_var.sqrt()
    # a plain nn.Sequential of PyTorch modules loads anywhere
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    torch.save(model, tmp_path / "model.pt")
    torch.save(torch.cat(data), tmp_path / "data.pt")
    torch.save(flat, tmp_path / "flat.pt")
    return tmp_path


def test_cli_table_fix_json_and_plot(files, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1]))
    assert cli_main(["diagnose", "model.pt", "--data", "data.pt", "--plot", "drift.png"]) == 0
    out = capsys.readouterr().out
    assert "recalibrate: layers layers.0.bn2 drift" in out
    assert "fix: batchnorm recalibrate model.pt --data data.pt -o model.recal.pt" in out
    png = (files / "drift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["diagnose", "model.pt", "--data", "data.pt", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["drifting"] == ["layers.0.bn2"] and report["fix"].startswith("batchnorm")
    assert report["layers"][0]["name"] == "layers.0.bn2"


@pytest.mark.parametrize("argv, message", [
    (["diagnose", "flat.pt", "--data", "missing.pt"], "expected an existing data file"),
    (["diagnose", "flat.pt", "--data", "data.pt", "--plot", "out.jpg"], "a .png file"),
    (["diagnose", "flat.pt", "--data", "data.pt", "--batches", "0"], "--batches >= 1"),
    (["diagnose", "flat.pt", "--data", "data.pt", "--plot", "nofolder/out.png"],
     "existing folder"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(files, capsys, argv, message):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (files / "out.jpg").exists() and not (files / "out.png").exists()
