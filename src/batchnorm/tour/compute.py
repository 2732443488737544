"""§2 How BN computes: the formulas, then one channel of real data worked through by hand.

The channel is the first conv's channel 0 on four test digits, in the network trained in §1, so
γ, β and the running statistics are learned values. Every step is computed in float64 NumPy and
then checked against the trained BatchNorm2d layer itself (a copy, in training mode).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from . import report as R
from .context import Context

FORMULAS = """μ_B = (1/m) · Σᵢ xᵢ                      (batch mean; m = N·H·W values per channel)
σ²_B = (1/m) · Σᵢ (xᵢ − μ_B)²               (biased batch variance, used to normalise)
x̂ᵢ = (xᵢ − μ_B) / √(σ²_B + ε)                (ε = 1e-5)
yᵢ = γ · x̂ᵢ + β                               (γ = weight, β = bias: learned, start at 1 and 0)
running_mean ← (1 − momentum) · running_mean + momentum · μ_B
running_var  ← (1 − momentum) · running_var  + momentum · σ²_B · m/(m − 1)   (unbiased)"""

BATCH = 4
CHANNEL = 0


def run(ctx: Context) -> R.Section:
    sec = R.Section("s2_compute", "2 · How BN computes")
    model = ctx.models["conv-bn-relu"]
    conv, bn = model[0], copy.deepcopy(model[1])
    images = torch.from_numpy(ctx.data.x_test[:BATCH])
    with torch.no_grad():
        feature = conv(images)  # (4, 16, H, W)
    x = feature[:, CHANNEL].double().numpy()  # (4, H, W)
    m = x.size
    eps, momentum = bn.eps, bn.momentum
    gamma = float(bn.weight.detach()[CHANNEL])
    beta = float(bn.bias.detach()[CHANNEL])
    rm, rv = float(bn.running_mean[CHANNEL]), float(bn.running_var[CHANNEL])

    total = x.sum()
    mean = total / m
    sq = ((x - mean) ** 2).sum()
    var = sq / m
    unbiased = sq / (m - 1)
    denom = np.sqrt(var + eps)
    xhat = (x - mean) / denom
    y = gamma * xhat + beta
    new_rm = (1 - momentum) * rm + momentum * mean
    new_rv = (1 - momentum) * rv + momentum * unbiased

    bn.train()
    with torch.no_grad():
        layer_y = bn(feature)[:, CHANNEL].double().numpy()
    check = {
        "output": float(np.abs(layer_y - y).max()),
        "running_mean": abs(float(bn.running_mean[CHANNEL]) - new_rm),
        "running_var": abs(float(bn.running_var[CHANNEL]) - new_rv),
    }
    flat = x.reshape(-1)
    picks = np.linspace(0, m - 1, 6).round().astype(int)
    examples = [{"index": int(i), "x": flat[i], "x_minus_mean": flat[i] - mean,
                 "x_hat": xhat.reshape(-1)[i], "y": y.reshape(-1)[i]} for i in picks]
    sec.results = {
        "layer": f"BatchNorm2d after the first conv of the §1 network, channel {CHANNEL}",
        "batch": BATCH, "m": m, "eps": eps, "momentum": momentum, "gamma": gamma, "beta": beta,
        "sum": total, "mean": mean, "sum_sq_dev": sq, "var_biased": var, "var_unbiased": unbiased,
        "sqrt_var_eps": denom, "running_mean_before": rm, "running_var_before": rv,
        "running_mean_after": new_rm, "running_var_after": new_rv,
        "x_hat_mean": float(xhat.mean()), "x_hat_var": float(xhat.var()),
        "y_mean": float(y.mean()), "y_std": float(y.std()),
        "examples": examples, "max_diff_vs_layer": check,
    }

    sec.p("Per channel, over every other axis (batch, height, width):")
    sec.html.append(f'<div class="formula">{R.esc(FORMULAS)}</div>')
    h, w = x.shape[1:]
    sec.p(f"Worked through on real numbers: the first convolution of the network trained in §1, "
          f"applied to {BATCH} test digits; channel {CHANNEL} holds m = {BATCH}·{h}·{w} = {m} "
          "values. "
          f"Its BN layer learned γ = {R.fmt(gamma, 6)}, β = {R.fmt(beta, 6)}.")
    steps = [
        ["Σ x", "sum of the m values", R.fmt(total, 6)],
        ["μ_B = Σx / m", f"{R.fmt(total, 6)} / {m}", R.fmt(mean, 6)],
        ["Σ (x − μ_B)²", "sum of squared deviations", R.fmt(sq, 6)],
        ["σ²_B = Σ(x − μ_B)² / m", f"{R.fmt(sq, 6)} / {m}  (biased)", R.fmt(var, 6)],
        ["√(σ²_B + ε)", f"√({R.fmt(var, 6)} + {eps:g})", R.fmt(denom, 6)],
        ["running_mean", f"{1 - momentum:g}·{_p(rm)} + {momentum:g}·{_p(mean)}",
         R.fmt(new_rm, 6)],
        ["running_var", f"{1 - momentum:g}·{_p(rv)} + {momentum:g}·{_p(unbiased)} "
         f"(unbiased: σ²_B·{m}/{m - 1})", R.fmt(new_rv, 6)],
    ]
    sec.html.append(R.table(["quantity", "computation", "value"], steps, left=2))
    sec.p("Six of the channel's values through the formula:")
    sec.html.append(R.table(
        ["position", "x", "x − μ_B", "x̂ = (x − μ_B)/√(σ²_B+ε)", "y = γ·x̂ + β"],
        [[e["index"], R.fmt(e["x"], 6), R.fmt(e["x_minus_mean"], 6), R.fmt(e["x_hat"], 6),
          R.fmt(e["y"], 6)] for e in examples]))
    sec.p(f"After normalising, x̂ has mean {R.fmt(xhat.mean(), 3)} and variance "
          f"{R.fmt(xhat.var(), 6)} (exactly 1 − ε/(σ²_B+ε) = {R.fmt(var / (var + eps), 6)}); "
          f"y has mean β = {R.fmt(y.mean(), 6)} and standard deviation ≈ |γ| = "
          f"{R.fmt(y.std(), 6)}.")
    sec.p("The same channel through the trained <code>BatchNorm2d</code> itself (a copy, in "
          "training mode) differs from the hand computation by at most: output "
          f"{R.fmt(check['output'])}, running_mean {R.fmt(check['running_mean'])}, running_var "
          f"{R.fmt(check['running_var'])} (float32 layer vs float64 by hand).")
    sec.fig(_plot(ctx, x, y, gamma, beta),
            "The channel's values before BN (left) and after (right).")
    sec.summary = [
        ("channel worked through", f"m = {m}, μ_B = {R.fmt(mean, 6)}, σ²_B = {R.fmt(var, 6)}"),
        ("hand computation vs the layer, max |diff|", R.fmt(max(check.values()))),
    ]
    return sec


def _p(value: float) -> str:
    """A factor in a written-out product: negative values in parentheses."""
    text = R.fmt(value, 6)
    return f"({text})" if value < 0 else text


def _plot(ctx: Context, x: np.ndarray, y: np.ndarray, gamma: float, beta: float) -> str:
    fig, (a, b) = R.new_figure(2, width=5.0, height=3.4)
    a.hist(x.reshape(-1), bins=30, color="C0", label="x (conv output)")
    a.axvline(x.mean(), color="k", ls="--", lw=1, label=f"μ_B = {x.mean():.3f}")
    a.set(title=f"Before BN: channel {CHANNEL} of the first conv", xlabel="value", ylabel="count")
    b.hist(y.reshape(-1), bins=30, color="C2", label="y = γ·x̂ + β")
    b.axvline(beta, color="k", ls="--", lw=1, label=f"β = {beta:.3f}")
    b.set(title=f"After BN (γ = {gamma:.3f})", xlabel="value", ylabel="count")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return R.save_figure(fig, ctx.out, "s2_channel.png")
