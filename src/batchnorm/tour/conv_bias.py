"""§6 What BN does to the conv before it: the bias is useless, then strip it and fold BN away.

On the network trained in §1 (whose convs have no bias), the first conv gets a random bias. In
training mode BN subtracts the batch mean, so the bias changes nothing and gets no gradient; in
eval mode the running mean never saw it, so ``batchnorm.strip_bias`` moves it there. Then
``batchnorm.fold`` turns every BN into its conv's weights, measured for error and latency.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

import batchnorm

from ..protocol import is_batchnorm
from . import report as R
from .context import Context
from .nets import count_parameters

BATCH = 64
LATENCY_BATCH = 256


def with_bias(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` whose first conv has a bias, initialised as PyTorch initialises one."""
    biased = copy.deepcopy(model)
    conv = biased[0]
    torch.manual_seed(seed)  # the bias PyTorch's default init gives: U(-1/√fan_in, 1/√fan_in)
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                    bias=True)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
    biased[0] = new
    return biased


def _bn_output(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output and its first BN's output."""
    captured = {}
    handle = model[1].register_forward_hook(lambda m, i, o: captured.setdefault("bn", o))
    try:
        out = model(x)
    finally:
        handle.remove()
    return out, captured["bn"]


def latencies_ms(models: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median wall time of one forward pass of each model, in milliseconds.

    The models take turns within each repeat, so a change in the machine's load (it is shared)
    hits them alike; two warm-up rounds come first.
    """
    times = [[] for _ in models]
    with torch.no_grad():
        for i in range(repeats + 2):
            for model, bucket in zip(models, times):
                start = time.perf_counter()
                model(x)
                if i >= 2:
                    bucket.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def run(ctx: Context) -> R.Section:
    sec = R.Section("s6_conv_bias", "6 · What BN does to the conv before it")
    s = ctx.settings
    trained = ctx.models["conv-bn-relu"]
    biased = with_bias(trained, s.seed)
    bias = biased[0].bias.detach().clone()
    x = torch.from_numpy(ctx.data.x_train[:BATCH])
    y = torch.from_numpy(ctx.data.y_train[:BATCH])

    # (a) training mode: the bias moves the batch mean by exactly b, and BN subtracts it
    plain = copy.deepcopy(trained).train()
    biased.train()
    with torch.no_grad():
        out0, bn0 = _bn_output(plain, x)
        out1, bn1 = _bn_output(copy.deepcopy(biased), x)
    train_effect = {"bn_output": _max(bn0, bn1), "network_output": _max(out0, out1),
                    "bias_abs_max": float(bias.abs().max())}

    # (b) its gradient, beside the same conv's weight gradient and a bias with no BN after it
    probe = copy.deepcopy(biased).train()
    nn.functional.cross_entropy(probe(x), y).backward()
    no_bn = copy.deepcopy(ctx.models["none"]).train()
    nn.functional.cross_entropy(no_bn(x), y).backward()
    grads = {"bias_before_bn": float(probe[0].bias.grad.abs().max()),
             "weight_before_bn": float(probe[0].weight.grad.abs().max()),
             "bias_without_bn": float(no_bn[0].bias.grad.abs().max())}

    # (c) eval mode: running_mean never saw the bias, so adding it does change the output
    biased.eval()
    with torch.no_grad():
        eval_shift = _max(copy.deepcopy(trained).eval()(x), biased(x))

    # (d) strip_bias moves the bias into running_mean
    stripped, strip_report = batchnorm.strip_bias(biased, x, report=True)
    stripped.eval()
    with torch.no_grad():
        strip_eval = _max(biased(x), stripped(x))
        strip_train = _max(copy.deepcopy(biased).train()(x), copy.deepcopy(stripped).train()(x))
    strip = {"report": strip_report.to_dict(),
             "parameters_saved": strip_report.parameters_saved,
             "parameters_before": count_parameters(biased),
             "parameters_after": count_parameters(stripped),
             "eval_output_max_diff": strip_eval, "train_output_max_diff": strip_train}

    # (e) fold every BN into its conv, on the test images
    x_test = torch.from_numpy(ctx.data.x_test)
    folded, report = batchnorm.fold(stripped, x_test, report=True)
    with torch.no_grad():
        want, got = stripped(x_test), folded(x_test)
    n_bn = sum(1 for m in stripped.modules() if is_batchnorm(m))
    n_bn_after = sum(1 for m in folded.modules() if is_batchnorm(m))
    xl = x_test[:LATENCY_BATCH]
    before, after = latencies_ms([stripped, folded], xl, s.latency_repeats)
    fold_result = {
        "report": report.to_dict(), "max_error": report.max_error, "rel_error": report.rel_error,
        "layer_max_error": max(((r.max_error or 0.0) for r in report.layers), default=None),
        "measured_max_error": _max(want, got),
        "same_predictions": int((want.argmax(1) == got.argmax(1)).sum()),
        "test_images": len(x_test),
        "bn_layers_before": n_bn, "bn_layers_after": n_bn_after,
        "parameters_before": count_parameters(stripped),
        "parameters_after": count_parameters(folded),
        "timing": {"batch": len(xl), "repeats": s.latency_repeats,
                   "threads": torch.get_num_threads(),
                   "latency_before_ms": before, "latency_after_ms": after,
                   "speedup": before / after if after > 0 else None},
    }
    sec.results = {"bias": bias.tolist(), "train_effect": train_effect, "gradients": grads,
                   "eval_shift_without_strip": eval_shift, "strip_bias": strip, "fold": fold_result}

    sec.p(f"The §1 network's first conv is given a bias, initialised as PyTorch's Conv2d "
          f"initialises one (uniform in ±1/√fan_in = ±1/3; largest |b| = "
          f"{R.fmt(train_effect['bias_abs_max'])}); everything else is the trained network. "
          f"On a training batch of {BATCH} images, in training mode:")
    sec.html.append(R.table(["measurement", "value"], [
        ["max |Δ| of the first BN's output, with vs without the bias",
         R.fmt(train_effect["bn_output"])],
        ["max |Δ| of the network's output", R.fmt(train_effect["network_output"])],
        ["max |∂loss/∂bias| (conv before BN)", R.fmt(grads["bias_before_bn"])],
        ["max |∂loss/∂weight| of the same conv", R.fmt(grads["weight_before_bn"])],
        ["max |∂loss/∂bias| of the first conv in the no-BN network (§1)",
         R.fmt(grads["bias_without_bn"])],
    ]))
    sec.p("Adding b to every value of a channel moves its batch mean by exactly b and leaves its "
          "variance unchanged, so x̂ = ((x + b) − (μ_B + b))/√(σ²_B + ε) does not depend on b at "
          "all: the output does not change and the bias's gradient is zero, both up to float32 "
          "rounding. BN's β does the bias's job. Hence <code>Conv2d(..., bias=False)</code> "
          "before BN.")
    sec.p(f"In eval mode the bias does matter, by up to {R.fmt(eval_shift)} on the outputs: "
          "running_mean was estimated without it. <code>batchnorm.strip_bias</code> removes the "
          "bias and subtracts it from running_mean:")
    sec.html.append(R.table(["measurement", "value"], [
        ["parameters saved (strip_bias report)", R.fmt(strip["parameters_saved"])],
        ["parameters before → after",
         f"{strip['parameters_before']:,} → {strip['parameters_after']:,}"],
        ["max |Δ| eval output, biased vs stripped", R.fmt(strip_eval)],
        ["max |Δ| train output, biased vs stripped", R.fmt(strip_train)],
    ]))
    sec.p("At inference BN is a fixed per-channel affine map, so <code>batchnorm.fold</code> "
          "merges it into the conv before it: W′ = W·γ/√(running_var+ε), "
          "b′ = (b − running_mean)·γ/√(running_var+ε) + β.")
    layer_rows = [[r["name"], r["action"], r["into"] or "—", R.fmt(r["max_error"]),
                   R.fmt(r["rel_error"])] for r in fold_result["report"]["layers"]]
    sec.html.append(R.table(["BN layer", "action", "folded into", "max error", "relative"],
                            layer_rows, left=3))
    t = fold_result["timing"]
    sec.html.append(R.table(["measurement", "before fold", "after fold"], [
        ["BN layers", fold_result["bn_layers_before"], fold_result["bn_layers_after"]],
        ["parameters", f"{fold_result['parameters_before']:,}",
         f"{fold_result['parameters_after']:,}"],
        [f"latency, batch {t['batch']}, median of {t['repeats']} ({t['threads']} thread)",
         f"{t['latency_before_ms']:.3f} ms", f"{t['latency_after_ms']:.3f} ms"],
    ]))
    sec.p(f"Whole-model max error on the {len(x_test)} test images: fold's report "
          f"{R.fmt(report.max_error)} (relative {R.fmt(report.rel_error)}), measured again here "
          f"{R.fmt(fold_result['measured_max_error'])}; {fold_result['same_predictions']} of "
          f"{len(x_test)} predictions identical; latency ×{t['speedup']:.2f}. (Latency is the one "
          "measurement that changes from run to run.)")
    sec.summary = [
        ("bias before BN: max output change (train mode)", R.fmt(train_effect["bn_output"])),
        ("bias before BN: max |gradient|", R.fmt(grads["bias_before_bn"])),
        ("strip_bias: parameters saved / eval max |Δ|",
         f"{strip['parameters_saved']} / {R.fmt(strip_eval)}"),
        ("fold: max error (model output)", R.fmt(report.max_error)),
        ("fold: latency before → after",
         f"{t['latency_before_ms']:.3f} ms → {t['latency_after_ms']:.3f} ms (×{t['speedup']:.2f})"),
    ]
    return sec
