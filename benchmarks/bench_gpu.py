"""Our BatchNorm2d / BatchNormAct2d on the Triton kernels vs PyTorch's CUDA layers, same run.

For the BN layers of ResNet-50 at batch 64 (``--batch 256`` too), float32 and bfloat16, NCHW and
channels_last, it times with CUDA events (medians of ``--repeats`` runs, each side timed
alternately):

- train fwd      : BatchNorm2d forward in training mode
- train fwd+bwd  : BatchNorm2d forward + backward
- bn+relu fwd+bwd: BatchNormAct2d(act="relu") vs BatchNorm2d then ReLU (eager), and vs the same
                   PyTorch module under torch.compile
- eval fwd       : forward in eval mode

and prints the speed-ups, their geometric means, and our training forward's achieved GB/s (3
passes over the tensor: statistics read, normalise read + write) against a device-to-device
copy measured in the same run. Last, the activation memory of a 10-block Conv-BN-LeakyReLU stack
in training (bytes autograd saves, through ``saved_tensors_hooks``): our inplace BatchNormAct2d vs
PyTorch's Conv-BN-LeakyReLU.

Needs a CUDA device and ``triton``; exits 2 with one line without them.

    python benchmarks/bench_gpu.py [--quick] [--batch 64 256] [--repeats 25] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import batchnorm  # noqa: E402
from batchnorm import ops  # noqa: E402

# ResNet-50's BN inputs per image: (C, H, W), every distinct shape once
RESNET50 = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
            (512, 28, 28), (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14),
            (512, 7, 7), (2048, 7, 7)]
QUICK = [(64, 56, 56), (256, 56, 56), (1024, 14, 14), (2048, 7, 7)]


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() by CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def alternate(a, b, repeats: int) -> tuple[float, float]:
    """Medians of a and b, timed in alternating rounds so both see the same device state."""
    ta, tb = [], []
    for _ in range(3):
        ta.append(timed(a, max(3, repeats // 3)))
        tb.append(timed(b, max(3, repeats // 3)))
    return statistics.median(ta), statistics.median(tb)


def copy_bandwidth(x: torch.Tensor, repeats: int) -> float:
    """GB/s of a device-to-device copy of x into a preallocated tensor (read + write)."""
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), repeats)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def cases(x, ours_bn, theirs_bn, ours_act, theirs_act, compiled_act):
    """(name, ours, theirs) callables for one input (no compile case without compiled_act)."""
    g = torch.randn_like(x)
    xr = x.detach().clone().requires_grad_()

    def fwd(m):
        return lambda: m(x)

    def fwd_bwd(m):
        def run():
            xr.grad = None
            m(xr).backward(g)
        return run

    return [
        ("train fwd", fwd(ours_bn), fwd(theirs_bn)),
        ("train fwd+bwd", fwd_bwd(ours_bn), fwd_bwd(theirs_bn)),
        ("bn+relu fwd+bwd", fwd_bwd(ours_act), fwd_bwd(theirs_act)),
    ] + ([("bn+relu vs compile", fwd_bwd(ours_act), fwd_bwd(compiled_act))]
         if compiled_act is not None else [])


HEADER = (f"{'shape':>22} {'dtype':>8} {'layout':>6} {'case':>18} {'ours ms':>8} "
          f"{'torch ms':>8} {'x':>6} {'GB/s':>7} {'of copy':>7}")


def show(r: dict) -> None:
    """Print one row as soon as it is measured (a run cut short keeps what it measured)."""
    extra = (f" {r['ours_gbs']:7.0f} {r['of_copy']:7.0%}" if "ours_gbs" in r else "")
    print(f"{'x'.join(map(str, r['shape'])):>22} {r['dtype']:>8} {r['layout']:>6} "
          f"{r['case']:>18} {r['ours_ms']:8.3f} {r['theirs_ms']:8.3f} "
          f"{r['speedup']:6.2f}{extra}", flush=True)


def layer_rows(batch: int, dtype: torch.dtype, channels_last: bool, shapes, repeats: int,
               compile_: bool = True):
    rows = []
    for c, h, w in shapes:
        x = torch.randn(batch, c, h, w, device="cuda", dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        # parameters in float32 for bfloat16 input, as under autocast
        ours_bn = batchnorm.BatchNorm2d(c).cuda()
        theirs_bn = nn.BatchNorm2d(c).cuda()
        ours_act = batchnorm.BatchNormAct2d(c, act="relu").cuda()
        theirs_act = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True)).cuda()
        compiled_act = (torch.compile(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()).cuda())
                        if compile_ else None)
        bound = copy_bandwidth(x, repeats)
        for name, a, b in cases(x, ours_bn, theirs_bn, ours_act, theirs_act, compiled_act):
            t_ours, t_theirs = alternate(a, b, repeats)
            rows.append(dict(shape=[batch, c, h, w], dtype=str(dtype).split(".")[-1],
                             layout="NHWC" if channels_last else "NCHW", case=name,
                             ours_ms=t_ours, theirs_ms=t_theirs, speedup=t_theirs / t_ours))
            if name == "train fwd":
                gbs = 3 * x.numel() * x.element_size() / (t_ours * 1e-3) / 1e9
                rows[-1].update(ours_gbs=gbs, copy_gbs=bound, of_copy=gbs / bound)
            show(rows[-1])
        ours_bn.eval(), theirs_bn.eval()
        with torch.no_grad():
            t_ours, t_theirs = alternate(lambda: ours_bn(x), lambda: theirs_bn(x), repeats)
        rows.append(dict(shape=[batch, c, h, w], dtype=str(dtype).split(".")[-1],
                         layout="NHWC" if channels_last else "NCHW", case="eval fwd",
                         ours_ms=t_ours, theirs_ms=t_theirs, speedup=t_theirs / t_ours))
        show(rows[-1])
        torch.cuda.empty_cache()
    return rows


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct activations autograd saves for backward in one training forward
    (the parameters, which both keep anyway, left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


def stack(ours: bool, c: int = 128) -> nn.Module:
    layers = []
    for _ in range(10):
        layers.append(nn.Conv2d(c, c, 3, padding=1, bias=False))
        if ours:
            layers.append(batchnorm.BatchNormAct2d(c, act="leaky_relu", negative_slope=0.01,
                                                   inplace=True))
        else:
            layers += [nn.BatchNorm2d(c), nn.LeakyReLU(0.01)]
    return nn.Sequential(*layers).cuda()


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 shapes, fewer repeats")
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile case (its compiles take the most time)")
    parser.add_argument("--json", metavar="OUT", help="also write the rows as JSON (after each "
                        "layout, so a run cut short keeps what it measured)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py: expected a CUDA device (got none): run it on a GPU machine")
        return 2
    batchnorm.set_backend("kernels")  # ours: the Triton kernels ("auto" takes PyTorch's path)
    x = torch.randn(2, 8, 4, 4, device="cuda")
    if ops._backend(x) != "triton":
        print("bench_gpu.py: expected the Triton backend on CUDA (got PyTorch's path): "
              "pip install triton")
        return 2
    shapes = QUICK if args.quick else RESNET50
    repeats = 9 if args.quick else args.repeats
    rows = []
    print(HEADER, flush=True)
    for batch in args.batch:
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                rows += layer_rows(batch, dtype, channels_last, shapes, repeats,
                                   compile_=not args.no_compile)
                if args.json:
                    Path(args.json).write_text(json.dumps(dict(rows=rows), indent=1))
    print()
    for case in ("train fwd", "train fwd+bwd", "bn+relu fwd+bwd", "bn+relu vs compile",
                 "eval fwd"):
        mean = geomean(r["speedup"] for r in rows if r["case"] == case)
        print(f"geomean {case:>20}: {mean:.2f}x")
    largest = max(r["shape"][1] * r["shape"][2] * r["shape"][3] for r in rows)
    biggest = [r for r in rows if "of_copy" in r
               and r["shape"][1] * r["shape"][2] * r["shape"][3] == largest]
    print(f"train fwd on the largest shape: {min(r['of_copy'] for r in biggest):.0%} to "
          f"{max(r['of_copy'] for r in biggest):.0%} of copy bandwidth")
    x = torch.randn(8, 128, 56, 56, device="cuda")
    ours, theirs = saved_bytes(stack(True), x), saved_bytes(stack(False), x)
    print(f"10-block Conv-BN-LeakyReLU stack, (8, 128, 56, 56): saved activations "
          f"{ours / 2**20:.0f} MiB (inplace) vs {theirs / 2**20:.0f} MiB (PyTorch): "
          f"{ours / theirs:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, stack_ratio=ours / theirs),
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
