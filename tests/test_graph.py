"""graph: the BN protocol, fx tracing with leaves, producers/users, the module-order fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchnorm.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d
from batchnorm.graph import is_foldable_producer, trace
from batchnorm.protocol import activation_of, bn_input_ranks, bn_kind, is_batchnorm

from .replicas import Conv3DSimple, build


class DuckBN(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.num_features, self.eps = c, 1e-5
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))


class TorchvisionStyleFrozen(nn.Module):  # all four tensors buffers, no base class of ours
    def __init__(self, c=4):
        super().__init__()
        self.num_features, self.eps = c, 0.0
        for name, value in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
            self.register_buffer(name, torch.full((c,), float(value)))


def test_bn_protocol_kinds():
    from batchnorm.layers import BatchNorm2d, BatchNormAct2d

    cases = [
        (nn.BatchNorm1d(4), "batchnorm"),
        (nn.BatchNorm3d(4), "batchnorm"),
        (nn.LazyBatchNorm2d(), "batchnorm"),
        (nn.SyncBatchNorm(4), "sync"),
        (BatchNorm2d(4), "batchnorm"),
        (BatchNormAct2d(4), "batchnorm"),
        (FrozenBatchNorm2d(4), "frozen"),
        (TorchvisionStyleFrozen(), "frozen"),
        (DuckBN(), "duck"),
        (nn.InstanceNorm2d(4, track_running_stats=True), None),
        (nn.LayerNorm(4), None),
        (nn.GroupNorm(2, 4), None),
        (nn.Conv2d(1, 1, 1), None),
        ("not a module", None),
    ]
    for module, kind in cases:
        assert bn_kind(module) == kind, module
        assert is_batchnorm(module) == (kind is not None)


def test_bn_input_ranks():
    assert bn_input_ranks(nn.BatchNorm1d(2)) == (2, 3)
    assert bn_input_ranks(nn.BatchNorm2d(2)) == (4,)
    assert bn_input_ranks(nn.BatchNorm3d(2)) == (5,)
    assert bn_input_ranks(FrozenBatchNorm1d(2)) == (2, 3)
    assert bn_input_ranks(nn.SyncBatchNorm(2)) is None
    assert bn_input_ranks(DuckBN()) is None


def test_foldable_producers_include_subclasses_and_transposed():
    for m in (nn.Conv1d(1, 1, 1), nn.ConvTranspose3d(1, 1, 1), nn.Linear(1, 1), Conv3DSimple(1, 1)):
        assert is_foldable_producer(m)
    for m in (nn.ReLU(), nn.BatchNorm2d(1), nn.Bilinear(1, 1, 1)):
        assert not is_foldable_producer(m)


def test_activation_of_our_bn_act():
    from batchnorm.layers import BatchNormAct2d

    assert activation_of(nn.BatchNorm2d(2)) is None
    assert activation_of(BatchNormAct2d(2, act="identity")) is None
    act = activation_of(BatchNormAct2d(2, act="leaky_relu", negative_slope=0.3))
    assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.3
    assert isinstance(activation_of(BatchNormAct2d(2, act="silu")), nn.SiLU)


def test_trace_residual_and_cat_structure():
    model, _ = build("resnet_basic")
    graph = trace(model)
    assert not graph.approximate and graph.warning is None
    bn2 = graph.calls("layers.0.bn2")[0]
    assert bn2.producer.name == "layers.0.conv2" and graph.feeds_only(bn2.producer, bn2)
    assert [u.label for u in bn2.users] == ["add"]
    relu_calls = graph.calls("layers.0.relu")  # one ReLU module used twice
    assert len(relu_calls) == 2 and not graph.called_once(relu_calls[0])
    assert len(graph.bn_sites()) == 8

    model, _ = build("densenet")
    graph = trace(model)
    norm1 = graph.calls("features.3.denselayer2.norm1")[0]
    assert norm1.producer.label == "cat" and len(norm1.producer.inputs) == 2  # [x, layer1 output]


class ShapeQuery(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        n = y.shape[0]  # reads no data
        return self.bn(y).view(n, -1)


def test_shape_queries_are_not_users():
    graph = trace(ShapeQuery())
    bn = graph.calls("bn")[0]
    assert graph.feeds_only(bn.producer, bn)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.b = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.a(x)
        for _ in range(int(x.sum() > 0)):  # data-dependent
            x = x + 1
        return self.bn(self.b(x))


def test_fallback_is_module_order_with_sequential_pairs():
    graph = trace(Untraceable())
    assert (
        graph.approximate and "approximate" in graph.warning and "could not trace" in graph.warning
    )
    assert [s.name for s in graph.sites if s.op == "module"] == ["a.0", "a.1", "b", "bn"]
    a1, bn = graph.calls("a.1")[0], graph.calls("bn")[0]
    assert graph.feeds_only(a1.producer, a1)  # adjacent in one nn.Sequential: trusted
    assert bn.producer.name == "b" and not graph.feeds_only(bn.producer, bn)  # guessed: not trusted


@pytest.mark.parametrize("name", ["shufflenet", "inception", "efficientnet", "conv_subclass"])
def test_replicas_trace(name):
    model, _ = build(name)
    graph = trace(model)
    assert not graph.approximate
    assert len(graph.bn_sites()) == sum(is_batchnorm(m) for m in model.modules())


def test_is_fixed_affine():
    from batchnorm.protocol import is_fixed_affine

    assert is_fixed_affine(FrozenBatchNorm2d(3)) and is_fixed_affine(TorchvisionStyleFrozen())
    bn = nn.BatchNorm2d(3)
    assert not is_fixed_affine(bn) and not is_fixed_affine(bn.eval())
    bn.momentum = 0.0
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    assert is_fixed_affine(bn) and not is_fixed_affine(bn.train())
    assert not is_fixed_affine(nn.Conv2d(3, 3, 1))
