"""``batchnorm demo``: the lesson's tour (for now, its §4 proof table)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the lesson end to end",
        description="Run the lesson's §4 proof: the hand-written loop, batchnorm.reference and "
        "torch.nn.BatchNorm2d on one random (2, 2, 2, 2) input, in training then eval.\n\n"
        "Example: batchnorm demo --seed 3",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..tour.proof import prove, render

    proof = prove(seed=args.seed)
    render(proof)
    return 0 if proof.max_diff < 1e-5 else 1
