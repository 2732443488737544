"""FrozenBatchNorm1d/2d/3d: a BN's eval map with every tensor a buffer."""
from __future__ import annotations

import pytest
import torch

from batchnorm import BatchNormError, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from batchnorm.frozen import _FrozenBatchNormXd

CASES = [(FrozenBatchNorm1d, torch.nn.BatchNorm1d, (4, 5)),
         (FrozenBatchNorm1d, torch.nn.BatchNorm1d, (4, 5, 3)),
         (FrozenBatchNorm2d, torch.nn.BatchNorm2d, (4, 5, 3, 2)),
         (FrozenBatchNorm3d, torch.nn.BatchNorm3d, (2, 5, 3, 2, 2))]


def _trained_bn(cls, shape):
    torch.manual_seed(0)
    bn = cls(shape[1], eps=1e-3)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    for _ in range(3):
        bn(torch.randn(shape) * 3 + 1)
    return bn.eval()


@pytest.mark.parametrize("frozen_cls,bn_cls,shape", CASES)
def test_equals_bn_in_eval_and_holds_only_buffers(frozen_cls, bn_cls, shape):
    bn = _trained_bn(bn_cls, shape)
    frozen = frozen_cls.from_batchnorm(bn)
    x = torch.randn(shape, dtype=torch.float32)
    torch.testing.assert_close(frozen(x), bn(x), rtol=0, atol=0)
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    scale, shift = frozen.scale_shift()
    view = (1, -1) + (1,) * (len(shape) - 2)
    torch.testing.assert_close(x * scale.view(view) + shift.view(view), bn(x), rtol=1e-5, atol=1e-6)
    xg = x.clone().requires_grad_()
    frozen(xg).sum().backward()
    torch.testing.assert_close(xg.grad, scale.view(view).expand_as(x))


def test_bad_input_is_a_clear_error():
    frozen = FrozenBatchNorm2d(5)
    with pytest.raises(BatchNormError, match=r"expected 4D input \(got 3D input\)"):
        frozen(torch.randn(2, 5, 3))
    with pytest.raises(BatchNormError, match=r"expected 5 channels"):
        frozen(torch.randn(2, 4, 3, 3))
    with pytest.raises(BatchNormError, match="num_features"):
        FrozenBatchNorm2d(0)
    with pytest.raises(BatchNormError, match="eps"):
        FrozenBatchNorm2d(3, eps=-1.0)


def test_any_rank_variant():
    frozen = _FrozenBatchNormXd(3)
    for shape in [(2, 3), (2, 3, 4), (2, 3, 4, 4), (1, 3, 2, 2, 2)]:
        x = torch.randn(shape)
        torch.testing.assert_close(frozen(x), x / (1 + 1e-5) ** 0.5)
    with pytest.raises(BatchNormError, match="at least 2 dimensions"):
        frozen(torch.randn(3))


@pytest.mark.parametrize("num_features, eps, message", [
    (0, 1e-5, "expected num_features to be a positive integer (got 0)"),
    (True, 1e-5, "expected num_features to be a positive integer (got True)"),
    (3, -1.0, "expected eps >= 0 (got -1.0)"),
    (3, float("nan"), "expected eps to be a finite number (got nan)"),
])
def test_constructors_share_the_checks_and_their_messages(num_features, eps, message):
    import batchnorm
    from batchnorm.errors import check_eps, check_num_features

    for cls in (FrozenBatchNorm2d, batchnorm.BatchNorm2d, batchnorm.BatchNormAct2d,
                batchnorm.SyncBatchNorm):
        with pytest.raises(BatchNormError) as err:
            cls(num_features, eps=eps)
        assert str(err.value) == message, cls
    with pytest.raises(BatchNormError) as err:
        check_num_features(num_features)
        check_eps(eps, training=False)
    assert str(err.value) == message


def test_tour_networks_refuse_an_unknown_placement_with_our_error():
    from batchnorm.tour.nets import SmallCNN

    with pytest.raises(BatchNormError, match=r"expected a placement in .* \(got 'bn-first'\)"):
        SmallCNN("bn-first", norm=torch.nn.BatchNorm2d)
