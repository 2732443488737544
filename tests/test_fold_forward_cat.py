"""fold's two other directions: into the layer after a BN, and into the pieces of a channel cat.

Every case is checked the way fold is: the folded model against the original in eval (and, in
float64, against it to 1e-12), the report's direction, and what is left of the BN.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm.errors import BatchNormError
from batchnorm.folding import fold, fold_weights_forward

from .replicas import randomize_bn
from .test_fold import assert_close, snapshot

# most models here are built in train mode: fold's warning about that has its own test
pytestmark = pytest.mark.filterwarnings("ignore:fold uses the running statistics")


def bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check(model, x, rel=1e-5, **kwargs):
    """fold(model, x) against model.eval()(x); the model is unchanged; returns (folded, rows)."""
    model = randomize_bn(model, 3)
    before = snapshot(model)
    folded, report = fold(model, x, report=True, **kwargs)
    assert snapshot(model) == before
    with torch.no_grad():
        assert_close(folded(x), copy.deepcopy(model).eval()(x), rel)
    assert report.rel_error < rel
    assert all(r.rel_error is not None and r.rel_error < rel for r in report.layers
               if r.action != "kept")
    return folded, {r.name: r for r in report.layers}


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("groups,dilation,mode", [(1, 1, "zeros"), (2, 2, "reflect"),
                                                  (6, 1, "circular"), (3, 1, "replicate")])
def test_fold_weights_forward_equals_conv_of_bn_in_float64(groups, dilation, mode):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    c, out = 6, 12
    bn = randomize_bn(nn.BatchNorm2d(c), 2).double().eval()
    pad = 0 if mode == "zeros" else 2
    conv = nn.Conv2d(c, out, 3, padding=pad, padding_mode=mode, dilation=dilation,
                     groups=groups).double()
    x = torch.randn(2, c, 9, 9, dtype=torch.float64, generator=g)
    w, b = fold_weights_forward(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                bn.weight, bn.bias, groups=groups)
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.copy_(w)
        folded.bias.copy_(b)
        want = conv(bn(x))
        assert (folded(x) - want).abs().max().item() <= 1e-12 * want.abs().max().item()
    # zero padding is where it stops being exact: the border windows differ, the inside not
    zero = nn.Conv2d(c, out, 3, padding=1, groups=groups).double()
    w, b = fold_weights_forward(zero.weight, zero.bias, bn.running_mean, bn.running_var, bn.eps,
                                bn.weight, bn.bias, groups=groups)
    with torch.no_grad():
        got = F.conv2d(x, w, b, padding=1, groups=groups)
        want = zero(bn(x))
        assert torch.allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-10)
        assert not torch.allclose(got, want, atol=1e-6)


def test_fold_weights_forward_linear_with_repeat_and_without_affine():
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(3, affine=False).double().eval()
    bn.running_mean.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
    fc = nn.Linear(3 * 4, 5, bias=False).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=g)
    w, b = fold_weights_forward(fc.weight, None, bn.running_mean, bn.running_var, bn.eps,
                                repeat=4)
    with torch.no_grad():
        want = fc(bn(x).flatten(1))
        assert (F.linear(x.flatten(1), w, b) - want).abs().max().item() < 1e-12
    assert not torch.equal(w, fc.weight)  # a new tensor; the layer is not touched
    with pytest.raises(BatchNormError, match=r"expected a weight reading 3 input features"):
        fold_weights_forward(fc.weight, None, bn.running_mean, bn.running_var, bn.eps)
    with pytest.raises(BatchNormError, match=r"expected bias with 5 elements \(got 2\)"):
        fold_weights_forward(fc.weight, torch.zeros(2), bn.running_mean, bn.running_var, bn.eps,
                             repeat=4)


# --------------------------------------------------------------------------- into the next layer


class Head(nn.Module):
    """The face-recognition head: BN2d → Dropout → Flatten → FC → BN1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.4)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 5 * 5, 8)
        self.features = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.features(self.fc(self.flat(self.drop(self.bn(self.act(self.conv(x)))))))


@pytest.mark.parametrize("with_input", [True, False])
def test_bn_dropout_fc_bn_head_folds_both_ways(with_input):
    x = torch.randn(3, 3, 5, 5)
    model = randomize_bn(Head(), 1)
    folded, report = fold(model, x if with_input else None, report=True)
    rows = {r.name: r for r in report.layers}
    assert (rows["bn"].direction, rows["bn"].into) == ("next", "fc")
    assert (rows["features"].direction, rows["features"].into) == ("previous", "fc")
    assert rows["bn"].reason == "BN → Linear" and not bns(folded)
    with torch.no_grad():
        assert_close(folded(x), copy.deepcopy(model).eval()(x))
    assert "next: fc" in str(report)


def test_flatten_bn1d_linear_folds_forward_without_example_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2))

    class Functional(nn.Module):  # the same with torch.flatten in forward
        def __init__(self):
            super().__init__()
            self.body, self.bn, self.fc = model[:3], nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.bn(torch.flatten(self.body(x), 1)))

    x = torch.randn(2, 3, 6, 6)
    for m, name in ((model, "4"), (Functional(), "bn")):
        randomize_bn(m, 2)
        folded, report = fold(m, report=True)
        row = next(r for r in report.layers if r.name == name)
        assert row.direction == "next" and not bns(folded)
        with torch.no_grad():
            assert_close(folded(x), copy.deepcopy(m).eval()(x))


def test_bn1d_then_linear_needs_a_known_2d_input():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    _, rows = check(model, torch.randn(5, 4))
    assert rows["0"].direction == "next"
    _, report = fold(model, report=True)  # the input could be (N, 4, 4): not folded blind
    assert report.layers[0].action == "frozen"
    assert "not known to be 2D (pass example_input)" in report.layers[0].reason
    # (N, C, L) input: the Linear reads L, not the BN's channels
    _, rows = check(model, torch.randn(5, 4, 4))
    assert rows["0"].action == "frozen" and "input is 3D" in rows["0"].reason


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 1),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2),  # padding 0
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 6, 3, padding=2, padding_mode="replicate", dilation=2),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular", groups=2),
        nn.Conv2d(4, 8, 1, groups=4, bias=False),  # depthwise
        nn.Conv2d(4, 6, 1, padding="same"),
        nn.Conv1d(4, 6, 3),
        nn.Conv3d(4, 6, 1),
    ],
    ids=["1x1", "pad0-stride-dilation", "reflect", "replicate", "circular-grouped", "depthwise",
         "same-1x1", "conv1d", "conv3d"],
)
def test_bn_folds_into_a_conv_after_it_where_exact(conv):
    dims = conv.weight.dim() - 2
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dims - 1](4)
    model = nn.Sequential(bn, conv)
    x = torch.randn(2, 4, *(7,) * dims)
    folded, rows = check(model, x)
    assert rows["0"].direction == "next" and rows["0"].into == "1" and not bns(folded)
    double = copy.deepcopy(model).double()
    _, rows = check(double, x.double(), rel=1e-12)
    assert rows["0"].direction == "next"


def test_bn_stays_before_a_zero_padded_conv_and_where_it_is_not_alone():
    _, rows = check(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)),
                    torch.randn(2, 4, 6, 6))
    assert rows["0"].action == "frozen" and "pads with zeros" in rows["0"].reason

    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.bn(x)
            return self.conv(y) + y

    _, rows = check(TwoUsers(), torch.randn(2, 4, 3, 3))
    assert rows["bn"].action == "frozen" and "2 users" in rows["bn"].reason

    act = nn.Sequential(batchnorm.BatchNormAct2d(4, act="relu"), nn.Conv2d(4, 4, 1))
    _, rows = check(act, torch.randn(2, 4, 3, 3))
    assert rows["0"].action == "frozen" and "activation" in rows["0"].reason
    shared = nn.Conv2d(4, 4, 1)
    twice = nn.Sequential(nn.BatchNorm2d(4), shared, nn.ReLU(), shared)
    _, rows = check(twice, torch.randn(2, 4, 3, 3))
    assert rows["0"].action == "frozen" and "called more than once" in rows["0"].reason
    transposed = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 2))
    _, rows = check(transposed, torch.randn(2, 4, 3, 3))
    assert rows["0"].action == "frozen"


def test_forward_false_and_bn_conv_bn_chains():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
    x = torch.randn(2, 4, 3, 3)
    folded, rows = check(model, x)  # the conv takes the BN after it and the one before it
    assert rows["0"].direction == "next" and rows["2"].direction == "previous"
    assert not bns(folded)
    _, rows = check(model, x, forward=False)
    assert rows["0"].action == "frozen" and rows["2"].direction == "previous"
    with pytest.raises(BatchNormError, match="expected forward to be True or False"):
        fold(model, forward="yes")


def test_a_frozen_bn_folds_forward_too():
    model = nn.Sequential(nn.Flatten(), batchnorm.FrozenBatchNorm1d(6), nn.Linear(6, 2))
    _, rows = check(model, torch.randn(3, 6))
    assert rows["1"].direction == "next"


# --------------------------------------------------------------------------- through torch.cat


class MixConv(nn.Module):
    """MixNet's MixedConv2d: channel groups through 3x3, 5x5, 7x7 convs, concatenated, BN."""

    def __init__(self, nested=False):
        super().__init__()
        self.splits = [2, 3, 3]
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=i == 1)
            for i, (c, k) in enumerate(zip(self.splits, (3, 5, 7))))
        self.nested = nested
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x):
        chunks = torch.split(x, self.splits, 1)  # indexed, as timm does: fx traces that
        parts = [conv(chunks[i]) for i, conv in enumerate(self.convs)]
        y = torch.cat([torch.cat(parts[:2], dim=1), parts[2]], 1) if self.nested \
            else torch.cat(parts, 1)
        return self.act(self.bn(y))


@pytest.mark.parametrize("nested", [False, True])
def test_mixconv_bn_splits_into_its_three_convs(nested):
    model = MixConv(nested)
    x = torch.randn(2, 8, 9, 9)
    for with_input in (x, None):
        folded, report = fold(randomize_bn(model, 4), with_input, report=True)
        row = report.layers[0]
        assert (row.action, row.direction) == ("folded", "pieces")
        assert row.into == "convs.0, convs.1, convs.2" and "stay" not in row.reason
        assert isinstance(folded.bn, nn.Identity) and not bns(folded)
        with torch.no_grad():
            assert_close(folded(x), copy.deepcopy(model).eval()(x))
    _, rows = check(copy.deepcopy(model).double(), x.double(), rel=1e-12)
    assert rows["bn"].direction == "pieces"


class Inception(nn.Module):
    """Inception-style: 1x1, 3x3 and a pooling branch, concatenated, then BN + ReLU."""

    def __init__(self, act=False):
        super().__init__()
        self.b1 = nn.Conv2d(4, 3, 1)
        self.b2 = nn.Conv2d(4, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.bn = batchnorm.BatchNormAct2d(12, act="relu") if act else nn.BatchNorm2d(12)

    def forward(self, x):
        return self.bn(torch.cat([self.b1(x), self.pool(x), self.b2(x)], 1))


@pytest.mark.parametrize("act", [False, True])
def test_inception_pooling_branch_stays_frozen_for_its_channels_only(act):
    x = torch.randn(2, 4, 6, 6)
    folded, rows = check(Inception(act), x)
    row = rows["bn"]
    assert row.direction == "pieces" and row.into == "b1, b2"
    assert "channels 3:7 (pool) stay a frozen affine" in row.reason
    left = bns(folded)
    assert len(left) == 1 and type(left[0]) is nn.BatchNorm2d and not left[0].training
    affine = left[0]
    # the folded channels are the exact identity; the pool's hold the original statistics
    probe = torch.randn(3, 12, 2, 2)
    with torch.no_grad():
        out = affine(probe)
    assert torch.equal(out[:, :3], probe[:, :3]) and torch.equal(out[:, 7:], probe[:, 7:])
    original = randomize_bn(Inception(act), 3).bn
    assert torch.equal(affine.running_mean[3:7], original.running_mean[3:7])
    assert all(not p.requires_grad for p in affine.parameters())


def test_cat_pieces_that_cannot_fold_and_cats_that_are_not_on_channels():
    class Cats(nn.Module):
        def __init__(self, dim=1, shared=False, same=False):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
            self.bn = nn.BatchNorm2d(4 if dim in (1, -3) else 2)
            self.dim, self.shared, self.same = dim, shared, same

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            y = self.bn(torch.cat([a, a if self.same else b], self.dim))
            return y + a.sum(1, keepdim=True) if self.shared else y

    x = torch.randn(2, 3, 4, 4)
    _, rows = check(Cats(shared=True), x)  # a also feeds the add: its channels stay
    assert rows["bn"].into == "b" and "channels 0:2 (a)" in rows["bn"].reason
    _, rows = check(Cats(same=True), x)  # the same tensor twice cannot take two slices
    assert rows["bn"].action == "frozen"
    _, rows = check(Cats(dim=-3), x)  # -3 is the channel axis of a 4D input
    assert rows["bn"].direction == "pieces"
    _, rows = check(Cats(dim=2), x)
    assert rows["bn"].action == "frozen" and "dim 2, not the channel axis" in rows["bn"].reason


def test_linear_pieces_fold_on_2d_input_only_when_it_is_known():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(5, 3), nn.Linear(5, 2), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(torch.cat([self.a(x), self.b(x)], 1))

    _, rows = check(Two(), torch.randn(4, 5))
    assert rows["bn"].direction == "pieces" and rows["bn"].into == "a, b"
    _, report = fold(randomize_bn(Two()), report=True)
    assert report.layers[0].action == "frozen"


class CatPool(nn.Module):
    """cat[conv_a, conv_b, pool] → BN → ReLU → conv: the pool's 3 channels cannot fold."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.bn = nn.BatchNorm2d(12)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = torch.cat([self.conv_a(x), self.conv_b(x), self.pool(x)], 1)
        return self.conv(self.relu(self.bn(y)))


def cat_pool():
    """CatPool with BN statistics and biases far from their defaults, in eval mode."""
    torch.manual_seed(7)
    model = randomize_bn(CatPool(), 7)
    with torch.no_grad():
        for conv in (model.conv_a, model.conv_b, model.conv):
            conv.bias.normal_(0, 2)
    return model.eval()


def test_a_bn_folded_in_part_is_counted_as_such():
    x, model = torch.randn(2, 3, 6, 6), cat_pool()
    folded, report = fold(model, x, report=True)
    row = report.layers[0]
    assert (row.action, row.direction, row.into) == ("partial", "pieces", "conv_a, conv_b")
    assert row.kept_channels == 3 and "channels 9:12 (pool)" in row.reason
    assert [report.count(a) for a in ("folded", "partial", "frozen", "kept")] == [0, 1, 0, 0]
    data = report.to_dict()
    assert (data["folded"], data["partial"], data["frozen"]) == (0, 1, 0)
    assert "0 folded, 1 folded in part (3 channels kept as a frozen per-channel affine)" \
        in str(report)
    assert len(bns(folded)) == 1  # what the report says is left
    with torch.no_grad():
        assert_close(folded(x), model(x))
    full = fold(randomize_bn(MixConv()), report=True)[1]  # every channel folds: no part left
    assert full.layers[0].action == "folded" and full.layers[0].kept_channels == 0
    assert "in part" not in str(full)


def test_fold_command_prints_the_part_kept(tmp_path, capsys):
    from batchnorm.cli import main

    status = main(["fold", f"{__name__}:cat_pool", "-o", str(tmp_path / "f.pt")])
    out = capsys.readouterr().out
    assert status == 0 and "1 folded in part (3 channels kept" in out


def test_strip_bias_takes_the_biases_a_cat_carries_into_bn():
    model = cat_pool()
    lean, report = batchnorm.strip_bias(model, report=True)
    assert report.layers == [("conv_a", "bn", 4), ("conv_b", "bn", 5)]
    assert report.parameters_saved == 9
    assert lean.conv_a.bias is None and lean.conv_b.bias is None
    assert lean.conv.bias is not None  # after the ReLU: it counts
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert_close(lean(x), ref(x), 1e-6)
        lean.train(), ref.train()
        for _ in range(2):  # training outputs, and the running statistics they leave
            x = torch.randn(4, 3, 6, 6)
            assert_close(lean(x), ref(x), 1e-5)
        lean.eval(), ref.eval()
        assert_close(lean(x), ref(x), 1e-5)
        assert_close(lean.bn.running_mean[9:], ref.bn.running_mean[9:], 0)  # the pool's


# --------------------------------------------------------------------------- inspect says so


def test_inspect_reports_forward_and_cat_folds():
    report = batchnorm.inspect(Head().eval(), torch.randn(2, 3, 5, 5))
    assert report.finding("fold-forward").layers == ["bn"]
    assert "bn → fc" in report.finding("fold-forward").message
    report = batchnorm.inspect(Inception().eval())
    assert report.finding("fold-pieces").layers == ["bn"]
    assert "no-producer" not in report.codes()
    assert report.totals["foldable"] == 1
    zero = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1))
    assert batchnorm.inspect(zero).finding("no-producer").layers == ["0"]


@pytest.mark.parametrize("with_input", [True, False])
def test_inspect_says_once_what_fold_does_with_a_bn_folded_in_part(with_input):
    report = batchnorm.inspect(cat_pool(), torch.randn(2, 3, 6, 6) if with_input else None)
    about_bn = [f.code for f in report.findings if "bn" in f.layers]
    assert about_bn == ["fold-pieces"]  # not also pre-activation: it does fold backwards
    message = report.finding("fold-pieces").message
    assert "bn → conv_a, conv_b, its channels 9:12 (pool) cannot fold backwards" in message
    bias = report.finding("redundant-bias")
    assert bias.layers == ["conv_a", "conv_b"] and "9 parameters wasted" in bias.message
    assert report.totals["wasted_bias_params"] == 9 and report.totals["foldable"] == 1


# --------------------------------------------------------------------------- random graphs


class Chain(nn.Module):
    """BN → (Dropout) → conv / Linear chains with random padding, groups and heads."""

    def __init__(self, spec):
        super().__init__()
        kernel, pad, mode, groups, head = spec
        c = 4
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.drop = nn.Dropout2d(0.3)
        self.conv = nn.Conv2d(c, 4, kernel, padding=pad, padding_mode=mode, groups=groups)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = head
        self.bn3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * (6 - kernel + 1 + 2 * pad) ** 2, 3)

    def forward(self, x):
        y = self.bn2(self.conv(self.drop(self.bn1(torch.relu(self.stem(x))))))
        if self.head:
            y = self.bn3(torch.relu(y))
        return self.fc(torch.flatten(y, 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(st.sampled_from([1, 3]), st.integers(0, 1),
                 st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
                 st.sampled_from([1, 2, 4]), st.booleans()),
       st.booleans(), st.integers(0, 100))
def test_fold_equals_eval_on_random_chains(spec, with_input, seed):
    torch.manual_seed(seed)
    model = randomize_bn(Chain(spec), seed)
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model, x if with_input else None, report=True)
    with torch.no_grad():
        assert_close(folded(x), copy.deepcopy(model).eval()(x))
    rows = {r.name: r for r in report.layers}
    exact = spec[1] == 0 or spec[2] != "zeros"
    assert rows["bn1"].direction == ("next" if exact else None)
    assert rows["bn2"].direction == "previous"
    if spec[4]:
        assert rows["bn3"].direction == "next"  # through flatten into fc
