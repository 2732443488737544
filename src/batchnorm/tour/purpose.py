"""§1 What BN is for: one small CNN trained with and without BN, then a learning-rate sweep."""
from __future__ import annotations

import torch

from . import report as R
from .context import Context
from .nets import SmallCNN
from .training import PERCENTILES, Curves, train

LABELS = {"conv-bn-relu": "with BN (Conv-BN-ReLU)", "none": "without BN (Conv-ReLU)",
          "conv-relu-bn": "BN after ReLU (Conv-ReLU-BN)"}
COLORS = {"conv-bn-relu": "C0", "none": "C1", "conv-relu-bn": "C2"}  # same in every plot
ACC_TARGET = 0.9  # "steps to 90% test accuracy"
SWEEP_WORKS = 0.8  # a rate "works" when the run ends at >= 80% test accuracy without diverging


def train_placement(ctx: Context, placement: str, *, lr: float | None = None,
                    steps: int | None = None, eval_every: int = 1, label: str | None = None):
    """Train SmallCNN(placement) from ``torch.manual_seed(seed)`` on the tour's batches."""
    s = ctx.settings
    steps = steps or s.steps
    torch.manual_seed(s.seed)
    model = SmallCNN(placement, num_classes=ctx.data.num_classes)
    if eval_every == 1:
        eval_every = ctx.eval_every
    task = ctx.task(label or f"§1 train {LABELS[placement]}", steps)
    curves = train(model, ctx.data, name=placement, steps=steps, lr=lr or s.lr, seed=s.seed,
                   batch_size=s.batch_size, eval_every=eval_every, progress=task)
    ctx.done(task)
    return model, curves


def steps_to(curves: Curves, target: float = ACC_TARGET) -> int | None:
    """First evaluated step whose test accuracy reaches ``target`` (None if never)."""
    return next((s for s, a in zip(curves.eval_steps, curves.test_acc) if a >= target), None)


def drift(curves: Curves) -> dict:
    """How far each percentile of the probed pre-activations moved over training (max - min)."""
    return {f"p{p}": max(r[i] for r in curves.percentiles) - min(r[i] for r in curves.percentiles)
            for i, p in enumerate(PERCENTILES)}


def run_summary(curves: Curves) -> dict:
    return {**curves.to_dict(), "steps_to_90pct": steps_to(curves),
            "percentile_drift": drift(curves)}


def plot_curves(ctx: Context, runs: dict[str, Curves], name: str, title: str) -> str:
    fig, (ax_loss, ax_acc) = R.new_figure(2, width=5.6)
    for placement, c in runs.items():
        ax_loss.plot(range(1, len(c.loss) + 1), c.loss, label=LABELS[placement], lw=1,
                     color=COLORS[placement])
        ax_acc.plot(c.eval_steps, c.test_acc, label=LABELS[placement], lw=1.3,
                    color=COLORS[placement])
    ax_loss.set(title=f"{title}: training loss", xlabel="training step",
                ylabel="cross-entropy (mini-batch)", yscale="log")
    ax_acc.set(title=f"{title}: test accuracy", xlabel="training step",
               ylabel=f"accuracy on {min(len(ctx.data.y_test), 1000)} test images", ylim=(0, 1.02))
    ax_acc.axhline(ACC_TARGET, color="grey", ls=":", lw=1, label=f"{ACC_TARGET:.0%}")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    return R.save_figure(fig, ctx.out, name)


def plot_percentiles(ctx: Context, runs: dict[str, Curves], name: str, what: str) -> str:
    fig, axes = R.new_figure(len(runs), width=5.0)
    lo = min(min(r) for c in runs.values() for r in c.percentiles)
    hi = max(max(r) for c in runs.values() for r in c.percentiles)
    for ax, (key, c) in zip(axes, runs.items()):
        for i, p in enumerate(PERCENTILES):
            ax.plot(c.eval_steps, [r[i] for r in c.percentiles], label=f"{p}th percentile",
                    lw=1.4, color=("C0", "C3", "C0")[i], ls=("--", "-", ":")[i])
        ax.fill_between(c.eval_steps, [r[0] for r in c.percentiles], [r[2] for r in c.percentiles],
                        alpha=0.12, color="C0")
        ax.set(title=LABELS.get(key, key), xlabel="training step", ylabel=what,
               ylim=(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return R.save_figure(fig, ctx.out, name)


def lr_sweep(ctx: Context) -> dict:
    s = ctx.settings
    rows = {}
    for placement in ("conv-bn-relu", "none"):
        rows[placement] = []
        for lr in s.sweep_rates:
            _, c = train_placement(ctx, placement, lr=lr, steps=s.sweep_steps,
                                   eval_every=s.sweep_steps,
                                   label=f"§1 sweep {LABELS[placement].split(' (')[0]}, lr {lr:g}")
            acc = c.final_test_acc
            rows[placement].append({
                "lr": lr, "diverged_at": c.diverged_at, "final_test_acc": acc,
                "final_loss": c.to_dict()["final_loss"],
                "works": acc is not None and acc >= SWEEP_WORKS,
            })
    return rows


def plot_sweep(ctx: Context, sweep: dict, name: str) -> str:
    fig, (ax,) = R.new_figure(1, width=6.4)
    for placement, rows in sweep.items():
        lrs = [r["lr"] for r in rows]
        accs = [r["final_test_acc"] if r["final_test_acc"] is not None else 0.0 for r in rows]
        ax.plot(lrs, accs, marker="o", label=LABELS[placement], color=COLORS[placement])
        div = [(r["lr"], 0.0) for r in rows if r["diverged_at"] is not None]
        if div:
            ax.scatter(*zip(*div), marker="x", s=90, color=COLORS[placement], zorder=3,
                       label=f"{LABELS[placement].split(' (')[0]}: diverged (loss not finite)")
    ax.axhline(SWEEP_WORKS, color="grey", ls=":", lw=1,
               label=f"'works' threshold {SWEEP_WORKS:.0%}")
    ax.set(xscale="log", xlabel="learning rate (SGD, momentum 0.9)", ylim=(-0.03, 1.03),
           ylabel=f"test accuracy after {ctx.settings.sweep_steps} steps",
           title="Learning-rate sweep: which rates each network tolerates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return R.save_figure(fig, ctx.out, name)


def run(ctx: Context) -> R.Section:
    s = ctx.settings
    sec = R.Section("s1_purpose", "1 · What BN is for")
    if s.quick:
        sec.p(f"<strong>{R.esc(s.QUICK_NOTE)}</strong>")
    runs = {}
    for placement in ("conv-bn-relu", "none"):
        ctx.models[placement], runs[placement] = train_placement(ctx, placement)
        ctx.curves[placement] = runs[placement]
    sweep = lr_sweep(ctx)
    bn, plain = (run_summary(runs[k]) for k in ("conv-bn-relu", "none"))
    sec.results = {"with_bn": bn, "without_bn": plain, "lr_sweep": sweep,
                   "probe": "pre-activations of the second conv block (input of its ReLU), "
                            "all channels and positions on the test images, eval mode"}

    sec.p(f"The same small CNN (three 3×3 conv blocks of 16, 32, 32 channels, a 2×2 max-pool, "
          f"global average pooling, a linear classifier) is trained twice from seed {s.seed}, on "
          f"the same {s.steps} mini-batches of {s.batch_size} images ({R.esc(ctx.data.source)}), "
          f"with SGD at learning rate {s.lr:g}, momentum 0.9: once with a BatchNorm2d after each "
          "convolution, once without. Test accuracy is measured "
          + ("after every step." if ctx.eval_every == 1 else f"every {ctx.eval_every} steps."))
    sec.fig(plot_curves(ctx, runs, "s1_curves.png", "With vs without BN"),
            "Training loss at every step (left) and test accuracy (right), same seed and batches.")
    rows = [[LABELS[k], r["final_loss"], R.fmt(r["final_test_acc"]),
             r["steps_to_90pct"] or s.not_reached()]
            for k, r in (("conv-bn-relu", bn), ("none", plain))]
    sec.html.append(R.table(["network", "final training loss", "final test accuracy",
                             f"first step with ≥ {ACC_TARGET:.0%} test accuracy"],
                            [[a, R.fmt(b), c, d] for a, b, c, d in rows]))
    sec.p("Ioffe &amp; Szegedy's Figure 1 follows the 15th, 50th and 85th percentiles of a hidden "
          "unit's input over training. Here: the pre-activations of the second conv block (the "
          "values its ReLU receives), over all channels and positions of the test images, in eval "
          "mode (so at step 0 the BN network still uses the initial running statistics, mean 0 "
          "and variance 1). Without BN nothing holds them in place: they can drift as the layers "
          "below them learn (the internal covariate shift BN was designed against).")
    sec.fig(plot_percentiles(ctx, runs, "s1_percentiles.png", "pre-activation value"),
            "15th / 50th / 85th percentiles of the second block's pre-activations during training.")
    sec.html.append(R.table(
        ["network", "p15 moved by", "p50 moved by", "p85 moved by", "final p15", "final p50",
         "final p85"],
        [[LABELS[k], *(R.fmt(r["percentile_drift"][f"p{p}"]) for p in PERCENTILES),
          *(R.fmt(r["percentiles"][f"p{p}"][-1]) for p in PERCENTILES)]
         for k, r in (("conv-bn-relu", bn), ("none", plain))]))
    half = s.steps // 2
    late = {k: _late_move(runs[k], half) for k in runs}
    sec.results["percentile_move_second_half"] = late
    sec.p(f"Over the second half of training (steps {half}–{s.steps}) the median moved by "
          f"{R.fmt(late['conv-bn-relu']['p50'])} with BN and {R.fmt(late['none']['p50'])} without; "
          f"the 15–85 spread changed by {R.fmt(late['conv-bn-relu']['spread'])} with BN and "
          f"{R.fmt(late['none']['spread'])} without.")
    sec.p(f"The learning-rate sweep trains each network for {s.sweep_steps} steps at each rate, "
          f"same seed. A rate <em>works</em> when the run ends at ≥ {SWEEP_WORKS:.0%} test "
          "accuracy without the loss becoming NaN or infinite. (A final loss near ln 10 ≈ 2.30 "
          "means the network still guesses uniformly among the 10 classes.)")
    sec.fig(plot_sweep(ctx, sweep, "s1_lr_sweep.png"),
            "Final test accuracy per learning rate; a cross marks a run whose loss became "
            "non-finite.")
    sec.html.append(R.table(
        ["learning rate", *(f"{LABELS[k]}: test accuracy (final training loss)" for k in sweep)],
        [[f"{lr:g}", *(R.Raw(_sweep_cell(sweep[k][i])) for k in sweep)]
         for i, lr in enumerate(s.sweep_rates)]))
    works = {k: [r["lr"] for r in rows if r["works"]] for k, rows in sweep.items()}
    sec.results["rates_that_work"] = works
    listed = {k: ", ".join(f"{lr:g}" for lr in v) or s.none_worked() for k, v in works.items()}
    sec.p(f"Rates that work — with BN: {listed['conv-bn-relu']}; without BN: {listed['none']}.")
    sec.summary = [
        ("final test accuracy, with / without BN",
         f"{R.fmt(bn['final_test_acc'])} / {R.fmt(plain['final_test_acc'])}"),
        (f"steps to {ACC_TARGET:.0%}, with / without BN",
         f"{bn['steps_to_90pct'] or s.not_reached()} / "
         f"{plain['steps_to_90pct'] or s.not_reached()}"),
        ("median pre-activation moved by, with / without BN",
         f"{R.fmt(bn['percentile_drift']['p50'])} / {R.fmt(plain['percentile_drift']['p50'])}"),
        ("learning rates that work, with BN", listed["conv-bn-relu"]),
        ("learning rates that work, without BN", listed["none"]),
    ]
    return sec


def _late_move(curves: Curves, start: int) -> dict:
    """Range of the median and of the p15-p85 spread over evaluations at steps >= ``start``."""
    rows = [r for st, r in zip(curves.eval_steps, curves.percentiles) if st >= start]
    med = [r[1] for r in rows]
    spread = [r[2] - r[0] for r in rows]
    return {"p50": max(med) - min(med), "spread": max(spread) - min(spread)}


def _sweep_cell(row: dict) -> str:
    if row["diverged_at"] is not None:
        return f'<span class="bad">diverged at step {row["diverged_at"]}</span>'
    text = f'{R.fmt(row["final_test_acc"])} (loss {R.fmt(row["final_loss"], 3)})'
    return f'<span class="ok">{text}</span>' if row["works"] else R.esc(text)
