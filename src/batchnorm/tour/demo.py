"""The whole tour: run every section of the lesson, print a summary, write the report folder."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from . import report as R
from .context import Context, Settings
from .data import downsample, load
from .training import deterministic, task_progress

MAX_SIDE = 16  # larger images are average-pooled (MNIST 28x28 -> 14x14): see data.downsample

INTRO = ("<p>Every section of the lesson on Batch Normalization, run for real on real data. "
         "Each number on this page was computed by this run and is stored in "
         "<code>results.json</code> beside this file; the plots are the PNG files beside it.</p>")


def run_demo(out: str | Path = "reports/demo", *, quick: bool = False, seed: int = 0,
             data: str | Path | None = None, console=None) -> dict:
    """Run the tour and write ``out/index.html``, ``out/*.png`` and ``out/results.json``.

    Returns the results dict (what ``results.json`` holds). Deterministic for a given ``seed``
    except the entries named ``timing`` (latency, wall time).
    """
    from rich.console import Console

    from . import compute, conv_bias, modes, parameters, placement, purpose
    from .proof import render

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings.make(seed, quick)
    started = time.perf_counter()
    torch.manual_seed(seed)
    dataset = downsample(load(data, seed=seed), MAX_SIDE)
    progress = task_progress(console)
    ctx = Context(settings, dataset, out, progress)
    sections: list[R.Section] = []
    with deterministic(), progress:
        for section in (purpose, compute, parameters, modes, placement, conv_bias):
            result = section.run(ctx)
            if section is modes:
                result, proof = result
            sections.append(result)
    elapsed = time.perf_counter() - started

    results = {
        "schema": "batchnorm.demo/1",
        "settings": settings.to_dict(),
        "data": dataset.describe(),
        "versions": {"torch": torch.__version__.split("+")[0], "numpy": np.__version__},
        **{s.key: s.results for s in sections},
        "figures": [f for s in sections for f in s.figures],
        "timing": {"total_s": elapsed, "machine": platform.machine()},
    }
    pooled = (f", average-pooled from {dataset.pooled_from[0]}×{dataset.pooled_from[1]} to "
              f"{dataset.image_shape[1]}×{dataset.image_shape[2]}" if dataset.pooled_from else "")
    kind = "quick (too short to show the training claims)" if quick else "full"
    meta = (f"seed {seed} · {kind} run · "
            f"data: {R.esc(dataset.source)}{pooled} "
            f"({dataset.describe()['train']} train / {dataset.describe()['test']} test images) · "
            f"torch {R.esc(torch.__version__)} · {elapsed:.1f} s")
    R.write_html(out, "Batch Normalization, run for real", INTRO, sections, meta)
    R.write_json(out, results)

    _print_summary(console, sections, proof, out, elapsed, render, quick)
    return results


def _print_summary(console, sections, proof, out: Path, elapsed: float, render,
                   quick: bool = False) -> None:
    from rich.table import Table

    console.rule("§4 the lesson's proof")
    render(proof, console)
    table = Table(title="The tour, in numbers", title_justify="left", show_lines=False)
    table.add_column("section", style="bold")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    for s in sections:
        for i, (label, value) in enumerate(s.summary):
            table.add_row(s.title if i == 0 else "", label, value)
    console.print(table)
    if quick:
        console.print(f"[yellow]{Settings.QUICK_NOTE}[/]")
    console.print(f"Report: [bold]{out / 'index.html'}[/]  ·  numbers: {out / 'results.json'}  ·  "
                  f"{elapsed:.1f} s")
