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
