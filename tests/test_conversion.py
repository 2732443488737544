"""batchnorm.convert / freeze / unfreeze: swaps on a copy, state carried; fuse_act: module swaps,
the fx graph rewrite only for functional activations."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import batchnorm
from batchnorm import BatchNormError
from batchnorm.layers import _BatchNormXd


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP barrier costs on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Mixed(nn.Module):
    """One of each PyTorch BN kind, odd arguments, a shared BN and mixed training flags."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm1d(4, momentum=None)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.bn3 = nn.BatchNorm3d(4, track_running_stats=False, eps=1e-3)
        self.bnb = nn.BatchNorm2d(4, bias=False)
        self.sync = nn.SyncBatchNorm(4)
        self.conv = nn.Conv2d(4, 4, 1)
        self.shared = self.bn2  # the same module at two names

    def forward(self, x1, x2, x3):
        a = self.bn1(x1)
        b = self.shared(self.bnb(self.bn2(self.conv(x2))))
        c = self.bn3(x3)
        return a, b, c, self.sync(x2), self.sync(x1)


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(6, 4, 5, generator=g, dtype=dtype) * 2 + 1,
            torch.randn(3, 4, 4, 4, generator=g, dtype=dtype) - 1,
            torch.randn(2, 4, 3, 2, 2, generator=g, dtype=dtype))


def trained_mixed(dtype=torch.float32) -> Mixed:
    torch.manual_seed(0)
    m = Mixed().to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    for seed in range(3):
        m(*inputs(seed, dtype))
    m.bn3.eval()  # mixed training flags
    m.bnb.weight.requires_grad_(False)
    return m


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def assert_outputs_close(a, b, tol=1e-5):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def bn_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules(remove_duplicate=False)
            if batchnorm.protocol.is_batchnorm(m)}


# ------------------------------------------------------------------------------------------------
# convert: torch -> ours -> torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_torch_ours_torch(dtype):
    model = trained_mixed(dtype)
    before = snapshot(model)
    ours = batchnorm.convert(model, to="batchnorm")

    assert_same_state(snapshot(model), before)  # input untouched
    assert bn_types(model)["bn2"] is nn.BatchNorm2d
    assert bn_types(ours) == {"bn1": batchnorm.BatchNorm1d, "bn2": batchnorm.BatchNorm2d,
                              "bn3": batchnorm.BatchNorm3d, "bnb": batchnorm.BatchNorm2d,
                              "sync": _BatchNormXd, "shared": batchnorm.BatchNorm2d}
    assert ours.shared is ours.bn2  # sharing kept
    assert ours.bn3.training is False and ours.bn2.training is True
    assert ours.bnb.weight.requires_grad is False and ours.bnb.bias is None
    assert ours.bn1.momentum is None and ours.bn3.eps == 1e-3 and ours.bn3.running_mean is None
    assert_same_state(snapshot(ours), before)

    x = inputs(5, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_outputs_close(ours(*x), model(*x), tol)  # training: buffers move in both
    for key, value in model.state_dict().items():  # the same buffer updates
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=tol, atol=tol, msg=key)
    model.eval()
    ours.eval()
    assert_outputs_close(ours(*x), model(*x), tol)

    back = batchnorm.convert(ours, to="torch")
    assert bn_types(back) == bn_types(model)
    assert back.shared is back.bn2
    assert_same_state(snapshot(back), snapshot(ours))
    assert_outputs_close(back(*x), model(*x), tol)


def test_convert_carries_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ours = batchnorm.convert(model)
    assert isinstance(ours[1], batchnorm.BatchNorm2d)
    assert all(t.device.type == "meta" for t in list(ours.parameters()) + list(ours.buffers()))


def test_convert_a_bn_itself_and_leave_other_kinds():
    bn = nn.BatchNorm2d(3)
    assert type(batchnorm.convert(bn)) is batchnorm.BatchNorm2d

    class MyBN(nn.BatchNorm2d):  # a subclass may have its own forward: not ours to replace
        pass

    model = nn.Sequential(MyBN(3), nn.InstanceNorm2d(3), batchnorm.BatchNorm2d(3))
    ours = batchnorm.convert(model)
    assert [type(m) for m in ours] == [MyBN, nn.InstanceNorm2d, batchnorm.BatchNorm2d]
    back = batchnorm.convert(model, to="torch")
    assert [type(m) for m in back] == [MyBN, nn.InstanceNorm2d, nn.BatchNorm2d]


@pytest.mark.parametrize("act,want", [("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU),
                                      ("elu", nn.ELU), ("silu", nn.SiLU), ("identity", None)])
def test_act_to_torch_is_bn_then_activation(act, want):
    ours = batchnorm.BatchNormAct2d(3, act, negative_slope=0.2, alpha=0.5)
    ours(torch.randn(4, 3, 2, 2))
    back = batchnorm.convert(nn.Sequential(ours), to="torch")[0]
    if want is None:
        assert type(back) is nn.BatchNorm2d
    else:
        assert [type(m) for m in back] == [nn.BatchNorm2d, want]
        assert getattr(back[1], "negative_slope", 0.2) == 0.2
        assert getattr(back[1], "alpha", 0.5) == 0.5
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(back.eval()(x), ours.eval()(x))


def test_unknown_target_and_fuse_with_other_targets():
    with pytest.raises(BatchNormError, match=re.escape("expected to in ('batchnorm', 'torch', ")):
        batchnorm.convert(nn.BatchNorm2d(3), to="onnx")
    with pytest.raises(BatchNormError, match="expected fuse_act=True only with to='batchnorm'"):
        batchnorm.convert(nn.BatchNorm2d(3), to="frozen", fuse_act=True)


# ------------------------------------------------------------------------------------------------
# freeze / unfreeze


def test_freeze_is_a_new_model_computing_eval_bn():
    model = trained_mixed()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="without running statistics"):  # bn3 tracks nothing
        frozen = batchnorm.freeze(model)
    assert_same_state(snapshot(model), before)
    assert {n: t.__name__ for n, t in bn_types(frozen).items()} == {
        "bn1": "FrozenBatchNorm1d", "bn2": "FrozenBatchNorm2d", "bn3": "FrozenBatchNorm3d",
        "bnb": "FrozenBatchNorm2d", "sync": "_FrozenBatchNormXd", "shared": "FrozenBatchNorm2d"}
    assert frozen.shared is frozen.bn2
    assert not list(p for n, p in frozen.named_parameters() if not n.startswith("conv"))
    model.eval()
    x = inputs(7)
    want = model(*x)
    got_train = frozen.train()(*x)  # frozen: the same map in train and eval
    for i in (0, 1, 3, 4):  # bn3 had no running statistics: not comparable
        torch.testing.assert_close(got_train[i], want[i], rtol=1e-5, atol=1e-5)
    assert_same_state(snapshot(frozen), snapshot(frozen.eval()))


def test_freeze_ours_and_act():
    ours = nn.Sequential(batchnorm.BatchNorm2d(3), batchnorm.BatchNormAct2d(3, "elu", alpha=0.5))
    ours(torch.randn(4, 3, 2, 2) * 3)
    ours.eval()
    frozen = batchnorm.freeze(ours)
    assert type(frozen[0]) is batchnorm.FrozenBatchNorm2d
    assert [type(m) for m in frozen[1]] == [batchnorm.FrozenBatchNorm2d, nn.ELU]
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(frozen(x), ours(x))
    assert batchnorm.freeze(frozen)[0] is not frozen[0]  # a new model, already frozen: same kinds
    assert type(batchnorm.freeze(frozen)[0]) is batchnorm.FrozenBatchNorm2d


def test_unfreeze_gives_trainable_ours_with_the_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.SyncBatchNorm(4))
    model(torch.randn(5, 3, 3, 3))
    model.eval()
    frozen = batchnorm.freeze(model)
    before = snapshot(frozen)
    trainable = batchnorm.unfreeze(frozen)
    assert_same_state(snapshot(frozen), before)
    assert type(trainable[1]) is batchnorm.BatchNorm2d and type(trainable[3]) is _BatchNormXd
    for bn, ref in ((trainable[1], model[1]), (trainable[3], model[3])):
        assert isinstance(bn.weight, nn.Parameter) and bn.weight.requires_grad
        assert int(bn.num_batches_tracked) == 0 and bn.momentum == 0.1
        torch.testing.assert_close(bn.running_var, ref.running_var)
        assert bn.training is False
    x = torch.randn(5, 3, 3, 3)
    torch.testing.assert_close(trainable(x), model(x))
    trainable.train()(x).sum().backward()  # trains
    assert trainable[1].weight.grad is not None and int(trainable[1].num_batches_tracked) == 1


class DuckFrozenBatchNorm2d(nn.Module):
    """torchvision-style FrozenBatchNorm2d (buffers only) without importing torchvision."""

    def __init__(self, n):
        super().__init__()
        self.num_features, self.eps = n, 1e-5
        fills = (("weight", 2.0), ("bias", 0.5), ("running_mean", 0.1), ("running_var", 4.0))
        for name, fill in fills:
            self.register_buffer(name, torch.full((n,), fill))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def test_unfreeze_duck_typed_frozen():
    model = nn.Sequential(DuckFrozenBatchNorm2d(3))
    trainable = batchnorm.unfreeze(model).eval()
    assert type(trainable[0]) is batchnorm.BatchNorm2d
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(trainable(x), model(x))


# ------------------------------------------------------------------------------------------------
# fuse_act


def _fused_kinds(gm: nn.Module) -> list[tuple[str, str]]:
    return [(n, m.act) for n, m in gm.named_modules()
            if isinstance(m, batchnorm.layers._OurBatchNormAct)]


def _compare_train_and_eval(model: nn.Module, fused: nn.Module, shape, tol=1e-5, **kwargs):
    """Same outputs, input and parameter gradients (random upstream gradient) and running
    statistics, in train and in eval mode."""
    for training in (True, False):
        model.train(training)
        fused.train(training)
        x = torch.randn(shape)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = model(xa, **kwargs), fused(xb, **kwargs)
        torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
        upstream = torch.randn_like(ya)
        ya.backward(upstream)
        yb.backward(upstream)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)
        grads_a = {n: p.grad for n, p in model.named_parameters()}
        for n, p in fused.named_parameters():
            torch.testing.assert_close(p.grad, grads_a[n], rtol=1e-4, atol=1e-4, msg=n)
        buffers_a = dict(model.named_buffers())
        for n, b in fused.named_buffers():
            torch.testing.assert_close(b, buffers_a[n], rtol=1e-5, atol=1e-5, msg=n)
        model.zero_grad()
        fused.zero_grad()


# every fused activation of the registry, as a module
ALL_ACTS = [("relu", lambda: nn.ReLU(inplace=True)), ("leaky_relu", lambda: nn.LeakyReLU(0.2)),
            ("elu", lambda: nn.ELU(alpha=0.5)), ("silu", nn.SiLU), ("relu6", nn.ReLU6),
            ("hardswish", nn.Hardswish)]


def _conv_bn_act_stack() -> nn.Sequential:
    layers = []
    for i, (_, make) in enumerate(ALL_ACTS):
        layers += [nn.Conv2d(6 if i else 3, 6, 3, padding=1), nn.BatchNorm2d(6), make()]
    return nn.Sequential(*layers, nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6))  # last: stays plain


def test_fuse_conv_bn_act_sequential_swaps_modules():
    torch.manual_seed(0)
    model = _conv_bn_act_stack()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # module activations: no GraphModule, nothing to warn of
        fused = batchnorm.convert(model, fuse_act=True)
    assert_same_state(snapshot(model), before)
    assert type(fused) is nn.Sequential
    assert _fused_kinds(fused) == [(str(3 * i + 1), name) for i, (name, _) in enumerate(ALL_ACTS)]
    assert fused.get_submodule("4").negative_slope == 0.2 and fused.get_submodule("7").alpha == 0.5
    assert [type(fused[3 * i + 2]) for i in range(len(ALL_ACTS))] == [nn.Identity] * len(ALL_ACTS)
    assert type(fused[-1]) is batchnorm.BatchNorm2d
    _compare_train_and_eval(model, fused, (4, 3, 5, 5))


def test_fused_sequential_stays_a_sequential():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    fused = batchnorm.convert(model, fuse_act=True)
    assert type(fused) is nn.Sequential and len(fused) == len(model) == 4
    assert [type(m) for m in fused] == [nn.Conv2d, batchnorm.BatchNormAct2d, nn.Identity,
                                        nn.Conv2d]
    assert type(fused[1]) is batchnorm.BatchNormAct2d and fused[-1] is fused[3]
    assert type(fused[:2]) is nn.Sequential and len(fused[:2]) == 2


class Masked(nn.Module):
    """Python control flow fx traces one way: ``mask`` is a Proxy, so ``mask is None`` is False."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU()
        self.bn2, self.act2 = nn.BatchNorm2d(4), nn.LeakyReLU(0.1)

    def forward(self, x, mask=None):
        y = self.act(self.bn(self.conv(x)))
        if mask is None:
            return self.act2(self.bn2(y))
        return self.act2(self.bn2(y * mask)) * mask


def test_fuse_keeps_python_control_flow():
    torch.manual_seed(3)
    model = Masked()
    fused = batchnorm.convert(model, fuse_act=True)
    assert type(fused) is Masked
    assert _fused_kinds(fused) == [("bn", "silu"), ("bn2", "leaky_relu")]
    mask = (torch.rand(2, 1, 5, 5) > 0.3).float()
    _compare_train_and_eval(model, fused, (2, 3, 5, 5))  # the branch fx did not trace
    _compare_train_and_eval(model, fused, (2, 3, 5, 5), mask=mask)


def test_fused_state_dict_loads_into_the_original_class_and_back():
    torch.manual_seed(4)
    model = Masked()
    model(torch.randn(4, 3, 5, 5))  # running statistics away from their initial values
    stack = _conv_bn_act_stack()
    for original, fresh, shape in ((model, Masked(), (2, 3, 5, 5)),
                                   (stack, _conv_bn_act_stack(), (2, 3, 4, 4))):
        fused = batchnorm.convert(original, fuse_act=True)
        assert list(fused.state_dict()) == list(original.state_dict())
        fresh.load_state_dict(fused.state_dict(), strict=True)
        back = batchnorm.convert(fused, to="torch")
        assert type(back) is type(original)
        assert list(back.state_dict()) == list(original.state_dict())
        fresh.load_state_dict(back.state_dict(), strict=True)
        assert_same_state(fresh.state_dict(), original.state_dict())
        assert bn_types(back) == bn_types(original)
        assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]
        x = torch.randn(shape)
        torch.testing.assert_close(back.eval()(x), original.eval()(x), rtol=1e-5, atol=1e-5)


def test_frozen_puts_the_activation_back_in_its_place():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ELU(0.5))
    model(torch.randn(4, 3, 3, 3))
    model[2].eval()  # the flag goes with the activation to nn.Identity and back
    frozen = batchnorm.freeze(batchnorm.convert(model, fuse_act=True))
    assert [type(m) for m in frozen] == [nn.Conv2d, batchnorm.FrozenBatchNorm2d, nn.ELU]
    assert frozen[2].alpha == 0.5 and frozen[2].training is False and frozen[0].training
    x = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(frozen(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_to_torch_keeps_a_sequential_when_no_identity_alone_follows():
    act = batchnorm.BatchNormAct2d(4, "relu")
    identity = nn.Identity()
    model = nn.Sequential(act, identity, identity)  # one Identity called twice: not a slot
    back = batchnorm.convert(model, to="torch")
    assert [type(m) for m in back[0]] == [nn.BatchNorm2d, nn.ReLU] and type(back[1]) is nn.Identity
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(back.eval()(x), model.eval()(x))


class Residual(nn.Module):
    """ResNet's BasicBlock: one ReLU module used twice, the second after the residual add."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + x)
        y = self.bn3(out)  # two consumers: not fusable
        return F.leaky_relu(y, 0.3) + y


class OwnReLUs(Residual):
    """The same block with one ReLU module per call: bn1's pair can be fused."""

    def __init__(self, c=4):
        super().__init__(c)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + x)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.BatchNorm1d(5), nn.BatchNorm1d(5), nn.BatchNorm1d(5)
        self.d = nn.BatchNorm1d(5)
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.leaky_relu(self.b(self.lin(x)), negative_slope=0.05)
        x = F.elu(self.c(x), 0.3)
        return self.d(x).relu()


def test_shared_activation_module_is_left_unfused_with_a_warning():
    torch.manual_seed(1)
    model = nn.Sequential(Residual(), Residual())
    with pytest.warns(UserWarning, match=r"0\.bn1 -> 0\.relu, 1\.bn1 -> 1\.relu left unfused.*"
                                         r"give each call its own activation module") as record:
        fused = batchnorm.convert(model, fuse_act=True)
    assert len(record) == 1 and type(fused) is nn.Sequential and _fused_kinds(fused) == []
    for name in ("0.bn1", "0.bn2", "0.bn3", "1.bn1", "1.bn2", "1.bn3"):
        assert type(fused.get_submodule(name)) is batchnorm.BatchNorm2d
    assert type(fused[0].relu) is nn.ReLU
    _compare_train_and_eval(model, fused, (2, 4, 5, 5))


def test_fuse_act_graph_fuses_shared_activation_modules_too():
    torch.manual_seed(1)
    model = nn.Sequential(Residual(), Residual())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        fused = batchnorm.convert(model, fuse_act="graph")
    assert isinstance(fused, fx.GraphModule)
    assert _fused_kinds(fused) == [("0.bn1", "relu"), ("1.bn1", "relu")]
    assert type(fused.get_submodule("0.relu")) is nn.ReLU  # still the residual's activation
    _compare_train_and_eval(model, fused, (2, 4, 5, 5))


@pytest.mark.parametrize("bad", ["yes", "Graph", 1, None])
def test_fuse_act_takes_false_true_or_graph(bad):
    with pytest.raises(BatchNormError, match=r"expected fuse_act False, True or 'graph' \(got "):
        batchnorm.convert(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), fuse_act=bad)


def test_fuse_residual_block_with_its_own_activation_modules():
    torch.manual_seed(1)
    model = nn.Sequential(OwnReLUs(), OwnReLUs())
    model.train()
    model[1].eval()  # training flags carried, containers included
    fused = batchnorm.convert(model, fuse_act=True)
    assert type(fused[0]) is OwnReLUs
    assert _fused_kinds(fused) == [("0.bn1", "relu"), ("1.bn1", "relu")]
    assert type(fused[0].relu1) is nn.Identity and type(fused[0].relu2) is nn.ReLU
    assert fused[1].training is False and fused[0].training and fused[1].bn1.training is False
    assert fused[1].relu1.training is False
    _compare_train_and_eval(model, fused, (2, 4, 5, 5))


def test_fuse_functional_activations_is_a_graph_rewrite_and_says_so():
    torch.manual_seed(2)
    model = Functional()
    with pytest.warns(UserWarning, match=r"returns a torch\.fx GraphModule, not a Functional: "
                                         r"fusing an activation function \(a -> relu, "
                                         r"b -> leaky_relu, c -> elu, d -> relu\) takes a graph "
                                         r"rewrite.*one path fx traced"):
        fused = batchnorm.convert(model, fuse_act=True)
    assert isinstance(fused, fx.GraphModule)
    assert _fused_kinds(fused) == [("a", "relu"), ("b", "leaky_relu"), ("c", "elu"), ("d", "relu")]
    assert fused.b.negative_slope == 0.05 and fused.c.alpha == 0.3
    assert set(fused.state_dict()) == set(model.state_dict())  # in the graph's order
    Functional().load_state_dict(fused.state_dict(), strict=True)
    _compare_train_and_eval(model, fused, (8, 5))


class Both(nn.Module):
    """A module activation and a functional one."""

    def __init__(self):
        super().__init__()
        self.bn1, self.act1, self.bn2 = nn.BatchNorm1d(5), nn.ELU(0.7), nn.BatchNorm1d(5)

    def forward(self, x):
        return F.silu(self.bn2(self.act1(self.bn1(x))))


def test_fuse_module_and_functional_activations_together():
    torch.manual_seed(5)
    model = Both()
    with pytest.warns(UserWarning, match=r"GraphModule, not a Both: .*\(bn2 -> silu\)") as record:
        fused = batchnorm.convert(model, fuse_act=True)
    assert len(record) == 1 and isinstance(fused, fx.GraphModule)
    assert _fused_kinds(fused) == [("bn1", "elu"), ("bn2", "silu")] and fused.bn1.alpha == 0.7
    assert set(fused.state_dict()) == set(model.state_dict())
    _compare_train_and_eval(model, fused, (8, 5))


def test_fuse_3d():
    model = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.ReLU())
    fused = batchnorm.convert(model, fuse_act=True)
    assert type(fused.get_submodule("1")) is batchnorm.BatchNormAct3d
    _compare_train_and_eval(model, fused, (2, 2, 3, 3, 3))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(3), nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = -x
        return self.relu(self.bn(x))


def test_untraceable_model_warns_and_is_converted_unfused():
    model = Untraceable()
    with pytest.warns(UserWarning, match="torch.fx cannot trace Untraceable"):
        out = batchnorm.convert(model, fuse_act=True)
    assert type(out) is Untraceable and type(out.bn) is batchnorm.BatchNorm2d
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(out(x), model(x))


def test_nothing_to_fuse_keeps_the_class_and_says_so():
    # no activation, or one the kernels do not fuse: converted, not fused, and a warning says so
    for model in (nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)),
                  nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Sigmoid())):
        with pytest.warns(UserWarning, match="none fused"):
            out = batchnorm.convert(model, fuse_act=True)
        assert type(out) is nn.Sequential and type(out[1]) is batchnorm.BatchNorm2d
