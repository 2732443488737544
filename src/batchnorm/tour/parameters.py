"""§3 Parameters: the lesson's Conv2d(3,16,3,padding=1) -> BatchNorm2d(16) -> ReLU, layer by layer.

The layer table is read off the modules (``named_parameters`` / ``named_buffers``); the BN totals
and findings come from ``batchnorm.inspect``, and the two counts are checked against each other.
"""
from __future__ import annotations

import torch

import batchnorm

from . import report as R
from .context import Context
from .nets import lesson_block


def layer_rows(model: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """Each child: class, output shape, learnable parameters and buffers (names and sizes)."""
    rows = []
    with torch.no_grad():
        for name, child in model.named_children():
            x = child(x)
            rows.append({
                "name": name, "layer": repr(child), "output_shape": list(x.shape),
                "parameters": {n: list(p.shape) for n, p in child.named_parameters()},
                "learnable": sum(p.numel() for p in child.parameters()),
                "buffers": {n: list(b.shape) for n, b in child.named_buffers()},
                "buffer_elements": sum(b.numel() for b in child.buffers()),
            })
    return rows


def run(ctx: Context) -> R.Section:
    sec = R.Section("s3_parameters", "3 · Parameters")
    torch.manual_seed(ctx.settings.seed)
    model = lesson_block()
    x = torch.randn(2, 3, 8, 8)
    rows = layer_rows(model, x)
    model.eval()  # inspected as it would be used
    report = batchnorm.inspect(model, x).to_dict()
    bn = model[1]
    counted = bn.weight.numel() + bn.bias.numel()
    learnable = report["totals"]["bn_params"]
    sec.results = {"layers": rows, "bn_learnable_params": learnable,
                   "bn_learnable_params_counted": counted, "agree": learnable == counted,
                   "bn_buffers": {n: list(b.shape) for n, b in bn.named_buffers()},
                   "inspect": report}

    sec.p("The lesson's example block, <code>Conv2d(3, 16, 3, padding=1) → BatchNorm2d(16) → "
          "ReLU</code>, on an input of shape (2, 3, 8, 8), layer by layer:")

    def shapes(d):
        return ", ".join(f"{n} {tuple(s)}" for n, s in d.items()) or "—"

    sec.html.append(R.table(
        ["layer", "output shape", "learnable parameters", "count", "buffers (not learned)",
         "elements"],
        [[r["layer"], str(tuple(r["output_shape"])), shapes(r["parameters"]), r["learnable"],
          shapes(r["buffers"]), r["buffer_elements"]] for r in rows], left=3))
    sec.p(f"BN's learnable parameters are γ (<code>weight</code>) and β (<code>bias</code>), one "
          f"each per channel: 2 × 16 = <strong>{learnable}</strong> according to "
          f"<code>batchnorm.inspect</code> (counted directly from the module: {counted}, "
          f"{R.verdict(learnable == counted, 'agree', 'disagree')}). running_mean and running_var "
          "(16 each) and num_batches_tracked (1) are <em>buffers</em>: saved in the state_dict "
          "and updated in training, but never touched by the optimiser — "
          f"{report['totals']['bn_buffers']} buffer elements in all.")
    t = report["totals"]
    sec.p(f"<code>batchnorm.inspect</code>: {t['bn_layers']} BN layer, {t['bn_params']} learnable "
          f"parameters ({t['bn_param_share']:.2%} of the block's {t['model_params']}), findings:")
    sec.html.append(_findings_table(report))
    sec.summary = [
        ("BN learnable parameters (inspect / counted)", f"{learnable} / {counted}"),
        ("BN buffer elements (running_mean, running_var, num_batches_tracked)",
         str(t["bn_buffers"])),
        ("inspect findings", ", ".join(f["code"] for f in report["findings"]) or "none"),
    ]
    return sec


def _findings_table(report: dict) -> str:
    if not report["findings"]:
        return "<p>No findings.</p>"
    return R.table(["severity", "finding", "layers", "fix"],
                   [[f["severity"], f["message"], ", ".join(f["layers"]), f["fix"] or "—"]
                    for f in report["findings"]], left=4)
