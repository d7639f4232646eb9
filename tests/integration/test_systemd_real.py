"""sandboxd under a real systemd: installed the way systemd/README.md says, driven with systemctl.

systemd boots as PID 1 in a container (images/systemd/Dockerfile, on the debootstrap base). The
test installs the wheel built from this checkout into it step by step as the guide tells a user to
(each step's command line must appear in the guide), with the local control plane running in this
process on 127.0.0.1 (the container shares the host's network) and the host's Docker engine through
the mounted socket, where the sandboxes run with `network_mode = "host"` (one test: the default
`none`, through the daemon's broker socket in a directory at the same path on both). Everything is
checked from outside the service, through `systemctl`, `journalctl` and /proc, without changing
the units.

Needs a Docker engine, the base image `sandboxd-base:bookworm` (images/build-base.sh; or the one
$BASE_IMAGE names), the sandbox image, the `build` package and a Python 3.11 (the base's python3)
to build the wheelhouse with; each missing one fails the test with what to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandboxd.controlplane.scenario import Expect, Scenario, ScriptedSession, ToolStep, six_tool_session
from sandboxd.controlplane.server import ControlPlane
from tests.conftest import REPO, SANDBOX_IMAGE, managed_leftovers

pytestmark = pytest.mark.docker

BASE_IMAGE = os.environ.get("BASE_IMAGE") or "sandboxd-base:bookworm"  # as scripts/bootstrap.sh
DOCKERFILE = REPO / "images/systemd/Dockerfile"
GUIDE = (REPO / "systemd/README.md").read_text()
SRC = "/root/sandboxd"  # the checkout's systemd/ and a wheelhouse, as a user would have them
TIMEOUT_STOP_SECONDS = 100  # TimeoutStopSec= of both units
WATCHDOG_SECONDS = 30  # WatchdogSec=
CONFIG = "/etc/sandboxd/sandboxd.toml"
SIX_TOOLS = ("bash", "read", "write", "edit", "glob", "grep")
# A directory at the same path on the host and in the container: sockets the daemon serves there
# are bind-mounted by the host's engine into sandboxes (network_mode = "none").
SHARED = Path(f"/var/lib/sandboxd-systemd-test-{uuid.uuid4().hex[:8]}")


def run(*args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=stdin)


def need(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        pytest.fail(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}",
                    pytrace=False)
    return result.stdout


@dataclass
class Host:
    """The systemd container: commands run as root in it, like a shell on a host."""

    name: str

    def sh(self, script: str, *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = run("docker", "exec", "-i", self.name, "bash", "-euo", "pipefail", "-c", script, stdin=stdin)
        if check and result.returncode != 0:
            journal = run("docker", "exec", self.name, "journalctl", "-n", "30", "--no-pager").stdout
            pytest.fail(f"`{script}` in {self.name} failed ({result.returncode}):\n{result.stdout[-3000:]}"
                        f"{result.stderr[-3000:]}\nlast journal lines:\n{journal}", pytrace=False)
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def journal(self, unit: str, cursor: str = "") -> str:
        since = f"--after-cursor='{cursor}'" if cursor else ""
        return self.sh(f"journalctl -u {unit} -o cat --no-pager {since}").stdout

    def cursor(self) -> str:
        out = self.sh("journalctl -n 1 --show-cursor --no-pager -q -o cat").stdout
        return out.rsplit("-- cursor: ", 1)[-1].strip()

    def as_service_user(self, pid: int, command: str) -> subprocess.CompletedProcess[str]:
        """`command` as the sandboxd user inside the mount namespace of process `pid`."""
        return self.sh(f"nsenter -t {pid} -m setpriv --reuid=sandboxd --regid=sandboxd --init-groups "
                       f"sh -c '{command}'", check=False)


def wait_until(condition: Callable[[], Any], timeout: float, what: str | Callable[[], str]) -> Any:
    """The first truthy value of `condition()`; fails with `what` (called at the end if callable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    pytest.fail(f"{what() if callable(what) else what}: not within {timeout:.0f}s", pytrace=False)


def guide_step(line: str) -> str:
    """A command line of the guide, checked to be there verbatim, so this test installs as it says."""
    assert line in GUIDE, f"systemd/README.md no longer says `{line}`; keep this test and the guide in step"
    return line


# --- the image, the wheelhouse, the host ----------------------------------------------------------


@pytest.fixture(scope="module")
def systemd_image(docker_client: Any) -> str:
    """The systemd image, built once per content of its Dockerfile and base (tag = their hash)."""
    if shutil.which("docker") is None:
        pytest.fail("the docker CLI is missing (apt-get install docker.io)", pytrace=False)
    base = run("docker", "image", "inspect", "-f", "{{.Id}}", BASE_IMAGE)
    if base.returncode != 0:
        pytest.fail(f"base image {BASE_IMAGE} is missing; build it with images/build-base.sh", pytrace=False)
    digest = hashlib.sha256(DOCKERFILE.read_bytes() + base.stdout.encode()).hexdigest()[:16]
    tag = f"sandboxd-test-systemd:{digest}"
    if run("docker", "image", "inspect", tag).returncode != 0:
        need(run("docker", "build", "--quiet", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                 "-t", tag, "-f", str(DOCKERFILE), str(DOCKERFILE.parent), timeout=900), "building the systemd image")
    return tag


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's wheel (sdist first, wheel from it) and every dependency's wheel."""
    if sys.version_info[:2] != (3, 11):
        pytest.fail("the wheelhouse needs Python 3.11, the python3 of Debian bookworm", pytrace=False)
    if run(sys.executable, "-m", "build", "--version").returncode != 0:
        pytest.fail("the `build` package is missing: pip install build (it is in the dev extra)", pytrace=False)
    out = tmp_path_factory.mktemp("wheelhouse")
    need(run(sys.executable, "-m", "build", "--outdir", str(out / "dist"), str(REPO)), "python -m build")
    wheel = next((out / "dist").glob("sandboxd-*.whl"))
    need(run(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(out / "wheelhouse"), str(wheel)),
         "pip wheel (the dependencies)")
    return out / "wheelhouse"


@pytest.fixture(scope="module")
def host(systemd_image: str, wheelhouse: Path, docker_client: Any) -> Iterator[Host]:
    """A booted systemd host with the program installed (guide steps 1 and 2)."""
    name = f"sandboxd-systemd-{uuid.uuid4().hex[:8]}"
    host = Host(name)
    try:
        SHARED.mkdir(mode=0o755)
        need(run("docker", "run", "-d", "--name", name, "--network", "host", "--cap-add", "SYS_ADMIN",
                 # SYS_PTRACE: root reads the service's /proc/<pid>/environ and enters its mount namespace.
                 "--cap-add", "SYS_PTRACE", "--security-opt", "seccomp=unconfined", "--tmpfs", "/run",
                 "--tmpfs", "/run/lock", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro",
                 "-v", "/var/run/docker.sock:/var/run/docker.sock", "-v", f"{SHARED}:{SHARED}", systemd_image),
             "starting the systemd container")
        # Until PID 1 has set up /run/systemd, systemctl says "offline" (or fails) at once; then
        # --wait returns when the boot has finished.
        def booted() -> str | None:
            state = host.sh("timeout 60 systemctl is-system-running --wait", check=False).stdout.strip()
            return state if state not in ("", "offline") else None

        state = wait_until(booted, 60, lambda: f"systemd booting in the container; its output:\n"
                           f"{run('docker', 'logs', '--tail', '30', name).stderr}")
        if state not in ("running", "degraded"):
            pytest.fail(f"systemd did not boot ({state}):\n{host.sh('systemctl --failed', check=False).stdout}",
                        pytrace=False)
        host.sh(f"mkdir -p {SRC}")
        need(run("docker", "cp", str(REPO / "systemd"), f"{name}:{SRC}/systemd"), "copying systemd/")
        need(run("docker", "cp", str(wheelhouse), f"{name}:{SRC}/wheelhouse"), "copying the wheelhouse")
        # The engine's host has a docker group owning the socket (Debian's docker.io creates it).
        host.sh("groupadd --gid $(stat -c %g /run/docker.sock) docker")
        host.sh(f"cd {SRC} && " + " && ".join(guide_step(s) for s in (
            "python3 -m venv /opt/sandboxd",
            "/opt/sandboxd/bin/pip install --no-index --find-links wheelhouse sandboxd",
            "/opt/sandboxd/bin/sandboxd version",
            "useradd --system --home-dir /var/lib/sandboxd --no-create-home --shell /usr/sbin/nologin sandboxd",
        )))
        yield host
    finally:
        run("docker", "exec", name, "systemctl", "stop", "sandboxd", "sandboxd@*", timeout=TIMEOUT_STOP_SECONDS + 20)
        run("docker", "rm", "-f", "-v", name)
        shutil.rmtree(SHARED, ignore_errors=True)


@dataclass
class Instance:
    """One installed unit (sandboxd.service or sandboxd@NAME.service) and its control plane."""

    host: Host
    unit: str
    control_plane: ControlPlane
    worker_id: str
    metrics_port: int

    def wait_for_sessions(self, ids: list[str], timeout: float = 120) -> dict[str, Any]:
        return self.control_plane.wait_for(lambda s: all(s["sessions"][i]["done"] for i in ids), timeout=timeout)

    def wait_running(self, ids: list[str], timeout: float = 60) -> None:
        """Until each session's sandbox has connected (its first tool call is out)."""
        self.control_plane.wait_for(lambda s: all(s["sessions"][i]["events"] > 0 for i in ids), timeout=timeout)


def ready(port: int) -> str:
    """/readyz's answer: "200 ..." or "503 <reason>"."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return f"{response.status} {response.read().decode()}"
    except urllib.error.HTTPError as error:
        return f"{error.code} {error.read().decode()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def configure(host: Host, path: str, cp: ControlPlane, worker_id: str, port: int, extra: str = "") -> None:
    """The "set environment_id (and anything else you change)" step: edit the copied example.

    Sandboxes share the host's network (they reach the control plane on 127.0.0.1) unless `extra`
    sets another network_mode.
    """
    text = host.sh(f"test -f {path}.orig || cp {path} {path}.orig; cat {path}.orig").stdout
    assert 'environment_id = "env_REPLACE_ME"' in text
    text = text.replace('environment_id = "env_REPLACE_ME"', f'environment_id = "{cp.environment_id}"')
    text += (f'\nbase_url = "{cp.url}"\nimage = "{SANDBOX_IMAGE}"\npull_policy = "never"\nworker_id = "{worker_id}"\n'
             f'metrics_address = "127.0.0.1:{port}"\nmax_sessions = 3\n'
             + (extra or 'network_mode = "host"\n'))
    host.sh(f"cat > {path}", stdin=text)


def key_step(host: Host, directory: str, cp: ControlPlane, guide_directory: str) -> None:
    """The guide's `( umask 077; printf ... > file )`, with the key on stdin instead of in argv."""
    guide_step(f"( umask 077; printf '%s' 'sk-ant-oat01-...' > {guide_directory}/environment_key )")
    host.sh(f"( umask 077; cat > {directory}/environment_key )", stdin=cp.environment_key)


@pytest.fixture(scope="module")
def service(host: Host, docker_client: Any) -> Iterator[Instance]:
    """sandboxd.service installed by guide steps 3, 4 and 6, enabled, not started."""
    with ControlPlane(Scenario(environment_id=f"env_{uuid.uuid4().hex[:8]}", lease_ttl_seconds=30)) as cp:
        instance = Instance(host, "sandboxd", cp, f"systemd-real-{uuid.uuid4().hex[:8]}", free_port())
        host.sh(f"cd {SRC} && " + " && ".join(guide_step(s) for s in (
            "install -d -m 0755 /etc/sandboxd",
            "install -m 0644 systemd/sandboxd.toml.example /etc/sandboxd/sandboxd.toml",
            "install -d -m 0700 /etc/sandboxd/credentials",
        )))
        configure(host, CONFIG, cp, instance.worker_id, instance.metrics_port)
        key_step(host, "/etc/sandboxd/credentials", cp, "/etc/sandboxd/credentials")
        host.sh(f"cd {SRC} && " + " && ".join(guide_step(s) for s in (
            "install -m 0644 systemd/sandboxd.service /etc/systemd/system/",
            "systemctl daemon-reload",
        )) + " && systemctl enable sandboxd")
        yield instance
        host.sh("systemctl stop sandboxd", check=False)
        remove_leftovers(docker_client, instance.worker_id)


def remove_leftovers(docker_client: Any, worker_id: str) -> dict[str, list[str]]:
    leftovers = managed_leftovers(docker_client, worker_id)
    for name in leftovers["containers"]:
        docker_client.api.remove_container(name, force=True, v=True)
    for name in leftovers["volumes"]:
        docker_client.api.remove_volume(name, force=True)
    return leftovers


@pytest.fixture
def started(service: Instance) -> Instance:
    """sandboxd.service, running (started if an earlier test stopped it)."""
    service.host.sh("systemctl start sandboxd")
    return service


def slow_session(tag: str, seconds: int) -> ScriptedSession:
    """The six tools after a bash step that takes `seconds`: still running when the test acts."""
    six = six_tool_session(tag)
    slow = ToolStep(name="bash", input={"command": f"sleep {seconds}; echo slow-{tag}"},
                    expect=Expect(is_error=False, contains=[f"slow-{tag}"]))
    return six.model_copy(update={"steps": [slow, *six.steps]})


def assert_all_passed(state: dict[str, Any], ids: list[str]) -> None:
    for sid in ids:
        session = state["sessions"][sid]
        failed = [r for r in session["results"] if not r["passed"]]
        assert session["passed"] and not failed, f"{sid}: {failed or 'not every tool result came back'}"
        assert len(session["results"]) == session["steps"]


def assert_succeeded_in_journal(host: Host, unit: str, state: dict[str, Any], ids: list[str], cursor: str = "") -> str:
    """Waits for the daemon's `session_finished ... outcome=succeeded` of each session; the journal."""
    patterns = [rf"session_finished work_id={state['sessions'][sid]['work_id']} .*outcome=succeeded" for sid in ids]
    journal = ""

    def logged() -> bool:
        nonlocal journal
        journal = host.journal(unit, cursor)
        return all(re.search(p, journal) for p in patterns)

    wait_until(logged, 30, lambda: f"every session logging outcome=succeeded:\n{journal[-4000:]}")
    return journal


# --- the tests ------------------------------------------------------------------------------------


def test_start_returns_once_the_daemon_is_ready(service: Instance) -> None:
    host = service.host
    host.sh("systemctl stop sandboxd")
    started = time.monotonic()
    host.sh("systemctl start sandboxd")
    elapsed = time.monotonic() - started
    print(f"systemctl start took {elapsed:.1f}s")
    state = host.show("sandboxd", "ActiveState", "SubState", "StatusText", "ExecMainStartTimestampMonotonic",
                      "ActiveEnterTimestampMonotonic")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    # Only the daemon writes this status (sd_notify STATUS=); Type=notify turned active on its READY=1.
    assert state["StatusText"] == "0/3 sessions running", state
    waited = (int(state["ActiveEnterTimestampMonotonic"]) - int(state["ExecMainStartTimestampMonotonic"])) / 1e6
    assert 0.2 < waited <= elapsed, f"systemd declared the unit active {waited:.2f}s after exec: not on READY=1"
    service.control_plane.wait_for(lambda s: len(s["workers_polling"]) == 1, timeout=10)
    port = service.metrics_port
    wait_until(lambda: ready(port).startswith("200"), 15, lambda: f"/readyz answering 200 ({ready(port)})")


def test_sessions_run_end_to_end_on_the_host_engine(started: Instance) -> None:
    cp = started.control_plane
    ids = [cp.add_session(six_tool_session(f"e2e{i}")).session_id for i in range(4)]
    state = started.wait_for_sessions(ids)
    assert_all_passed(state, ids)
    assert {r["name"] for r in state["sessions"][ids[0]]["results"]} == set(SIX_TOOLS)
    assert_succeeded_in_journal(started.host, "sandboxd", state, ids)


def test_the_default_network_mode_none_serves_sessions_through_the_broker(started: Instance) -> None:
    """No network in sandboxes: the daemon's API broker socket, bind-mounted by the host's engine."""
    host, cp = started.host, started.control_plane
    dropin = "/etc/systemd/system/sandboxd.service.d/socket-dir.conf"
    guide_step("#   ReadWritePaths=/srv/sandboxd-sockets")
    host.sh(guide_step("install -d -o sandboxd -g sandboxd -m 0755 /srv/sandboxd-sockets")
            .replace("/srv/sandboxd-sockets", f"{SHARED}/run"))
    host.sh(f"mkdir -p {Path(dropin).parent} && printf '[Service]\\nReadWritePaths={SHARED}/run\\n' > {dropin}")
    configure(host, CONFIG, cp, started.worker_id, started.metrics_port,
              extra=f'network_mode = "none"\nsocket_dir = "{SHARED}/run"\n')
    try:
        host.sh("systemctl daemon-reload && systemctl restart sandboxd")
        ids = [cp.add_session(six_tool_session(f"none{i}")).session_id for i in range(2)]
        state = started.wait_for_sessions(ids)
        assert_all_passed(state, ids)
        journal = assert_succeeded_in_journal(host, "sandboxd", state, ids)
        assert f"channels_ready socket_dir={SHARED}/run " in journal, "the per-sandbox sockets live in socket_dir"
    finally:
        host.sh(f"rm -f {dropin}")
        configure(host, CONFIG, cp, started.worker_id, started.metrics_port)
        host.sh("systemctl daemon-reload && systemctl restart sandboxd")


def test_the_sandboxing_holds(started: Instance) -> None:
    host = started.host
    pid = host.main_pid("sandboxd")
    status = dict(line.split(":\t", 1) for line in host.sh(f"cat /proc/{pid}/status").stdout.splitlines()
                  if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, f"{cap}={status[cap]}: CapabilityBoundingSet= grants nothing"
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status
    assert re.search(r"^Max core file size +0 +0 ", host.sh(f"cat /proc/{pid}/limits").stdout, re.M)
    docker_gid = host.sh("stat -c %g /run/docker.sock").stdout.strip()
    assert docker_gid in status["Groups"].split(), "SupplementaryGroups=docker gives the service the socket"

    # Directories the sandboxd user owns, outside the state directory: the user can write them, the
    # service cannot (ProtectSystem=strict mounts them read-only in its namespace).
    probes = [f"{d}/sandboxd-probe" for d in ("/etc", "/usr/local", "/opt", "/srv", "/var/lib")]
    host.sh(f"install -d -o sandboxd -g sandboxd {' '.join(probes)}")
    plain = "setpriv --reuid=sandboxd --regid=sandboxd --init-groups"
    try:
        for path in probes:
            assert host.sh(f"{plain} touch {path}/x", check=False).returncode == 0, f"the user can write {path}"
            result = host.as_service_user(pid, f"touch {path}/y")
            assert result.returncode != 0 and "Read-only file system" in result.stderr, (path, result.stderr)
    finally:
        host.sh(f"rm -rf {' '.join(probes)}")
    assert host.as_service_user(pid, "touch /var/lib/sandboxd/.probe && rm /var/lib/sandboxd/.probe").returncode == 0
    assert host.as_service_user(pid, "ls /home /root").returncode != 0, "ProtectHome= hides /home and /root"
    # The key reaches the service as a credential file only, readable inside its namespace.
    key = started.control_plane.environment_key
    credential = host.as_service_user(pid, "cat /run/credentials/sandboxd.service/environment_key")
    assert credential.stdout.strip() == key, credential
    environ = host.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
    assert "CREDENTIALS_DIRECTORY=/run/credentials/sandboxd.service" in environ
    assert key not in environ and not re.search(r"^\w*(KEY|TOKEN|SECRET)\w*=", environ, re.M), environ
    # The account alone (outside the unit) reads neither the key's source nor the Docker socket.
    assert host.sh(f"{plain} cat /etc/sandboxd/credentials/environment_key", check=False).returncode != 0
    assert host.sh(f"{plain} test -w /run/docker.sock", check=False).returncode != 0
    assert key not in host.journal("sandboxd")


def test_a_hung_daemon_is_killed_by_the_watchdog_and_restarted(started: Instance) -> None:
    host = started.host
    before = host.show("sandboxd", "MainPID", "NRestarts")
    cursor = host.cursor()
    stopped = time.monotonic()
    host.sh(f"kill -STOP {before['MainPID']}")
    after = wait_until(
        lambda: (s := host.show("sandboxd", "MainPID", "NRestarts", "SubState"))["SubState"] == "running"
        and s["MainPID"] != before["MainPID"] and s,
        WATCHDOG_SECONDS + 40, "a restart after the watchdog timeout")
    print(f"hung daemon replaced by a running one after {time.monotonic() - stopped:.1f}s")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    journal = host.sh(f"journalctl -u sandboxd --no-pager --after-cursor='{cursor}'").stdout
    assert f"Watchdog timeout (limit {WATCHDOG_SECONDS}s)" in journal, journal
    assert "Failed with result 'watchdog'" in journal
    # The new process serves.
    sid = started.control_plane.add_session(six_tool_session("after-watchdog")).session_id
    assert_all_passed(started.wait_for_sessions([sid]), [sid])


def test_stop_lets_running_sessions_finish_within_the_stop_timeout(started: Instance, docker_client: Any) -> None:
    host, cp = started.host, started.control_plane
    ids = [cp.add_session(slow_session(f"stop{i}", seconds=15)).session_id for i in range(2)]
    started.wait_running(ids)
    cursor = host.cursor()
    assert not any(cp.state_snapshot()["sessions"][i]["done"] for i in ids), "sessions still running at stop"
    begun = time.monotonic()
    host.sh("systemctl stop sandboxd")
    elapsed = time.monotonic() - begun
    print(f"systemctl stop with 2 running sessions took {elapsed:.1f}s")
    state = cp.state_snapshot()
    assert_all_passed(state, ids)
    assert elapsed < TIMEOUT_STOP_SECONDS - 10, f"stop took {elapsed:.0f}s"
    shown = host.show("sandboxd", "ActiveState", "Result", "ExecMainStatus")
    assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, shown
    journal = assert_succeeded_in_journal(host, "sandboxd", state, ids, cursor)
    assert "shutdown_requested signal=SIGTERM" in journal
    assert managed_leftovers(docker_client, started.worker_id) == {"containers": [], "volumes": []}


def test_reload_hands_running_sessions_to_the_re_executed_daemon(started: Instance, docker_client: Any) -> None:
    """`systemctl reload` (ExecReload= sends SIGHUP): the daemon re-executes in place and adopts."""
    host, cp = started.host, started.control_plane
    before = host.show("sandboxd", "MainPID", "NRestarts")
    ids = [cp.add_session(slow_session(f"reload{i}", seconds=20)).session_id for i in range(2)]
    started.wait_running(ids)
    cursor = host.cursor()
    assert not any(cp.state_snapshot()["sessions"][i]["done"] for i in ids), "sessions still running at reload"
    # The guide's upgrade: a new install under the running daemon, then the reload.
    host.sh(f"cd {SRC} && /opt/sandboxd/bin/pip install --quiet --force-reinstall --no-deps --no-index "
            "--find-links wheelhouse sandboxd")
    guide_step("`systemctl reload sandboxd`")
    host.sh("systemctl reload sandboxd")
    # systemctl returns once ExecReload= has sent the signal; the unit is `reloading` from the
    # daemon's RELOADING=1 until the re-executed program sends READY=1.
    after = wait_until(lambda: (a := host.show("sandboxd", "MainPID", "NRestarts", "ActiveState", "SubState"))
                       ["ActiveState"] == "active" and a, 60,
                       lambda: f"the re-executed daemon's READY=1 ({host.show('sandboxd', 'ActiveState', 'SubState')})")
    assert after["MainPID"] == before["MainPID"], "a reload re-executes in place: the same PID"
    assert after["NRestarts"] == before["NRestarts"] and after["SubState"] == "running", after
    state = started.wait_for_sessions(ids)
    assert_all_passed(state, ids)
    journal = assert_succeeded_in_journal(host, "sandboxd", state, ids, cursor)
    assert "daemon_reexec" in journal, journal[-4000:]
    for sid in ids:
        assert re.search(rf"sandbox_adopted .*work_id={state['sessions'][sid]['work_id']}", journal), journal[-4000:]
    wait_until(lambda: host.show("sandboxd", "StatusText")["StatusText"] == "0/3 sessions running", 30,
               "the re-executed daemon reporting its adopted sessions finished")
    assert host.show("sandboxd", "MainPID") == {"MainPID": before["MainPID"]}


def test_the_template_runs_two_environments_side_by_side(host: Host, docker_client: Any) -> None:
    names = ("blue", "green")
    planes = {n: ControlPlane(Scenario(environment_id=f"env_{n}_{uuid.uuid4().hex[:6]}")).start() for n in names}
    instances = {n: Instance(host, f"sandboxd@{n}", planes[n], f"systemd-real-{n}-{uuid.uuid4().hex[:6]}",
                             free_port()) for n in names}
    try:
        host.sh(f"cd {SRC} && " + guide_step("install -m 0644 systemd/sandboxd@.service /etc/systemd/system/"))
        for name, instance in instances.items():
            host.sh(f"cd {SRC} && name={name} && " + " && ".join(guide_step(s) for s in (
                "install -d -m 0755 /etc/sandboxd/$name",
                "install -d -m 0700 /etc/sandboxd/$name/credentials",
                "install -m 0644 systemd/sandboxd.toml.example /etc/sandboxd/$name/sandboxd.toml",
            )))
            configure(host, f"/etc/sandboxd/{name}/sandboxd.toml", instance.control_plane, instance.worker_id,
                      instance.metrics_port)
            key_step(host, f"/etc/sandboxd/{name}/credentials", instance.control_plane,
                     "/etc/sandboxd/prod/credentials")
        host.sh(guide_step("systemctl daemon-reload") + " && "
                + guide_step("systemctl enable --now sandboxd@prod sandboxd@staging").replace("prod", "blue")
                .replace("staging", "green"))
        ids = {n: [i.control_plane.add_session(six_tool_session(f"{n}{k}")).session_id for k in range(2)]
               for n, i in instances.items()}
        for name, instance in instances.items():
            unit = instance.unit
            assert_all_passed(instance.wait_for_sessions(ids[name]), ids[name])

            def finished(u: str = unit) -> bool:
                return host.show(u, "StatusText")["StatusText"] == "0/3 sessions running"

            wait_until(finished, 30, f"{unit} reporting its sessions finished")
            assert host.show(unit, "ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"}
            assert ready(instance.metrics_port).startswith("200"), ready(instance.metrics_port)
            assert "daemon_ready" in host.sh(f"journalctl -t sandboxd-{name} -o cat --no-pager").stdout
            assert host.sh(f"test -d /var/lib/sandboxd/{name}", check=False).returncode == 0
    finally:
        host.sh("systemctl stop sandboxd@blue sandboxd@green", check=False)
        for instance in instances.values():
            instance.control_plane.stop()
            remove_leftovers(docker_client, instance.worker_id)
