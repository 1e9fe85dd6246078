"""The package's layering, read from its source (every import, at any depth, TYPE_CHECKING ones too).

Dependencies point one way: ``errors``/``config`` ← ``protocol`` and ``engine`` ← ``gateway`` ← ``server`` ←
``cli``.  The wire models never reach into an engine, engines know no HTTP and no routing, the router calls no
server code back; code that the transformers and vLLM engines share lives outside ``engine/local/``; and the
environment is read only at the edge (``config.py`` builds the settings, ``cli/`` its flags' defaults), never
below it.  Writing a variable for a library that reads it (vLLM's CPU knobs) is not reading.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "inhouse"

# layer → the layers it must not import
FORBIDDEN = {
    "protocol": ("engine", "gateway", "server", "cli"),
    "engine": ("gateway", "server", "cli"),
    "gateway": ("server", "cli"),
    "server": ("cli",),
}
# the modules of engine/ outside local/ that may import it: they build the LocalEngine
BUILDS_LOCAL = {"engine/factory.py", "engine/auto.py"}


def modules(under: str = "") -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((PACKAGE / under).rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8"), str(path))


def imported(tree: ast.Module, module: str) -> Iterator[str]:
    """Every module name an ``import`` or ``from ... import`` of ``tree`` names (relative ones resolved)."""
    package = ["inhouse", *module.split("/")[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def offending_imports(forbidden: dict[str, tuple[str, ...]]) -> list[str]:
    found = []
    for layer, others in forbidden.items():
        for module, tree in modules(layer):
            for name in imported(tree, module):
                if any(name == f"inhouse.{o}" or name.startswith(f"inhouse.{o}.") for o in others):
                    found.append(f"{module} imports {name}")
    return found


def test_each_layer_imports_only_the_layers_beneath_it() -> None:
    assert offending_imports(FORBIDDEN) == []


def test_only_the_engine_builders_reach_into_engine_local() -> None:
    """Checkpoint resolution and prompt building, shared with vLLM, live in ``engine/checkpoint.py`` and
    ``engine/prompt.py``; the rest of the package sees the local engine only through the factory."""
    found = []
    for module, tree in modules():
        if module.startswith("engine/local/") or module in BUILDS_LOCAL:
            continue
        found += [f"{module} imports {name}" for name in imported(tree, module)
                  if name == "inhouse.engine.local" or name.startswith("inhouse.engine.local.")]
    assert found == []


def environment_reads(tree: ast.Module) -> list[int]:
    """Lines that read the process environment: any use of ``os.environ`` but an assignment to one of its keys
    or a ``setdefault`` whose value is dropped, any ``os.getenv``, and ``environ``/``getenv`` imported from os."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv", "environb", "getenvb") for a in node.names):
            lines.append(node.lineno)
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"):
            continue
        if node.attr in ("getenv", "getenvb", "environb"):
            lines.append(node.lineno)
        elif node.attr == "environ":
            parent = parents[node]
            written = isinstance(parent, ast.Subscript) and isinstance(parent.ctx, ast.Store)
            set_default = (isinstance(parent, ast.Attribute) and parent.attr == "setdefault"
                           and isinstance(parents[parent], ast.Call) and isinstance(parents[parents[parent]], ast.Expr))
            if not (written or set_default):
                lines.append(node.lineno)
    return lines


def test_nothing_below_config_reads_the_environment() -> None:
    found = [f"{module}:{line}" for module, tree in modules()
             if module != "config.py" and not module.startswith("cli/")
             for line in environment_reads(tree)]
    assert found == []


@pytest.mark.parametrize(("source", "reads"), [
    ("import os\nx = os.environ.get('A')\n", [2]),
    ("import os\nx = os.environ['A']\n", [2]),
    ("import os\nif 'A' in os.environ: pass\n", [2]),
    ("import os\nx = os.getenv('A')\n", [2]),
    ("from os import environ\n", [1]),
    ("import os\nenv = dict(os.environ)\n", [2]),
    ("import os\nx = os.environ.setdefault('A', '1')\n", [2]),  # its value is used: a read
    ("import os\nos.environ['A'] = '1'\nos.environ.setdefault('B', '2')\n", []),
])
def test_the_environment_check_tells_reads_from_writes(source: str, reads: list[int]) -> None:
    assert environment_reads(ast.parse(source)) == reads


def test_the_import_check_sees_imports_inside_functions_and_relative_ones() -> None:
    tree = ast.parse("def f():\n    from inhouse.engine.base import Delta\nfrom ..engine import base\n")
    assert {"inhouse.engine.base", "inhouse.engine", "inhouse.engine.base.Delta"} <= set(
        imported(tree, "protocol/chat.py"))
