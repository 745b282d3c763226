"""Every module imports, and the import graph keeps its shape (no cycles, layers only import down).

The graph is built statically (ast, nothing imported) over pagedjax/ and pallas_kernels/. An import
counts wherever it is written: at module level, inside a function (a lazy import), or under
`if TYPE_CHECKING:`. Cycles are looked for among module-level imports only (those run at import
time; a lazy import inside a function runs later and is how a genuine two-way need is broken).
Layering counts every import, lazy or type-only: a layer that imports a higher one lazily still
depends on it.

Layers (LAYERS, lowest first): a module may import its own group, the leaf modules, and groups of a
strictly lower rank; groups of the same rank are independent of each other.

  0 pallas_kernels     kernels: stand alone, never import pagedjax (not even a leaf module)
  1 pagedjax.core      scheduler, KV page bookkeeping, requests: pure Python + numpy, no JAX
  1 pagedjax.models    model code, weights, loaders (JAX, the kernels)
  1 pagedjax.sampling  the sampler (JAX, the kernels)
  1 pagedjax.parallel  (placeholder for sharding; nothing in it yet)
  2 pagedjax.runner    runs a scheduled step on the device: uses core's data types (ModelOutput,
                       SchedulerOutput), models and sampling
  2 pagedjax.spec_decode  draft proposers over core's requests (device proposers get the runner
                       passed in, never imported); its config, metrics and verify are leaf modules
  3 pagedjax.engine    the engine loop: scheduler + runner + output processing
  4 pagedjax, .llm     the public API (the package's __init__ and LLM)
  5 pagedjax.entrypoints  CLI, OpenAI-compatible server
  6 pagedjax.testing   helpers for tests (may use anything)

Leaf modules (LEAF_MODULES: settings, request/response types, platform probing, env variables,
metrics) may be imported by any pagedjax layer, and import only other leaf modules or nothing from
pagedjax (pallas_kernels is allowed: platform probes the kernels). pagedjax.core also imports nothing
from JAX (nor the kernels, which are JAX).

KNOWN_VIOLATIONS lists edges of the existing code that break a rule and are to be fixed in the code
(not by changing the rule); an entry that no longer occurs fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pagedjax", "pallas_kernels")

LAYERS = {
    "pallas_kernels": 0,
    "pagedjax.core": 1,
    "pagedjax.models": 1,
    "pagedjax.sampling": 1,
    "pagedjax.parallel": 1,
    "pagedjax.runner": 2,
    "pagedjax.spec_decode": 2,
    "pagedjax.engine": 3,
    "pagedjax.llm": 4,  # the public API: LLM, and the package's own __init__ that re-exports it
    "pagedjax.entrypoints": 5,
    "pagedjax.testing": 6,
}
LEAF_MODULES = {
    "pagedjax.config",
    "pagedjax.sampling_params",
    "pagedjax.outputs",
    "pagedjax.platform",
    "pagedjax.envs",
    "pagedjax.metrics",
    "pagedjax.engine_args",
    "pagedjax.spec_decode.config",  # SpeculativeConfig: a setting (engine_args parses it)
    "pagedjax.spec_decode.metrics",
    "pagedjax.spec_decode.verify",  # the acceptance rule: pure Python, used by the runner
}
# group -> top-level packages it must not import (pallas_kernels: the kernels are JAX code).
FORBIDDEN_PACKAGES = {"pagedjax.core": ("jax", "jaxlib", "flax", "orbax", "pallas_kernels")}
# Modules that run a program when imported (`python -m ...`): imported by nobody, so not imported
# by the import test either (importing pagedjax.entrypoints.openai.__main__ starts a server).
PROGRAM_MODULES = ("__main__",)

# (importer, imported): known breaks of a rule, each to be fixed in the code.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    target: str  # a module of PACKAGES (longest known prefix) or an outside top-level package
    line: int
    module_level: bool  # runs at import time (not inside a function, not under TYPE_CHECKING)
    type_checking: bool = False


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """module name -> source file, for every .py file of PACKAGES."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: set[str]) -> str:
    """The longest prefix of `name` that is a known module, else its top-level package."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return parts[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import statement of a module's source, resolved to known modules."""
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(
                    Import(
                        _resolve(alias.name, known),
                        node.lineno,
                        not in_function and not type_checking,
                        type_checking,
                    )
                )
            return
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in known else _resolve(base, known)
                found.append(
                    Import(target, node.lineno, not in_function and not type_checking, type_checking)
                )
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, type_checking)
            return
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_checking)

    visit(ast.parse(source), False, False)
    return found


def import_graph(root: Path = ROOT) -> dict[str, list[Import]]:
    """module -> its imports (targets inside PACKAGES, or outside top-level package names)."""
    files = module_files(root)
    known = set(files)
    return {
        name: [
            i
            for i in imports_of(path.read_text(), name, path.name == "__init__.py", known)
            if i.target != name
        ]
        for name, path in files.items()
    }


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return cycles


def module_level_edges(graph: dict[str, list[Import]]) -> dict[str, set[str]]:
    return {
        m: {i.target for i in imports if i.module_level and i.target in graph} for m, imports in graph.items()
    }


def group_of(module: str) -> str | None:
    """The LEAF_MODULES entry or LAYERS group a module belongs to (longest prefix), else None."""
    if module in LEAF_MODULES:
        return module
    if module == "pagedjax":  # the package's __init__ (only: its submodules are placed above)
        return "pagedjax.llm"
    best = None
    for group in LAYERS:
        if module == group or module.startswith(group + "."):
            if best is None or len(group) > len(best):
                best = group
    return best


def layering_violations(graph: dict[str, list[Import]]) -> list[tuple[str, str, str]]:
    """(importer, imported, why) for every import that breaks a rule of the module docstring."""
    out = []
    for module, imports in sorted(graph.items()):
        group = group_of(module)
        if group is None:
            out.append((module, "", "module in no layer: add its package to LAYERS or LEAF_MODULES"))
            continue
        for imp in imports:
            target = imp.target
            why = None
            top = target.split(".")[0]
            if top in FORBIDDEN_PACKAGES.get(group, ()):
                why = f"{group} must not import {top}"
            elif target not in graph:  # another outside package
                continue
            elif module.startswith("pallas_kernels") and top == "pagedjax":
                why = "pallas_kernels must not import pagedjax"
            else:
                target_group = group_of(target)
                if target_group is None or target_group == group:
                    continue
                if group in LEAF_MODULES:
                    if target_group not in LEAF_MODULES and target_group != "pallas_kernels":
                        why = "a leaf module may import only leaf modules (or pallas_kernels)"
                elif target_group in LEAF_MODULES:
                    continue
                elif LAYERS[target_group] >= LAYERS[group]:
                    why = (
                        f"{group} (layer {LAYERS[group]}) must not import {target_group} "
                        f"(layer {LAYERS[target_group]})"
                    )
            if why:
                kind = "type-only " if imp.type_checking else ("" if imp.module_level else "lazy ")
                out.append((module, target, f"{kind}import at line {imp.line}: {why}"))
    return out


# -- the tests ---------------------------------------------------------------------------------


IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys, traceback

    program_modules = set(json.loads(sys.argv[1]))

    failed, imported, skipped = {}, [], []

    def onerror(name):  # a package that walk_packages could not import to look inside
        failed[name] = traceback.format_exc(limit=-3)

    for root in ("pagedjax", "pallas_kernels"):
        try:
            package = importlib.import_module(root)
        except BaseException:
            failed[root] = traceback.format_exc(limit=-3)
            continue
        imported.append(root)
        for info in pkgutil.walk_packages(package.__path__, root + ".", onerror=onerror):
            if info.name.rsplit(".", 1)[-1] in program_modules:
                skipped.append(info.name)
                continue
            try:
                importlib.import_module(info.name)
                imported.append(info.name)
            except BaseException:
                failed[info.name] = traceback.format_exc(limit=-3)
    print("RESULT " + json.dumps({"failed": failed, "imported": imported, "skipped": skipped}))
    """
)


def test_every_module_imports():
    """One fresh interpreter imports every module (none needs a GPU to import; only `__main__`
    modules, which run a program, are skipped)."""
    res = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, json.dumps(PROGRAM_MODULES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert res.returncode == 0 and lines, f"import script failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    assert not result["failed"], "modules that fail to import:\n" + "\n".join(
        f"--- {name}\n{tb}" for name, tb in sorted(result["failed"].items())
    )
    expected = {m for m in module_files() if m.rsplit(".", 1)[-1] not in PROGRAM_MODULES}
    missing = expected - set(result["imported"])
    assert not missing, f"modules walk_packages did not reach: {sorted(missing)}"


def test_no_import_cycles():
    cycles = find_cycles(module_level_edges(import_graph()))
    assert not cycles, "module-level import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_layering():
    violations = [v for v in layering_violations(import_graph()) if v[:2] not in KNOWN_VIOLATIONS]
    assert not violations, "layering violations (see this file's docstring):\n" + "\n".join(
        f"{importer} -> {imported}: {why}" for importer, imported, why in violations
    )


def test_known_violations_still_occur():
    found = {v[:2] for v in layering_violations(import_graph())}
    fixed = KNOWN_VIOLATIONS - found
    assert not fixed, f"fixed (remove from KNOWN_VIOLATIONS): {sorted(fixed)}"


def test_probing_modules_import_nothing_heavy_at_import_time():
    """platform / envs import JAX and the kernels only inside functions (the package's own
    __init__ may still import more); the kernels' env table imports only the standard library."""
    graph = import_graph()
    for module in ("pagedjax.platform", "pagedjax.envs"):
        heavy = [
            i for i in graph[module] if i.module_level and i.target.split(".")[0] in ("jax", "pallas_kernels")
        ]
        assert not heavy, f"{module} imports at module level: {heavy}"
    outside = [
        i for i in graph["pallas_kernels.cpu.envs"] if i.target in graph or i.target in ("jax", "numpy")
    ]
    assert not outside, outside


# -- the checker itself catches what it should ---------------------------------------------------


TYPE_ONLY = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"


def _graph_of(sources: dict[str, str]) -> dict[str, list[Import]]:
    known = set(sources)
    return {m: imports_of(textwrap.dedent(src), m, False, known) for m, src in sources.items()}


@pytest.mark.parametrize(
    ("sources", "bad"),
    [
        ({"pagedjax.core.a": "import jax\n"}, ("pagedjax.core.a", "jax")),
        ({"pagedjax.core.a": "def f():\n    import jax.numpy\n"}, ("pagedjax.core.a", "jax")),
        (
            {"pagedjax.core.a": "from pagedjax.runner import x\n", "pagedjax.runner": ""},
            ("pagedjax.core.a", "pagedjax.runner"),
        ),
        (
            {"pagedjax.models.a": "from pagedjax.sampling.s import f\n", "pagedjax.sampling.s": ""},
            ("pagedjax.models.a", "pagedjax.sampling.s"),
        ),
        (
            {"pagedjax.engine.a": "import pagedjax.entrypoints.cli\n", "pagedjax.entrypoints.cli": ""},
            ("pagedjax.engine.a", "pagedjax.entrypoints.cli"),
        ),
        (
            {"pallas_kernels.x": "from pagedjax import config\n", "pagedjax.config": ""},
            ("pallas_kernels.x", "pagedjax.config"),
        ),
        (
            {"pagedjax.config": "from pagedjax.engine.e import E\n", "pagedjax.engine.e": ""},
            ("pagedjax.config", "pagedjax.engine.e"),
        ),
        (
            {
                "pagedjax.config": TYPE_ONLY + "    from pagedjax.core.c import C\n",
                "pagedjax.core.c": "",
            },
            ("pagedjax.config", "pagedjax.core.c"),
        ),
        ({"pagedjax.nowhere": ""}, ("pagedjax.nowhere", "")),
    ],
)
def test_layering_rules_catch(sources, bad):
    assert bad in {v[:2] for v in layering_violations(_graph_of(sources))}


def test_layering_rules_allow():
    sources = {
        "pagedjax.runner.r": "from pagedjax.core.model_output import ModelOutput\n"
        "from pagedjax.models import m\nimport jax\n"
        "from pagedjax import envs\nfrom pallas_kernels import k\n",
        "pagedjax.core.model_output": "import numpy\nfrom pagedjax.sampling_params import SamplingParams\n",
        "pagedjax.models.m": "import pallas_kernels.k\nfrom pagedjax.config import ModelConfig\n",
        "pagedjax.platform": "def f():\n    from pallas_kernels import k\n    from pagedjax import envs\n",
        "pagedjax.envs": "",
        "pagedjax.sampling_params": "",
        "pagedjax.config": "",
        "pallas_kernels.k": "import jax\n",
    }
    assert layering_violations(_graph_of(sources)) == []


def test_cycle_check_counts_module_level_imports_only():
    sources = {
        "pagedjax.models.a": "from pagedjax.models import b\n",
        "pagedjax.models.b": "def f():\n    from pagedjax.models import a\n",
        "pagedjax.models.c": "import pagedjax.models.d\n",
        "pagedjax.models.d": "class K:\n    from pagedjax.models.c import x\n",
        "pagedjax.models.e": TYPE_ONLY + "    import pagedjax.models.a\n",
    }
    assert find_cycles(module_level_edges(_graph_of(sources))) == [["pagedjax.models.c", "pagedjax.models.d"]]


def test_no_import_cycles_even_through_lazy_imports():
    """A lazy import may not hide a two-way dependency either (models/loader.py and checkpoint.py
    imported each other inside functions until LoadedModel moved to models/loaded_model.py)."""
    graph = import_graph()
    edges = {
        m: {i.target for i in imps if not i.type_checking and i.target in graph} for m, imps in graph.items()
    }
    cycles = find_cycles(edges)
    assert not cycles, "import cycles (counting imports inside functions):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )
