"""fold, fold_weights and strip_bias against PyTorch: every replica, random graphs, odd BN kinds."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import batchnorm
from batchnorm.errors import BatchNormError
from batchnorm.folding import fold, fold_weights, strip_bias
from batchnorm.frozen import FrozenBatchNorm2d

from .replicas import REPLICAS, build, randomize_bn

# most models here are built in train mode: fold's warning about that has its own test
pytestmark = pytest.mark.filterwarnings("ignore:fold uses the running statistics")


def assert_close(got, want, rel=1e-5):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"max error {err:.3e} > {rel} * {scale:.3e}"


def snapshot(model):
    """Every state_dict entry as raw bytes, plus every module's training flag."""
    state = {
        k: (
            v.dtype,
            tuple(v.shape),
            v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            if v.dim()
            else v.item(),
        )
        for k, v in model.state_dict().items()
    }
    return state, [m.training for m in model.modules()]


# --------------------------------------------------------------------------- fold_weights


def test_fold_weights_matches_pytorch_for_conv():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3), randomize_bn(nn.BatchNorm2d(6))
    want_w, want_b = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    w, b = fold_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    assert_close(w, want_w.detach(), 1e-6)
    assert_close(b, want_b.detach(), 1e-6)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_weights_transposed_grouped_equals_bn_after_conv(groups, dims):
    torch.manual_seed(groups * 10 + dims)
    conv_t = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dims - 1]
    bn_cls = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dims - 1]
    conv = conv_t(8, 12, 3, stride=2, groups=groups, bias=True)
    bn = randomize_bn(bn_cls(12), seed=groups).eval()
    x = torch.randn(2, 8, *([4] * dims))
    want = bn(conv(x))
    w, b = fold_weights(
        conv.weight,
        conv.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
        transposed=True,
        groups=groups,
    )
    got = F.__dict__[f"conv_transpose{dims}d"](x, w, b, stride=2, groups=groups)
    assert_close(got.detach(), want.detach())


def test_fold_weights_linear_without_affine_and_bias():
    torch.manual_seed(1)
    lin, bn = nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7, affine=False)
    randomize_bn(bn).eval()
    x = torch.randn(3, 5)
    w, b = fold_weights(lin.weight, None, bn.running_mean, bn.running_var, bn.eps)
    assert_close(F.linear(x, w, b).detach(), bn(lin(x)).detach())


def test_fold_weights_rejects_wrong_shapes():
    with pytest.raises(BatchNormError, match="expected a weight with 4 output channels"):
        fold_weights(torch.ones(3, 2, 1, 1), None, torch.zeros(4), torch.ones(4), 1e-5)
    with pytest.raises(BatchNormError, match="expected gamma with 3 elements"):
        fold_weights(torch.ones(3, 2), None, torch.zeros(3), torch.ones(3), 1e-5, torch.ones(2))
    with pytest.raises(BatchNormError, match="transposed conv weight"):
        fold_weights(
            torch.ones(4, 3, 1),
            None,
            torch.zeros(4),
            torch.ones(4),
            1e-5,
            transposed=True,
            groups=2,
        )


# --------------------------------------------------------------------------- every replica


def is_frozen_affine(m: nn.Module) -> bool:
    """What fold makes of a BN it cannot fold: PyTorch's BN in eval, frozen."""
    return (type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
            and batchnorm.protocol.is_fixed_affine(m))



@pytest.mark.parametrize("name", sorted(REPLICAS))
def test_fold_equals_eval_on_every_replica(name):
    model, x = build(name)
    model.train()  # fold must not care about (or change) the input's mode, but say it
    before = snapshot(model)
    with pytest.warns(UserWarning, match="the model was in training mode"):
        folded, report = fold(model, x, report=True)
    assert snapshot(model) == before, "fold changed the input model"
    assert not folded.training
    with torch.no_grad():
        want = copy.deepcopy(model).eval()(x)
        got = folded(x)
    assert_close(got, want)

    _, _, n_folded, n_frozen = REPLICAS[name]
    partial = report.count("partial")  # folded in pieces, some channels left
    assert (report.count("folded") + partial, report.count("frozen"), report.count("kept")) == (
        n_folded,
        n_frozen,
        0,
    )
    # what is left of BN is the frozen affines (those of a cat's pieces that fold nowhere
    # included): PyTorch's BN in eval, nothing trainable
    remaining = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(remaining) == n_frozen + partial, "a PyTorch BN survived the fold"
    assert all(is_frozen_affine(m) for m in remaining)
    assert report.max_error is not None and report.rel_error < 1e-5
    assert all(r.max_error is not None and r.rel_error < 1e-5 for r in report.layers)


def test_fold_leaves_no_bn_where_pytorch_fuse_keeps_them():
    with warnings.catch_warnings():  # torch's module warns about its own jit use on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    for name in ("dcgan", "conv_subclass", "densenet"):
        model, _ = build(name)
        fused = fuse(copy.deepcopy(model).eval())
        kept_by_fuse = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        ours = fold(model)
        kept_by_us = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and not is_frozen_affine(m)
                         for m in ours.modules())
        assert kept_by_fuse > 0 and kept_by_us == 0, name


# ------------------------------------------------------------------------ BN kinds and odd graphs


class DuckBN(nn.Module):
    """A third-party BN: not a _BatchNorm, same attributes."""

    def __init__(self, c):
        super().__init__()
        self.num_features, self.eps = c, 1e-3
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def odd_kinds_model():
    from batchnorm.layers import BatchNorm2d, BatchNormAct2d

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.SyncBatchNorm(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        DuckBN(6),
        nn.Conv2d(6, 6, 1),
        BatchNormAct2d(6, act="leaky_relu", negative_slope=0.2),
        nn.Conv2d(6, 6, 1),
        BatchNorm2d(6),
        nn.Conv2d(6, 6, 1),
        FrozenBatchNorm2d(6),
        nn.MaxPool2d(2),
        nn.SyncBatchNorm(6),  # not after a conv: frozen affine
        nn.MaxPool2d(2),
        BatchNormAct2d(6, act="elu", alpha=0.5),  # frozen affine + its ELU
    )
    return randomize_bn(model)


def test_fold_handles_sync_duck_ours_frozen_and_act():
    model = odd_kinds_model()
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model, x, report=True)
    with torch.no_grad():
        assert_close(folded(x), copy.deepcopy(model).eval()(x))
    actions = {r.name: r.action for r in report.layers}
    assert actions == {
        "1": "folded",
        "4": "folded",
        "6": "folded",
        "8": "folded",
        "10": "folded",
        "12": "frozen",
        "14": "frozen",
    }
    assert isinstance(folded[6], nn.LeakyReLU) and folded[6].negative_slope == 0.2
    assert isinstance(folded[14][1], nn.ELU) and folded[14][1].alpha == 0.5
    # the frozen affines are PyTorch's BN in eval mode, frozen (issue 11: loads without us)
    assert all(type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm) and not m.training
               and not m.weight.requires_grad and m.momentum == 0.0
               for m in folded.modules() if batchnorm.protocol.is_batchnorm(m))


def test_fold_without_example_input_and_unknown_rank_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.SyncBatchNorm(4))
    randomize_bn(model)
    # no shapes: the SyncBatchNorm becomes an any-rank affine
    folded, report = fold(model, report=True)
    x = torch.randn(2, 3, 5, 5)
    assert report.max_error is None
    with torch.no_grad():
        assert_close(folded(x), copy.deepcopy(model).eval()(x))


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = (
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4, track_running_stats=False),
        )

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y  # conv output read twice: BN cannot fold
        return self.bn2(self.conv2(z))  # no running stats: eval uses the batch, kept


def test_fold_keeps_shared_output_and_statless_bn_correct():
    model = randomize_bn(SharedOutput())
    x = torch.randn(4, 3, 5, 5)
    folded, report = fold(model, x, report=True)
    actions = {r.name: (r.action, r.reason) for r in report.layers}
    assert actions["bn"][0] == "frozen" and "other users" in actions["bn"][1]
    assert actions["bn2"][0] == "kept"
    with torch.no_grad():
        assert_close(folded(x), copy.deepcopy(model).eval()(x))


def test_fold_skips_linear_on_3d_input():
    model = randomize_bn(
        nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5))
    )  # BN normalises dim 1 = 5 rows
    x = torch.randn(2, 5, 5)
    folded, report = fold(model, x, report=True)
    assert report.layers[0].action == "frozen"
    with torch.no_grad():
        assert_close(folded(x), copy.deepcopy(model).eval()(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = x * 2
        return self.bn(self.conv(x))


def test_fold_falls_back_to_sequential_pairs_when_tracing_fails():
    model = randomize_bn(Untraceable())
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model, x, report=True)
    assert report.warning and "approximate" in report.warning
    actions = {r.name: r.action for r in report.layers}
    assert actions == {"body.1": "folded", "bn": "frozen"}  # conv → bn not provably adjacent
    with torch.no_grad():
        assert_close(folded(x), copy.deepcopy(model).eval()(x))


def test_fold_report_prints_and_serialises():
    import json

    model, x = build("densenet")
    report = fold(model, x, report=True)[1]
    text = str(report)
    assert "features.1" in text and "folded" in text and "frozen" in text
    data = json.loads(json.dumps(report.to_dict()))
    # two BN read a cat whose last piece alone is a conv used only there: folded in part
    assert (data["folded"], data["partial"], data["frozen"]) == (5, 2, 4)
    assert len(data["layers"]) == 11 and "2 folded in part" in text
    assert "pieces:" in text
    assert {"features.3.denselayer2.conv2", "features.8.denselayer2.conv2"} == {
        r["into"] for r in data["layers"] if r["direction"] == "pieces"}
    assert {r["direction"] for r in data["layers"]} == {"previous", "pieces", None}


def test_fold_warns_that_a_training_model_comes_back_in_eval_mode(tmp_path, capsys):
    from batchnorm.cli import main

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    with pytest.warns(UserWarning, match="running statistics: the model was in training mode"):
        folded, report = fold(model, report=True)
    assert not folded.training and "training mode" in report.warning
    model.eval()[1].train()  # one BN training inside an eval model normalises with the batch
    with pytest.warns(UserWarning, match="training mode"):
        fold(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = fold(model.eval(), report=True)
    assert report.warning is None
    # the command says it once, as the report's warning line
    torch.save(model.train(), tmp_path / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        status = main(["fold", str(tmp_path / "m.pt"), "-o", str(tmp_path / "f.pt")])
    assert status == 0 and "warning: fold uses the running statistics" in capsys.readouterr().out


def test_fold_rejects_non_modules_and_bad_inputs():
    with pytest.raises(BatchNormError, match="expected an nn.Module"):
        fold("model")
    with pytest.raises(BatchNormError, match="example_input"):
        fold(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)), example_input=[1, 2])
    with pytest.raises(BatchNormError, match="runs on example_input"):
        fold(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)), torch.randn(1, 2, 3, 3))


# --------------------------------------------------------------------------- random graphs


class RandomGraph(nn.Module):
    """A program of conv / conv-transpose / BN / act / add / cat ops over a list of tensors,
    optionally followed by a pooled Linear → BN1d head."""

    def __init__(self, program, c0, head=False):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleList()
        self.head = None
        channels = [c0]
        for op, a, b, opt in program:
            c = channels[a]
            if op == "conv":
                cls = nn.ConvTranspose2d if opt % 3 == 2 else nn.Conv2d
                out = 2 + opt % 5
                extra = {}
                if cls is nn.Conv2d and opt % 7 == 3:  # BN → it folds forward
                    extra["padding_mode"] = "reflect"
                if cls is nn.Conv2d and c % 2 == 0 and out % 2 == 0 and opt % 6 == 4:
                    extra["groups"] = 2
                self.layers.append(
                    cls(c, out, 1 + 2 * (opt % 2), padding=opt % 2, bias=opt % 4 == 1, **extra)
                )
                channels.append(out)
            elif op == "bn":
                self.layers.append(nn.BatchNorm2d(c))
                channels.append(c)
            elif op == "act":
                self.layers.append([nn.ReLU(), nn.Hardswish(), nn.LeakyReLU(0.1)][opt % 3])
                channels.append(c)
            elif op == "add":
                self.layers.append(nn.Identity())
                channels.append(c if channels[b] == c else c)
            else:  # cat
                self.layers.append(nn.Identity())
                channels.append(c + channels[b])
        self.channels = channels
        if head == "after":  # pooled features through Linear → BatchNorm1d → ReLU
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(channels[-1], 6),
                nn.BatchNorm1d(6),
                nn.ReLU(),
            )
        elif head == "before":  # BN2d → Dropout → Flatten → Linear: folds forward
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(2),
                nn.BatchNorm2d(channels[-1]),
                nn.Dropout(0.5),
                nn.Flatten(),
                nn.Linear(channels[-1] * 4, 6),
            )

    def forward(self, x):
        values = [x]
        for (op, a, b, _), layer in zip(self.program, self.layers):
            if op == "add":
                other = values[b] if self.channels[b] == self.channels[a] else values[a]
                values.append(values[a] + other)
            elif op == "cat":
                values.append(torch.cat([values[a], values[b]], 1))
            else:
                values.append(layer(values[a]))
        return values[-1] if self.head is None else self.head(values[-1])


@st.composite
def programs(draw):
    n = draw(st.integers(2, 10))
    program = []
    for _ in range(n):
        i = len(program)  # values 0..i exist
        op = draw(st.sampled_from(["conv", "conv", "bn", "bn", "act", "add", "cat"]))
        a = draw(st.integers(0, i))
        b = draw(st.integers(0, i))
        convs = [j + 1 for j, p in enumerate(program) if p[0] == "conv"]
        if op == "bn" and draw(st.booleans()) and program:
            # favour BN right after a conv to exercise folding
            a = draw(st.sampled_from(convs)) if convs else a
        if op == "cat" and draw(st.booleans()) and convs:
            # favour a BN on a cat of convs (some of them used elsewhere too)
            a, b = draw(st.sampled_from(convs)), draw(st.sampled_from(convs))
            program.append((op, a, b, draw(st.integers(0, 20))))
            op, a = "bn", i + 1
        program.append((op, a, b, draw(st.integers(0, 20))))
    return program


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.sampled_from([None, "after", "before"]), st.booleans(),
       st.integers(0, 1000))
def test_fold_equals_eval_on_random_graphs(program, head, with_input, seed):
    torch.manual_seed(seed)
    model = randomize_bn(RandomGraph(program, 3, head), seed)
    x = torch.randn(2, 3, 5, 5)
    before = snapshot(model)
    folded, report = fold(model, x if with_input else None, report=True)
    assert snapshot(model) == before
    with torch.no_grad():
        want = copy.deepcopy(model).eval()(x)
        got = folded(x)
    assert_close(got, want)
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(report.layers) == bns
    assert all(r.action in ("folded", "partial", "frozen") for r in report.layers)
    if head == "before":
        assert report.layers[-1].direction == "next"


# --------------------------------------------------------------------------- strip_bias


def biased_model():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=True),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 3, padding=1, groups=2, bias=True),
        nn.BatchNorm2d(4, momentum=None),
        nn.Conv2d(4, 4, 1, bias=True),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # act in between: bias stays
        nn.Flatten(),
        nn.Linear(64, 5),
        nn.BatchNorm1d(5),
    )
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None and isinstance(
                m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
            ):
                m.bias.normal_(0, 2)
    return randomize_bn(model)


def test_strip_bias_keeps_eval_and_training_outputs():
    model = biased_model()
    x = torch.randn(4, 3, 4, 4)
    before = snapshot(model)
    lean, report = strip_bias(model, report=True)
    assert snapshot(model) == before, "strip_bias changed the input model"
    assert [(p, b) for p, b, _ in report.layers] == [("0", "1"), ("3", "4"), ("9", "10")]
    assert report.parameters_saved == 6 + 4 + 5
    assert (
        lean[0].bias is None
        and lean[3].bias is None
        and lean[5].bias is not None
        and lean[9].bias is None
    )
    want_params = sum(p.numel() for p in model.parameters()) - report.parameters_saved
    assert sum(p.numel() for p in lean.parameters()) == want_params

    ref = copy.deepcopy(model)
    with torch.no_grad():
        assert_close(lean.eval()(x), ref.eval()(x), 1e-6)
        lean.train(), ref.train()
        for _ in range(2):  # training outputs, and the running statistics they leave
            x = torch.randn(4, 3, 4, 4)
            assert_close(lean(x), ref(x), 1e-5)
        lean.eval(), ref.eval()
        assert_close(lean(x), ref(x), 1e-5)


def test_strip_bias_leaves_shared_outputs_alone():
    model = SharedOutput()
    lean, report = strip_bias(model, report=True)
    assert report.parameters_saved == 4  # conv2 → bn2 only; conv's output is shared
    assert lean.conv.bias is not None and lean.conv2.bias is None
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        assert_close(lean.eval()(x), copy.deepcopy(model).eval()(x), 1e-6)


def test_fold_with_tied_weights_keeps_the_other_user_right():
    first, second = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    second.weight = first.weight  # one Parameter, two layers: only the first is followed by BN
    model = randomize_bn(nn.Sequential(first, nn.BatchNorm2d(3), second))
    x = torch.randn(2, 3, 4, 4)
    before = snapshot(model)
    folded, report = fold(model, x, report=True)
    assert snapshot(model) == before and report.layers[0].action == "folded"
    with torch.no_grad():
        assert_close(folded(x), copy.deepcopy(model).eval()(x))


def test_frozen_replacements_are_bit_identical_to_bn_eval():
    model, x = build("densenet")
    folded, report = fold(model, x, report=True)
    frozen = [r for r in report.layers if r.action == "frozen"]
    assert len(frozen) == 4 and all(r.max_error == 0.0 for r in frozen)
    module = folded.get_submodule(frozen[0].name)
    assert type(module) is nn.BatchNorm2d and not module.training  # PyTorch's, in eval
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        module(torch.randn(2, module.num_features, 3))


def test_fold_and_strip_bias_return_clean_modules_and_reports_on_request():
    import pickle
    import pickletools

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()
    x = torch.randn(2, 3, 6, 6)
    for transform, report_type in ((fold, "FoldReport"), (strip_bias, "StripReport")):
        plain = transform(model, x)
        new, report = transform(model, x, report=True)
        assert isinstance(plain, nn.Module) and type(report).__name__ == report_type
        for m in (plain, new):
            assert not any(isinstance(v, type(report)) for v in vars(m).values())
            # every BN folded (or PyTorch's BN kept): no class of ours in the pickle at all
            strings = [arg for _, arg, _ in pickletools.genops(pickle.dumps(m))
                       if isinstance(arg, str)]
            assert not [t for t in strings if t.split(".")[0] == "batchnorm"], strings
    assert report.parameters_saved == 6


def test_fold_freezes_a_sync_layer_into_the_class_of_the_bn_it_replaced():
    # the sync layer takes any rank; it remembers the BatchNorm2d it replaced, so the frozen
    # affine takes 4D input (it was a FrozenBatchNorm1d, which refuses 4D input)
    model = batchnorm.convert(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), to="sync").eval()
    folded, report = fold(model, report=True)
    assert report.layers[0].action == "frozen"
    assert type(folded[1]) is nn.BatchNorm2d
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert_close(folded(x), model(x))


def test_a_folded_model_loads_where_batchnorm_cannot_be_imported(tmp_path):
    import subprocess
    import sys

    model = odd_kinds_model()  # ours, duck-typed, frozen, SyncBatchNorm, BN+act
    x = torch.randn(2, 3, 8, 8)
    folded = fold(model, x)
    torch.save(folded, tmp_path / "folded.pt")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(folded(x), tmp_path / "want.pt")
    code = (
        "import sys; sys.modules['batchnorm'] = None\n"  # any import of batchnorm now fails
        "import torch\n"
        f"m = torch.load({str(tmp_path / 'folded.pt')!r}, weights_only=False)\n"
        f"x, want = torch.load({str(tmp_path / 'x.pt')!r}), "
        f"torch.load({str(tmp_path / 'want.pt')!r})\n"
        "with torch.no_grad():\n    assert torch.equal(m(x), want)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
