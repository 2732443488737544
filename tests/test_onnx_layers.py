"""Our layers under PyTorch's own torch.onnx.export: both exporters write standard ONNX
(BatchNormalization + the activation's node), which onnxruntime runs as it runs PyTorch's BN."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import batchnorm

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _net(bn, act_bn):
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn(4), nn.ReLU(), nn.Conv2d(4, 4, 1), act_bn(4))


def _run(model, x, path, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), ops


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_our_layers_export_like_pytorchs(tmp_path, dynamo, training):
    torch.manual_seed(0)
    theirs = _net(nn.BatchNorm2d, lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.2)))
    ours = _net(batchnorm.BatchNorm2d,
                lambda c: batchnorm.BatchNormAct2d(c, act="leaky_relu", negative_slope=0.2))
    for bn in theirs.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
    ours.load_state_dict({k.replace("4.0.", "4."): v for k, v in theirs.state_dict().items()})
    theirs.train(training)
    ours.train(training)
    x = torch.randn(2, 3, 8, 8)
    want, want_ops = _run(copy.deepcopy(theirs), x, tmp_path / "theirs.onnx", dynamo)
    got, got_ops = _run(copy.deepcopy(ours), x, tmp_path / "ours.onnx", dynamo)
    # standard ops only (the exporters may fold an eval BN into the conv before it, as they do
    # for PyTorch's): the same op set as PyTorch's layers give
    assert got_ops == want_ops and "LeakyRelu" in got_ops
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if not training:
        with torch.no_grad():
            torch.testing.assert_close(got, ours(x), rtol=1e-5, atol=1e-5)
