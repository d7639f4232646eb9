"""A release a user can install: `python -m build` makes the sdist and, from it, the wheel; the wheel
installs into a clean virtualenv and its `sandboxd demo` runs sessions end to end.

The wheel is built from the unpacked sdist (build's default), so a file missing from the sdist
breaks the wheel too. The virtualenv has no access to this checkout (it runs from a temporary
directory, without PYTHONPATH), so the demo runs only what the wheel installed. Needs the `build`
package, pip's usual index, a Docker engine and the sandbox image.
"""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
# Never in an sdist: the test suite, virtualenvs, VCS and build leftovers, anything named like a secret.
FORBIDDEN = re.compile(r"(^|/)(tests|\.venv[^/]*|venv|\.git|build|dist|__pycache__|\.pytest_cache|\.mypy_cache"
                       r"|secrets?|credentials)/|\.pyc$|(^|/)(\.env|environment_key|api_key)$|\.(pem|key)$", re.I)


@dataclass(frozen=True)
class Dist:
    sdist: Path
    wheel: Path


def run(*args: str | Path, timeout: float = 600, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def need(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        pytest.fail(f"{what} failed ({result.returncode}):\n{result.stdout[-4000:]}{result.stderr[-4000:]}",
                    pytrace=False)
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    probe = run(sys.executable, "-m", "build", "--version")
    if probe.returncode != 0:
        pytest.fail("the `build` package is missing: pip install build (it is in the dev extra)", pytrace=False)
    out = tmp_path_factory.mktemp("dist")
    need(run(sys.executable, "-m", "build", "--outdir", out, REPO), "python -m build")
    sdists, wheels = list(out.glob("sandboxd-*.tar.gz")), list(out.glob("sandboxd-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return Dist(sdists[0], wheels[0])


def test_the_sdist_has_the_sources_and_nothing_private(dist: Dist) -> None:
    assert dist.sdist.name == f"sandboxd-{VERSION}.tar.gz"
    with tarfile.open(dist.sdist) as tar:
        names = [n.removeprefix(f"sandboxd-{VERSION}/") for n in tar.getnames()]
    required = {"PKG-INFO", "pyproject.toml", "README.md", "src/sandboxd/__init__.py", "src/sandboxd/py.typed",
                "src/sandboxd/controlplane/__init__.py"}
    required |= {p.name for p in REPO.glob("LICEN[CS]E*")}  # the licence text, once the repository has one
    assert required <= set(names), required - set(names)
    sources = {str(p.relative_to(REPO)) for p in (REPO / "src/sandboxd").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))[:10]
    assert not [n for n in names if FORBIDDEN.search(n)], [n for n in names if FORBIDDEN.search(n)]


def test_the_wheel_has_the_package_entry_points_and_metadata(dist: Dist) -> None:
    assert dist.wheel.name == f"sandboxd-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
        info = f"sandboxd-{VERSION}.dist-info"
        metadata = email.parser.Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert {"sandboxd/__init__.py", "sandboxd/cli.py", "sandboxd/py.typed", "sandboxd/entrypoint.py"} <= names
    assert not [n for n in names if n.startswith("tests/") or FORBIDDEN.search(n)]
    assert metadata["Name"] == "sandboxd" and metadata["Version"] == VERSION
    assert metadata["Requires-Python"] == PROJECT["requires-python"]
    assert metadata["Description-Content-Type"] == "text/markdown" and "# sandboxd" in metadata.get_payload()
    assert "controlplane" in metadata.get_all("Provides-Extra", [])
    assert "sandboxd = sandboxd.cli:main" in entry_points
    assert "sandboxd-sandbox = sandboxd.entrypoint:main" in entry_points


@pytest.mark.docker
def test_the_wheel_installs_into_a_clean_virtualenv_and_runs_the_demo(
    dist: Dist, tmp_path: Path, sandbox_image: str
) -> None:
    venv = tmp_path / "venv"
    need(run(sys.executable, "-m", "venv", venv), "python -m venv")
    # The user's environment, minus anything pointing at this checkout or its virtualenv.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "SANDBOXD_"))}
    need(run(venv / "bin/pip", "install", "--quiet", f"{dist.wheel}[controlplane]", env=env, cwd=tmp_path),
         "pip install the wheel with the controlplane extra")

    version = need(run(venv / "bin/sandboxd", "version", env=env, cwd=tmp_path), "sandboxd version")
    assert version.strip() == f"sandboxd {VERSION}"
    where = need(run(venv / "bin/python", "-c", "import sandboxd; print(sandboxd.__file__)", env=env, cwd=tmp_path),
                 "import sandboxd")
    assert where.startswith(str(venv)), f"sandboxd imported from {where}, not from the wheel"

    demo = run(venv / "bin/sandboxd", "demo", "--sessions", "2", "--max-sessions", "2", "--image", sandbox_image,
               env=env, cwd=tmp_path, timeout=300)
    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, output[-5000:]
    results = re.findall(r"^  \[(ok |BAD)\] (sesn_\w+) (\w+)", demo.stdout, re.M)
    assert len(results) == 12 and {mark for mark, _, _ in results} == {"ok "}, demo.stdout[-5000:]
    for session in {s for _, s, _ in results}:
        assert sorted(t for _, s, t in results if s == session) == ["bash", "edit", "glob", "grep", "read", "write"]
    assert "sessions run: 2  succeeded: 2  failed: 0" in demo.stdout
    assert "tool results checked by the control plane: 12/12 as expected" in demo.stdout
