"""inspect: each finding on a model built to show it, and its absence on one that does not."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.errors import BatchNormError
from batchnorm.frozen import FrozenBatchNorm2d
from batchnorm.inspection import inspect

from .replicas import build


def good():
    """Conv → BN → ReLU twice, no biases, eval mode: only the 'ok' finding."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    ).eval()


def test_good_model_has_only_the_ok_finding():
    report = inspect(good(), torch.randn(2, 3, 8, 8))
    assert report.codes() == {"conv-bn-act"}
    assert report.finding("conv-bn-act").layers == ["1", "4"]
    assert report.finding("conv-bn-act").severity == "ok"
    assert not report.approximate and report.warning is None


@pytest.mark.parametrize(
    "code, model, layers",
    [
        (
            "act-before-bn",
            nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(8)),
            ["2"],
        ),
        (
            "pre-activation",
            nn.Sequential(
                nn.Conv2d(3, 8, 3, bias=False),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 4, 1),
            ),
            ["2"],
        ),
        # BN -> conv with no activation between is not the pre-activation pattern: it folds
        # forward into the conv
        ("fold-forward", nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)), ["0"]),
        ("no-producer", nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), ["0"]),
        (
            "no-producer",
            nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(8)),
            ["2"],
        ),
    ],
)
def test_placement_findings(code, model, layers):
    report = inspect(model.eval())
    assert report.finding(code).layers == layers
    assert report.finding(code).fix
    assert "conv-bn-act" not in report.codes()
    assert code not in inspect(good()).codes()


def test_act_before_bn_wins_over_pre_activation():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
    )
    assert inspect(model).finding("act-before-bn").layers == ["2"]


def test_densenet_replica_placements():
    model, x = build("densenet")
    report = inspect(model.eval(), x)
    assert len(report.finding("conv-bn-act").layers) == 5
    # norm1 of each dense layer; the transition BN is pre-activation too, but it folds
    pre = report.finding("pre-activation").layers
    assert len(pre) == 4 and all(name.endswith("norm1") for name in pre)
    # the transition and final BN read a cat whose last piece is the last conv's alone
    assert report.finding("fold-pieces").layers == ["features.4", "features.9"]
    assert "no-producer" not in report.codes()


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_shared_output_finding():
    report = inspect(Shared())
    assert report.finding("shared-output").layers == ["bn"]
    assert "shared-output" not in inspect(good()).codes()


def test_redundant_bias_counts_wasted_parameters():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 5),
        nn.BatchNorm1d(5),
        nn.ReLU(),
    )
    report = inspect(model)
    finding = report.finding("redundant-bias")
    assert finding.layers == ["0", "4"] and "13 parameters wasted" in finding.message
    assert report.totals["wasted_bias_params"] == 13
    # a bias followed by an activation before BN is not redundant
    act_between = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8))
    assert "redundant-bias" not in inspect(act_between).codes()
    assert "redundant-bias" not in inspect(good()).codes()


def test_train_mode_finding_and_modes():
    model = good()
    model[4].train()  # one BN left in train mode inside an eval model
    assert inspect(model).finding("train-mode").layers == ["4"]
    assert "train-mode" not in inspect(model, mode="training").codes()
    model.train()  # a model in training: auto says nothing, inference flags every BN
    assert "train-mode" not in inspect(model).codes()
    assert inspect(model, mode="inference").finding("train-mode").layers == ["1", "4"]
    assert "train-mode" not in inspect(good(), mode="inference").codes()
    with pytest.raises(BatchNormError, match='expected mode "auto"'):
        inspect(model, mode="eval")


def test_eps_zero_finding():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), FrozenBatchNorm2d(4, eps=0.0))
    assert inspect(model).finding("eps-zero").layers == ["1"]
    assert (
        "eps-zero"
        not in inspect(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), FrozenBatchNorm2d(4))).codes()
    )


def test_channel_mismatch_finding():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(6))
    finding = inspect(model).finding("channel-mismatch")
    assert (
        finding.layers == ["1"]
        and finding.severity == "error"
        and "0 gives 8, 1 expects 6" in finding.message
    )
    assert "channel-mismatch" not in inspect(good()).codes()


def test_one_value_per_channel_needs_example_input():
    model, x = build("mobilenet_v3")  # Linear → BatchNorm1d on pooled (N, 16)
    assert "one-value-per-channel" not in inspect(model).codes()
    finding = inspect(model, x).finding("one-value-per-channel")
    assert finding.layers == ["6"]
    assert "batch size 1" in finding.message and "(2, 16)" in finding.message
    pooled = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4)
    )
    finding = inspect(pooled, torch.randn(1, 3, 8, 8)).finding("one-value-per-channel")
    assert finding.layers == ["2"] and "fails already" in finding.message
    assert "one-value-per-channel" not in inspect(good(), torch.randn(1, 3, 8, 8)).codes()


class Duck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_features, self.eps, self.momentum = c, 1e-3, 0.01
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return x


def test_layer_table_kinds_params_buffers_and_totals():
    from batchnorm.layers import BatchNormAct2d

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1, bias=False),
        nn.BatchNorm2d(4, affine=False, momentum=None),
        nn.Conv2d(4, 4, 1, bias=False),
        nn.SyncBatchNorm(4),
        nn.Conv2d(4, 4, 1, bias=False),
        FrozenBatchNorm2d(4),
        nn.Conv2d(4, 4, 1, bias=False),
        Duck(4),
        nn.Conv2d(4, 4, 1, bias=False),
        BatchNormAct2d(4, act="relu"),
    )
    report = inspect(model)
    rows = {r.name: r for r in report.layers}
    assert [(r.kind, r.params, r.buffers) for r in report.layers] == [
        ("batchnorm", 8, 9),
        ("batchnorm", 0, 9),
        ("sync", 8, 9),
        ("frozen", 0, 16),
        ("duck", 0, 8),
        ("batchnorm", 8, 9),
    ]
    assert (
        rows["3"].momentum is None and rows["9"].eps == 1e-3 and rows["11"].cls == "BatchNormAct2d"
    )
    assert rows["1"].producer == "0 (Conv2d)" and rows["1"].mode == "train"
    conv_params = 3 * 4 + 5 * 16
    assert report.totals == {
        "bn_layers": 6,
        "bn_params": 24,
        "bn_buffers": 60,
        "model_params": conv_params + 24,
        "bn_param_share": 24 / (conv_params + 24),
        "foldable": 6,
        "wasted_bias_params": 0,
    }
    assert report.finding("conv-bn-act").layers == ["1", "3", "5", "7", "9", "11"]


def test_lesson_example_has_32_parameters():
    report = inspect(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    assert report.layers[0].params == 32 and report.totals["bn_params"] == 32


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.bn = nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.relu(self.conv(x))
        if x.mean() > 10:  # data-dependent: fx cannot trace
            x = -x
        return self.bn(x)


def test_fallback_to_module_order_warns():
    report = inspect(Untraceable())
    assert report.approximate and "approximate" in report.warning
    assert report.finding("act-before-bn").layers == ["bn"]  # module order still shows the pattern
    assert "approximate" in str(report)


def test_inspect_changes_nothing_and_serialises():
    model, x = build("resnet_basic")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = inspect(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["totals"]["bn_layers"] == 8 and len(data["layers"]) == 8
    assert {"code", "severity", "layers", "message", "fix"} == set(data["findings"][0])
    text = str(report)
    assert "layers.0.bn1" in text and "findings" in text


def test_inspect_rejects_bad_arguments():
    with pytest.raises(BatchNormError, match="expected an nn.Module"):
        inspect(42)
    with pytest.raises(BatchNormError, match="runs on example_input"):
        inspect(good(), torch.randn(2, 5, 8, 8))
    with pytest.raises(BatchNormError, match="example_input to be a tensor"):
        inspect(good(), "x")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_inspect_torchscript_model():
    scripted = torch.jit.script(copy.deepcopy(good()))
    report = inspect(scripted)
    assert report.approximate  # fx cannot trace TorchScript: module order, which is exact here
    assert [r.cls for r in report.layers] == ["BatchNorm2d", "BatchNorm2d"]
    assert report.finding("conv-bn-act").layers == ["1", "4"]


class _Untraceable(nn.Module):
    """conv -> BN -> relu, but data-dependent control flow defeats torch.fx."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.relu(self.bn(self.conv(x)))


def test_untraceable_model_does_not_claim_a_shared_output():
    report = inspect(_Untraceable())
    assert report.approximate
    assert "shared-output" not in report.codes() and "unverified-pair" in report.codes()
    assert report.finding("unverified-pair").layers == ["bn"]


def test_bn_feeding_a_linear_or_conv_directly_folds_and_is_not_pre_activation():
    head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(64),
                         nn.Linear(64, 2))

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
            self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(self.bn(torch.cat([self.a(x), self.b(x)], 1)))

    for model, name, code in ((head, "3", "fold-forward"), (Cat(), "bn", "fold-pieces")):
        report = inspect(model)
        assert "pre-activation" not in report.codes(), report.codes()
        assert name in report.finding(code).layers
    pre = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    plain = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1))
    assert inspect(plain).finding("pre-activation").layers == ["1"]
    assert "pre-activation" not in inspect(pre).codes()  # both BN follow a conv


def test_inspect_and_fold_agree_on_bn_without_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    report = inspect(model)
    assert report.finding("no-running-stats").layers == ["1"]
    assert report.finding("conv-bn-act").layers == ["3"] and report.totals["foldable"] == 1
    _, folds = batchnorm.fold(model, report=True)
    assert [r.name for r in folds.layers if r.action == "folded"] == ["3"]


def test_traced_torchscript_says_its_bn_layers_keep_no_attributes():
    import warnings

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.randn(1, 3, 8, 8))
    report = inspect(traced)
    assert report.layers == [] and "2 BN layers (1, 4) come from torch.jit.trace" in report.warning


# ---------------------------------------------------------------------------------------------
# the state lint: each finding on a model built to show it, absent on one that does not


def _codes(model):
    return {f.code: f for f in inspect(model).findings}


def test_frozen_parameters_in_train_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    assert "frozen-params-train-mode" not in _codes(model)  # trains its parameters: fine
    for p in model[1].parameters():
        p.requires_grad_(False)
    found = _codes(model)["frozen-params-train-mode"]
    assert found.layers == ["1"] and found.fix
    model[1].eval()  # the fix: eval mode, statistics fixed
    assert "frozen-params-train-mode" not in _codes(model)


def test_slow_and_cumulative_momentum():
    bn = nn.BatchNorm2d(4, momentum=0.001)
    bn.num_batches_tracked.fill_(100)  # 0.999^100 = 90% of the initial values left
    found = _codes(nn.Sequential(bn))["slow-momentum"]
    assert "90%" in found.message and "2995 batches" in found.message
    bn.num_batches_tracked.fill_(5000)  # 0.7% left: caught up
    assert "slow-momentum" not in _codes(nn.Sequential(bn))
    assert "slow-momentum" not in _codes(nn.Sequential(nn.BatchNorm2d(4)))  # fresh, 0.1
    cumulative = nn.Sequential(nn.BatchNorm2d(4, momentum=None))
    assert _codes(cumulative)["cumulative-momentum"].layers == ["0"]
    assert "cumulative-momentum" not in _codes(cumulative.eval())  # evaluating: no drift


def test_eps_that_underflows_in_half_precision():
    half = nn.Sequential(nn.BatchNorm2d(4, eps=1e-8).half())
    found = _codes(half)["eps-underflow-fp16"]
    assert "eps=1e-08" in found.message
    assert "eps-underflow-fp16" not in _codes(nn.Sequential(nn.BatchNorm2d(4, eps=1e-8)))
    assert "eps-underflow-fp16" not in _codes(nn.Sequential(nn.BatchNorm2d(4).half()))


def test_ddp_with_broadcast_buffers(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        wrapped = nn.parallel.DistributedDataParallel(model)
        found = _codes(wrapped)["ddp-broadcast-buffers"]
        assert found.layers == ["module.1"] and "broadcast_buffers=False" in found.fix
        quiet = nn.parallel.DistributedDataParallel(copy.deepcopy(model),
                                                    broadcast_buffers=False)
        assert "ddp-broadcast-buffers" not in _codes(quiet)
        assert "ddp-broadcast-buffers" not in _codes(model)
    finally:
        dist.destroy_process_group()
