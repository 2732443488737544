"""batchnorm.convert / freeze / unfreeze: swaps on a copy, state carried, fuse_act via torch.fx."""
from __future__ import annotations

import re

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


def _compare_train_and_eval(model: nn.Module, fused: nn.Module, shape, tol=1e-5):
    for training in (True, False):
        model.train(training)
        fused.train(training)
        x = torch.randn(shape)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = model(xa), fused(xb)
        torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)
        grads_a = {n: p.grad for n, p in model.named_parameters()}
        for n, p in fused.named_parameters():
            torch.testing.assert_close(p.grad, grads_a[n], rtol=1e-4, atol=1e-4, msg=n)
        model.zero_grad()
        fused.zero_grad()


def test_fuse_conv_bn_act_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.LeakyReLU(0.2),
        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ELU(alpha=0.5),
        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.SiLU(),
        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6),  # no activation: stays plain
    )
    before = snapshot(model)
    fused = batchnorm.convert(model, fuse_act=True)
    assert_same_state(snapshot(model), before)
    assert isinstance(fused, fx.GraphModule)
    assert _fused_kinds(fused) == [("1", "relu"), ("4", "leaky_relu"), ("7", "elu"), ("10", "silu")]
    assert fused.get_submodule("4").negative_slope == 0.2 and fused.get_submodule("7").alpha == 0.5
    assert type(fused.get_submodule("13")) is batchnorm.BatchNorm2d
    assert not any(isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SiLU)) for m in fused.modules())
    assert set(fused.state_dict()) == set(model.state_dict())  # same keys: checkpoints load
    _compare_train_and_eval(model, fused, (4, 3, 5, 5))


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


def test_fuse_residual_block():
    torch.manual_seed(1)
    model = nn.Sequential(Residual(), Residual())
    fused = batchnorm.convert(model, fuse_act=True)
    assert _fused_kinds(fused) == [("0.bn1", "relu"), ("1.bn1", "relu")]
    for name in ("0.bn2", "0.bn3", "1.bn2", "1.bn3"):
        assert type(fused.get_submodule(name)) is batchnorm.BatchNorm2d
    _compare_train_and_eval(model, fused, (2, 4, 5, 5))
    model.train()
    model[1].eval()  # training flags carried, containers included
    fused = batchnorm.convert(model, fuse_act=True)
    assert fused.get_submodule("1").training is False and fused.get_submodule("0").training
    assert fused.get_submodule("1.bn1").training is False


def test_fuse_functional_activations():
    torch.manual_seed(2)
    model = Functional()
    fused = batchnorm.convert(model, fuse_act=True)
    assert _fused_kinds(fused) == [("a", "relu"), ("b", "leaky_relu"), ("c", "elu"), ("d", "relu")]
    assert fused.b.negative_slope == 0.05 and fused.c.alpha == 0.3
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
