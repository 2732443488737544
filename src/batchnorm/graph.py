"""The model graph every BN tool reads: who produces a BN's input, who uses its output.

``trace(model)`` runs ``torch.fx`` symbolic tracing (conv, linear and every BN-like module are
kept as leaves) and turns the result into a small list of :class:`Site` objects, one per call
in the model's dataflow. When tracing fails (data-dependent control flow, unsupported Python),
it falls back to *module order*: each leaf module's input is taken to be the previous leaf's
output. That is right for plain stacks and wrong for branches, so the graph is then marked
``approximate`` with a warning, and the rewriting tools trust only pairs that sit next to each
other inside one ``nn.Sequential``.

What counts as batch norm is :mod:`batchnorm.protocol`'s; what counts as an activation is the
registry's (:mod:`batchnorm.activations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from . import activations
from .protocol import is_batchnorm

__all__ = [
    "is_foldable_producer",
    "out_channels",
    "class_name",
    "Site",
    "ModelGraph",
    "trace",
]

_FOLDABLE_NAMES = {
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Linear",
}


def is_foldable_producer(module: object) -> bool:
    """Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear, subclasses included (and TorchScript'd)."""
    if isinstance(module, (_ConvNd, nn.Linear)):
        return True
    return isinstance(module, torch.jit.ScriptModule) and class_name(module) in _FOLDABLE_NAMES


def class_name(module: nn.Module) -> str:
    """The module's class name; for TorchScript, the name of the class it was scripted from."""
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", type(module).__name__)
    return type(module).__name__


def out_channels(module: nn.Module) -> int | None:
    """Output channels of a conv (transposed or not) or linear layer."""
    if not is_foldable_producer(module):
        return None
    return getattr(module, "out_channels", getattr(module, "out_features", None))


_ACT_MODULES = activations.module_classes()
_ACTIVATION_LABELS = activations.labels()


# --------------------------------------------------------------------------- the graph


@dataclass(eq=False)
class Site:
    """One call in the model's dataflow.

    ``name`` is the module path for module calls (``layer1.0.bn1``) and the fx node name
    otherwise; ``op`` is ``"module"``, ``"function"``, ``"input"`` or ``"output"``.
    """

    name: str
    op: str
    module: nn.Module | None = None
    label: str = ""  # function / method name for non-module sites
    inputs: list["Site"] = field(default_factory=list)
    users: list["Site"] = field(default_factory=list)
    # the call's arguments as written, other sites in place of fx nodes (torch.cat's list and
    # dim, flatten's start_dim); empty on an approximate graph
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def is_bn(self) -> bool:
        return self.module is not None and is_batchnorm(self.module)

    @property
    def is_activation(self) -> bool:
        if self.module is not None:
            return isinstance(self.module, _ACT_MODULES) or (
                isinstance(self.module, torch.jit.ScriptModule)
                and class_name(self.module) in {c.__name__ for c in _ACT_MODULES}
            )
        return self.label in _ACTIVATION_LABELS

    @property
    def producer(self) -> "Site | None":
        """The site whose output is this site's first input."""
        return self.inputs[0] if self.inputs else None

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {self.op})"


@dataclass
class ModelGraph:
    """Sites in execution order, plus where each module is called."""

    sites: list[Site]
    approximate: bool = False
    warning: str | None = None
    # pairs (producer module name, consumer module name) known to be direct and exclusive
    sequential_pairs: set[tuple[str, str]] = field(default_factory=set)

    def calls(self, module_name: str) -> list[Site]:
        """Every site that calls the module at ``module_name``."""
        return [s for s in self.sites if s.op == "module" and s.name == module_name]

    def bn_sites(self) -> list[Site]:
        return [s for s in self.sites if s.is_bn]

    def feeds_only(self, producer: Site, consumer: Site) -> bool:
        """True when ``producer``'s output goes to ``consumer`` alone, as its main input.

        On an approximate graph only pairs adjacent inside one ``nn.Sequential`` count.
        """
        if consumer.producer is not producer:
            return False
        if self.approximate:
            return (producer.name, consumer.name) in self.sequential_pairs
        return len(producer.users) == 1 and producer.users[0] is consumer

    def called_once(self, site: Site) -> bool:
        return site.op == "module" and len(self.calls(site.name)) == 1


class _Tracer(fx.Tracer):
    """fx tracer that keeps conv, linear and every BN-like module as a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_batchnorm(m) or is_foldable_producer(m) or isinstance(m, _ACT_MODULES):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> ModelGraph:
    """The dataflow of ``model``: from ``torch.fx`` tracing, else approximated by module order."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # any tracing failure: fall back, say why
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return _module_order(model, reason[:200])
    return _from_fx(model, graph)


def _from_fx(model: nn.Module, graph: fx.Graph) -> ModelGraph:
    sites: dict[fx.Node, Site] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            site = Site(node.name, "input", label=node.name)
        elif node.op == "output":
            site = Site(node.name, "output", label="output")
        elif node.op == "call_module":
            site = Site(str(node.target), "module", module=model.get_submodule(node.target))
        elif node.op == "get_attr":
            site = Site(node.name, "attr", label=str(node.target))
        else:
            target = node.target
            label = target if isinstance(target, str) else getattr(target, "__name__", str(target))
            site = Site(node.name, "function", label=label)
        sites[node] = site
    for node, site in sites.items():
        # inputs in argument order, flattening lists (torch.cat([a, b])) and kwargs
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: inputs.append(n) or n)
        site.inputs = [sites[n] for n in inputs]
        site.users = [sites[u] for u in node.users]
        site.args = fx.node.map_arg(node.args, sites.__getitem__)
        site.kwargs = dict(fx.node.map_arg(node.kwargs, sites.__getitem__))
    ordered = list(sites.values())
    # shape queries (x.shape, x.size(), x.dim()) read no data: they do not count as users, so
    # "used only by BN" still holds for a conv whose output shape is also looked at
    for site in ordered:
        site.users = [
            u for u in site.users if not (u.op == "function" and u.label in _SHAPE_QUERIES)
        ]
    return ModelGraph(ordered)


_SHAPE_QUERIES = {"size", "dim", "getattr"}


def _module_order(model: nn.Module, reason: str) -> ModelGraph:
    input_site = Site("input", "input", label="input")
    sites = [input_site]
    previous = input_site
    pairs: set[tuple[str, str]] = set()
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            site = Site(name, "module", module=module, inputs=[previous])
            previous.users.append(site)
            sites.append(site)
            previous = site
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.Sequential) or class_name(parent) == "Sequential":
            children = list(parent.named_children())
            prefix = f"{parent_name}." if parent_name else ""
            for (a_name, _), (b_name, _) in zip(children, children[1:]):
                pairs.add((prefix + a_name, prefix + b_name))
    output = Site("output", "output", label="output", inputs=[previous])
    previous.users.append(output)
    sites.append(output)
    warning = (
        f"torch.fx could not trace the model ({reason}); the graph is approximated by "
        "module order, so findings are approximate"
    )
    return ModelGraph(sites, approximate=True, warning=warning, sequential_pairs=pairs)
