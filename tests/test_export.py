"""export_onnx: fold, export, and an onnxruntime round trip that matches PyTorch."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import batchnorm
from batchnorm.errors import BatchNormError
from batchnorm.folding import fold
from batchnorm.onnx_export import export_onnx

from .replicas import build

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "dcgan"])
def test_round_trip_with_onnxruntime(name, tmp_path):
    model, x = build(name)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(model, x, path)
    assert path.exists() and result.path == str(path)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind
    assert result.max_error < 1e-4 and result.rel_error < 1e-5
    # independent check: run the file ourselves against the original model in eval mode
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = copy.deepcopy(model).eval()(x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # folded BN are gone; each one left (frozen, or the frozen channels of a split BN) is a
    # single inference-mode BatchNormalization
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fold(model, x).modules())
    assert ops.count("BatchNormalization") == left >= result.frozen
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "onnxruntime" in str(result)


def test_missing_extra_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    model, x = build("dcgan")
    with pytest.raises(BatchNormError, match=r"pip install 'batchnorm\[onnx\]'"):
        export_onnx(model, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_bad_example_input(tmp_path):
    model, _ = build("dcgan")
    with pytest.raises(BatchNormError, match="example_input"):
        export_onnx(model, None, tmp_path / "m.onnx")
    with pytest.raises(BatchNormError, match="runs on example_input"):
        export_onnx(model, torch.randn(1, 5, 1, 1), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def _dynamo_fails(monkeypatch) -> None:
    real = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo exporter failed on purpose")
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)


def test_torchscript_exporter_takes_over_when_dynamo_fails(tmp_path, monkeypatch):
    _dynamo_fails(monkeypatch)
    model, x = build("dcgan")
    result = export_onnx(model, x, tmp_path / "m.onnx")
    assert result.exporter == "torchscript" and result.max_error < 1e-4
    assert result.to_dict()["opset"] == result.opset > 0


def test_dynamic_batch_runs_at_other_batch_sizes(tmp_path):
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    model, x = build("dcgan")
    x1 = x[:1]
    fixed = export_onnx(model, x1, tmp_path / "fixed.onnx")
    free = export_onnx(model, x1, tmp_path / "free.onnx", dynamic_batch=True)
    assert free.max_error < 1e-4 and fixed.max_error < 1e-4
    batch = np.random.default_rng(0).standard_normal((8, *x.shape[1:])).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "free.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: batch})[0]
    with torch.no_grad():
        want = copy.deepcopy(model).eval()(torch.from_numpy(batch))
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-4, atol=1e-4)
    session = ort.InferenceSession(str(tmp_path / "fixed.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(InvalidArgument, match=r"index: 0 Got: 8 Expected: 1"):  # batch 1 only
        session.run(None, {session.get_inputs()[0].name: batch})


class _FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))))


def _graph_modules():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.warns(UserWarning, match="GraphModule"):
        fused = batchnorm.convert(_FunctionalReLU(), fuse_act=True)
    return [fx.symbolic_trace(net), fused]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_dynamic_batch_on_fx_graph_modules(tmp_path, monkeypatch, exporter):
    if exporter == "torchscript":  # it reads model.graph as a TorchScript graph
        _dynamo_fails(monkeypatch)
    for i, model in enumerate(_graph_modules()):
        assert isinstance(model, fx.GraphModule)
        path = tmp_path / f"m{i}.onnx"
        with torch.no_grad():  # running statistics away from their initial values
            model.train()(torch.randn(8, 3, 6, 6) * 2 + 1)
        result = export_onnx(model, torch.randn(2, 3, 6, 6), path, dynamic_batch=True)
        assert result.exporter == exporter and result.max_error < 1e-4
        batch = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.HasField("dim_value")  # free in the file


def test_opset_onnxruntime_cannot_run_is_refused_before_anything_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(a))
    model, x = build("dcgan")
    with pytest.raises(BatchNormError, match=r"7 or higher \(got opset 5\)"):
        export_onnx(model, x, tmp_path / "m.onnx", opset=5)
    assert os.listdir(tmp_path) == [] and calls == []


def test_a_bn_folded_in_part_is_counted_as_such(tmp_path):
    from .test_fold_forward_cat import cat_pool

    model = cat_pool()
    result = export_onnx(model, torch.randn(2, 3, 6, 6), tmp_path / "m.onnx")
    assert (result.folded, result.partial, result.frozen) == (0, 1, 0)
    assert "0 BN folded, 1 folded in part, 0 frozen" in str(result)
    assert result.max_error < 1e-4


def test_a_training_model_exports_its_eval_computation_without_folds_warning(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = export_onnx(model, torch.randn(2, 3, 6, 6), tmp_path / "m.onnx")
    assert result.folded == 1 and model.training  # the caller's model untouched
