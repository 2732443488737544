"""adapt: AdaBN and TENT on a small CNN trained on the digits, tested on shifted digits.

Measured on this setup (150 Adam steps, seed 0): clean test accuracy 0.99; with the contrast
halved and the images brightened (``0.5 x + 0.4``) the plain model falls to 0.12, AdaBN gives
0.99 and TENT 0.99. The thresholds below leave a wide margin on both sides.
"""
from __future__ import annotations

import copy

import pytest
import torch

import batchnorm
from batchnorm import BatchNormError
from batchnorm.tour.data import load
from batchnorm.tour.nets import SmallCNN


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = load()
    x, y = torch.from_numpy(data.x_train).float(), torch.from_numpy(data.y_train)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_test, y_test = torch.from_numpy(data.x_test).float(), torch.from_numpy(data.y_test)
    return model.eval(), x_test, y_test


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def shifted(x):
    return 0.5 * x + 0.4  # contrast halved, brightened


def test_adabn_and_tent_restore_accuracy_on_shifted_digits(trained):
    model, x, y = trained
    before = copy.deepcopy(model.state_dict())
    target = list(shifted(x).split(64))
    assert accuracy(model, x, y) > 0.95
    assert accuracy(model, shifted(x), y) < 0.4  # the shift breaks the model
    adabn = batchnorm.adapt(model, target, "adabn", progress=False)
    tent = batchnorm.adapt(model, [(b, None) for b in target], "tent", progress=False)
    assert accuracy(adabn, shifted(x), y) > 0.9
    assert accuracy(tent, shifted(x), y) > 0.9
    assert not adabn.training and not tent.training
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key]), key


def test_adabn_is_exact_recalibration_on_the_target(trained):
    model, x, _ = trained
    target = list(shifted(x).split(64))
    adabn = batchnorm.adapt(model, target, "adabn", progress=False)
    want = batchnorm.recalibrate(copy.deepcopy(model), target, progress=False)
    for (key, a), b in zip(adabn.state_dict().items(), want.state_dict().values()):
        assert torch.equal(a, b), key
    assert type(adabn[1]) is type(model[1])  # module classes kept


def test_tent_trains_only_the_bn_affine_parameters(trained):
    model, x, _ = trained
    tent = batchnorm.adapt(model, list(shifted(x).split(64)), "tent", steps=2, lr=1e-2,
                           progress=False)
    names = {name for name, m in tent.named_modules() if isinstance(m, batchnorm.BatchNorm2d)}
    assert names
    originals = dict(model.named_parameters())
    changed = set()
    for name, p in tent.named_parameters():
        if not torch.equal(p, originals[name]):
            changed.add(name)
        assert p.requires_grad == originals[name].requires_grad and p.grad is None
    assert changed and all(n.rsplit(".", 1)[0] in names for n in changed)
    assert any(n.endswith(".weight") for n in changed) and any(n.endswith(".bias") for n in changed)
    for name, m in tent.named_modules():  # batch statistics in eval; the buffers as they were
        if name in names:
            assert m.eval_stats == "batch"
            original = model.get_submodule(name)
            assert torch.equal(m.running_mean, original.running_mean)
            assert torch.equal(m.num_batches_tracked, original.num_batches_tracked)


def test_tent_lowers_the_entropy_it_minimises(trained):
    model, x, _ = trained
    target = shifted(x)[:128]

    def entropy(m):
        with torch.no_grad():
            p = torch.softmax(m(target), dim=1)
        return -(p * p.clamp_min(1e-12).log()).sum(1).mean().item()

    one = batchnorm.adapt(model, [target], "tent", steps=1, lr=1e-2, progress=False)
    many = batchnorm.adapt(model, [target], "tent", steps=10, lr=1e-2, progress=False)
    assert entropy(many) < entropy(one)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "sar"}, "method in"),
    ({"steps": 0}, "steps to be a positive integer"),
    ({"batches": 0}, "batches to be None or a positive integer"),
    ({"lr": 0.0}, "lr > 0"),
    ({"lr": True}, "lr > 0"),
])
def test_bad_arguments(trained, kwargs, match):
    model, x, _ = trained
    with pytest.raises(BatchNormError, match=match):
        batchnorm.adapt(model, [x[:8]], progress=False, **kwargs)


def test_models_it_cannot_adapt():
    with pytest.raises(BatchNormError, match="a model with BN layers"):
        batchnorm.adapt(torch.nn.Linear(3, 2), [torch.randn(4, 3)], progress=False)
    with pytest.raises(BatchNormError, match=r"\(N, classes\) logits"):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
        batchnorm.adapt(model, [torch.randn(4, 1, 3, 3)], "tent", progress=False)
    with pytest.raises(BatchNormError, match="an nn.Module"):
        batchnorm.adapt("model", [])
