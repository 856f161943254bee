"""The house rule: the core library never imports kfp or apache_beam."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import kaedama


def _core_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(kaedama.__path__, prefix="kaedama."):
        # CLI front-ends may launch the deployable layers (lazily, inside run()).
        if info.name.startswith("kaedama.commands") or info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def test_core_modules_import_neither_kfp_nor_beam():
    modules = _core_modules()
    assert "kaedama.manifest" in modules and "kaedama.storage" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('kfp', 'apache_beam'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"core imported: {result.stdout.strip()}"


def test_stage_commands_import_lazily():
    code = (
        "import sys\n"
        "from kaedama import cli\n"
        "cli.build_parser()\n"
        "heavy = [m for m in ('torch', 'apache_beam', 'kfp', 'timm') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", "kaedama --help must not import heavy stacks"


def _kaedama_imports(path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("kaedama"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kaedama"))
    return found


def test_core_modules_have_no_import_cycle():
    # Any import, typed-only ones included, counts: a cycle means two modules that
    # cannot be understood (or moved) apart.
    from pathlib import Path

    root = Path(kaedama.__path__[0])
    graph = {}
    for name in _core_modules():
        rel = name.split(".")[1:]
        path = root.joinpath(*rel).with_suffix(".py")
        if not path.exists():
            path = root.joinpath(*rel, "__init__.py")
        graph[name] = {m for m in _kaedama_imports(path) if m != name}
    modules = set(graph)

    def deps(name):
        return {m for m in graph[name] if m in modules and not name.startswith(m + ".")}

    state: dict[str, int] = {}

    def visit(name, stack):
        state[name] = 1
        for dep in deps(name):
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join([*stack, name, dep]))
            if dep not in state:
                visit(dep, [*stack, name])
        state[name] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [])
    assert "kaedama.dedup.hashing" in modules and "kaedama.train.runtime" in modules
