"""The package's layers: no module imports one above it (read from the source, so an import
inside a function counts too), and every module imports on its own."""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import batchnorm

PACKAGE = Path(batchnorm.__file__).parent

# bottom to top; a module may import its own level and the ones below. A package (kernels/,
# ops/, cli/, tour/) is one level for the modules inside it.
LEVELS = [
    ["activations", "numerics"],
    ["errors", "files", "progress", "console"],
    ["reference"],
    ["kernels"],
    ["ops"],
    ["layers", "frozen"],
    ["protocol", "collectives"],
    ["sync"],
    ["graph", "probe"],
    ["conversion", "folding", "recalibration", "fusion"],
    ["inspection", "onnx_export", "adaptation", "diagnosis", "qat"],
    ["cli", "tour", "__init__", "__main__"],
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield parts, path


def _top(parts: tuple[str, ...]) -> str:
    return parts[0]


def _imported(parts: tuple[str, ...], tree: ast.AST):
    """(line, top-level batchnorm module) for every import of a batchnorm module in tree."""
    package = parts[:-1]  # the importing module's package inside batchnorm
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "batchnorm":
                    rest = alias.name.split(".")[1:]
                    yield node.lineno, rest[0] if rest else "__init__"
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").split(".")[0] != "batchnorm":
                    continue
                target = tuple(node.module.split(".")[1:])
            else:
                base = package[: len(package) - (node.level - 1)]
                if node.level - 1 > len(package):
                    continue
                target = base + tuple((node.module or "").split(".")) if node.module else base
            if target:
                yield node.lineno, target[0]
            else:  # from . import x (at the top of the package): x is the module
                for alias in node.names:
                    yield node.lineno, alias.name


def test_every_module_has_a_level():
    missing = {_top(parts) for parts, _ in _modules()} - set(LEVEL)
    assert not missing, f"give these modules a level in LEVELS: {sorted(missing)}"


def test_no_module_imports_one_above_it():
    upward = []
    for parts, path in _modules():
        me = LEVEL[_top(parts)]
        for line, target in _imported(parts, ast.parse(path.read_text())):
            if target in LEVEL and LEVEL[target] > me:
                upward.append(f"{'/'.join(parts)}.py:{line} imports {target}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checker_sees_upward_imports():
    tree = ast.parse("from ..folding import fold\nimport batchnorm.cli\nfrom . import sync\n")
    found = [t for _, t in _imported(("ops", "numba_cpu"), tree)]
    assert found == ["folding", "cli", "ops"]
    found = [t for _, t in _imported(("layers",), ast.parse("from . import ops, sync"))]
    assert found == ["ops", "sync"]


_IMPORT_IN_LEVEL_ORDER = """
import importlib, json, sys
order, level = json.loads(sys.argv[1]), json.loads(sys.argv[2])
import batchnorm  # every import runs the package's __init__ first (it loads errors only)
upward = []
for name in order:
    before = {m for m in sys.modules if m.startswith("batchnorm")}
    importlib.import_module(name)
    for new in {m for m in sys.modules if m.startswith("batchnorm")} - before:
        top = new.split(".")[1] if "." in new else "__init__"
        if level.get(top, -1) > level[name.split(".")[1] if "." in name else "__init__"]:
            upward.append(f"importing {name} loaded {new}")
print(json.dumps(upward))
"""


def test_importing_each_module_loads_nothing_above_it():
    """Bottom to top in one fresh process: everything below a module is loaded before it, so
    whatever its import loads anew comes from it; nothing of that may sit above it."""
    import json

    names = sorted({"batchnorm." + ".".join(p).removesuffix(".__init__") for p, _ in _modules()
                    if p[-1] != "__main__" and p != ("__init__",)},
                   key=lambda n: LEVEL[n.split(".")[1]])
    done = subprocess.run([sys.executable, "-c", _IMPORT_IN_LEVEL_ORDER, json.dumps(names),
                           json.dumps(LEVEL)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_reference_needs_no_torch():
    code = "import sys, batchnorm.reference; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_public_names_resolve():
    """Every public name is the package's own documented object (not a None placeholder or a
    re-exported torch name), listed by dir(), and importable with a star import."""
    assert len(set(batchnorm.__all__)) == len(batchnorm.__all__)
    for name in batchnorm.__all__:
        obj = getattr(batchnorm, name)
        assert name in dir(batchnorm)
        if isinstance(obj, (str, int, float, tuple, frozenset, dict)):
            continue  # constants
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        module = obj.__name__ if inspect.ismodule(obj) else obj.__module__
        assert module.startswith("batchnorm"), f"{name} comes from {module}"
    namespace: dict = {}
    exec("from batchnorm import *", namespace)
    assert set(batchnorm.__all__) <= set(namespace)
    importlib.import_module("batchnorm.ops.memory")


def test_readme_lists_every_public_name():
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    section = readme.split("## Public names", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_][\w/]*)`", section)) - {"batchnorm.__all__"}
    names = set()
    for item in listed:  # "BatchNorm1d/2d/3d" stands for three names
        head, *ranks = item.split("/")
        names.add(head)
        names.update(head[:-2] + r for r in ranks)
    assert names == set(batchnorm.__all__) - {"__version__"}, names ^ set(batchnorm.__all__)
