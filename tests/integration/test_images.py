"""The two images as built by images/build.sh (`.ci/run` builds them first): each runs as its
own fixed non-root user, on a read-only root filesystem, carries what it needs at run time and no
build tools, and the documented extension example (images/examples/Dockerfile.node) builds on
the sandbox image without breaking its contract.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import sandboxd
from tests.conftest import DAEMON_IMAGE, REPO

pytestmark = pytest.mark.docker

NO_BUILD_TOOLS = "for t in gcc cc c++ make pip pip3 apt-file; do command -v $t && exit 1; done; " \
                 "python3 -m pip --version 2>/dev/null && exit 1; " \
                 "/opt/sandboxd/bin/python -m pip --version 2>/dev/null && exit 1; exit 0"
NO_SETUID = "test -z \"$(find / -xdev -type f -perm /6000 2>/dev/null)\""


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def run(image: str, *command: str, entrypoint: str | None = None, extra: tuple[str, ...] = ()) -> str:
    """Run `command` in a throw-away container of `image`: no network, read-only root filesystem."""
    args = ["run", "--rm", "--network", "none", "--read-only", *extra]
    if entrypoint is not None:
        args += ["--entrypoint", entrypoint]
    result = docker(*args, image, *command)
    assert result.returncode == 0, f"{image} {command}: {result.stdout}{result.stderr}"
    return result.stdout.strip()


def config(image: str) -> dict[str, object]:
    result = docker("image", "inspect", image)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]["Config"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def daemon_image(docker_client: object) -> str:
    if docker("image", "inspect", DAEMON_IMAGE).returncode != 0:
        pytest.fail(f"image {DAEMON_IMAGE} is missing; build it with images/build.sh", pytrace=False)
    return DAEMON_IMAGE


# --- the sandbox image ----------------------------------------------------------------------------

SANDBOX_TMP = ("--tmpfs", "/tmp:rw,nosuid,nodev,size=64m", "--mount", "type=volume,dst=/workspace")


def test_sandbox_runs_as_10001_in_its_workspace(sandbox_image: str) -> None:
    cfg = config(sandbox_image)
    assert cfg["User"] == "10001:10001"
    assert cfg["WorkingDir"] == "/workspace"
    assert cfg["Entrypoint"] == ["/opt/sandboxd/bin/sandboxd-sandbox"]
    assert "HOME=/tmp" in cfg["Env"]  # type: ignore[operator]
    assert run(sandbox_image, "-c", "id -u; id -g; pwd; stat -c %u:%g /workspace",
               entrypoint="/bin/bash", extra=SANDBOX_TMP).split() == ["10001", "10001", "/workspace", "10001:10001"]


def test_sandbox_has_the_tools_and_the_worker(sandbox_image: str) -> None:
    script = (
        "set -e; test -x /bin/bash; git --version; rg --version | head -n1; python3 --version; "
        "/opt/sandboxd/bin/python -c 'import sandboxd.entrypoint, anthropic.lib.environments'; "
        "test -x /opt/sandboxd/bin/sandboxd-sandbox; "
        # the worker runtime other images get: complete, read-only to the sandbox user, standing alone
        "test -f /opt/sandboxd-runtime/.complete; if touch /opt/sandboxd-runtime/x 2>/dev/null; then exit 8; fi; "
        "env -i /opt/sandboxd-runtime/ld.so --library-path /opt/sandboxd-runtime/lib /opt/sandboxd-runtime/bin/python3 "
        "-I -S /opt/sandboxd-runtime/run.py --help | grep -q -- --max-idle; "
        # read-only root filesystem: the workspace (a volume) and HOME (a tmpfs) are writable
        "echo hi > /workspace/f; echo hi > $HOME/f; if touch /var/tmp/f 2>/dev/null; then exit 9; fi; echo ok"
    )
    assert run(sandbox_image, "-c", script, entrypoint="/bin/bash", extra=SANDBOX_TMP).endswith("ok")


def test_sandbox_has_no_build_tools_or_setuid_programs(sandbox_image: str) -> None:
    run(sandbox_image, "-c", NO_BUILD_TOOLS, entrypoint="/bin/sh")
    run(sandbox_image, "-c", NO_SETUID, entrypoint="/bin/sh")


# --- the daemon image -----------------------------------------------------------------------------


def test_daemon_runs_as_10002_under_tini(daemon_image: str) -> None:
    cfg = config(daemon_image)
    assert cfg["User"] == "10002:10002"
    assert cfg["Entrypoint"] == ["/usr/bin/tini", "--", "/opt/sandboxd/bin/sandboxd"]
    assert cfg["Cmd"] == ["run"]
    assert run(daemon_image, "-u", entrypoint="id") == "10002"
    assert run(daemon_image, "version") == f"sandboxd {sandboxd.__version__}"
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.version"] == sandboxd.__version__  # type: ignore[index]


def test_daemon_has_what_it_runs_and_a_writable_state_dir(daemon_image: str) -> None:
    script = (
        "set -e; git --version; ssh -V 2>&1; test -x /usr/bin/tini; python3 --version; "
        "/opt/sandboxd/bin/python -c 'import sandboxd.cli, docker, prometheus_client'; "
        "touch /var/lib/sandboxd/probe; if touch /var/tmp/probe 2>/dev/null; then exit 9; fi; "
        "test \"$(stat -c %u /var/lib/sandboxd)\" = 10002; echo ok"
    )
    # The image declares /var/lib/sandboxd a volume, so it is writable with a read-only root.
    assert run(daemon_image, "-c", script, entrypoint="/bin/sh").endswith("ok")


def test_daemon_rejects_a_missing_environment_with_exit_2(daemon_image: str) -> None:
    result = docker("run", "--rm", "--network", "none", "--read-only", daemon_image, "run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "environment_id" in result.stderr


def test_daemon_has_no_build_tools_or_setuid_programs(daemon_image: str) -> None:
    run(daemon_image, "-c", NO_BUILD_TOOLS, entrypoint="/bin/sh")
    run(daemon_image, "-c", NO_SETUID, entrypoint="/bin/sh")


# --- extending the sandbox image ------------------------------------------------------------------


def test_the_node_example_extends_the_sandbox_image(sandbox_image: str) -> None:
    tag = "sandboxd-sandbox-node:test"
    example = REPO / "images" / "examples"
    # --network host: apt inside the build reaches the Debian mirror (dockerd may have no bridge).
    built = docker("build", "--quiet", "--network", "host", "--build-arg", f"SANDBOX_IMAGE={sandbox_image}",
                   "-f", str(example / "Dockerfile.node"), "-t", tag, str(example), timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        cfg, base = config(tag), config(sandbox_image)
        for key in ("User", "WorkingDir", "Entrypoint"):
            assert cfg[key] == base[key], key
        assert run(tag, "-c", "node --version; id -u", entrypoint="/bin/bash", extra=SANDBOX_TMP).split()[1] == "10001"
        run(tag, "-c", NO_SETUID, entrypoint="/bin/sh")
    finally:
        docker("image", "rm", "--force", tag)


def test_images_readme_shows_the_example() -> None:
    readme = (REPO / "images" / "README.md").read_text()
    assert "examples/Dockerfile.node" in readme and "10001" in readme
    assert Path(REPO / "images" / "examples" / "Dockerfile.node").is_file()
