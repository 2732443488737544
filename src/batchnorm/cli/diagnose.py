"""``batchnorm diagnose MODEL --data FILE``: do the BN running statistics describe this data?"""

from __future__ import annotations

import argparse
import shlex

from ._errors import CLIError
from ._model import TRUST_NOTE, check_output, describe, load_model, require_python_module
from ._output import emit, note
from .recalibrate import add_nonfinite_argument, load_batches, nonfinite_refused


def register(sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="how far each BN's running statistics are from the data's, and what it costs",
        description=describe(
            "For every BN layer, on the batches of --data and without changing the model: the "
            "statistics it sees against its running ones (mean shift in running standard "
            "deviations, log variance ratio; median and worst channel) and the output change "
            "when this layer alone uses batch statistics. A table sorted by that effect, a "
            "verdict, and the recalibrate command that fixes a drift. --data is read as by "
            "`batchnorm recalibrate`; a batch with NaN/Inf in a BN's input is refused, or with "
            "--nonfinite skip left out and reported.",
            "batchnorm diagnose model.pt --data val.npy",
            "batchnorm diagnose model.pt --data val.npz --key x --batches 4 --plot drift.png",
            "batchnorm diagnose model.pt --data val.pt --json",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help=TRUST_NOTE)
    p.add_argument("--data", required=True, metavar="FILE", help=".pt, .npy or .npz file of inputs")
    p.add_argument("--key", default=None, help="array name in a .npz file (default: the first)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="batch size for a single array (default 32)")
    p.add_argument("--batches", type=int, default=8,
                   help="use at most this many batches (default 8; each layer's effect costs "
                        "one pass over them)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write a plot of the drift and effect per layer, in network order")
    add_nonfinite_argument(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..diagnosis import diagnose
    from ..probe import NonFiniteBatch

    if args.batch_size < 1:
        raise CLIError(f"expected --batch-size >= 1 (got {args.batch_size})")
    if args.batches < 1:
        raise CLIError(f"expected --batches >= 1 (got {args.batches})")
    plot = None
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise CLIError(f"expected a .png file for --plot (got {args.plot!r})")
        plot = check_output(args.plot, [args.model, args.data], option="--plot")
        _require_matplotlib()
    batches = load_batches(args.data, args.key, args.batch_size)
    model = load_model(args.model)
    require_python_module(model, args.model)
    try:
        result = diagnose(model, batches, batches=args.batches, progress=not args.json,
                          nonfinite=args.nonfinite)
    except NonFiniteBatch as exc:
        raise nonfinite_refused(exc) from None
    fix = _fix_command(args) if result.drifting else None
    if plot is not None:
        _write_plot(result, plot)
    emit(args, {"model": args.model, **result.to_dict(), "fix": fix,
                "plot": None if plot is None else str(plot)}, result)
    if fix:
        note(args, f"fix: {fix}")
    if plot is not None:
        note(args, f"wrote {plot}")
    return 0


def _fix_command(args) -> str:
    """The recalibrate command for the same model and data."""
    out = args.model.rsplit(".", 1)[0] + ".recal.pt" if args.model.endswith((".pt", ".pth")) \
        else "model.recal.pt"
    parts = ["batchnorm", "recalibrate", args.model, "--data", args.data]
    if args.key is not None:
        parts += ["--key", args.key]
    if args.batch_size != 32:
        parts += ["--batch-size", str(args.batch_size)]
    if args.nonfinite != "raise":  # the data that was diagnosed needs it to recalibrate too
        parts += ["--nonfinite", args.nonfinite]
    return shlex.join(parts + ["-o", out])


def _require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError("expected matplotlib for --plot (got none installed)",
                       "pip install 'batchnorm[tour]'")


def _write_plot(result, target) -> None:
    from ..files import write_atomically
    from ..tour.report import new_figure

    width = max(6.4, 0.35 * len(result.order) + 2)
    fig, (ax_shift, ax_effect) = new_figure(2, width=width / 2 + 3, height=4.5)
    result.plot(ax_shift, ax_effect)
    fig.suptitle(result.verdict, fontsize=10)
    write_atomically(target, lambda tmp: fig.savefig(tmp, format="png",
                                                     metadata={"Software": None}))
