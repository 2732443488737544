"""BatchNorm1d/2d/3d and BatchNormAct1d/2d/3d: drop-in PyTorch layers on the fused kernels.

The layers hold state and pick the computation; the math lives in :mod:`batchnorm.ops`
(``bn_act_train`` / ``bn_act_eval``), which never touches buffers. A forward pass here is:

1. every check (rank, channels, dtype, eps, momentum, values per channel), so that a bad input
   raises :class:`~batchnorm.BatchNormError` before anything changes;
2. one op call: batch statistics in training (and in eval without running buffers), the running
   ones otherwise;
3. the running-buffer update under ``no_grad``, guarded against non-finite batch statistics.

Everything else (constructor arguments, parameters, buffers, state_dict keys and version 2
handling, ``reset_parameters``, ``extra_repr``) is inherited from PyTorch's ``_BatchNorm``, so
``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`` holds and checkpoints load both ways.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import ops
from .activations import REGISTRY
from .errors import (
    check_act,
    check_counted,
    check_eps,
    check_eval_stats,
    check_momentum,
    check_num_features,
    check_pieces,
    check_renorm,
    check_values_per_channel,
    check_virtual_batch_size,
    expected,
)
from .ops import custom_ops, step, torch_fallback
from .ops.moments import merge_parts

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "NONFINITE",
    "OPTIONS",
]

NONFINITE = ("skip", "raise", "update")
# the options for hard training conditions, with their defaults (all off: plain BN); constructor
# keywords and attributes, never buffers, so a state_dict still loads into PyTorch's BN
OPTIONS = {"renorm": False, "rmax": 1.0, "dmax": 0.0, "virtual_batch_size": None,
           "eval_stats": "running", "eval_mix": 0.0}
# the ones a loop changes between steps (the paper ramps rmax and dmax), with their checks: floats
# for the user, each held also as a one-element tensor that forward hands to the ops, so that a
# compiled graph takes it as an input (dynamo makes a float attribute a constant of the graph: one
# recompile per value)
_RUNTIME = {
    "rmax": lambda v: check_renorm(True, v, 0.0)[1],
    "dmax": lambda v: check_renorm(True, 1.0, v)[2],
    "eval_mix": lambda v: check_eval_stats("running", v)[1],
}
_REPLAYS_KEPT = 64  # Batch Renorm (r, d) kept per layer for a checkpointed forward to reuse
_TORCH_TAKES_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters
_REDUCED = (torch.float16, torch.bfloat16)  # may run with float32 parameters, as in PyTorch
_STATE = ("weight", "bias", "running_mean", "running_var")  # the tensors a forward reads
# the same function object as torch.compiler.is_compiling (dynamo folds it to a constant); a
# module attribute so that a test can take the compiled branch of the guard in eager without
# patching torch itself (a patched torch.compiler.is_compiling stays cached inside dynamo)
_is_compiling = torch.compiler.is_compiling


def in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, without importing torch.onnx on a layer's first call
    (no export runs before torch.onnx is imported) and without its per-call imports when the
    exporters were never loaded."""
    return "torch.onnx" in sys.modules and torch.onnx.is_in_onnx_export()


def _replaying() -> bool:
    """True while autograd runs a backward on this thread: a training forward then is a
    checkpointed segment run again (``torch.utils.checkpoint``, reentrant or not), whose first
    run already updated the buffers. Never under torch.compile (it does not re-run Python)."""
    return not _is_compiling() and torch._C._current_graph_task_id() != -1


def _number(name: str, value: object) -> object:
    """A 0-d real tensor's number (the runtime options take one wherever they take a float);
    anything else as given, for the option's own check."""
    if not isinstance(value, Tensor):
        return value
    if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
        raise expected(f"{name} to be a number or a 0-d real tensor",
                       f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
    return value.item()


def _check_runtime(name: str, value: object, renorm: object) -> float:
    """A runtime option's value, checked; the clips only with renorm (else they would not act)."""
    value = _RUNTIME[name](_number(name, value))
    if name in ("rmax", "dmax") and not renorm and value != OPTIONS[name]:
        raise expected(f"renorm=True to set {name} (the clips act only in Batch Renorm)",
                       f"{name}={value!r} with renorm={renorm!r}")
    return value


def _runtime_tensor(value: float, device) -> Tensor:
    """A runtime option's tensor: float64 (float32 on MPS, which has no float64) whatever the
    layer's dtype, so that the value is the float the user set; of shape (1,), since dynamo
    traces a 0-d CPU tensor input as a symbolic float, then specialises it and restarts."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.tensor([value], dtype=dtype, device=device)


class _RuntimeOption:
    """A runtime option: reads the float, and a set (a number or a 0-d tensor) is checked, then
    written into the tensor in place (the same object: a compiled graph's input, no new guard;
    on CUDA a fill kernel, no host sync)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name
        self.__doc__ = f"{name}, a float (see the class docstring); set it any step."

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj._option_values[self.name]

    def __set__(self, obj, value) -> None:
        value = _check_runtime(self.name, value, obj.renorm)
        obj._option_tensors[self.name].fill_(value)
        obj._option_values[self.name] = value


class _OurBatchNorm(_BatchNorm):
    """Shared forward of BatchNorm*d and BatchNormAct*d; subclasses set ``input_ranks``."""

    input_ranks: tuple[int, ...] = ()  # the input ranks the class takes (the BN protocol reads it)
    rmax = _RuntimeOption()
    dmax = _RuntimeOption()
    eval_mix = _RuntimeOption()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
        renorm: bool = False,
        rmax: float = 1.0,
        dmax: float = 0.0,
        virtual_batch_size: int | None = None,
        eval_stats: str = "running",
        eval_mix: float = 0.0,
    ) -> None:
        check_num_features(num_features)
        check_eps(eps, training=False)
        check_momentum(momentum)
        if nonfinite not in NONFINITE:
            raise expected(f"nonfinite in {NONFINITE}", repr(nonfinite))
        renorm, _, _ = check_renorm(renorm, 1.0, 0.0)
        rmax, dmax = (_check_runtime(k, v, renorm) for k, v in (("rmax", rmax), ("dmax", dmax)))
        if renorm and not track_running_stats:
            raise expected("track_running_stats=True with renorm=True (r and d are measured "
                           "against the running statistics)", "track_running_stats=False")
        virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
        eval_stats, eval_mix = check_eval_stats(eval_stats, _number("eval_mix", eval_mix))
        if eval_stats == "mix" and not track_running_stats:
            raise expected("track_running_stats=True with eval_stats='mix' (it mixes the batch "
                           "statistics with the running ones)", "track_running_stats=False")
        # PyTorch >= 2.13 takes ``bias``; older releases always learn beta with ``affine``
        extra = {"bias": bias} if _TORCH_TAKES_BIAS else {}
        if not bias and not _TORCH_TAKES_BIAS:
            raise expected("bias=True with this PyTorch (bias=False needs torch >= 2.13)",
                           f"bias=False, torch {torch.__version__}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **extra)
        self.nonfinite = nonfinite
        self._warned_nonfinite = False
        self.renorm = renorm
        self.virtual_batch_size = virtual_batch_size
        self.eval_stats = eval_stats
        self._init_runtime({"rmax": rmax, "dmax": dmax, "eval_mix": eval_mix}, device)
        self._replays: OrderedDict = OrderedDict()  # Batch Renorm's (r, d) by batch statistics

    # ----------------------------------------------------------------------------------------
    # what BatchNormAct overrides

    def _act(self) -> tuple[str, float, float, bool]:
        """(act, negative_slope, alpha, inplace) passed to the ops."""
        return "identity", 0.01, 1.0, False

    # ----------------------------------------------------------------------------------------

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self.input_ranks:
            ranks = " or ".join(f"{r}D" for r in self.input_ranks)
            raise expected(f"{ranks} input", f"{input.dim()}D input")

    def _state(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """(weight, bias, running_mean, running_var), read once a call from the module's own
        dicts (``Module.__getattr__`` for each read costs more than the rest of a small call's
        Python); by attribute under dynamo, which traces that."""
        if _is_compiling():
            return self.weight, self.bias, self.running_mean, self.running_var
        params, buffers = self._parameters, self._buffers
        return (params.get("weight"), params.get("bias"), buffers.get("running_mean"),
                buffers.get("running_var"))

    def _check_input(self, x: Tensor, batch_stats: bool, update: bool,
                     state: tuple | None = None) -> None:
        """Every check forward makes, before it computes or changes anything (``state``: the
        tensors of :meth:`_state`, read here if not given)."""
        if not isinstance(x, Tensor):
            raise expected("input to be a torch.Tensor", type(x).__name__)
        self._check_input_dim(x)
        if not x.is_floating_point():
            raise expected("floating-point input", f"dtype {x.dtype}")
        if x.shape[1] != self.num_features:
            raise expected(f"{self.num_features} channels on dim 1",
                           f"{x.shape[1]} channels, input of shape {tuple(x.shape)}")
        for name, t in zip(_STATE, self._state() if state is None else state):
            if t is None:
                continue
            if t.device != x.device:
                raise expected(f"input on {t.device}, the device of {name}",
                               f"input on {x.device}")
            if t.dtype == x.dtype:
                continue
            if x.dtype in _REDUCED and t.dtype == torch.float32:
                continue
            raise expected(f"input of dtype {t.dtype}, the dtype of {name} (mixed dtypes)",
                           f"dtype {x.dtype}")
        check_eps(self.eps, training=batch_stats)
        if update:
            check_momentum(self.momentum)
        if batch_stats and x.numel() == x.shape[1]:  # N * prod(spatial) == 1 (a plain int test:
            if self.training:  # the shared check is a graph break)
                check_values_per_channel(tuple(x.shape), 1)  # PyTorch's "when training"
            why = ("no running statistics: track_running_stats=False"
                   if self.running_mean is None and self.running_var is None
                   else "eval_stats='batch'")  # (an error: the attribute reads cost nothing)
            raise expected(f"more than 1 value per channel for batch statistics in eval ({why})",
                           f"input of shape {tuple(x.shape)}: 1 value per channel")

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalise ``input`` per channel (then the activation, for BatchNormAct); in training
        with ``track_running_stats``, update the running statistics and num_batches_tracked.

        Training normalises with the batch's statistics (the options of the class docstring
        apply: Batch Renorm, ghost batches); evaluation with the running ones, or with the batch's
        (``eval_stats``, or no running statistics).

        Args:
            input: floating point, C = ``num_features`` channels on dim 1.
            mask: None, or a bool tensor, True where a position counts: the statistics (and
                their gradient terms) cover the counted positions only, and every position is
                normalised. It changes nothing where the running statistics normalise.
                Default: None

        Shape:
            - input: ``(N, C, *)`` of a rank the class takes: 2D or 3D for BatchNorm1d, 4D for
              2d, 5D for 3d (BatchNormAct alike)
            - mask: ``(N, *)``, the input's shape without C
            - output: the input's

        Returns:
            A tensor of ``input``'s shape, dtype and memory format.

        Raises:
            BatchNormError: a bad input or option (rank, channels, dtype, eps, momentum, a mask
                of the wrong shape, one value per channel where batch statistics are needed),
                before any buffer changes.
        """
        x = input
        if in_onnx_export():
            return self._onnx_forward(x, mask)
        # PyTorch's rules: batch statistics in training, and in eval when there are no buffers;
        # buffers (and num_batches_tracked) change only in training with tracking on.
        state = self._state()
        weight, bias, running_mean, running_var = state
        tracked = running_mean is not None or running_var is not None
        if not self.training and self.eval_stats != "running":
            self._check_eval_stats(tracked)  # an attribute a user may have set to anything
        batch_stats = self.training or not tracked
        eval_stats = "running" if batch_stats else self.eval_stats
        update = self.training and self.track_running_stats
        if update and _replaying():
            update = False  # the forward of a checkpointed segment, run again in backward
        self._check_input(x, batch_stats or eval_stats == "batch", update, state)
        act, negative_slope, alpha, inplace = self._act()
        if eval_stats == "mix" or (mask is not None and eval_stats == "running"
                                   and not batch_stats):
            ops.check_mask(mask, x)
            if eval_stats == "running":  # a mask does not change running statistics
                mask = None
            else:
                # a copy: autograd keeps it, and a later ``m.eval_mix = v`` fills the original
                mix = self._runtime("eval_mix", x)[0].clone()
                return ops.bn_act_mixed(x, weight, bias, running_mean, running_var, self.eps,
                                        act, negative_slope, alpha, mix, mask)
        if not (batch_stats or eval_stats == "batch"):
            # the tensors' dtypes and devices were checked against x: x alone picks the backend
            return step.eval_step(step.backend_for(x), x, weight, bias, running_mean,
                                  running_var, self.eps, act, negative_slope, alpha)
        renorm = self.training and self._renorm_on()
        ghost = self.training and self.virtual_batch_size is not None
        if mask is not None or renorm or ghost:
            return self._forward_pieces(x, mask, renorm, ghost, update,
                                        (act, negative_slope, alpha))
        return self._train_step(x, update, act, negative_slope, alpha, inplace, state)

    def _train_step(self, x: Tensor, update: bool, act: str, negative_slope: float, alpha: float,
                    inplace: bool, state: tuple) -> Tensor:
        """Plain BN's training forward: one backend call, which also updates the running
        statistics in place (guarded); then num_batches_tracked."""
        weight, bias, running_mean, running_var = state
        nbt = (self._buffers.get("num_batches_tracked") if not _is_compiling()
               else self.num_batches_tracked) if update else None
        rm, rv = (running_mean, running_var) if update else (None, None)
        if x.numel() == 0:  # an empty batch: PyTorch counts it and updates nothing
            if nbt is not None:
                nbt.add_(1)
            return ops.bn_act_train(x, weight, bias, self.eps, act, negative_slope, alpha,
                                    inplace)[0]
        # the tensors' dtypes and devices were checked against x: x alone picks the backend
        backend = step.backend_for(x, fused=inplace)
        factor = 0.0 if rm is None else self._factor(nbt, rm)
        y, mean, var, ok = step.train_step(backend, x, weight, bias, rm, rv, self.eps, factor,
                                           self.nonfinite != "update", act, negative_slope,
                                           alpha, inplace)
        if rm is None and update and self.nonfinite != "update":  # counted, no buffers
            ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
        if update:
            self._count_batch(ok, mean, var, nbt)
        return y

    def _factor(self, nbt: Tensor | None, like: Tensor) -> float | Tensor:
        """The running update's factor: momentum, or the cumulative average's
        1 / num_batches_tracked after this batch (a tensor where reading it would be a device
        synchronisation or a graph break)."""
        if self.momentum is not None:
            return self.momentum
        if nbt is None:
            return 0.0
        if _is_compiling() or nbt.device.type != "cpu":
            return 1.0 / (nbt + 1).to(like.dtype)
        return 1.0 / (int(nbt) + 1)

    def _count_batch(self, ok: bool | Tensor, mean: Tensor, var: Tensor,
                     nbt: Tensor | None = None) -> None:
        """num_batches_tracked after a guarded update whose outcome is ``ok``: +1 when the
        buffers were updated; else ``nonfinite`` says (raise, or warn once). Where ``ok`` is a
        device flag and reading it would synchronise (CUDA) or break a compiled graph, "skip"
        counts on the device and does not warn; "raise" reads it. ``nbt``: the counter, if the
        caller has read it."""
        if nbt is None:
            nbt = self.num_batches_tracked
        if ok is True:
            if nbt is not None:
                nbt.add_(1)
            return
        if isinstance(ok, Tensor) and self.nonfinite != "raise" and (
                _is_compiling() or ok.device.type != "cpu"):
            if nbt is not None:
                nbt.add_(ok)  # int64 += bool: one kernel (a .to() first would be two)
            return
        if bool(ok):
            if nbt is not None:
                nbt.add_(1)
            return
        self._reject_nonfinite(mean, var)

    def _check_eval_stats(self, tracked: bool) -> None:
        """eval_stats (a plain attribute) in evaluation; eval_mix was checked when set."""
        check_eval_stats(self.eval_stats, 0.0)
        if self.eval_stats == "mix" and not tracked:
            raise expected("track_running_stats=True with eval_stats='mix' (it mixes the batch "
                           "statistics with the running ones)", "no running statistics")

    def _renorm_on(self) -> bool:
        """Batch Renorm with clips that can move r or d (rmax=1, dmax=0 is BN exactly: eager
        runs plain BN's kernels then). Compiled, renorm alone decides: the clips are inputs of
        the graph, not constants to branch on, so a ramp from (1, 0) compiles once (r = 1 and
        d = 0 exactly at unit clips)."""
        if _is_compiling():
            return bool(self.renorm)
        return self.renorm is not False and self._clips_act()  # (False: nothing to check)

    def _clips_act(self) -> bool:
        """renorm on, with clips other than (1, 0), read from the floats."""
        renorm, _, _ = check_renorm(self.renorm, 1.0, 0.0)
        return renorm and (self.rmax > 1.0 or self.dmax > 0.0)

    def _runtime(self, name: str, like: Tensor) -> Tensor:
        """A runtime option's tensor on ``like``'s device. A layer that ``convert`` built holds
        moved parameters but tensors of its own on the default device: moved here, once."""
        t = self._option_tensors[name]
        if t.device != like.device:
            t = t.to(like.device)
            if not _is_compiling():  # (a compiled graph moves it on every call)
                self._option_tensors[name] = t
        return t

    def _forward_pieces(self, x: Tensor, mask: Tensor | None, renorm: bool, ghost: bool,
                        update: bool, act: tuple[str, float, float]) -> Tensor:
        """Masked statistics, ghost batches and Batch Renorm: the statistics of each piece (the
        whole batch, or each ghost batch) first, then its normalisation with them; the running
        statistics from the pieces merged (Chan), once. Everything is checked before any
        buffer changes."""
        ops.check_mask(mask, x)
        vbs = check_virtual_batch_size(self.virtual_batch_size) if ghost else None
        if renorm and self.running_mean is None:
            raise expected("running statistics with renorm=True", "running_mean=None")
        n = x.shape[0]
        if vbs is not None and n > 0:
            check_pieces(n, x[0, 0].numel(), vbs)
            xs = x.split(vbs)
            masks = [None] * len(xs) if mask is None else list(mask.split(vbs))
        else:
            xs, masks = [x], [mask]
        eager = not _is_compiling()
        parts, ys = [], []
        for k, (xp, mp) in enumerate(zip(xs, masks)):
            part = ops.moments(xp, mp)
            if mp is not None and eager and xp.numel() > 0:
                check_counted(int(part.count), "the mask" if len(xs) == 1 else
                              f"the mask in every ghost batch (batch {k} of {len(xs)})")
            parts.append(part)
        for xp, mp, (count, mean, m2) in zip(xs, masks, parts):
            var = m2 / count
            weight, bias = self.weight, self.bias
            if renorm:
                weight, bias = self._renormed(mean, var, weight, bias, x, update)
            ys.append(ops.bn_act_stats(xp, weight, bias, mean, var, count, self.eps, *act,
                                       mask=mp))
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        if update:  # statistics of half-precision data in float32, as plain BN's (and PyTorch's)
            self._update_from_moments(*merge_parts(parts),
                                      torch.float32 if x.dtype in _REDUCED else x.dtype)
        return y

    def _update_from_moments(self, count: Tensor, mean: Tensor, m2: Tensor, dtype) -> None:
        """The running update from float64 moments of the (counted) batch."""
        n = float(count) if not _is_compiling() else count
        self._update_running_stats(mean.to(dtype), (m2 / count).to(dtype), n)

    def _renorm_factors(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Batch Renorm's float64 (r, d) of batch statistics against the running ones."""
        return ops.renorm_factors(mean, var, self.running_mean, self.running_var, self.eps,
                                  self._runtime("rmax", mean), self._runtime("dmax", mean))

    def _renormed(self, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                  x: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        """Batch Renorm's (weight, bias) for plain BN (:func:`batchnorm.ops.renorm_affine`)."""
        return ops.renorm_affine(weight, bias, *self._renorm_rd(mean, var, update), x.dtype)

    def _renorm_rd(self, mean: Tensor, var: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        """(r, d) for these batch statistics, measured against the running statistics before
        this batch; a checkpointed forward run again in backward reuses the first run's r and d
        (found by its batch statistics, which the kernels reproduce bitwise)."""
        key = None
        if not _is_compiling():
            key = (mean.detach().cpu().numpy().tobytes(), var.detach().cpu().numpy().tobytes())
        if not update and key in self._replays and _replaying():
            r, d = self._replays.pop(key)
        else:
            r, d = self._renorm_factors(mean, var)
            if key is not None and update:
                self._replays[key] = (r, d)
                while len(self._replays) > _REPLAYS_KEPT:
                    self._replays.popitem(last=False)
        return r, d

    def _onnx_forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Under ``torch.onnx.export``: PyTorch's own BN forward, then the activation, so both
        exporters write the standard BatchNormalization node (training mode included, exactly
        as they do for ``torch.nn.BatchNorm2d``) and the activation's own node; the custom ops
        have no ONNX form. The options ONNX has no node for are refused."""
        if self.eval_stats != "running" or mask is not None or (self.training and (
                self._clips_act() or self.virtual_batch_size is not None)):
            raise expected("plain BN to export to ONNX: eval_stats='running', no mask, and in "
                           "training no renorm or virtual_batch_size (its BatchNormalization "
                           "has none of them)", f"{type(self).__name__}({self.num_features}) "
                           f"with {self.options() or 'a mask'}")
        act, negative_slope, alpha, _ = self._act()
        return REGISTRY[act].apply(_BatchNorm.forward(self, x), negative_slope, alpha)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: int | Tensor) -> None:
        """The running update from batch statistics computed outside the training step (the
        options' paths, SyncBatchNorm's global statistics): the same guarded update as the step
        (:func:`batchnorm.ops.custom_ops.running_update`), then :meth:`_count_batch`. ``n``
        values per channel: a tensor under torch.compile on the options' paths."""
        nbt, rm, rv = self.num_batches_tracked, self.running_mean, self.running_var
        if isinstance(n, (int, float)) and n == 0:  # empty batch: PyTorch counts it, no update
            if nbt is not None:
                nbt.add_(1)
            return
        check = self.nonfinite != "update"
        if rm is None:
            ok = (torch.isfinite(mean).all() & torch.isfinite(var).all()) if check else True
        elif isinstance(n, Tensor):
            ok = torch_fallback.running_update(mean, var, rm, rv, self._factor(nbt, rm), n, check)
        else:
            ok = custom_ops.running_update(mean, var, rm, rv, self._factor(nbt, rm), int(n), check)
        self._count_batch(ok, mean, var)

    def _reject_nonfinite(self, mean: Tensor, var: Tensor) -> None:
        """nonfinite="raise": raise; "skip": warn once per layer. Buffers are left alone."""
        bad = int((~(torch.isfinite(mean) & torch.isfinite(var))).sum())
        if self.nonfinite == "raise":
            raise expected("finite batch statistics (nonfinite='raise')",
                           f"NaN/Inf mean or variance in {bad} of {self.num_features} channels; "
                           "running statistics left unchanged")
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}({self.num_features}): a training batch had NaN/Inf "
                f"statistics in {bad} channel(s); running statistics and num_batches_tracked "
                "were left unchanged (nonfinite='skip'; warned once per layer)",
                RuntimeWarning, stacklevel=4)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.nonfinite != "skip":
            text += f", nonfinite={self.nonfinite!r}"
        for name, value in self.options().items():  # only the options set
            text += f", {name}={value!r}"
        return text

    def options(self) -> dict:
        """The options for hard training conditions that differ from plain BN's (what
        ``convert`` carries over and ``inspect`` shows); the clips only with renorm on (a loop
        may turn it off and keep them: they do not act then)."""
        values = {name: getattr(self, name, default) for name, default in OPTIONS.items()}
        if not values["renorm"]:
            values["rmax"], values["dmax"] = OPTIONS["rmax"], OPTIONS["dmax"]
        return {name: v for name, v in values.items() if v != OPTIONS[name]}

    # ----------------------------------------------------------------------------------------
    # the runtime options' tensors: not buffers (named_buffers and state_dict stay PyTorch's),
    # so this class moves, copies and unpickles them

    def _init_runtime(self, values: dict, device) -> None:
        self._option_values = dict(values)
        self._option_tensors = {name: _runtime_tensor(v, device) for name, v in values.items()}

    def _apply(self, fn, recurse=True):
        """Module.to / cuda / half / to_empty...: the runtime options follow the device, and keep
        their value and dtype (``.half()`` would round rmax=1.1 to 1.0996; ``to_empty`` would
        leave garbage)."""
        super()._apply(fn, recurse)
        tensors = self.__dict__.get("_option_tensors")
        if tensors is not None:
            for name, t in tensors.items():
                tensors[name] = _runtime_tensor(self._option_values[name], fn(t).device)
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_replays", OrderedDict())  # pickles of before the options
        for name, default in OPTIONS.items():
            if name not in _RUNTIME:
                self.__dict__.setdefault(name, default)
        if "_option_values" not in self.__dict__:  # pickles of the float attributes, or older
            values = {name: self.__dict__.pop(name, OPTIONS[name]) for name in _RUNTIME}
            t = next(iter(list(self.parameters()) + list(self.buffers())), None)
            self._init_runtime(values, None if t is None else t.device)


_NONFINITE_DOC = """nonfinite: what a training batch whose mean or variance is NaN/Inf does to the
            running statistics. "skip": leave running_mean, running_var and
            num_batches_tracked unchanged and warn once per layer (the output of that batch is
            still returned); "raise": raise BatchNormError before any buffer changes;
            "update": update them as PyTorch does (they become NaN). Keyword only.
            Default: "skip\""""

_BN_DOC = r"""Batch normalization over a {ranks} input, a drop-in for ``torch.nn.{name}``.

    .. math::
        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} * \gamma + \beta

    Mean and variance are per channel (dim 1) over every other dimension. Normalising uses the
    *biased* variance; ``running_var`` is updated with the *unbiased* one, ``var * n / (n - 1)``:
    ``running = (1 - momentum) * running + momentum * batch``, or with ``momentum=None`` the
    cumulative average ``1 / num_batches_tracked``. Eval uses the running statistics, or the batch
    ones when built with ``track_running_stats=False``. Behaviour, state_dict keys and version
    handling are PyTorch's; each loads the other's state_dict.

    A training forward is one call into a backend (:mod:`batchnorm.ops.step`) that computes the
    statistics, the normalisation with the affine map and activation, and the running update;
    a backward is one more. The backend (:func:`batchnorm.set_backend`, default "auto"): the
    fused numba kernels on CPU for float32/float64 input, contiguous or channels-last; on CUDA
    PyTorch's own path, or the Triton kernels with ``set_backend("kernels")`` (and for
    ``inplace=True`` or a mask); PyTorch's path for the rest (CPU bfloat16/float16, odd
    strides). Under ``torch.compile`` / ``torch.export`` the kernels are custom ops.

    Differences from PyTorch, all deliberate: a bad input (wrong rank, channels or dtype, one
    value per channel in training, eps <= 0 in training) raises :class:`BatchNormError` (a
    ``ValueError``) *before* ``num_batches_tracked`` changes (PyTorch has already incremented
    it); momentum outside [0, 1] is refused; NaN/Inf batch statistics do not poison the running
    ones (``nonfinite``); under ``torch.utils.checkpoint`` (reentrant or not) the running
    statistics and ``num_batches_tracked`` are updated once per step, not twice (a training
    forward that runs while autograd executes a backward on this thread,
    ``torch._C._current_graph_task_id() != -1``, is the checkpointed segment run again: it
    normalises with the same statistics, bitwise, and updates nothing).

    Options for hard training conditions (keywords, attributes a training loop may change
    between steps; all off by default, and the state_dict stays PyTorch's). ``rmax``, ``dmax``
    and ``eval_mix`` take a number or a 0-d tensor and read back as floats; a value is checked
    when set (:class:`BatchNormError`, nothing changed), and under ``torch.compile`` it is an
    input of the graph, not a constant, so a schedule compiles once:

    - **Batch Renorm** (``renorm=True``, Ioffe 2017): in training, with
      :math:`\sigma = \sqrt{{running\_var + \epsilon}}` before this batch,
      :math:`r = clip(\sqrt{{\sigma_B^2 + \epsilon}} / \sigma, 1/r_{{max}}, r_{{max}})` and
      :math:`d = clip((\mu_B - running\_mean) / \sigma, -d_{{max}}, d_{{max}})`, the layer
      computes :math:`\gamma (\hat x r + d) + \beta`, r and d constants for the gradient.
      ``rmax=1, dmax=0`` is BN exactly; the paper ramps them to 3 and 5. Eval is BN's.
    - **Ghost BN** (``virtual_batch_size=v``, Hoffer et al. 2017): in training the batch is cut
      along N into pieces of v samples (the last may be smaller), each normalised with its own
      statistics; the running statistics are updated once per call from the whole batch (the
      pieces merged with Chan's formula, so they equal plain BN's). Keras 2 averaged the pieces'
      means and variances instead, which leaves out the spread between the pieces' means. Eval is
      BN's.
    - **Masks** (``forward(x, mask)``, mask a bool tensor of x's shape without the channel dim,
      True = counted): the statistics (and their gradient terms) cover the counted positions
      only; every position is normalised; ``running_var`` uses the counted n for n / (n - 1).
      In evaluation with running statistics a mask changes nothing.
    - **Test-time statistics** (``eval_stats``): in evaluation, normalise with the running
      statistics ("running", BN), the batch's own ("batch", gradients through them, as TENT
      needs) or ``eval_mix * batch + (1 - eval_mix) * running`` mean and (biased batch)
      variance ("mix"). The buffers never change in evaluation. ``fold`` and ONNX export refuse
      a layer that is not on "running".

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability. Default: 1e-5
        momentum: factor of the running-statistics update, or None for a cumulative average.
            Default: 0.1
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: True
        track_running_stats: keep running_mean, running_var and num_batches_tracked buffers and
            use them in eval. Default: True
        device, dtype: of the parameters and buffers. Default: None
        bias: with ``affine``, whether to learn beta too (keyword only). Default: True
        {nonfinite}
        renorm, rmax, dmax: Batch Renorm and its clips, ``rmax >= 1``, ``dmax >= 0`` (keyword
            only; renorm needs ``track_running_stats``, clips other than 1 and 0 need
            ``renorm=True``, when built and when set). Default: False, 1.0, 0.0
        virtual_batch_size: Ghost BN's piece size, or None (keyword only). Default: None
        eval_stats: "running", "batch" or "mix" ("mix" needs ``track_running_stats``; keyword
            only). Default: "running"
        eval_mix: the weight of the batch statistics with "mix", in [0, 1] (keyword only).
            Default: 0.0

    Shape:
        - Input: {shapes}
        - mask (optional): the input's shape without C, bool
        - Output: same as input

    Examples::

        >>> m = batchnorm.{name}(16)
        >>> y = m(torch.randn({example}))
    """


def _bn_doc(name: str, ranks: tuple[int, ...], shapes: str, example: str) -> str:
    return _BN_DOC.format(ranks=" or ".join(f"{r}D" for r in ranks), name=name, shapes=shapes,
                          example=example, nonfinite=_NONFINITE_DOC)


class BatchNorm1d(_OurBatchNorm):
    input_ranks = (2, 3)
    __doc__ = _bn_doc("BatchNorm1d", input_ranks, ":math:`(N, C)` or :math:`(N, C, L)`",
                      "8, 16, 10")


class BatchNorm2d(_OurBatchNorm):
    input_ranks = (4,)
    __doc__ = _bn_doc("BatchNorm2d", input_ranks, ":math:`(N, C, H, W)`", "8, 16, 5, 5")


class BatchNorm3d(_OurBatchNorm):
    input_ranks = (5,)
    __doc__ = _bn_doc("BatchNorm3d", input_ranks, ":math:`(N, C, D, H, W)`", "8, 16, 3, 5, 5")


class _BatchNormXd(_OurBatchNorm):
    """Ours, any rank 2..5: what ``convert`` makes of a ``torch.nn.SyncBatchNorm`` (no rank)."""

    input_ranks = (2, 3, 4, 5)


# ------------------------------------------------------------------------------------------------
# BatchNorm followed by an activation, one kernel pass each way


class _OurBatchNormAct:
    """Mixin of BatchNormAct*d: the activation arguments; forward is _OurBatchNorm's."""

    def __init__(
        self,
        num_features: int,
        act: str = "relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        inplace: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
        **options,
    ) -> None:
        negative_slope, alpha = check_act(act, negative_slope, alpha, bool(inplace))
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, nonfinite=nonfinite, **options)
        self.act = act
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.inplace = bool(inplace)

    def _act(self) -> tuple[str, float, float, bool]:
        # checked each call: they are plain attributes a user may have set to anything
        negative_slope, alpha = check_act(self.act, self.negative_slope, self.alpha, self.inplace)
        return self.act, negative_slope, alpha, self.inplace

    def activation(self) -> nn.Module:
        """The activation as a separate PyTorch module (what ``convert(to="torch")`` emits)."""
        return REGISTRY[self.act].make_module(self.negative_slope, self.alpha)

    def extra_repr(self) -> str:
        extra = f", act={self.act!r}"
        for name in REGISTRY[self.act].params:  # the constants this activation reads
            extra += f", {name}={getattr(self, name)}"
        if self.inplace:
            extra += ", inplace=True"
        return super().extra_repr() + extra


_ACT_DOC = r"""{base} then an activation, in the same kernel passes (no extra pass over memory).

    .. math::
        y = \mathrm{{act}}\Big(\frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}}
            * \gamma + \beta\Big)

    A subclass of :class:`batchnorm.{base}` with the same parameters, buffers and state_dict keys,
    so a checkpoint of a separate BN (followed by a parameter-free activation) loads into it.
    Statistics, running buffers, eval and the non-finite guard are exactly as in {base}.

    With ``inplace=True`` and an invertible activation (identity, leaky_relu with
    ``negative_slope > 0``, elu with ``alpha > 0``), training saves only the output for backward
    and recovers the normalised input from it (the InPlace-ABN method): a Conv-BN-act stack keeps
    one activation tensor per block instead of two or three. The input is not overwritten. Where
    ``|weight| < eps`` the recovery is inexact (it divides by ``sign(weight) * eps``).

    Args:
        num_features: C, the number of channels.
        act: "relu", "leaky_relu", "elu", "silu", "relu6", "hardswish" or "identity".
            Default: "relu"
        negative_slope: slope of leaky_relu for negative inputs. Default: 0.01
        alpha: the ELU scale, ``alpha * (exp(z) - 1)`` for z <= 0. Default: 1.0
        inplace: save only the output for backward (invertible act only; else BatchNormError at
            construction). Default: False
        eps, momentum, affine, track_running_stats, device, dtype, bias: as in {base}.
        {nonfinite}

    Shape:
        - Input: {shapes}
        - Output: same as input

    Examples::

        >>> m = batchnorm.{name}(16, act="leaky_relu", negative_slope=0.1, inplace=True)
        >>> y = m(torch.randn({example}))
    """


def _act_doc(name: str, base: type, shapes: str, example: str) -> str:
    return _ACT_DOC.format(base=base.__name__, name=name, shapes=shapes, example=example,
                           nonfinite=_NONFINITE_DOC)


class BatchNormAct1d(_OurBatchNormAct, BatchNorm1d):
    __doc__ = _act_doc("BatchNormAct1d", BatchNorm1d, ":math:`(N, C)` or :math:`(N, C, L)`",
                       "8, 16, 10")


class BatchNormAct2d(_OurBatchNormAct, BatchNorm2d):
    __doc__ = _act_doc("BatchNormAct2d", BatchNorm2d, ":math:`(N, C, H, W)`", "8, 16, 5, 5")


class BatchNormAct3d(_OurBatchNormAct, BatchNorm3d):
    __doc__ = _act_doc("BatchNormAct3d", BatchNorm3d, ":math:`(N, C, D, H, W)`", "8, 16, 3, 5, 5")
