"""recalibrate: "exact" equals BN on the concatenated inputs, "average" equals
torch.optim.swa_utils.update_bn; it restores what it touches and fails cleanly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from batchnorm.errors import BatchNormError
from batchnorm.frozen import FrozenBatchNorm2d
from batchnorm.recalibration import recalibrate

from .replicas import build


def batches(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * 2 + 1 for _ in range(n)]


def assert_same_state(a: nn.Module, b: nn.Module, tol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert (sa[k].double() - sb[k].double()).abs().max().item() <= tol, k


@pytest.mark.parametrize(
    "name", ["resnet_basic", "densenet", "mobilenet_v3", "conv_subclass", "dcgan"]
)
def test_equals_update_bn(name):
    model, x = build(name)
    data = batches((4, *x.shape[1:]))
    want, got = copy.deepcopy(model), copy.deepcopy(model)
    update_bn(data, want)
    assert recalibrate(got, data, progress=False, estimator="average") is got
    assert_same_state(got, want, tol=1e-6)
    changed = [
        k
        for k, v in got.state_dict().items()
        if "running_mean" in k and not torch.equal(v, model.state_dict()[k])
    ]
    assert changed, "recalibration changed nothing"


def test_tuples_dicts_input_fn_and_batch_limit():
    model, x = build("resnet_basic")
    data = batches((3, 3, 16, 16), n=5)
    want = copy.deepcopy(model)
    update_bn(data[:3], want)
    labels = torch.zeros(3)
    for source, kwargs in [
        ([(t, labels) for t in data], {}),
        ([{"image": t, "label": labels} for t in data], {}),
        ([{"pixels": t} for t in data], {"input_fn": lambda b: b["pixels"]}),
        (iter(data), {}),  # a one-shot iterator without len
    ]:
        got = recalibrate(copy.deepcopy(model), source, batches=3, progress=False,
                          estimator="average", **kwargs)
        assert_same_state(got, want, tol=1e-6)


def test_input_fn_tuple_and_dict_become_arguments():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, a, b=None):
            return self.bn(a + b)

    data = [(torch.randn(4, 3), torch.randn(4, 3)) for _ in range(3)]
    with torch.no_grad():
        sums = torch.stack([a + b for a, b in data])
    m1 = recalibrate(TwoInputs(), data, input_fn=lambda t: t, progress=False,
                     estimator="average")
    m2 = recalibrate(TwoInputs(), data, input_fn=lambda t: {"a": t[0], "b": t[1]}, progress=False,
                     estimator="average")
    mean = sums.mean(dim=1).mean(dim=0)  # average of the per-batch means
    var = sums.var(dim=1, unbiased=True).mean(dim=0)
    for m in (m1, m2):
        assert torch.allclose(m.bn.running_mean, mean, atol=1e-6)
        assert torch.allclose(m.bn.running_var, var, atol=1e-5)


def test_restores_momentum_and_mixed_training_flags():
    model, x = build("resnet_basic")
    model.eval()
    model.layers[0].bn1.train()
    model.layers[0].bn1.momentum = 0.3
    model.layers[1].bn2.momentum = None
    flags = [m.training for m in model.modules()]
    momenta = [getattr(m, "momentum", "-") for m in model.modules()]
    recalibrate(model, batches((2, 3, 16, 16), n=2), progress=True)  # with the progress bar
    assert [m.training for m in model.modules()] == flags
    assert [getattr(m, "momentum", "-") for m in model.modules()] == momenta


class FailsOnThirdBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.calls = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.2), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return self.bn(self.conv(x))


def test_failure_restores_statistics_momentum_and_mode():
    model = FailsOnThirdBatch().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
        model.bn.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BatchNormError, match=r"a model that runs on batch 3 of data .*boom"):
        recalibrate(model, batches((2, 3, 4, 4), n=4), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.bn.momentum == 0.2 and not model.training and not model.bn.training

    with pytest.raises(BatchNormError, match="expected at least one batch"):
        recalibrate(model, [], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_and_statless_bn_are_left_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False)
    )
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    recalibrate(model, batches((2, 3, 4, 4), n=2), progress=False)
    assert torch.equal(model[1].running_mean, torch.full((4,), 3.0))
    assert recalibrate(nn.Linear(2, 2), [torch.randn(1, 2)]) is not None  # no BN: nothing to do


def test_bad_arguments_change_nothing():
    model, _ = build("resnet_basic")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, match in [
        ({"batches": 0}, "batches to be None or a positive integer"),
        ({"batches": True}, "batches"),
        ({"input_fn": 3}, "input_fn to be callable"),
    ]:
        with pytest.raises(BatchNormError, match=match):
            recalibrate(model, batches((2, 3, 16, 16)), **kwargs)
    with pytest.raises(BatchNormError, match="data to be an iterable"):
        recalibrate(model, 5)
    with pytest.raises(BatchNormError, match="expected a dict batch with one of the keys"):
        recalibrate(model, [{"foo": torch.randn(2, 3, 16, 16)}], progress=False)
    with pytest.raises(BatchNormError, match="expected batches that are tensors"):
        recalibrate(model, [3.0], progress=False)
    with pytest.raises(BatchNormError, match="expected an nn.Module"):
        recalibrate("model", [])
    with pytest.raises(BatchNormError, match="estimator in"):
        recalibrate(model, batches((2, 3, 16, 16)), estimator="precise")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_last_batch_of_one_sample_is_skipped_and_counted():
    # BN after global pooling: a batch of one sample has one value per channel
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.BatchNorm1d(4))
    data = list(torch.randn(9, 3, 6, 6).split(4))  # 4 + 4 + 1
    want = copy.deepcopy(model)
    update_bn(data[:2], want)
    got, report = recalibrate(model, data, progress=False, report=True, estimator="average")
    assert (report.batches, report.samples, report.skipped_samples) == (2, 8, 1)
    torch.testing.assert_close(got[3].running_mean, want[3].running_mean)
    torch.testing.assert_close(got[3].running_var, want[3].running_var)
    # without drop_last the one-sample batch reaches BN, which refuses it: one clear error
    with pytest.raises(BatchNormError, match=r"runs on batch 3 of data of shape \(1, 3, 6, 6\)"):
        recalibrate(model, data, progress=False, drop_last=False)
    # only a last one-sample batch is skipped; and data of one sample only has no batch left
    with pytest.raises(BatchNormError, match=r"at least one batch in data \(got no batches "
                                             r"\(1 skipped\)\)"):
        recalibrate(model, [torch.randn(1, 3, 6, 6)], progress=False)


def test_a_model_that_fails_on_the_data_is_one_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for data in ([torch.randn(4, 5, 6, 6)], [torch.randn(4, 3, 6)]):  # channels, rank
        with pytest.raises(BatchNormError, match="expected a model that runs on batch 1 of data"):
            recalibrate(model, data, progress=False)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# the exact estimator


def _inputs_of_every_bn(model, data):
    """The inputs every BN of ``model`` sees over ``data`` in a train-mode pass (a copy)."""
    model = copy.deepcopy(model).train()
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(
        name, []).append(args[0].detach().clone()))
             for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "mobilenet_v3"])
def test_exact_equals_bn_on_the_concatenation(name):
    model, x = build(name)
    model = model.double()
    g = torch.Generator().manual_seed(3)
    # unequal batch sizes, and batches from different places: their means differ
    data = [torch.randn(n, *x.shape[1:], generator=g, dtype=torch.float64) * (1 + k) + k
            for k, n in enumerate((2, 5, 3))]
    inputs = _inputs_of_every_bn(model, data)
    got, report = recalibrate(copy.deepcopy(model), data, progress=False, report=True)
    assert report.estimator == "exact" and report.batches == 3
    layers = dict(got.named_modules())
    for bn_name, xs in inputs.items():
        whole = torch.cat(xs)  # BN on the concatenated inputs: mean and unbiased variance
        dims = [0, *range(2, whole.dim())]
        bn = layers[bn_name]
        torch.testing.assert_close(bn.running_mean, whole.mean(dims), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, whole.var(dims, unbiased=True), rtol=1e-10,
                                   atol=1e-12)
        assert int(bn.num_batches_tracked) == 3


def test_exact_counts_the_spread_between_batches_where_average_does_not():
    model = nn.Sequential(nn.BatchNorm1d(2))
    data = [torch.randn(50, 2) + 10.0, torch.randn(10, 2) - 10.0]  # far apart, unequal sizes
    exact = recalibrate(copy.deepcopy(model), data, progress=False)
    average = recalibrate(copy.deepcopy(model), data, progress=False, estimator="average")
    whole = torch.cat(data)
    torch.testing.assert_close(exact[0].running_mean, whole.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact[0].running_var, whole.var(0), rtol=1e-5, atol=1e-5)
    assert (exact[0].running_var > 30).all()  # the batch means' spread: ~ 10^2 * 50 * 10 / 60^2
    assert (average[0].running_var < 2).all()  # each batch's own variance, ~1
    torch.testing.assert_close(average[0].running_mean, (data[0].mean(0) + data[1].mean(0)) / 2)


def test_exact_reports_the_layers_it_left_alone():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.frozen = FrozenBatchNorm2d(4)
            self.stateless = nn.BatchNorm2d(4, track_running_stats=False)
            self.used = nn.BatchNorm2d(4)
            self.unused = nn.BatchNorm2d(4)  # a branch the data never takes

        def forward(self, x):
            return self.used(self.stateless(self.frozen(self.conv(x))))

    model = Branchy()
    with torch.no_grad():
        model.unused.running_mean.fill_(2.0)
    _, report = recalibrate(model, batches((2, 3, 4, 4), n=2), progress=False, report=True)
    why = dict(report.skipped_layers)
    assert set(why) == {"frozen", "stateless", "unused"}
    assert "frozen" in why["frozen"] and "track_running_stats=False" in why["stateless"]
    assert why["unused"] == "no batch reached it"
    assert torch.equal(model.unused.running_mean, torch.full((4,), 2.0))  # left as it was
    assert int(model.unused.num_batches_tracked) == 0
    assert report.to_dict()["skipped_layers"][0] == {"layer": "frozen",
                                                      "why": "frozen: fixed statistics"}


def test_exact_uses_the_mask_of_our_layers():
    import batchnorm

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = batchnorm.BatchNorm1d(3)

        def forward(self, x, mask):
            return self.bn(x, mask=mask)

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 6, generator=g), torch.rand(4, 6, generator=g) < 0.5)
            for _ in range(3)]
    got = recalibrate(Masked(), data, input_fn=lambda b: b, progress=False)
    counted = torch.cat([x.permute(0, 2, 1)[m] for x, m in data])  # (counted, C)
    torch.testing.assert_close(got.bn.running_mean, counted.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.bn.running_var, counted.var(0), rtol=1e-5, atol=1e-6)
