"""``batchnorm experiment shift``: the tour's digits CNN against shifted test digits.

A small CNN with Conv → BN → ReLU blocks is trained on the clean digits, then tested on the test
digits shifted in ways a camera or a scanner shifts them (generated here, nothing downloaded):

- **contrast**: ``0.5 x + 0.4`` (contrast halved, brighter);
- **brightness**: ``x + 0.5``;
- **inversion**: ``1 - x`` (white digits on black become black on white), a control: a
  per-channel affine change of the statistics cannot undo a sign flip after the first conv's
  ReLU, so BN-only adaptation is not expected to help there.

For each test set: accuracy in eval as is; what :func:`batchnorm.diagnose` reports; accuracy
after AdaBN and after TENT (:func:`batchnorm.adapt`). The claims of the methods are judged
against this run's numbers, nothing asserted in advance:

1. "a shift of the input statistics breaks a BN network in eval" (accuracy on a shifted set
   below 50%, where the clean test set is above 90%);
2. "diagnose sees it": the verdict says recalibrate on each shifted set, and not on the clean
   test set;
3. AdaBN (Li et al. 2016) "restores the accuracy": within 5 points of the clean test accuracy;
4. TENT (Wang et al. 2021) likewise.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adaptation import adapt
from ..diagnosis import diagnose
from . import report as R
from .data import load
from .nets import SmallCNN
from .training import as_tensors, deterministic, task_progress

SHIFTS = {
    "clean": lambda x: x,
    "contrast": lambda x: 0.5 * x + 0.4,
    "brightness": lambda x: x + 0.5,
    "inversion": lambda x: 1.0 - x,
}
CLAIMS = {
    "breaks": "a shift of the input statistics breaks a BN network in eval",
    "diagnosed": "batchnorm.diagnose reports the drift on shifted data, and none on clean data",
    "adabn": "AdaBN restores the accuracy on shifted data",
    "tent": "TENT restores the accuracy on shifted data",
}
RESTORED = 0.05  # within this of the clean accuracy counts as restored


@dataclass(frozen=True)
class Config:
    steps: int = 300
    lr: float = 1e-2  # Adam
    batch_size: int = 64
    tent_lr: float = 1e-3
    tent_steps: int = 1
    seed: int = 0


def train_model(config: Config, x: torch.Tensor, y: torch.Tensor, progress=None) -> SmallCNN:
    torch.manual_seed(config.seed)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    for step in range(config.steps):
        idx = torch.randint(0, len(x), (config.batch_size,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress[0].update(progress[1], completed=step + 1)
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def judge(rows: dict) -> dict:
    clean = rows["clean"]["eval"]
    shifted = [k for k in rows if k not in ("clean", "inversion")]
    return {
        "breaks": {"holds": clean > 0.9 and all(rows[k]["eval"] < 0.5 for k in shifted),
                   "clean": clean, **{k: rows[k]["eval"] for k in shifted}},
        "diagnosed": {"holds": not rows["clean"]["drifting"]
                      and all(rows[k]["drifting"] for k in shifted),
                      **{k: rows[k]["verdict"] for k in rows}},
        "adabn": {"holds": all(rows[k]["adabn"] >= clean - RESTORED for k in shifted),
                  **{k: rows[k]["adabn"] for k in shifted}},
        "tent": {"holds": all(rows[k]["tent"] >= clean - RESTORED for k in shifted),
                 **{k: rows[k]["tent"] for k in shifted}},
    }


def run_shift(out: str | Path = "reports/shift", *, steps: int | None = None, seed: int = 0,
              data: str | Path | None = None, console=None) -> dict:
    """Train, shift, diagnose, adapt; write ``out/index.html``, ``out/shift.png`` and
    ``out/results.json``; print the verdicts."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    config = Config(seed=seed) if steps is None else Config(steps=steps, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset = load(data, seed=seed)
    x_train, y_train, x_test, y_test = as_tensors(dataset)
    progress = task_progress(console)
    rows = {}
    with deterministic(), progress:
        task = progress.add_task("shift: train the CNN", total=config.steps)
        model = train_model(config, x_train, y_train, (progress, task))
        task = progress.add_task("shift: diagnose and adapt", total=len(SHIFTS))
        for name, shift in SHIFTS.items():
            x = shift(x_test)
            batches = list(x.split(config.batch_size))
            found = diagnose(model, batches, batches=None, progress=False)
            adabn = adapt(model, batches, "adabn", progress=False)
            tent = adapt(model, batches, "tent", steps=config.tent_steps, lr=config.tent_lr,
                         progress=False)
            worst = found.layers[0]
            rows[name] = {"eval": accuracy(model, x, y_test), "adabn": accuracy(adabn, x, y_test),
                          "tent": accuracy(tent, x, y_test), "verdict": found.verdict,
                          "drifting": found.drifting, "worst_layer": worst.name,
                          "worst_effect": worst.effect,
                          "worst_shift": max(abs(r.shift_worst) for r in found.layers)}
            progress.advance(task)
    verdicts = judge(rows)
    elapsed = time.perf_counter() - started

    sec = R.Section("shift", "BN statistics under a shift of the data")
    plot = _plot(out, rows)
    sec.p(f"A CNN of three Conv → BN → ReLU blocks trained on {R.esc(dataset.source)} "
          f"({dataset.describe()['train']} images, {config.steps} Adam steps of "
          f"{config.batch_size}, learning rate {config.lr:g}, seed {seed}), then tested on the "
          f"{len(y_test)} test images as they are and shifted: contrast <code>0.5 x + 0.4</code>, "
          "brightness <code>x + 0.5</code>, inversion <code>1 − x</code> (a control: a sign "
          "flip is not a change of per-channel statistics). For each test set: accuracy in eval "
          "as is, what <code>batchnorm.diagnose</code> reports, and accuracy after AdaBN "
          "(exact recalibration on the test set) and after TENT (batch statistics, BN affine "
          f"trained on prediction entropy: {config.tent_steps} Adam step(s) per batch of "
          f"{config.batch_size}, learning rate {config.tent_lr:g}).")
    sec.fig(plot, "Test accuracy per test set: the model as is, after AdaBN, after TENT.")
    sec.html.append(R.table(
        ["test set", "eval as is", "diagnose", "worst effect", "AdaBN", "TENT"],
        [[k, R.fmt(r["eval"]), r["verdict"], f"{r['worst_effect']:.1%} ({r['worst_layer']})",
          R.fmt(r["adabn"]), R.fmt(r["tent"])] for k, r in rows.items()], left=3))
    claim_rows = [[CLAIMS[c], R.verdict(v["holds"], "shown", "not shown"),
                   "; ".join(f"{k}: {R.fmt(val) if isinstance(val, float) else val}"
                             for k, val in v.items() if k != "holds")]
                  for c, v in verdicts.items()]
    sec.html.append("<h3>The claims, checked against this run</h3>")
    sec.html.append(R.table(["claim", "this run", "numbers"], claim_rows, left=3))
    results = {
        "schema": "batchnorm.shift/1",
        "config": vars(config) | {"restored_within": RESTORED},
        "data": dataset.describe(),
        "rows": rows,
        "claims": {k: {"claim": CLAIMS[k], **v} for k, v in verdicts.items()},
        "figures": sec.figures, "timing": {"total_s": elapsed},
    }
    meta = (f"seed {seed} · {config.steps} steps · data: {R.esc(dataset.source)} · "
            f"torch {R.esc(torch.__version__)} · {elapsed:.1f} s")
    R.write_html(out, "BN under a data shift: diagnose, AdaBN, TENT", "", [sec], meta)
    R.write_json(out, results)

    table = Table(title="Shifted digits: accuracy", title_justify="left")
    for col in ("test set", "eval as is", "diagnose", "AdaBN", "TENT"):
        table.add_column(col)
    for k, r in rows.items():
        table.add_row(k, R.fmt(r["eval"]), r["verdict"], R.fmt(r["adabn"]), R.fmt(r["tent"]))
    console.print(table)
    console.print(R.claims_table("The claims against this run", CLAIMS, verdicts))
    console.print(f"Report: [bold]{out / 'index.html'}[/]  ·  {elapsed:.1f} s")
    return results


def _plot(out: Path, rows: dict) -> str:
    fig, (ax,) = R.new_figure(1, width=7.0, height=4.0)
    names = list(rows)
    for i, (key, label) in enumerate((("eval", "as is"), ("adabn", "AdaBN"), ("tent", "TENT"))):
        ax.bar([j + (i - 1) * 0.27 for j in range(len(names))], [rows[n][key] for n in names],
               0.27, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set(title="Test accuracy on shifted digits", ylabel="test accuracy", ylim=(0, 1.05))
    ax.axhline(rows["clean"]["eval"], color="grey", ls=":", lw=1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return R.save_figure(fig, out, "shift.png")
