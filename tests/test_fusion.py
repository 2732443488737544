"""fuse_frozen: the fused model against the unfused one (outputs and every gradient over several
optimizer steps, float32 and float64), state_dict both ways, what fuses and what does not."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchNormError
from batchnorm.fusion import FoldedAway, FusedFrozen

from .replicas import build


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2, dilation=2, bias=False),
        batchnorm.BatchNormAct2d(8, act="leaky_relu", negative_slope=0.2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 5), nn.BatchNorm1d(5),
    ).to(dtype)


def _with_statistics(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
    return model.eval()


def _steps(model, batches, steps=3):
    """Outputs and gradients of every trainable parameter over a few SGD steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    out = []
    for x in batches[:steps]:
        y = model(x)
        loss = y.square().mean()
        optimizer.zero_grad()
        loss.backward()
        out.append((y.detach().clone(), [p.grad.clone() for p in params]))
        optimizer.step()
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("bn_trains", [False, True])
def test_fused_model_computes_the_unfused_outputs_and_gradients(dtype, tol, bn_trains):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 6, 6, generator=g, dtype=dtype) for _ in range(3)]
    model = _with_statistics(_net(dtype), batches[0])
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters():
                p.requires_grad_(bn_trains)
    fused = batchnorm.fuse_frozen(model)
    assert sum(isinstance(m, FusedFrozen) for m in fused.modules()) == 3
    assert sum(isinstance(m, FoldedAway) for m in fused.modules()) == 3
    for (y_a, g_a), (y_b, g_b) in zip(_steps(model, batches), _steps(fused, batches)):
        torch.testing.assert_close(y_b, y_a, rtol=tol, atol=tol)
        assert len(g_a) == len(g_b) == (11 if bn_trains else 5)
        for a, b in zip(g_a, g_b):
            torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_frozen_batchnorm_pairs_fuse_and_run_in_train_mode():
    model, x = build("resnet_basic")
    model = _with_statistics(model, x)
    frozen = batchnorm.freeze(model)
    fused = batchnorm.fuse_frozen(frozen)
    n_bn = sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(isinstance(m, FusedFrozen) for m in fused.modules()) == n_bn
    frozen.train()
    fused.train()  # fixed statistics in any mode
    torch.testing.assert_close(fused(x), frozen(x), rtol=1e-5, atol=1e-5)


def test_state_dict_keys_and_checkpoints_both_ways():
    x = torch.randn(4, 3, 6, 6)
    model = _with_statistics(_net(), x)
    fused = batchnorm.fuse_frozen(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    other = _with_statistics(_net(), 3 * x + 1)  # other weights and statistics
    fused.load_state_dict(other.state_dict())  # an unfused checkpoint loads into the fused model
    torch.testing.assert_close(fused(x), other(x), rtol=1e-5, atol=1e-5)
    back = _net()
    back.load_state_dict(fused.state_dict())  # and the fused model's loads back
    torch.testing.assert_close(back.eval()(x), other(x), rtol=1e-6, atol=1e-6)


def test_a_plain_bn_in_train_mode_is_refused_clearly():
    x = torch.randn(4, 3, 6, 6)
    fused = batchnorm.fuse_frozen(_with_statistics(_net(), x))
    fused.train()
    with pytest.raises(BatchNormError, match=r"BatchNorm2d fused into this Conv2d in eval mode"):
        fused(x)
    fused.eval()
    fused(x)


def test_what_does_not_fuse():
    x = torch.randn(4, 3, 6, 6)
    # BN in train mode (batch statistics), a conv output used twice, a BN after an activation
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with pytest.warns(UserWarning, match="no Conv/Linear → frozen BN pair"):
        same = batchnorm.fuse_frozen(model)
    torch.testing.assert_close(same(x), model(x))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            z = self.conv(x)
            return self.bn(z) + z

    with pytest.warns(UserWarning):
        batchnorm.fuse_frozen(Shared().eval())
    training = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))  # train mode
    with pytest.warns(UserWarning):
        kept = batchnorm.fuse_frozen(training)
    assert isinstance(kept[1], nn.BatchNorm2d)
    with pytest.raises(BatchNormError, match="an nn.Module"):
        batchnorm.fuse_frozen("model")


def test_input_model_is_untouched_and_the_copy_pickles(tmp_path):
    x = torch.randn(4, 3, 6, 6)
    model = _with_statistics(_net(), x)
    before = copy.deepcopy(model.state_dict())
    fused = batchnorm.fuse_frozen(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert isinstance(model[0], nn.Conv2d)
    torch.save(fused, tmp_path / "fused.pt")
    loaded = torch.load(tmp_path / "fused.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), fused(x))
