"""The activation registry: every entry runs through the kernels, the fallback, convert's fusion,
the inplace check and the graph helpers, and they agree with each other."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import BatchNormError, activations, ops
from batchnorm.activations import FUSED, INVERTIBLE, REGISTRY
from batchnorm.errors import check_act
from batchnorm.graph import trace
from batchnorm.kernels import _activation as kernel_codes
from batchnorm.protocol import activation_of

SLOPE, ALPHA, EPS = 0.2, 1.3, 1e-5
PARAMS = {"negative_slope": SLOPE, "alpha": ALPHA}


def test_kernel_codes_are_the_registrys():
    codes = {name: REGISTRY[name].code for name in FUSED}
    assert codes == {name: getattr(kernel_codes, name.upper()) for name in FUSED}
    assert sorted(codes.values()) == list(kernel_codes.CODES)
    assert FUSED == ("identity", "relu", "leaky_relu", "elu", "silu", "relu6", "hardswish")
    assert INVERTIBLE == ("identity", "leaky_relu", "elu")
    assert ops.ACTIVATIONS == FUSED and ops.INVERTIBLE == INVERTIBLE


@pytest.mark.parametrize("act", FUSED)
def test_kernels_and_fallback_agree_forward_and_backward(act):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    dy = torch.randn_like(x)
    outputs = []
    # contiguous: the numba kernels; a transposed view: PyTorch's path (same values)
    for inp in (x, x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert ops._backend(inp, w, b) == ("numba" if inp.is_contiguous() else "torch")
        xi, wi, bi = (t.clone().requires_grad_() for t in (inp, w, b))
        y, mean, var = ops.bn_act_train(xi, wi, bi, EPS, act, SLOPE, ALPHA)
        grads = torch.autograd.grad(y, (xi, wi, bi), dy)
        ye = ops.bn_act_eval(xi, wi, bi, mean, var, EPS, act, SLOPE, ALPHA)
        outputs.append((y, mean, var, *grads, ye))
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", FUSED)
def test_derivative_and_inverse_are_the_functions(act):
    entry = REGISTRY[act]
    z = torch.linspace(-3, 3, 61, dtype=torch.float64).requires_grad_()
    y = entry.apply(z, SLOPE, ALPHA)
    (grad,) = torch.autograd.grad(y.sum(), z)
    mask = z.detach() != 0  # the derivative at 0 is a convention
    torch.testing.assert_close(entry.derivative(z.detach(), SLOPE, ALPHA)[mask], grad[mask])
    if entry.invertible:
        back, dz = entry.inverse(y.detach(), SLOPE, ALPHA)
        torch.testing.assert_close(back, z.detach())
        torch.testing.assert_close(dz[mask], grad[mask])


@pytest.mark.parametrize("act", FUSED)
def test_inplace_check_follows_the_registry(act):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    if act in INVERTIBLE:
        for xi in (x, x.transpose(2, 3)):  # kernels and fallback
            xa, xb = xi.clone().requires_grad_(), xi.clone().requires_grad_()
            ya = ops.bn_act_train(xa, None, None, EPS, act, SLOPE, ALPHA, inplace=True)[0]
            yb = ops.bn_act_train(xb, None, None, EPS, act, SLOPE, ALPHA)[0]
            dy = torch.randn_like(ya)
            torch.testing.assert_close(torch.autograd.grad(ya, xa, dy)[0],
                                       torch.autograd.grad(yb, xb, dy)[0])
        for name in REGISTRY[act].positive:
            args = {**PARAMS, name: 0.0}
            with pytest.raises(BatchNormError, match=f"{name} > 0 with inplace=True"):
                check_act(act, args["negative_slope"], args["alpha"], True)
    else:
        with pytest.raises(BatchNormError, match="an invertible act"):
            batchnorm.BatchNormAct2d(3, act=act, inplace=True)


class _Net(nn.Module):
    """conv -> BN -> an activation: a module (registered) or a callable on the tensor."""

    def __init__(self, apply):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        if isinstance(apply, nn.Module):
            self.act = apply
        else:
            self.apply_fn = apply

    def forward(self, z):
        z = self.bn(self.conv(z))
        return self.act(z) if hasattr(self, "act") else self.apply_fn(z)


@pytest.mark.parametrize("act", [a for a in FUSED if a != "identity"])
def test_convert_fuses_every_module_function_and_method_of_the_registry(act):
    entry = REGISTRY[act]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    appliers = [entry.make_module(SLOPE, ALPHA)]
    appliers += [lambda z, f=f: f(z, *[PARAMS[p] for p in entry.params]) for f in entry.functions]
    appliers += [lambda z, name=name: getattr(z, name)() for name in entry.methods]
    for apply in appliers:
        net = _Net(apply)
        fused = batchnorm.convert(net, fuse_act=True)
        bn = fused.get_submodule("bn")
        assert isinstance(bn, batchnorm.BatchNormAct2d) and bn.act == act, apply
        for name in entry.params:
            assert getattr(bn, name) == pytest.approx(PARAMS[name])
        with torch.no_grad():
            torch.testing.assert_close(fused(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_graph_helpers_know_every_entry(name):
    entry = REGISTRY[name]
    for cls in entry.modules:
        net = nn.Sequential(nn.Conv2d(3, 3, 1), cls())
        site = trace(net).calls("1")[0]
        assert site.is_activation, cls
    if name != "identity":
        class Timm(nn.BatchNorm2d):  # a third-party BN+act naming its activation
            act = name

        rebuilt = activation_of(Timm(3))
        assert isinstance(rebuilt, entry.modules), rebuilt
    if entry.fused:
        module = batchnorm.BatchNormAct2d(3, act=name, negative_slope=SLOPE, alpha=ALPHA)
        rebuilt = module.activation()
        assert isinstance(rebuilt, entry.modules or nn.Identity)
        z = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(rebuilt(z), entry.apply(z, SLOPE, ALPHA))


def test_lookups():
    assert activations.get("Leaky-ReLU") is REGISTRY["leaky_relu"]
    assert activations.get("swish") is REGISTRY["silu"]
    assert activations.get("nope") is None
    assert activations.by_module(nn.ReLU6(), exact=True) is REGISTRY["relu6"]
    assert activations.by_call(F.elu) is REGISTRY["elu"]
    assert activations.by_call("relu_") is REGISTRY["relu"]
    assert activations.by_call(torch.add) is None
