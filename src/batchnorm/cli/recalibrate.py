"""``batchnorm recalibrate MODEL --data FILE -o OUT``: re-estimate BN running statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._errors import CLIError
from ._model import (
    TRUST_NOTE,
    check_output,
    describe,
    load_model,
    require_python_module,
    save_model,
)
from ._output import emit, note


def register(sub) -> None:
    p = sub.add_parser(
        "recalibrate",
        help="recompute BN running statistics from data (after SWA, pruning, domain shift)",
        description=describe(
            "Re-estimate every BN's running statistics from the batches of --data (train mode, "
            "no gradients): by default the mean and unbiased variance of every value each BN "
            "saw (--estimator exact, what BN computes on all the batches at once), or the "
            "average of the per-batch statistics as PyTorch's update_bn does (--estimator "
            "average). --data is a .pt tensor (or list of tensor batches), a .npy array or "
            "a .npz archive (first array, or --key); a single array is cut into --batch-size "
            "batches along dim 0. A batch with NaN/Inf in a BN's input is refused (nothing is "
            "written), or with --nonfinite skip left out of that BN's statistics and reported.",
            "batchnorm recalibrate model.pt --data images.npy -o model.recal.pt",
            "batchnorm recalibrate model.pt --data val.npz --key x --batch-size 64 --batches 50 "
            "-o out.pt",
            "batchnorm recalibrate model.pt --data noisy.npy --nonfinite skip -o model.recal.pt",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help=TRUST_NOTE)
    p.add_argument("--data", required=True, metavar="FILE", help=".pt, .npy or .npz file of inputs")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the model")
    p.add_argument("--key", default=None, help="array name in a .npz file (default: the first)")
    p.add_argument(
        "--batch-size", type=int, default=32, help="batch size for a single array (default 32)"
    )
    p.add_argument("--batches", type=int, default=None, help="use at most this many batches")
    p.add_argument("--estimator", choices=("exact", "average"), default="exact",
                   help="exact: statistics of all the values (default); average: update_bn's")
    add_nonfinite_argument(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=run)


def add_nonfinite_argument(p) -> None:
    p.add_argument("--nonfinite", choices=("raise", "skip"), default="raise",
                   help="a batch with NaN/Inf in a BN's input: raise (refuse the data, the "
                        "default) or skip (leave it out of that BN's statistics)")


def nonfinite_refused(exc) -> CLIError:
    """The one line for NaN/Inf data under --nonfinite raise, with the next step."""
    return CLIError(exc.reason, "remove the non-finite samples, or pass --nonfinite skip to "
                                "leave such batches out")


def run(args) -> int:
    from ..probe import NonFiniteBatch
    from ..recalibration import recalibrate

    target = check_output(args.output, [args.model, args.data])
    if args.batch_size < 1:
        raise CLIError(f"expected --batch-size >= 1 (got {args.batch_size})")
    if args.batches is not None and args.batches < 1:
        raise CLIError(f"expected --batches >= 1 (got {args.batches})")
    batches = load_batches(args.data, args.key, args.batch_size)
    model = load_model(args.model)
    require_python_module(model, args.model)
    try:
        _, report = recalibrate(model, batches, batches=args.batches, progress=not args.json,
                                report=True, estimator=args.estimator, nonfinite=args.nonfinite)
    except NonFiniteBatch as exc:
        raise nonfinite_refused(exc) from None
    save_model(model, target)
    data = {"output": str(target), **report.to_dict()}
    if args.json:
        emit(args, data)
        return 0
    text = f"wrote {target}: running statistics from {report.batches} batches, " \
           f"{report.samples} samples"
    if report.skipped_samples:
        text += (f"; skipped a last batch of {report.skipped_samples} sample (BN in train mode "
                 "needs more than one value per channel)")
    note(args, text)
    for name, why in report.skipped_layers:
        note(args, f"left {name} as it was: {why}")
    for name, numbers in report.skipped_batches.items():
        note(args, f"left out {batch_list(numbers)} for {name} (NaN/Inf in its input)")
    return 0


def batch_list(numbers: list[int]) -> str:
    """'batch 2' or 'batches 2, 5'"""
    return ("batch " if len(numbers) == 1 else "batches ") + ", ".join(map(str, numbers))


def load_batches(spec: str, key: str | None, batch_size: int) -> list:
    """A list of float tensors from a .pt / .npy / .npz file."""
    import numpy as np
    import torch

    path = Path(spec)
    if not path.exists():
        raise CLIError(f"expected an existing data file (got {spec!r}: no such file)")
    if path.is_dir():
        raise CLIError(f"expected a data file (got {spec!r}: a directory)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if not archive.files:
                    raise CLIError(f"expected at least one array in {spec!r} (got none)")
                name = key if key is not None else archive.files[0]
                if name not in archive.files:
                    raise CLIError(f"expected an array {name!r} in {spec!r} (got {archive.files})")
                data = archive[name]
        elif suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CLIError(f"expected a .pt, .npy or .npz data file (got {spec!r})")
    except CLIError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        if "Weights only load failed" in reason:
            reason = "not a file of tensors (torch.load with weights_only=True refused it)"
        raise CLIError(
            f"expected a readable data file (got {spec!r}: unreadable: {reason})"
        ) from None
    if isinstance(data, np.ndarray):
        if data.dtype.kind not in "fiu" or data.ndim < 2:
            raise CLIError(
                f"expected a numeric array of rank >= 2 in {spec!r} (got {data.dtype}, "
                f"{data.ndim}D)"
            )
        data = torch.from_numpy(np.ascontiguousarray(data)).float()
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or data.is_complex() or data.dtype == torch.bool:
            raise CLIError(
                f"expected a real tensor of rank >= 2 in {spec!r} (got {data.dtype}, {data.dim()}D)"
            )
        return list(data.float().split(batch_size))
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return [t.float() for t in data]
    raise CLIError(
        f"expected a tensor, array or list of tensor batches in {spec!r} "
        f"(got {type(data).__name__})"
    )
