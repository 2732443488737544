"""§4 Training vs evaluation: the lesson's proof table, then why train and eval outputs differ.

Three measurements: (a) the lesson's (2, 2, 2, 2) input after one training step, batch statistics
beside running statistics; (b) the same input trained on k times, where eval converges to train
up to the biased/unbiased variance ratio the closed form predicts; (c) the network trained in §1,
where in training mode an image's prediction depends on the other images in its batch.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

import batchnorm

from . import report as R
from .context import Context
from .proof import EPS, MOMENTUM, prove

REPEATS = 100  # training steps on the same input in (b)
PARTNERS = 8  # batch partners tried in (c)
BATCH_SIZES = (2, 8, 64)  # train-mode test-accuracy batch sizes in (c)
TRAIN_MODE_IMAGES = 448  # test images classified in train mode (7 batches of 64; 224 pairs)


def run(ctx: Context) -> R.Section:
    sec = R.Section("s4_modes", "4 · Training vs evaluation")
    proof = prove(ctx.settings.seed, extra={"batchnorm": batchnorm.BatchNorm2d})
    sec.results["proof"] = proof.to_dict()
    sec.results["proof"]["implementations"] = list(proof.rows[0].values)
    sec.p("The lesson's proof, run: a random (2, 2, 2, 2) float32 input (seed "
          f"{ctx.settings.seed}) through the lesson's hand-written per-channel loop, "
          "<code>batchnorm.reference</code>, <code>torch.nn.BatchNorm2d</code>"
          + " and our <code>batchnorm.BatchNorm2d</code>"
          + "; one training step (momentum 0.1, ε = 1e-5), then eval mode with the running "
          "statistics that step produced.")
    for row in proof.rows:
        names = list(row.values)
        n = len(row.values[names[0]])
        sec.html.append(f"<h3>{R.esc(row.mode)}: {R.esc(row.quantity)} — max difference "
                        f"{R.fmt(row.max_diff)} "
                        f"{R.verdict(row.max_diff < 1e-5, '(agree)', '(DISAGREE)')}</h3>")
        sec.html.append(R.table(
            ["#", *names, "max |diff|"],
            [[i, *(f"{row.values[k][i]: .6f}" for k in names),
              R.fmt(max(row.values[k][i] for k in names) - min(row.values[k][i] for k in names))]
             for i in range(n)]))
    sec.p(f"Largest difference anywhere: <strong>{R.fmt(proof.max_diff)}</strong>.")

    one = _one_step(proof.input)
    sec.results["one_step"] = one
    sec.html.append("<h3>Why the same input gives different outputs in train and eval mode</h3>")
    sec.p("In training, BN normalises with the batch's own mean and biased variance; in eval, with "
          "the running statistics. After one step from the initial running_mean = 0 and "
          "running_var = 1, those are far apart:")
    sec.html.append(R.table(
        ["channel", "batch mean μ_B", "running_mean", "batch var σ²_B (biased)",
         "unbiased var", "running_var"],
        [[c, *(R.fmt(one[k][c], 6) for k in ("batch_mean", "running_mean", "batch_var",
                                              "batch_var_unbiased", "running_var"))]
         for c in range(2)]))
    sec.p("Channel 0's eight values: train output (x − μ_B)/√(σ²_B+ε) beside eval output "
          "(x − running_mean)/√(running_var+ε):")
    sec.html.append(R.table(
        ["x", "train output", "eval output", "difference"],
        [[R.fmt(a, 6), R.fmt(b, 6), R.fmt(c, 6), R.fmt(c - b, 6)]
         for a, b, c in zip(one["x_channel0"], one["train_channel0"], one["eval_channel0"])]))
    sec.p(f"Largest |train − eval| after one step: {R.fmt(one['max_train_eval_diff'])}; the eval "
          f"output recomputed by hand from the running statistics matches the layer to "
          f"{R.fmt(one['eval_by_hand_diff'])}.")

    conv = _converge(proof.input)
    sec.results["repeated_steps"] = conv
    sec.p(f"Training {REPEATS} times on the same input moves the running statistics towards the "
          f"batch's: running_mean after k steps is (1 − 0.9ᵏ)·μ_B (largest deviation from that "
          f"closed form: {R.fmt(conv['closed_form_mean_error'])}). The gap does not close to zero: "
          "running_var tends to the <em>unbiased</em> variance σ²_B·m/(m−1) with m = 8 values per "
          "channel, so eval divides by a larger number. Predicted limit of max |train − eval|: "
          f"{R.fmt(conv['predicted_limit'], 6)}; measured after {REPEATS} steps: "
          f"{R.fmt(conv['max_diff'][-1], 6)}.")
    sec.fig(_plot_converge(ctx, conv), "max |train − eval| after k training steps on one input.")

    real = _real_batches(ctx)
    sec.results["real_data"] = real
    sec.p("On real data, with the network trained in §1: in training mode an image's output "
          f"depends on the rest of its batch. Test image 0 paired with each of {PARTNERS} other "
          "test images (batches of 2): its logits move by up to "
          f"{R.fmt(real['logit_spread_train'])}"
          f" and its predicted class takes {real['distinct_predictions_train']} distinct value(s); "
          f"in eval mode they move by {R.fmt(real['logit_spread_eval'])}.")
    sec.html.append(R.table(
        ["BN statistics", "test accuracy"],
        [[f"running (eval mode, first {TRAIN_MODE_IMAGES} test images)",
          R.fmt(real["test_acc_eval"])],
         *[[f"batch statistics of {b} images (train mode, first {TRAIN_MODE_IMAGES} test images)",
            R.fmt(real["test_acc_train"][str(b)])]
           for b in BATCH_SIZES]]))
    sec.summary = [
        ("proof: implementations", ", ".join(proof.rows[0].values)),
        ("proof: largest difference", R.fmt(proof.max_diff)),
        ("one step: max |train − eval|", R.fmt(one["max_train_eval_diff"])),
        (f"after {REPEATS} steps: measured / predicted gap",
         f"{R.fmt(conv['max_diff'][-1], 6)} / {R.fmt(conv['predicted_limit'], 6)}"),
        ("test accuracy, eval vs train mode batch of 2",
         f"{R.fmt(real['test_acc_eval'])} vs {R.fmt(real['test_acc_train']['2'])}"),
    ]
    return sec, proof


def _one_step(x: np.ndarray) -> dict:
    bn = torch.nn.BatchNorm2d(2, eps=EPS, momentum=MOMENTUM)
    xt = torch.from_numpy(x.copy())
    with torch.no_grad():
        train = bn(xt).numpy()
        bn.eval()
        evaluation = bn(xt).numpy()
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3))
    rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    by_hand = (x64 - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + EPS)
    return {
        "batch_mean": mean, "batch_var": var, "batch_var_unbiased": x64.var(axis=(0, 2, 3), ddof=1),
        "running_mean": rm, "running_var": rv,
        "x_channel0": x64[:, 0].reshape(-1), "train_channel0": train[:, 0].reshape(-1),
        "eval_channel0": evaluation[:, 0].reshape(-1),
        "max_train_eval_diff": float(np.abs(train - evaluation).max()),
        "eval_by_hand_diff": float(np.abs(by_hand - evaluation).max()),
    }


def _converge(x: np.ndarray) -> dict:
    bn = torch.nn.BatchNorm2d(2, eps=EPS, momentum=MOMENTUM)
    xt = torch.from_numpy(x.copy())
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3))
    m = x.size // 2
    diffs, mean_err = [], 0.0
    for k in range(1, REPEATS + 1):
        bn.train()
        with torch.no_grad():
            train = bn(xt).numpy()
            bn.eval()
            evaluation = bn(xt).numpy()
        diffs.append(float(np.abs(train - evaluation).max()))
        closed = (1 - (1 - MOMENTUM) ** k) * mean
        mean_err = max(mean_err, float(np.abs(bn.running_mean.double().numpy() - closed).max()))
    # limit: running_mean -> μ_B, running_var -> unbiased var, so
    # eval = train · √((σ² + ε) / (σ²·m/(m-1) + ε))
    xhat = (x64 - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + EPS)
    ratio = np.sqrt((var + EPS) / (var * m / (m - 1) + EPS))
    predicted = float(np.abs(xhat * (1 - ratio[None, :, None, None])).max())
    return {"steps": list(range(1, REPEATS + 1)), "max_diff": diffs,
            "closed_form_mean_error": mean_err, "predicted_limit": predicted,
            "values_per_channel": m}


def _plot_converge(ctx: Context, conv: dict) -> str:
    fig, (ax,) = R.new_figure(1, width=6.4, height=3.8)
    ax.plot(conv["steps"], conv["max_diff"], label="measured max |train − eval|", color="C0")
    ax.axhline(conv["predicted_limit"], color="C3", ls="--",
               label="predicted limit (unbiased vs biased variance, "
                     f"m = {conv['values_per_channel']})")
    ax.set(xlabel="training steps on the same input (k)", ylim=(0, None),
           ylabel="max |train output − eval output|",
           title="Eval approaches train as the running statistics converge")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return R.save_figure(fig, ctx.out, "s4_train_vs_eval.png")


def _real_batches(ctx: Context) -> dict:
    # Train-mode calls update the running statistics: each mode gets its own copy.
    model = copy.deepcopy(ctx.models["conv-bn-relu"]).train()
    frozen = copy.deepcopy(ctx.models["conv-bn-relu"]).eval()
    x = torch.from_numpy(ctx.data.x_test)
    y = torch.from_numpy(ctx.data.y_test)
    logits_train, logits_eval = [], []
    with torch.no_grad():
        for j in range(1, PARTNERS + 1):
            pair = x[[0, j]]
            logits_train.append(model(pair)[0])
            logits_eval.append(frozen(pair)[0])
        lt, le = torch.stack(logits_train), torch.stack(logits_eval)
        n_sub = min(len(y), TRAIN_MODE_IMAGES)
        acc_eval = float((frozen(x[:n_sub]).argmax(1) == y[:n_sub]).double().mean())
        acc_train = {}
        for b in BATCH_SIZES:
            n = (min(len(y), TRAIN_MODE_IMAGES) // b) * b  # whole batches only
            preds = torch.cat([model(x[i:i + b]).argmax(1) for i in range(0, n, b)])
            acc_train[str(b)] = float((preds == y[:n]).double().mean())
    return {
        "logit_spread_train": float((lt.max(0).values - lt.min(0).values).max()),
        "logit_spread_eval": float((le.max(0).values - le.min(0).values).max()),
        "distinct_predictions_train": int(lt.argmax(1).unique().numel()),
        "test_acc_eval": acc_eval, "test_acc_train": acc_train,
    }
