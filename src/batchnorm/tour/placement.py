"""§5 Where BN goes: Conv-BN-ReLU vs Conv-ReLU-BN vs no BN on the digits, and what inspect says.

Conv-BN-ReLU and no-BN are the two runs of §1; Conv-ReLU-BN is trained here with the same
seed, batches, steps and learning rate.
"""
from __future__ import annotations

import copy

import torch

import batchnorm

from . import report as R
from .context import Context
from .parameters import _findings_table
from .purpose import LABELS, plot_curves, run_summary, train_placement

ORDER = ("conv-bn-relu", "conv-relu-bn", "none")


def run(ctx: Context) -> R.Section:
    sec = R.Section("s5_placement", "5 · Where BN goes")
    model, curves = train_placement(ctx, "conv-relu-bn", label=f"§5 train {LABELS['conv-relu-bn']}")
    ctx.models["conv-relu-bn"], ctx.curves["conv-relu-bn"] = model, curves
    example = torch.from_numpy(ctx.data.x_test[:8])
    results = {}
    for placement in ORDER:
        deployed = copy.deepcopy(ctx.models[placement]).eval()  # inspected as it would be used
        report = batchnorm.inspect(deployed, example).to_dict()
        summary = run_summary(ctx.curves[placement])
        results[placement] = {
            "final_test_acc": summary["final_test_acc"], "final_loss": summary["final_loss"],
            "steps_to_90pct": summary["steps_to_90pct"], "curves": summary, "inspect": report,
        }
    sec.results = {"placements": results}

    s = ctx.settings
    sec.p("The lesson puts BN between the convolution and the ReLU: BN centres and scales each "
          "channel, and the ReLU then cuts at a point that sits inside the distribution instead of "
          "wherever the conv's output happens to fall. Three orders of the same CNN, trained with "
          f"the same seed, {s.steps} steps and learning rate {s.lr:g}:")
    runs = {p: ctx.curves[p] for p in ORDER}
    sec.fig(plot_curves(ctx, runs, "s5_placement.png", "BN placement"),
            "Training loss and test accuracy for the three orders.")
    rows = []
    for p in ORDER:
        r = results[p]
        t = r["inspect"]["totals"]
        codes = [f["code"] for f in r["inspect"]["findings"]]
        rows.append([LABELS[p], R.fmt(r["final_test_acc"]), R.fmt(r["final_loss"]),
                     r["steps_to_90pct"] or ctx.settings.not_reached(), t["bn_layers"],
                     t["bn_params"],
                     t["foldable"], ", ".join(codes) or "none"])
    sec.html.append(R.table(["order", "final test accuracy", "final training loss",
                             "first step ≥ 90%", "BN layers", "BN parameters",
                             "foldable BN", "inspect findings"], rows))
    best = max(ORDER, key=lambda p: results[p]["final_test_acc"] or 0.0)
    reached = [p for p in ORDER if results[p]["steps_to_90pct"] is not None]
    fastest = min(reached, key=lambda p: results[p]["steps_to_90pct"]) if reached else None
    foldable = {p: results[p]["inspect"]["totals"]["foldable"] for p in ORDER}
    sec.results["best_final_test_acc"] = best
    sec.results["fastest_to_90pct"] = fastest
    sec.p(f"In this run the best final test accuracy is {R.esc(LABELS[best])}'s and the first to "
          + (f"reach 90% is {R.esc(LABELS[fastest])}. " if fastest else "reach 90%: none. ")
          + ("On a task this small both BN orders train well; "
             if all((results[p]["final_test_acc"] or 0) >= 0.9 for p in ORDER[:2]) else "")
          + "What differs regardless of accuracy is inference: inspect finds "
          f"{foldable['conv-bn-relu']} BN "
          f"layers that fold into their conv with Conv-BN-ReLU and {foldable['conv-relu-bn']} with "
          "Conv-ReLU-BN, where each BN stays a separate per-channel pass (§6).")
    for p in ORDER:
        sec.html.append(f"<h3>inspect: {R.esc(LABELS[p])}</h3>")
        sec.html.append(_findings_table(results[p]["inspect"]))
    sec.summary = [
        (f"final test accuracy: {LABELS[p]}", R.fmt(results[p]["final_test_acc"])) for p in ORDER
    ] + [("inspect findings, Conv-ReLU-BN",
          ", ".join(f["code"] for f in results["conv-relu-bn"]["inspect"]["findings"]))]
    return sec
