"""The tour's networks: a small CNN in three BN placements, and the MLP of Ioffe & Szegedy's Fig. 1.

Every builder takes a ``norm`` factory (``torch.nn.BatchNorm2d`` or ``batchnorm.BatchNorm2d``...),
so the same network runs on PyTorch's layer or ours. The hidden layer whose pre-activations the
tour follows is reachable as ``model.probe`` (the module whose *output* is those pre-activations).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import expected

PLACEMENTS = ("conv-bn-relu", "conv-relu-bn", "none")


def _block(cin: int, cout: int, placement: str, norm) -> tuple[list[nn.Module], nn.Module]:
    """One conv block and the module whose output feeds the block's activation."""
    if placement == "conv-bn-relu":
        # no conv bias: BN's mean subtraction would remove it (the lesson's §6)
        conv, bn = nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout)
        return [conv, bn, nn.ReLU()], bn
    if placement == "conv-relu-bn":
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        return [conv, nn.ReLU(), norm(cout)], conv
    if placement == "none":
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        return [conv, nn.ReLU()], conv
    raise expected(f"a placement in {PLACEMENTS}", repr(placement))


class SmallCNN(nn.Sequential):
    """Three 3x3 conv blocks (16, 32, 32 channels), a 2x2 max-pool, global average pool, linear.

    ``probe`` is the module whose output is the second block's pre-activations (the input of
    its ReLU): BN's output with Conv-BN-ReLU, the conv's output otherwise.
    """

    def __init__(self, placement: str = "conv-bn-relu", num_classes: int = 10, norm=nn.BatchNorm2d):
        layers1, _ = _block(1, 16, placement, norm)
        layers2, probe = _block(16, 32, placement, norm)
        layers3, _ = _block(32, 32, placement, norm)
        super().__init__(
            *layers1, *layers2, nn.MaxPool2d(2), *layers3,
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
        )
        self.placement = placement
        self.probe_name = next(name for name, m in self.named_children() if m is probe)

    @property
    def probe(self) -> nn.Module:
        return getattr(self, self.probe_name)


class SigmoidMLP(nn.Sequential):
    """Ioffe & Szegedy 2015, Fig. 1: three fully-connected hidden layers of 100 sigmoid units.

    With ``bn=True`` each hidden layer is Linear (no bias) -> BatchNorm1d -> Sigmoid, as in the
    paper's BN network; otherwise Linear -> Sigmoid. ``probe`` outputs the last hidden layer's
    sigmoid inputs.
    """

    def __init__(self, inputs: int, num_classes: int = 10, bn: bool = False, hidden: int = 100,
                 norm=nn.BatchNorm1d):
        layers: list[nn.Module] = [nn.Flatten()]
        width = inputs
        for _ in range(3):
            linear = nn.Linear(width, hidden, bias=not bn)
            layers += [linear, norm(hidden), nn.Sigmoid()] if bn else [linear, nn.Sigmoid()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        self.probe_name = str(len(layers) - 3)  # the last hidden layer's BN or Linear

    @property
    def probe(self) -> nn.Module:
        return getattr(self, self.probe_name)


def lesson_block(bias: bool = True, norm=nn.BatchNorm2d) -> nn.Sequential:
    """The lesson's §3 example: Conv2d(3, 16, 3, padding=1) -> BatchNorm2d(16) -> ReLU."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=bias), norm(16), nn.ReLU())


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_small_gaussian(model: nn.Module, std: float, generator: torch.Generator) -> None:
    """Fig. 1's "small random Gaussian values" for every Linear weight, zero biases."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
