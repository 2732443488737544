"""The layers' options for hard training conditions: Batch Renorm, Ghost BN, masks, checkpoint-safe
updates and test-time statistics, on every layer class, against the reference (which
test_reference_variants.py checks against the paper's formulas and finite differences).

Each case runs three training steps and one eval step, comparing output, gradients and buffers
with the reference in float64 (our float32 against the reference's float64 at float32's bounds).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

import batchnorm
from batchnorm import BatchNormError, reference
from batchnorm.activations import REGISTRY
from batchnorm.sync import SyncBatchNorm, SyncBatchNormAct

EPS = 1e-3
RENORM = {"renorm": True, "rmax": 1.5, "dmax": 0.2}
OPTIONS = [
    ({**RENORM}, False),
    ({"virtual_batch_size": 3}, False),
    ({"virtual_batch_size": 4, **RENORM}, False),
    ({}, True),
    ({"virtual_batch_size": 3}, True),
    ({**RENORM, "virtual_batch_size": 2}, True),
]
LAYERS = [  # (class, shape, act)
    (batchnorm.BatchNorm1d, (8, 3, 5), "identity"),
    (batchnorm.BatchNorm1d, (8, 3), "identity"),
    (batchnorm.BatchNorm2d, (8, 3, 4, 3), "identity"),
    (batchnorm.BatchNorm3d, (8, 3, 2, 2, 3), "identity"),
    (batchnorm.BatchNormAct2d, (8, 3, 4, 3), "leaky_relu"),
    (batchnorm.BatchNormAct1d, (8, 3, 5), "silu"),
    (SyncBatchNorm, (8, 3, 4, 3), "identity"),  # one process: the plain layer's path
    (SyncBatchNormAct, (8, 3, 5), "relu"),
]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _layer(cls, act, dtype, **opts):
    kwargs = {} if act == "identity" else {"act": act}
    m = cls(3, eps=EPS, dtype=dtype, **kwargs, **opts)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.2, 0.7, -0.9]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        m.running_mean.copy_(torch.tensor([1.0, -0.5, 0.2]))
        m.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    return m


def _batch(shape, step, dtype, channels_last, masked):
    g = torch.Generator().manual_seed(100 + step)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    mask = None
    if masked:
        mask = torch.rand((shape[0], *shape[2:]), generator=g) < 0.6
        mask.reshape(shape[0], -1)[:, 0] = True  # every ghost batch counts at least 2 values
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, dy, mask


def _act_ref(act, z):
    """The activation and its derivative in float64, from PyTorch's own function."""
    t = torch.from_numpy(z).requires_grad_()
    y = REGISTRY[act].apply(t, 0.01, 1.0)
    (d,) = torch.autograd.grad(y.sum(), t)
    return y.detach().numpy(), d.numpy()


def _reference_steps(shape, act, dtype, channels_last, masked, opts, steps, m):
    """The reference's trajectory: three training steps, one eval step."""
    w, b = m.weight.detach().double().numpy(), m.bias.detach().double().numpy()
    rm = m.running_mean.double().numpy().copy()
    rv = m.running_var.double().numpy().copy()
    nbt = 0
    out = []
    for step, training in enumerate(steps):
        x, dy, mask = _batch(shape, step, dtype, channels_last, masked)
        x64, dy64 = x.double().numpy(), dy.double().numpy()
        z, state = reference.forward(x64, w, b, rm, rv, training=training, eps=EPS,
                                     num_batches_tracked=nbt,
                                     mask=None if mask is None else mask.numpy(), **opts)
        y, dact = _act_ref(act, z)
        dx, dw, db = reference.backward(dy64 * dact, state)
        rm, rv, nbt = state.running_mean, state.running_var, state.num_batches_tracked
        out.append((y, dx, dw, db, rm, rv, nbt))
    return out


def _layer_steps(m, shape, dtype, channels_last, masked, steps):
    out = []
    for step, training in enumerate(steps):
        m.train(training)
        x, dy, mask = _batch(shape, step, dtype, channels_last, masked)
        x = x.requires_grad_()
        y = m(x, mask=mask)
        dx, dw, db = torch.autograd.grad(y, [x, m.weight, m.bias], dy)
        assert y.is_contiguous(memory_format=torch.channels_last) or not channels_last \
            or x.dim() != 4
        out.append((y, dx, dw, db, m.running_mean.clone(), m.running_var.clone(),
                    int(m.num_batches_tracked)))
    return out


def _compare(got, want, dtype, label):
    names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
    for step, (g, w) in enumerate(zip(got, want)):
        for name, a, b in zip(names, g, w):
            np.testing.assert_allclose(a.detach().double().numpy(), b, **TOL[dtype],
                                       err_msg=f"{label} step {step} {name}")
        assert g[6] == w[6], f"{label} step {step} num_batches_tracked"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("opts, masked", OPTIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("cls, shape, act", LAYERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_layer_options_equal_reference(cls, shape, act, opts, masked, dtype):
    check_options(cls, shape, act, opts, masked, dtype)


def check_options(cls, shape, act, opts, masked, dtype):
    """Three training steps and an eval step of the layer against the reference, in both
    layouts where there are two."""
    steps = [True, True, True, False]
    for channels_last in (False, True) if len(shape) == 4 else (False,):
        m = _layer(cls, act, dtype, **opts)
        want = _reference_steps(shape, act, dtype, channels_last, masked, opts, steps, m)
        got = _layer_steps(m, shape, dtype, channels_last, masked, steps)
        _compare(got, want, dtype, f"{cls.__name__} channels_last={channels_last}")


@pytest.mark.parametrize("stats, mix", [("batch", 0.0), ("mix", 0.3), ("mix", 1.0),
                                        ("running", 0.5)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_stats_equal_reference_and_never_touch_buffers(stats, mix, masked, dtype):
    opts = {"eval_stats": stats, "eval_mix": mix}
    for cls, shape, act in LAYERS[2:5]:
        m = _layer(cls, act, dtype, **opts)
        before = copy.deepcopy(m.state_dict())
        want = _reference_steps(shape, act, dtype, False, masked, opts, [False, False], m)
        got = _layer_steps(m, shape, dtype, False, masked, [False, False])
        _compare(got, want, dtype, cls.__name__)
        for key, value in m.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_renorm_clips_can_change_each_step_and_unit_clips_are_bn_bitwise():
    x, dy, _ = _batch((8, 3, 4, 3), 0, torch.float32, False, False)
    plain, renorm = _layer(batchnorm.BatchNorm2d, "identity", None), \
        _layer(batchnorm.BatchNorm2d, "identity", None, renorm=True)
    assert torch.equal(plain(x), renorm(x))  # rmax=1, dmax=0: the same kernels, same bits
    renorm.rmax, renorm.dmax = 3.0, 5.0  # the paper ramps them during training
    y = renorm(x)
    want, state = reference.forward(x.double().numpy(), renorm.weight.detach().double().numpy(),
                                    renorm.bias.detach().double().numpy(),
                                    plain.running_mean.double().numpy(),
                                    plain.running_var.double().numpy(), training=True, eps=EPS,
                                    renorm=True, rmax=3.0, dmax=5.0)
    assert not np.allclose(state.pieces[0].r, 1.0)  # the clips did not bite: r, d are the data's
    np.testing.assert_allclose(y.detach().double().numpy(), want, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# checkpointed forwards run again in backward


def _net(cls=batchnorm.BatchNorm2d, **opts):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), cls(4, **opts), nn.ReLU(), nn.Conv2d(4, 2, 1),
                         cls(2, **opts))


def _train(model, use_checkpoint, reentrant, steps=3):
    for step in range(steps):
        x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        if use_checkpoint:
            y = checkpoint.checkpoint(model, x.requires_grad_(reentrant),
                                      use_reentrant=reentrant)
        else:
            y = model(x)
        y.square().sum().backward()
    return model


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("opts", [{}, RENORM, {"virtual_batch_size": 2},
                                  {"virtual_batch_size": 4, **RENORM}], ids=str)
def test_checkpointed_model_has_the_plain_models_buffers_and_gradients(opts, reentrant):
    plain = _train(_net(**opts), False, reentrant)
    ckpt = _train(_net(**opts), True, reentrant)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), name
    assert int(ckpt[1].num_batches_tracked) == 3


@pytest.mark.parametrize("reentrant", [False, True])
def test_pytorchs_bn_updates_twice_under_checkpoint(reentrant):
    """What the tests above guard against (fairscale #1035): PyTorch counts every run."""
    ckpt = _train(_net(nn.BatchNorm2d), True, reentrant)
    assert int(ckpt[1].num_batches_tracked) == 6


def test_renorm_replays_the_first_runs_r_and_d(monkeypatch):
    """Without the kept (r, d), the run in backward would measure r and d against buffers the
    first run already moved, and the gradients would differ."""
    monkeypatch.setattr(batchnorm.layers, "_REPLAYS_KEPT", 0)
    plain = _train(_net(**RENORM), False, False)
    ckpt = _train(_net(**RENORM), True, False)
    assert not all(torch.equal(a.grad, b.grad)
                   for a, b in zip(plain.parameters(), ckpt.parameters()))


def test_masked_forward_under_checkpoint():
    m1, m2 = _layer(batchnorm.BatchNorm1d, "identity", None), \
        _layer(batchnorm.BatchNorm1d, "identity", None)
    x, dy, mask = _batch((8, 3, 5), 0, torch.float32, False, True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (m1(x1, mask=mask) * dy).sum().backward()
    y2 = checkpoint.checkpoint(lambda t: m2(t, mask=mask), x2, use_reentrant=False)
    (y2 * dy).sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(m1.running_var, m2.running_var)
    assert int(m2.num_batches_tracked) == 1


# ---------------------------------------------------------------------------------------------
# errors: clear, before any state changes


@pytest.mark.parametrize("kwargs, match", [
    ({"renorm": True, "rmax": 0.9}, "rmax >= 1"),
    ({"renorm": True, "dmax": -0.1}, "dmax >= 0"),
    ({"virtual_batch_size": 0}, "virtual_batch_size"),
    ({"virtual_batch_size": -2}, "virtual_batch_size"),
    ({"eval_stats": "tta"}, "eval_stats in"),
    ({"eval_mix": 1.5}, "eval_mix in"),
    ({"eval_mix": -0.1}, "eval_mix in"),
    ({"renorm": True, "track_running_stats": False}, "track_running_stats=True with renorm"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(BatchNormError, match=match):
        batchnorm.BatchNorm2d(3, **kwargs)


def _bad_forward(m, x, mask=None):
    before = copy.deepcopy(m.state_dict())
    yield
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed call"


@pytest.mark.parametrize("mask, match", [
    (torch.ones(8, 4, dtype=torch.bool), "mask of shape"),
    (torch.ones(8, 5), "boolean mask"),
    (torch.zeros(8, 5, dtype=torch.bool), "count at least 2"),
    (torch.zeros(8, 5, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)
     .index_fill_(0, torch.arange(1, 8), False), "count at least 2"),
    ("mask", "mask to be a torch.Tensor"),
])
def test_bad_masks_change_nothing(mask, match):
    m = _layer(batchnorm.BatchNorm1d, "identity", None)
    x = torch.randn(8, 3, 5)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(BatchNormError, match=match):
        m(x, mask=mask)
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_attributes_changed_to_bad_values_raise_and_change_nothing():
    """The float options raise when set (test_runtime_options.py), the others at forward."""
    m = _layer(batchnorm.BatchNorm2d, "identity", None, **RENORM)
    before = copy.deepcopy(m.state_dict())
    for name, value, match in (("rmax", 0.5, "rmax >= 1"), ("dmax", float("nan"), "dmax"),
                               ("eval_mix", 2.0, "eval_mix in")):
        old = getattr(m, name)
        with pytest.raises(BatchNormError, match=match):
            setattr(m, name, value)
        assert getattr(m, name) == old
    m.virtual_batch_size = 0
    with pytest.raises(BatchNormError, match="virtual_batch_size"):
        m(torch.randn(4, 3, 2, 2))
    m.virtual_batch_size = None
    m.eval()
    m.eval_stats = "test-time"
    with pytest.raises(BatchNormError, match="eval_stats in"):
        m(torch.randn(4, 3, 2, 2))
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_ghost_piece_of_one_value_is_an_error():
    m = batchnorm.BatchNorm1d(3, virtual_batch_size=2)
    with pytest.raises(BatchNormError, match="ghost batches of more than 1 value"):
        m(torch.randn(5, 3))  # pieces 2, 2, 1
    assert int(m.num_batches_tracked) == 0
    m(torch.randn(5, 3, 2))  # the last piece holds 2 values per channel: fine


# ---------------------------------------------------------------------------------------------
# state_dict, convert, inspect, fold, export, compile


def test_state_dict_loads_into_pytorchs_bn_and_back():
    ours = _layer(batchnorm.BatchNorm2d, "identity", None, virtual_batch_size=2, **RENORM)
    ours(torch.randn(8, 3, 2, 2))
    theirs = nn.BatchNorm2d(3, eps=EPS)
    theirs.load_state_dict(ours.state_dict())
    back = batchnorm.BatchNorm2d(3, eps=EPS, **RENORM)
    back.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_convert_carries_the_options_and_torch_refuses_them():
    model = nn.Sequential(nn.Conv2d(3, 3, 1),
                          batchnorm.BatchNorm2d(3, virtual_batch_size=2, eval_stats="batch",
                                                **RENORM), nn.ReLU())
    fused = batchnorm.convert(model, fuse_act=True)
    sync = batchnorm.convert(model, to="sync")
    for layer in (fused[1] if isinstance(fused, nn.Sequential) else fused.get_submodule("1"),
                  sync[1]):
        assert layer.options() == {"renorm": True, "rmax": 1.5, "dmax": 0.2,
                                   "virtual_batch_size": 2, "eval_stats": "batch"}
    back = batchnorm.convert(sync, to="batchnorm")
    assert back[1].options() == model[1].options()
    with pytest.raises(BatchNormError, match="options PyTorch's BatchNorm lacks"):
        batchnorm.convert(model, to="torch")


def test_inspect_shows_the_options():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), batchnorm.BatchNorm2d(3, virtual_batch_size=4))
    report = batchnorm.inspect(model)
    assert report.layers[0].options == "virtual_batch_size=4"
    assert "virtual_batch_size=4" in str(report)


def test_fold_folds_renorm_and_ghost_layers_and_refuses_eval_statistics():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), batchnorm.BatchNorm2d(3, virtual_batch_size=2,
                                                                    **RENORM))
    model(torch.randn(4, 3, 2, 2))
    x = torch.randn(2, 3, 2, 2)
    folded = batchnorm.fold(model)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    model[1].eval_stats = "batch"
    with pytest.raises(BatchNormError, match="eval_stats='running' to fold"):
        batchnorm.fold(model)


def test_onnx_export_refuses_what_onnx_cannot_say():
    pytest.importorskip("onnx")
    import io

    for m, kwargs in ((batchnorm.BatchNorm2d(3, eval_stats="batch").eval(), {}),
                      (batchnorm.BatchNorm2d(3, virtual_batch_size=2).train(),
                       {"training": torch.onnx.TrainingMode.TRAINING})):
        with pytest.raises(Exception, match="plain BN to export to ONNX"):
            torch.onnx.export(m, (torch.randn(4, 3, 2, 2),), io.BytesIO(), dynamo=False,
                              **kwargs)


class _Masked(nn.Module):
    def __init__(self, **opts):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 4, 1)
        self.bn = batchnorm.BatchNormAct1d(4, act="relu", **opts)

    def forward(self, x, mask):
        return self.bn(self.conv(x), mask=mask)


@pytest.mark.slow
@pytest.mark.parametrize("opts", [RENORM, {"virtual_batch_size": 2}], ids=str)
def test_compile_fullgraph_matches_eager(opts):
    x, _, mask = _batch((4, 3, 5), 0, torch.float32, False, True)
    dy = torch.randn(4, 4, 5, generator=torch.Generator().manual_seed(5))
    eager, compiled_model = _Masked(**opts), _Masked(**opts)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for model, fn in ((eager, eager), (compiled_model, compiled)):
        y = fn(x, mask)
        (y * dy).sum().backward()
    torch.testing.assert_close(compiled(x, mask), eager(x, mask), rtol=1e-5, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager.bn.running_var, compiled_model.bn.running_var)
    # the clips as attributes a training loop ramps: the compiled model follows
    if opts.get("renorm"):
        eager.bn.rmax = compiled_model.bn.rmax = 2.0
    torch.testing.assert_close(compiled(x, mask), eager(x, mask), rtol=1e-5, atol=1e-5)


def test_export_keeps_the_ops():
    x, _, mask = _batch((4, 3, 5), 0, torch.float32, False, True)
    program = torch.export.export(_Masked(virtual_batch_size=2, **RENORM), (x, mask))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "batchnorm.moments.default" in targets
    assert "batchnorm.bn_act_stats.default" in targets
    torch.testing.assert_close(program.module()(x, mask),
                               _Masked(virtual_batch_size=2, **RENORM)(x, mask))


@pytest.mark.parametrize("opts, masked", OPTIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["strided", "bfloat16"])
def test_pytorchs_path_takes_the_options_too(opts, masked, kind):
    """Odd strides and half precision run on PyTorch's ops (as CUDA does): the same answers."""
    shape = (8, 3, 5)
    m = _layer(batchnorm.BatchNorm1d, "identity", None, **opts)
    want = _reference_steps(shape, "identity", torch.float32, False, masked, opts,
                            [True, True, False], m)
    out = []
    for step, training in enumerate([True, True, False]):
        m.train(training)
        x, dy, mask = _batch(shape, step, torch.float32, False, masked)
        if kind == "strided":
            x = x.transpose(0, 2).contiguous().transpose(0, 2)  # not a layout the kernels view
        else:
            x, dy = x.to(torch.bfloat16), dy.to(torch.bfloat16)
        x.requires_grad_()
        y = m(x, mask=mask)
        dx, dw, db = torch.autograd.grad(y, [x, m.weight, m.bias], dy)
        out.append((y.float(), dx.float(), dw, db, m.running_mean.clone(), m.running_var.clone(),
                    int(m.num_batches_tracked)))
    if kind == "strided":
        _compare(out, want, torch.float32, "strided")
        return
    for step, (g, w) in enumerate(zip(out, want)):  # bfloat16: 8 bits of mantissa
        for a, b in zip(g[:2], w[:2]):
            np.testing.assert_allclose(a.detach().double().numpy(), b, rtol=0.05, atol=0.05)
        for a, b in zip(g[4:6], w[4:6]):  # statistics in float32 from bfloat16 data
            np.testing.assert_allclose(a.double().numpy(), b, rtol=0.02, atol=0.02)
        assert g[6] == w[6]
