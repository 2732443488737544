"""Ioffe & Szegedy 2015, Figure 1 (a)-(c), rerun: a sigmoid MLP with and without BN.

The paper trains a network of 3 fully-connected hidden layers of 100 sigmoid units on MNIST
(weights from small random Gaussians, mini-batches of 60) with and without BN before each
sigmoid, and shows (a) test accuracy against training steps, (b, c) the 15th/50th/85th
percentiles of one sigmoid's input over training. Its claims:

1. BN "helps the network train faster" — measured as the first step reaching a test accuracy
   target, and the mean test accuracy over the run;
2. and "achieve higher accuracy" — the final test accuracy;
3. BN "makes the distribution more stable and reduces the internal covariate shift" — measured
   as how far the sigmoid input's percentiles move after the first tenth of training, in units
   of that input's final 15-85 spread (so a network whose inputs are simply larger is not
   penalised).

Each claim gets a verdict computed from this run's numbers; nothing is asserted in advance.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import report as R
from .data import Dataset, load
from .nets import SigmoidMLP, init_small_gaussian
from .training import MAX_TEST, PERCENTILES, Curves, deterministic, task_progress, train

CLAIMS = {
    "faster": "Batch Normalization helps the network train faster",
    "higher_accuracy": "... and achieve higher accuracy",
    "stable": "Batch Normalization makes the distribution (of a sigmoid's input) more stable "
              "and reduces the internal covariate shift",
}
LABELS = {"bn": "with BN", "plain": "without BN"}


@dataclass(frozen=True)
class Config:
    steps: int = 5000
    lr: float = 0.5  # plain SGD (no momentum), the same for both networks
    batch_size: int = 60  # the paper's
    init_std: float = 0.1  # "small random Gaussian values"
    probe_unit: int = 0  # which sigmoid of the last hidden layer to follow
    evals: int = 100  # test evaluations over the run
    target: float = 0.9  # accuracy for "steps to target"
    seed: int = 0

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.evals)


def build(bn: bool, data: Dataset, config: Config) -> SigmoidMLP:
    torch.manual_seed(config.seed)
    inputs = int(torch.tensor(data.image_shape).prod())
    model = SigmoidMLP(inputs, data.num_classes, bn=bn)
    init_small_gaussian(model, config.init_std, torch.Generator().manual_seed(config.seed))
    return model


def measure(c: Curves, config: Config) -> dict:
    """The numbers each claim is judged on."""
    steps, acc = c.eval_steps, c.test_acc
    reach = next((s for s, a in zip(steps, acc) if a >= config.target), None)
    start = config.steps // 10
    later = [row for s, row in zip(steps, c.percentiles) if s >= start]
    final = c.percentiles[-1]
    width = final[2] - final[0]
    moved = {f"p{p}": max(r[i] for r in later) - min(r[i] for r in later)
             for i, p in enumerate(PERCENTILES)}
    return {
        "steps_to_target": reach, "mean_test_acc": sum(acc[1:]) / max(1, len(acc) - 1),
        "final_test_acc": c.final_test_acc, "diverged_at": c.diverged_at,
        "percentile_moved_after_first_tenth": moved,
        "final_spread_p85_minus_p15": width,
        "relative_shift": max(moved.values()) / width if width > 0 else None,
    }


def judge(m: dict) -> dict:
    """Each claim: holds or not, and the numbers behind the verdict."""
    bn, plain = m["bn"], m["plain"]
    big = float("inf")
    bn_steps, plain_steps = bn["steps_to_target"], plain["steps_to_target"]
    faster = ((bn_steps or big) < (plain_steps or big)
              or (bn_steps is not None and bn_steps == plain_steps
                  and bn["mean_test_acc"] > plain["mean_test_acc"]))
    higher = (bn["final_test_acc"] or 0.0) > (plain["final_test_acc"] or 0.0)
    stable = (bn["relative_shift"] is not None and plain["relative_shift"] is not None
              and bn["relative_shift"] < plain["relative_shift"])
    return {
        "faster": {"holds": faster, "bn_steps_to_target": bn_steps,
                   "plain_steps_to_target": plain_steps,
                   "bn_mean_test_acc": bn["mean_test_acc"],
                   "plain_mean_test_acc": plain["mean_test_acc"]},
        "higher_accuracy": {"holds": higher, "bn_final_test_acc": bn["final_test_acc"],
                            "plain_final_test_acc": plain["final_test_acc"]},
        "stable": {"holds": stable, "bn_relative_shift": bn["relative_shift"],
                   "plain_relative_shift": plain["relative_shift"]},
    }


def run_figure1(out: str | Path = "reports/figure1", *, steps: int | None = None, seed: int = 0,
                data: str | Path | None = None, console=None) -> dict:
    """Train both networks, write ``out/index.html``, ``out/*.png``, ``out/results.json``."""
    from rich.console import Console

    console = console or Console()
    config = Config(seed=seed) if steps is None else Config(steps=steps, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset = load(data, seed=seed)
    progress = task_progress(console)
    curves = {}
    with deterministic(), progress:
        for key in ("bn", "plain"):
            model = build(key == "bn", dataset, config)
            task = progress.add_task(f"figure 1: train {LABELS[key]}", total=config.steps)
            curves[key] = train(model, dataset, name=key, steps=config.steps, lr=config.lr,
                                seed=seed, batch_size=config.batch_size,
                                eval_every=config.eval_every, probe_unit=config.probe_unit,
                                momentum=0.0, progress=(progress, task))
            progress.update(task, completed=config.steps)
    measured = {k: measure(c, config) for k, c in curves.items()}
    verdicts = judge(measured)
    elapsed = time.perf_counter() - started

    sec = R.Section("figure1", "Ioffe & Szegedy 2015, Figure 1, rerun")
    fig_a = _plot_accuracy(out, curves, config)
    fig_bc = _plot_percentiles(out, curves, config)
    n_test = min(len(dataset.y_test), MAX_TEST)
    sec.p(f"Two networks of 3 fully-connected hidden layers of 100 sigmoid units on "
          f"{R.esc(dataset.source)} ({dataset.describe()['train']} training images), one with "
          "BatchNorm1d before each sigmoid (and no bias in the linear layer it follows), one "
          f"without; same seed ({seed}), same weights init N(0, {config.init_std:g}²), same "
          f"{config.steps} mini-batches of {config.batch_size}, plain SGD at learning rate "
          f"{config.lr:g}. Test accuracy on {n_test} test images every {config.eval_every} steps.")
    sec.p("The paper ran 50,000 steps on MNIST; the default here is the bundled 8×8 digits "
          "(pass <code>--data</code> with MNIST files and <code>--steps 50000</code> for the "
          "original setting). Its learning rate is not stated; this one is the same for both "
          "networks.")
    sec.fig(fig_a, "(a) Test accuracy against training steps.")
    sec.fig(fig_bc, f"(b, c) 15th/50th/85th percentiles of the input of sigmoid "
                    f"{config.probe_unit} in the last hidden layer, over the test images.")
    rows = []
    for claim, v in verdicts.items():
        if claim == "faster":
            numbers = (f"first step ≥ {config.target:.0%}: "
                       f"{v['bn_steps_to_target'] or 'never'} with BN, "
                       f"{v['plain_steps_to_target'] or 'never'} without; mean test accuracy "
                       f"{R.fmt(v['bn_mean_test_acc'])} vs {R.fmt(v['plain_mean_test_acc'])}")
        elif claim == "higher_accuracy":
            numbers = (f"final test accuracy {R.fmt(v['bn_final_test_acc'])} with BN vs "
                       f"{R.fmt(v['plain_final_test_acc'])} without")
        else:
            numbers = (f"largest percentile move after step {config.steps // 10}, in units of the "
                       f"final 15–85 spread: {R.fmt(v['bn_relative_shift'])} with BN vs "
                       f"{R.fmt(v['plain_relative_shift'])} without")
        rows.append([CLAIMS[claim], R.verdict(v["holds"], "shown", "not shown"), numbers])
    sec.html.append("<h3>The paper's claims, checked against this run</h3>")
    sec.html.append(R.table(["claim (Ioffe & Szegedy 2015, Fig. 1)", "this run", "numbers"], rows,
                            left=3))
    sec.html.append(R.table(
        ["network", "final test accuracy", "first step ≥ target", "mean test accuracy",
         "p15 moved", "p50 moved", "p85 moved", "final p85 − p15"],
        [[LABELS[k], R.fmt(m["final_test_acc"]), m["steps_to_target"] or "never",
          R.fmt(m["mean_test_acc"]),
          *(R.fmt(m["percentile_moved_after_first_tenth"][f"p{p}"]) for p in PERCENTILES),
          R.fmt(m["final_spread_p85_minus_p15"])] for k, m in measured.items()]))
    results = {
        "schema": "batchnorm.figure1/1",
        "config": {**vars(config), "eval_every": config.eval_every, "momentum": 0.0},
        "data": dataset.describe(),
        "curves": {k: c.to_dict() for k, c in curves.items()},
        "measured": measured, "claims": {k: {"claim": CLAIMS[k], **v} for k, v in verdicts.items()},
        "figures": sec.figures, "timing": {"total_s": elapsed},
    }
    meta = (f"seed {seed} · {config.steps} steps · data: {R.esc(dataset.source)} · "
            f"torch {R.esc(torch.__version__)} · {elapsed:.1f} s")
    R.write_html(out, "Batch Normalization: Ioffe & Szegedy's Figure 1, rerun", "", [sec], meta)
    R.write_json(out, results)

    console.print(R.claims_table("Figure 1: the paper's claims against this run", CLAIMS,
                                 verdicts))
    for key, m in measured.items():
        console.print(f"{LABELS[key]}: final test accuracy {R.fmt(m['final_test_acc'])}, "
                      "first step "
                      f"≥ {config.target:.0%}: {m['steps_to_target'] or 'never'}, relative shift "
                      f"of the sigmoid input {R.fmt(m['relative_shift'])}")
    console.print(f"Report: [bold]{out / 'index.html'}[/]  ·  {elapsed:.1f} s")
    return results


def _plot_accuracy(out: Path, curves: dict[str, Curves], config: Config) -> str:
    fig, (ax,) = R.new_figure(1, width=6.4, height=4.0)
    for key, c in curves.items():
        ax.plot(c.eval_steps, c.test_acc, label=LABELS[key], lw=1.5)
    ax.axhline(config.target, color="grey", ls=":", lw=1, label=f"{config.target:.0%}")
    ax.set(title="(a) Test accuracy, with and without BN", xlabel="training step",
           ylabel="test accuracy", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    return R.save_figure(fig, out, "figure1_a_accuracy.png")


def _plot_percentiles(out: Path, curves: dict[str, Curves], config: Config) -> str:
    fig, axes = R.new_figure(2, width=5.0, height=4.0)
    for ax, key, letter in zip(axes, ("plain", "bn"), "bc"):
        c = curves[key]
        for i, p in enumerate(PERCENTILES):
            ax.plot(c.eval_steps, [r[i] for r in c.percentiles], label=f"{p}th percentile",
                    color=("C0", "C3", "C0")[i], ls=("--", "-", ":")[i])
        ax.set(title=f"({letter}) sigmoid input, {LABELS[key]}", xlabel="training step",
               ylabel=f"input of sigmoid {config.probe_unit}, last hidden layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return R.save_figure(fig, out, "figure1_bc_percentiles.png")
