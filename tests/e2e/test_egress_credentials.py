"""A credential that never enters the sandbox, under runc and under gVisor.

A loopback HTTPS service with a certificate from a test CA (which only the daemon is told to trust)
stands for a private API. The daemon has a rule for it; the sandbox has only a placeholder in
API_TOKEN and the proxy's CA in its bundle. A tool's curl with the placeholder reaches the service,
which sees the real token; the same placeholder to a host without the rule (tunnelled untouched)
or over plain HTTP carries nothing; and a scan of the sandbox's environment, files and readable
process memory finds no real value. A session's git clones and pushes a private repository over
HTTPS with the placeholder as its password.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import secrets
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pip
import pytest

from sandboxd.controlplane.scenario import Expect, ScriptedSession, ToolStep
from tests.e2e.conftest import Harness
from tests.integration.git_server import git
from tests.integration.test_egress_credentials import seed_repository
from tests.integration.test_egress_proxy import build_index
from tests.integration.tls_service import (
    ServiceCa,
    TlsGitServer,
    TlsService,
    make_test_ca,
    serve_index,
    serve_tls,
)

# Run by a tool, with the needle reversed in its source so that only this process holds it whole:
# every other process's readable environ and memory, and the files where a sandbox keeps things.
SCAN = r'''
import os
needle = "{reversed}"[::-1].encode()
me, found = str(os.getpid()), []
for pid in filter(str.isdigit, os.listdir("/proc")):
    if pid == me:
        continue
    for name in ("environ", "cmdline", "mem"):
        try:
            if name == "mem":
                data = b""
                for line in open(f"/proc/{{pid}}/maps"):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    if "r" in line.split()[1] and hi - lo < 64 << 20:
                        with open(f"/proc/{{pid}}/mem", "rb") as mem:
                            try:
                                mem.seek(lo); data += mem.read(hi - lo)
                            except (OSError, OverflowError, ValueError): pass
            else:
                data = open(f"/proc/{{pid}}/{{name}}", "rb").read()
        except OSError:
            continue
        if needle in data:
            found.append(f"{{pid}}/{{name}}")
files = 0
for top in ("/workspace", "/tmp", "/run", "/etc", "/home", "/var", "/root", "/opt"):
    for root, dirs, names in os.walk(top):
        for n in names:
            path = os.path.join(root, n)
            try:
                if os.path.islink(path) or os.path.getsize(path) > 32 << 20:
                    continue
                with open(path, "rb") as f:
                    files += 1
                    if needle in f.read():
                        found.append(path)
            except OSError:
                pass
print("FILES", files > 100, "FOUND", len(found), found)
'''


class _Plain(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.hits += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"plain")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def plain() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Plain)
    server.hits = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def service_ca(tmp_path: Path) -> ServiceCa:
    return make_test_ca(tmp_path / "service-ca")


@pytest.fixture
def service(service_ca: ServiceCa) -> Iterator[TlsService]:
    with serve_tls(service_ca) as server:
        yield server


@pytest.fixture
def other(service_ca: ServiceCa) -> Iterator[TlsService]:
    with serve_tls(service_ca) as server:
        yield server


def _bash(command: str, **expect: Any) -> ToolStep:
    return ToolStep(name="bash", input={"command": command}, expect=Expect(**expect))


def _daemon_env(rule: dict[str, Any], ca: ServiceCa, runtime: str, allowed: list[str] | None = None) -> dict[str, str]:
    """The daemon's settings for one credential rule to a loopback service: its port allowed, its CA trusted."""
    env = {
        "SANDBOXD_EGRESS_ALLOWED_HOSTS": json.dumps(allowed or [f"{rule['host']}:{rule['port']}"]),
        "SANDBOXD_EGRESS_CREDENTIALS": json.dumps([rule]),
        "SANDBOXD_EGRESS_UPSTREAM_CA_FILE": str(ca.cert_file),
    }
    if runtime != "runc":
        env["SANDBOXD_RUNTIME"] = runtime
    return env


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_a_placeholder_reaches_the_service_as_the_real_token(harness: Harness, service_ca: ServiceCa,
                                                             service: TlsService, other: TlsService, plain: Any,
                                                             runtime: str) -> None:
    secret = "e2e-" + secrets.token_hex(16)
    secret_file = harness.tmp / "api-token"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    port, other_port, plain_port = service.port, other.port, plain.server_address[1]
    curl = "env -u NO_PROXY -u no_proxy curl -s -S --max-time 20 -o - -w ' status=%{http_code}'"
    steps = [
        _bash('case "$API_TOKEN" in sandboxd-credential-api-*) echo PH-OK;; esac; '
              'test "$CURL_CA_BUNDLE" = /run/sandboxd/ca-bundle.pem && test -r "$SSL_CERT_FILE" && echo CA-OK; '
              "echo KEYS $(grep -rl 'PRIVATE KEY' /run/sandboxd 2>/dev/null | wc -l)",
              contains=["PH-OK", "CA-OK", "KEYS 0"]),
        _bash(f'{curl} -H "Authorization: Bearer $API_TOKEN" https://localhost:{port}/private -D -',
              contains=['"path": "/private"', "status=200"], not_contains=["X-Seen-Authorization"]),
        # A host without the rule: tunnelled end to end (its certificate is the test CA's, hence -k here).
        _bash(f'{curl} -k -H "Authorization: Bearer $API_TOKEN" https://127.0.0.1:{other_port}/other',
              contains=["status=200"]),
        # Plain HTTP never carries a credential: to the rule's host and to any other, refused.
        _bash(f'{curl} -H "Authorization: Bearer $API_TOKEN" http://localhost:{port}/plain',
              contains=["status=403"]),
        _bash(f'{curl} -u "git:$API_TOKEN" http://localhost:{plain_port}/plain', contains=["status=403"]),
        _bash(f"python3 - <<'EOF'\n{SCAN.format(reversed=secret[::-1])}\nEOF",
              contains=["FILES True FOUND 0 []"]),
    ]
    session = harness.control_plane.add_session(ScriptedSession(steps=steps))
    rule = {"name": "api", "host": "localhost", "port": port, "secret_file": str(secret_file),
            "placeholder_env": "API_TOKEN"}
    allowed = [f"localhost:{port}", f"127.0.0.1:{other_port}", f"localhost:{plain_port}"]
    run = harness.drain(env=_daemon_env(rule, service_ca, runtime, allowed))

    assert run.returncode == 0, run.output[-5000:]
    results = harness.control_plane.state_snapshot()["sessions"][session.session_id]["results"]
    assert [r["passed"] for r in results] == [True] * len(steps), [r["text"] for r in results]
    assert [(s.path, s.headers.get("authorization")) for s in service.seen] == [("/private", f"Bearer {secret}")]
    (seen_other,) = other.seen
    assert seen_other.headers["authorization"].startswith("Bearer sandboxd-credential-api-")
    assert plain.hits == 0
    assert re.search(r"egress_credential_injected host=localhost rule=api sandbox=\S+ session=sesn_", run.output)
    assert "reason=placeholder" in run.output
    assert secret not in run.output
    assert harness.leftovers() == {"containers": [], "volumes": []}


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_git_clones_and_pushes_with_a_placeholder(harness: Harness, service_ca: ServiceCa, runtime: str) -> None:
    root = harness.tmp / "git-root"
    bare = seed_repository(root, harness.tmp)
    with TlsGitServer(root, ca=service_ca) as server:
        token_file = harness.tmp / "git-token"
        token_file.write_text(server.token + "\n")
        url = f"https://x-access-token:$GIT_TOKEN@localhost:{server.port}/private/repo.git"
        git_cmd = "env -u NO_PROXY -u no_proxy GIT_TERMINAL_PROMPT=0 git -c user.name=t -c user.email=t@example.invalid"
        steps = [
            _bash(f'cd /tmp && {git_cmd} clone -q "{url}" repo && cat repo/README && echo CLONED',
                  contains=["seed", "CLONED"]),
            _bash(f"cd /tmp/repo && echo pushed > pushed.txt && {git_cmd} add pushed.txt && "
                  f"{git_cmd} commit -q -m pushed && {git_cmd} push -q origin HEAD:main && echo PUSHED",
                  contains=["PUSHED"]),
        ]
        session = harness.control_plane.add_session(ScriptedSession(steps=steps))
        rule = {"name": "git", "host": "localhost", "port": server.port, "format": "basic",
                "secret_file": str(token_file), "placeholder_env": "GIT_TOKEN"}
        run = harness.drain(env=_daemon_env(rule, service_ca, runtime))
        requests = list(server.requests)

    assert run.returncode == 0, run.output[-5000:]
    results = harness.control_plane.state_snapshot()["sessions"][session.session_id]["results"]
    assert [r["passed"] for r in results] == [True] * len(steps), [r["text"] for r in results]
    assert git("log", "-1", "--format=%s", "main", cwd=bare) == "pushed"
    assert "sandboxd-credential" not in str(requests)
    assert any(r.path.endswith("git-receive-pack") and r.headers.get("Authorization") for r in requests)
    assert server.token not in run.output
    assert harness.leftovers() == {"containers": [], "volumes": []}


def test_an_opt_in_rule_applies_only_to_the_session_that_asks(harness: Harness, service_ca: ServiceCa,
                                                               service: TlsService) -> None:
    secret = "opt-in-" + secrets.token_hex(16)
    secret_file = harness.tmp / "api-token"
    secret_file.write_text(secret + "\n")
    curl = "env -u NO_PROXY -u no_proxy curl -s -S --max-time 20 -o - -w ' status=%{http_code}'"
    url = f"https://localhost:{service.port}"
    cp = harness.control_plane
    asking = cp.add_session(ScriptedSession(metadata={"egress_credentials": "api"}, steps=[
        _bash(f'{curl} -H "Authorization: Bearer $API_TOKEN" {url}/asked', contains=["status=200"])]))
    # Not asked: a plain tunnel to the service (its own certificate, hence -k), the placeholder untouched.
    other = cp.add_session(ScriptedSession(steps=[
        _bash(f'{curl} -k -H "Authorization: Bearer $API_TOKEN" {url}/not-asked', contains=["status=200"])]))
    rule = {"name": "api", "host": "localhost", "port": service.port, "secret_file": str(secret_file),
            "placeholder_env": "API_TOKEN", "session_opt_in": True}
    run = harness.drain(env=_daemon_env(rule, service_ca, "runc"))

    assert run.returncode == 0, run.output[-5000:]
    sessions = cp.state_snapshot()["sessions"]
    for session in (asking, other):
        assert [r["passed"] for r in sessions[session.session_id]["results"]] == [True]
    seen = {s.path: s.headers["authorization"] for s in service.seen}
    assert seen["/asked"] == f"Bearer {secret}"
    assert seen["/not-asked"].startswith("Bearer sandboxd-credential-api-")
    assert f"egress_credentials_opt_in session_id={asking.session_id} rules=api" in run.output
    assert harness.leftovers() == {"containers": [], "volumes": []}


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_pip_downloads_from_a_private_index_with_a_placeholder(harness: Harness, service_ca: ServiceCa,
                                                               runtime: str) -> None:
    """pip in a sandbox, its index password the placeholder: the index sees the real one, the sandbox never.

    Our image has no pip, so the tool fetches this machine's pip (its package, zipped) from the same
    private index first, with curl and the placeholder as its Basic password, and runs it from the zip.
    """
    secret = "index-" + secrets.token_hex(16)
    root = harness.tmp / "index"
    build_index(root)
    with zipfile.ZipFile(root / "pip.zip", "w") as archive:
        package = Path(pip.__file__).parent
        for path in package.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, Path("pip") / path.relative_to(package))
    secret_file = harness.tmp / "index-password"
    secret_file.write_text(secret + "\n")
    with serve_index(root, service_ca, secret) as index:
        port = int(index.server_address[1])
        direct = "env -u NO_PROXY -u no_proxy"
        steps = [
            _bash(f'cd /tmp && {direct} curl -sS -f -u "user:$PIP_PASSWORD" -o pip.zip '
                  f"https://localhost:{port}/pip.zip && echo FETCHED", contains=["FETCHED"]),
            _bash(f"cd /tmp && {direct} python3 pip.zip/pip download --no-deps --no-cache-dir "
                  "--disable-pip-version-check --retries 0 --timeout 20 --proxy \"$HTTPS_PROXY\" "
                  f'--index-url "https://user:$PIP_PASSWORD@localhost:{port}/simple/" -d out tinypkg '
                  "&& ls out", contains=["tinypkg-1.0-py3-none-any.whl"]),
        ]
        session = harness.control_plane.add_session(ScriptedSession(steps=steps))
        rule = {"name": "index", "host": "localhost", "port": port, "format": "basic",
                "secret_file": str(secret_file), "placeholder_env": "PIP_PASSWORD"}
        run = harness.drain(env=_daemon_env(rule, service_ca, runtime))
        seen = list(index.seen)

    assert run.returncode == 0, run.output[-5000:]
    results = harness.control_plane.state_snapshot()["sessions"][session.session_id]["results"]
    assert [r["passed"] for r in results] == [True] * len(steps), [r["text"] for r in results]
    expected = "Basic " + base64.b64encode(f"user:{secret}".encode()).decode()
    assert seen.count(expected) >= 3, seen  # pip.zip, the project page and the wheel
    assert all(header == expected for header in seen if header), seen
    assert secret not in run.output and "sandboxd-credential" not in str(seen)
    assert harness.leftovers() == {"containers": [], "volumes": []}
