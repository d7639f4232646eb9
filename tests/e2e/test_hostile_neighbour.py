"""The hostile-neighbour suite: one daemon, product defaults (network_mode none), hostile sessions
beside an ordinary one, under runc and gVisor.

Every hostile session attacks with what a tool has: bash, python3 and curl as the sandbox user, PID 1's
stdio through /proc/1/fd, the bind-mounted /run/sandboxd/api.sock. Each test asserts, for every attack:

- the ordinary session completes and its tool results are exactly its commands' stdout;
- the daemon lives through it (its /metrics answers, no traceback in its log) and exits 0 on SIGTERM
  with a clean `daemon_exit code=0` line;
- the hostile work item ends `stopped`, by exactly one effective stop, and nothing else is stopped twice;
- nothing is left behind: no container, no volume, no staging entry, no per-sandbox socket directory.

The attacks:
1. garbage on PID 1's stdout (wrong types, 1e400, a 38-digit integer, NaN, binary, a 20 MB line
   without a newline, 100k-deep and 2k-deep JSON nesting): counted as dropped lines, nothing else;
2. a forged `stopped` event followed by SIGKILL of the worker: the daemon still stops the item (on
   its own word, from what its broker did not see), without waiting for the lease to lapse;
3. the API through api.sock without the worker's credential (none, made up, x-api-key, both, a
   guessed placeholder), for its own session, the neighbour's session and item, the poll and
   /v1/agents, path tricks, absolute-form, CONNECT, malformed and oversized heads, a slow head, a
   head cut short: every answer is the broker's 403/400/408 and each refusal is counted by reason;
4. 200 connections held open on api.sock: the neighbour, started meanwhile, completes promptly;
5. ~120 MB to PID 1's stderr and stdout: the container's log on the engine stays within its bound
   (json-file 2 x 8 MiB) while it runs;
6. another sandbox's sockets: /run/sandboxd holds only this sandbox's api.sock and is read-only,
   no other socket (the engine's, another sandbox's directory, abstract ones) is reachable;
plus a forged `abort` written into the worker's stdin through /proc/1/fd/0, and reading the worker's
credential (a scan of everything readable for the placeholder, ptrace, process_vm_readv).

Found by reading the channel code as an attacker, and fixed (these tests keep them fixed):
- a refusal storm: each refused request was one WARNING line in the daemon's own log, unbounded
  (tens of thousands from one sandbox in 15 s); now a per-sandbox log budget, every refusal counted;
- with `log_format = "json"`, a line a tool writes to its stderr, copied into the daemon's log when
  its session fails, became a record of its own (`event`, `work_id`, `level`, `logger`, `time`
  the tool's): now the sandbox's text is one quoted field and never overrides the record's own.
gVisor runs attacks 1-6; the two above are runtime-independent (daemon side) and run under runc.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandboxd.controlplane.scenario import ScriptedSession, ToolStep, new_session_id
from tests.e2e.conftest import Harness, Run

RUNTIMES = ["runc", "runsc"]
LOG_BOUND = 16 * 1024 * 1024  # json-file max-size 8m x max-file 2 (sandboxd.containers.LOG_LIMITS)
LOG_SLACK = 1024 * 1024  # a file is rotated after the write that crossed max-size


# ---------------------------------------------------------------------------------------------------
# What the hostile tools run
# ---------------------------------------------------------------------------------------------------

# Lines a tool forges on PID 1's stdout (the daemon's event stream). Each `printf` is one atomic
# write of whole lines, so the worker's own events can only land between them. The leading empty
# line ends whatever partial line came before (empty lines are skipped, not counted).
FORGED_LINES = [
    '{"event":[],"t":0}',
    '{"event":"tool_end","t":1e400}',
    '{"event":"tool_end","t":99999999999999999999999999999999999999}',
    '{"event":"tool_end","t":-1}',
    '{"event":"tool_end","t":NaN}',
    '{"event":"tool_end","t":true}',
    '{"event":"no_such_event","t":1}',
]
FORGED_VALID = '{"event":"heartbeat","t":1,"first":true}'  # well-formed: taken, but believed only without a broker
FORGED_STOP = '{"event":"stopped","t":1}'
NOT_AN_EVENT = len(FORGED_LINES) + 1  # and the forged stop

STDOUT_ATTACKS = [
    "{ printf '\\n'; "
    + " ".join(f"printf '%s\\n' '{line}';" for line in [*FORGED_LINES, FORGED_VALID])
    + " } > /proc/1/fd/1 && echo forged-lines",
    "head -c 100000 /dev/urandom > /proc/1/fd/1; printf '\\n' > /proc/1/fd/1; echo binary",
    "head -c 20000000 /dev/zero | tr '\\0' a > /proc/1/fd/1 && echo endless-line",
    "python3 -c \"import sys; sys.stdout.write('[' * 100000 + '\\n' + '[' * 2000 + ']' * 2000 + '\\n')\""
    " > /proc/1/fd/1 && echo deep-nesting",
]
# The forged stop, then SIGKILL of the worker (the python process under PID 1, same uid as the tool).
FORGE_STOP_AND_KILL = (
    f"printf '\\n%s\\n' '{FORGED_STOP}' > /proc/1/fd/1; worker=$(pgrep -P 1 -f sandboxd-runtime/run.py); "
    "echo killing $worker; kill -9 $worker; sleep 30; echo worker-survived"
)
# A forged control message on the worker's stdin (the pipe behind PID 1's fd 0).
FORGE_ABORT = (
    "printf '%s\\n' '{\"type\":\"abort\",\"reason\":\"forged by a tool\"}' > /proc/1/fd/0 && echo abort-written; "
    "sleep 20; echo worker-ignored-it"
)

# Raw HTTP on api.sock, one connection per attempt; prints `name status source` per attempt, where
# source is `broker` when the body is the broker's refusal and anything else is shown.
API_ATTACKS = r'''
import socket, sys
OWN, OTHER, OTHER_WORK, ENV = sys.argv[1:5]
SOCK = "/run/sandboxd/api.sock"
FAKE = "sk-ant-api03-" + "A" * 40

def exchange(raw, *, wait=30.0, cut=False):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(wait)
    s.connect(SOCK)
    data = b""
    try:
        try:
            s.sendall(raw)
        except OSError:
            pass  # refused before the whole request was sent: the answer is still there to read
        if cut:
            return "cut"
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        return "no-answer"
    except ConnectionResetError:
        return "reset"  # closed with our unread bytes in its queue: a unix socket reports that first
    except OSError as exc:
        return "error-" + type(exc).__name__
    finally:
        s.close()
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "none"
    source = "broker" if b"sandboxd broker" in data else "OTHER:" + data[:300].decode("ascii", "replace")
    return status + " " + source

def req(target, *headers, method="GET", body=b""):
    lines = [method + " " + target + " HTTP/1.1", "Host: sandboxd-broker", *headers]
    if body:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

bearer = "Authorization: Bearer " + FAKE
attempts = {
    "own_no_credential": req("/v1/sessions/" + OWN),
    "own_made_up_bearer": req("/v1/sessions/" + OWN, bearer),
    "own_x_api_key": req("/v1/sessions/" + OWN, "x-api-key: " + FAKE),
    "own_both_headers": req("/v1/sessions/" + OWN, bearer, "x-api-key: " + FAKE),
    "own_guessed_placeholder": req("/v1/sessions/" + OWN, "Authorization: Bearer sandboxd-placeholder-" + "0" * 48),
    "other_session": req("/v1/sessions/" + OTHER, bearer),
    "other_events_post": req("/v1/sessions/" + OTHER + "/events", bearer, "content-type: application/json",
                             method="POST", body=b'{"events":[]}'),
    "other_item_stop": req("/v1/environments/%s/work/%s/stop" % (ENV, OTHER_WORK), bearer,
                           "content-type: application/json", method="POST", body=b'{"force":true}'),
    "other_item_heartbeat": req("/v1/environments/%s/work/%s/heartbeat" % (ENV, OTHER_WORK), bearer, method="POST"),
    "poll": req("/v1/environments/%s/work/poll" % ENV, bearer),
    "agents": req("/v1/agents", bearer),
    "dot_dot": req("/v1/sessions/%s/../../v1/agents" % OWN, bearer),
    "encoded_slashes": req("/v1/sessions/%s%%2F..%%2F..%%2Fv1%%2Fagents" % OWN, bearer),
    "absolute_form": req("https://api.anthropic.com/v1/agents", bearer),
    "connect": b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n",
    "pipelined": req("/v1/agents") + req("/v1/sessions/" + OWN),
    "garbage": b"GARBAGE\r\n\r\n",
    "binary": bytes(range(256)) + b"\r\n\r\n",
    "bad_header_name": b"GET /v1/agents HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    "no_host": b"GET /v1/agents HTTP/1.1\r\n\r\n",
    "oversized_head": req("/v1/sessions/" + OWN, "X-Pad: " + "a" * 200000),
}
for name, raw in attempts.items():
    print(name, exchange(raw), flush=True)
print("cut_head", exchange(b"GET /v1/agents HTTP/1.1\r\nHost: x\r\n", cut=True), flush=True)
print("slow_head", exchange(b"GET /v1/agents HTTP/1.1\r\nHost: x\r\n", wait=30), flush=True)
'''
# The same with curl, as a tool would first try it (curl normalises `..` unless told not to).
CURL = "curl -s -o /tmp/answer -w '%{{http_code}}' --unix-socket /run/sandboxd/api.sock {options} 'http://x{path}'"
CURL_ATTEMPTS = {
    "curl_no_credential": ("", "/v1/sessions/{own}"),
    "curl_bearer": ("-H 'Authorization: Bearer sk-ant-api03-made-up'", "/v1/sessions/{own}"),
    "curl_path_as_is": ("--path-as-is -H 'x-api-key: sk-ant-api03-made-up'", "/v1/sessions/{own}/../../v1/agents"),
}


def _curl_attempts(own: str) -> str:
    return "; ".join(
        f"echo {name} $({CURL.format(options=options, path=path.format(own=own))}) "
        "$(grep -q 'sandboxd broker' /tmp/answer && echo broker || echo OTHER)"
        for name, (options, path) in CURL_ATTEMPTS.items())


CREDENTIAL_ATTEMPTS = [
    *CURL_ATTEMPTS,
    "own_no_credential", "own_made_up_bearer", "own_x_api_key", "own_both_headers", "own_guessed_placeholder",
    "other_session", "other_events_post", "other_item_stop", "other_item_heartbeat", "poll", "agents",
    "dot_dot", "encoded_slashes", "absolute_form", "connect", "pipelined",
]
BAD_REQUEST_ATTEMPTS = ["garbage", "binary", "bad_header_name", "no_host", "oversized_head"]
# What each attempt must get: the broker's refusal, never the API's answer. A head over the bound is
# refused while it is still being sent; the unix socket may then report the reset before the 400.
API_EXPECTED: dict[str, set[str]] = {
    **{name: {"403 broker"} for name in CREDENTIAL_ATTEMPTS},  # the curl ones first: they run first
    **{name: {"400 broker"} for name in BAD_REQUEST_ATTEMPTS},
    "oversized_head": {"400 broker", "reset"},
    "cut_head": {"cut"},
    "slow_head": {"408 broker"},
}
API_REFUSALS = {"credential": len(CREDENTIAL_ATTEMPTS), "bad_request": len(BAD_REQUEST_ATTEMPTS) + 1,  # + cut_head
                "timeout": 1, "route": 0, "not_assigned": 0, "body_too_large": 0, "upstream": 0}

# Attack 6: what of the socket directory a tool can see, change or reach.
SOCKET_PROBE = r'''
import errno, os, socket, stat
D = "/run/sandboxd"
def outcome(fn):
    try:
        fn()
    except OSError as exc:
        return "denied"
    return "ALLOWED"
def bind_evil():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(D + "/evil.sock")
    finally:
        s.close()
print("listing", sorted(os.listdir(D)))
for what, fn in [("create", lambda: open(D + "/evil", "w").close()), ("mkdir", lambda: os.mkdir(D + "/d")),
                 ("unlink", lambda: os.unlink(D + "/api.sock")),
                 ("rename", lambda: os.rename(D + "/api.sock", D + "/moved.sock")),
                 ("symlink", lambda: os.symlink("/tmp", D + "/link")),
                 ("chmod", lambda: os.chmod(D + "/api.sock", 0o600)), ("bind", bind_evil)]:
    print(what, outcome(fn))
print("listing-after", sorted(os.listdir(D)))
found = []
for root, dirs, files in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in files + dirs:
        path = os.path.join(root, name)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                found.append(path)
        except OSError:
            found.append("unstatable:" + path)
print("sockets", sorted(found))
host_dir = ""
for line in open("/proc/self/mountinfo"):
    if line.split()[4:5] == [D]:
        host_dir = line.split()[3]
guesses = [os.path.dirname(host_dir) + "/egress.sock", os.path.dirname(host_dir) + "/api.sock",
           host_dir + "/api.sock", "/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock"]
reached = []
for path in sorted(set(found) | set(guesses)):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    try:
        s.connect(path.replace("unstatable:", ""))
        reached.append(path)
    except OSError:
        pass
    finally:
        s.close()
print("reachable", reached)
abstract = []
for line in open("/proc/net/unix").read().splitlines()[1:]:
    parts = line.split()
    if len(parts) > 7 and parts[7].startswith("@"):
        abstract.append(parts[7])
print("abstract", sorted(abstract))
'''
SOCKET_EXPECTED = [
    "listing ['api.sock']",
    *(f"{what} denied" for what in ("create", "mkdir", "unlink", "rename", "symlink", "chmod", "bind")),
    "listing-after ['api.sock']",
    "reachable ['/run/sandboxd/api.sock']",
    "abstract []",
]

# The worker's credential: searched for in everything a tool can read, and asked of the kernel.
CREDENTIAL_PROBE = r'''
import ctypes, errno, os, re, sys
worker = int(sys.argv[1])
pattern = re.compile(rb"sandboxd-placeholder-[0-9a-f]{8,}|sk-ant-[A-Za-z0-9_-]{12,}")
found = set()
def scan(data):
    found.update(pattern.findall(data))
for pid in filter(str.isdigit, os.listdir("/proc")):
    for name in ("environ", "cmdline"):
        try:
            scan(open("/proc/%s/%s" % (pid, name), "rb").read())
        except OSError:
            pass
    try:
        maps = open("/proc/%s/maps" % pid).read().splitlines()
        with open("/proc/%s/mem" % pid, "rb") as mem:
            for line in maps:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if "r" in line.split()[1] and hi - lo < 64 << 20:
                    try:
                        mem.seek(lo)
                        scan(mem.read(hi - lo))
                    except (OSError, OverflowError, ValueError):
                        pass
    except OSError:
        pass
for top in ("/tmp", "/workspace"):
    for root, dirs, files in os.walk(top):
        for name in files:
            try:
                scan(open(os.path.join(root, name), "rb").read(1 << 20))
            except OSError:
                pass
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(16, worker, None, None) == 0:  # PTRACE_ATTACH
    print("ptrace ALLOWED")
    libc.ptrace(17, worker, None, None)  # PTRACE_DETACH
else:
    print("ptrace denied", errno.errorcode.get(ctypes.get_errno(), "?"))
class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(4096)
local, remote = Iovec(ctypes.addressof(buf), 4096), Iovec(0x400000, 4096)
libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                                  ctypes.c_ulong]
read = libc.process_vm_readv(worker, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
print("process_vm_readv", "ALLOWED" if read >= 0 else "denied " + errno.errorcode.get(ctypes.get_errno(), "?"))
found = {f for f in found if b"made-up" not in f and b"AAAAAAAA" not in f}  # the attacker's own fakes
print("credentials found", len(found), *sorted(f[:24].decode() + "..." for f in found))
'''


def _py(script: str, *args: str) -> str:
    return f"python3 - {' '.join(args)} <<'PYEOF'\n{script}\nPYEOF"


def _bash(command: str) -> ToolStep:
    return ToolStep(name="bash", input={"command": command})


# ---------------------------------------------------------------------------------------------------
# The ordinary neighbour
# ---------------------------------------------------------------------------------------------------

@dataclass
class Neighbour:
    """An ordinary session whose tool results are known to the byte."""

    tag: str
    session_id: str = field(default_factory=new_session_id)

    @property
    def commands(self) -> list[tuple[str, str]]:
        return [
            (f"echo neighbour-{self.tag}", f"neighbour-{self.tag}"),
            ("python3 -c 'print(sum(range(101)))'", "5050"),
            (f"printf 'one {self.tag}\\ntwo\\n' > notes.txt && wc -l < notes.txt", "2"),
            ("cat notes.txt && echo $((6 * 7))", f"one {self.tag}\ntwo\n42"),
        ]

    def session(self) -> ScriptedSession:
        return ScriptedSession(session_id=self.session_id, title=f"neighbour {self.tag}",
                               steps=[_bash(command) for command, _ in self.commands])

    def check(self, state: dict[str, Any], work_id: str) -> None:
        record = state["sessions"][self.session_id]
        assert record["done"], f"the neighbour did not finish: {record}"
        texts = [r["text"] for r in record["results"]]
        assert texts == [expected for _, expected in self.commands]
        assert [r["is_error"] for r in record["results"]] == [False] * len(self.commands)
        assert state["work"][work_id]["stops"] == [{"credential": "sessions_token", "force": True}]
        assert state["work"][work_id]["times_stopped"] == 1


# ---------------------------------------------------------------------------------------------------
# Harness helpers
# ---------------------------------------------------------------------------------------------------

def _runtime_env(harness: Harness, runtime: str) -> dict[str, str]:
    if runtime == "runc":
        return {}
    assert runtime in harness.docker.info().get("Runtimes", {}), (
        f"the {runtime} runtime is not registered with the engine (WITH_TEST_TOOLS=1 scripts/bootstrap.sh)")
    return {"SANDBOXD_RUNTIME": runtime}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(harness: Harness, runtime: str, **env: str) -> tuple[Run, str]:
    address = f"127.0.0.1:{_free_port()}"
    run = harness.start("run", "--metrics-address", address, **_runtime_env(harness, runtime), **env)
    return run, address


def _scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _labelled(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, float]:
    """{reason: value} of a counter with one `reason` label."""
    return {dict(labels)["reason"]: value for (metric, labels), value in metrics.items() if metric == name}


def _sandbox_of(harness: Harness, work_id: str) -> str | None:
    """The container a work item was handed to, from its assignment record on the engine."""
    labels = [f"io.sandboxd.instance={harness.worker_id}", f"io.sandboxd.work-id={work_id}"]
    for volume in harness.docker.volumes.list(filters={"label": labels}):
        name = (volume.attrs.get("Labels") or {}).get("io.sandboxd.sandbox")
        if name:
            return str(name)
    return None


def _until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> float:
    """Wait until `condition()`; returns when (monotonic), fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout}s")
        time.sleep(interval)
    return time.monotonic()


def _in_sandbox(harness: Harness, work_id: str, *command: str) -> bool:
    """True when `command` succeeds inside the work item's sandbox (False if there is none yet)."""
    name = _sandbox_of(harness, work_id)
    if name is None:
        return False
    try:
        return int(harness.docker.containers.get(name).exec_run(list(command)).exit_code) == 0
    except Exception:  # noqa: BLE001 - not running (yet, or any more)
        return False


def _all_stopped(harness: Harness, work_ids: list[str], timeout: float) -> dict[str, Any]:
    return harness.control_plane.wait_for(
        lambda s: all(s["work"][w]["state"] == "stopped" for w in work_ids), timeout=timeout)


def _stopped_once(state: dict[str, Any], work_id: str) -> dict[str, Any]:
    work = state["work"][work_id]
    assert work["state"] == "stopped", work
    assert len(work["stops"]) == 1 and work["times_stopped"] == 1, work["stop_log"]
    return dict(work)


def _shutdown_cleanly(harness: Harness, run: Run, address: str) -> None:
    """The daemon lived through it, exits 0 on SIGTERM, and leaves nothing behind."""
    assert run.process.poll() is None, f"the daemon died:\n{run.output[-6000:]}"
    _scrape(address)  # still answering
    harness.signal(run, signal.SIGTERM)
    harness.wait(run, timeout=90)
    output = run.output
    assert run.returncode == 0, output[-6000:]
    assert _records(output, "shutdown_requested", signal="SIGTERM"), output[-3000:]
    assert _records(output, "daemon_exit", code="0"), output[-3000:]
    for bad in ("Traceback", "connection_failed", "session_crashed"):
        assert bad not in output, f"{bad} in the daemon's log:\n{output[-6000:]}"
    summary = harness.control_plane.state_snapshot()["stop_summary"]
    assert summary["stopped_more"] == [] and summary["not_stopped"] == [], summary
    assert harness.leftovers() == {"containers": [], "volumes": []}
    assert harness.staging_leftovers() == []
    for directory in (Path(harness.socket_dir), harness.state_dir / "run"):
        left = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        assert left == [], f"left in {directory}: {left}"
    per_sandbox = sorted(str(p) for p in harness.state_dir.rglob("sandboxd-*"))
    assert per_sandbox == [], f"per-sandbox leftovers in the state dir: {per_sandbox}"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(str(harness.tmp))]
    assert mounts == [], f"mounts left under the test's directory: {mounts}"


def _records(output: str, event: str, **fields: str) -> list[dict[str, Any]]:
    """The daemon's log records of `event` with these field values, from text or JSON lines."""
    found = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
        else:
            text = re.match(r"\S+ \S+ +\w+ +\S+ (.*)", line)  # date time level logger message
            if text is None or not text.group(1).startswith(event + " "):
                continue
            record = dict(re.findall(r"(\w+)=(\S+)", text.group(1))) | {"event": event}
        if record.get("event") == event and all(str(record.get(k)) == v for k, v in fields.items()):
            found.append(record)
    return found


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------
# Attacks 1, 2, 3, 6 and the stdin forgery, in one daemon run
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", RUNTIMES)
def test_forged_output_api_calls_and_sockets_hurt_no_neighbour(harness: Harness, runtime: str) -> None:
    cp = harness.control_plane
    neighbour = Neighbour("a")
    ordinary = cp.add_session(neighbour.session())
    api_id = new_session_id()
    api_attacker = cp.add_session(ScriptedSession(session_id=api_id, title="api attacker", steps=[
        _bash(_curl_attempts(api_id) + "; "
              + _py(API_ATTACKS, api_id, neighbour.session_id, ordinary.work_id, cp.environment_id)),
        _bash(_py(SOCKET_PROBE)),
        _bash(_py(CREDENTIAL_PROBE, "$(pgrep -P 1 -f sandboxd-runtime/run.py)")),
    ]))
    forger = cp.add_session(ScriptedSession(title="stdout forger", steps=[
        *(_bash(command) for command in STDOUT_ATTACKS), _bash(FORGE_STOP_AND_KILL)]))
    stdin_forger = cp.add_session(ScriptedSession(title="stdin forger", steps=[_bash(FORGE_ABORT)]))
    items = [ordinary.work_id, api_attacker.work_id, forger.work_id, stdin_forger.work_id]

    run, address = _start(harness, runtime)
    state = _all_stopped(harness, items, timeout=150)
    # The daemon settles a sandbox a moment after its item's stop; the last one's metrics follow.
    _until(lambda: _scrape(address)[("sandboxd_sessions_running", ())] == 0, 60, "the sessions did not end")
    metrics = _scrape(address)

    neighbour.check(state, ordinary.work_id)

    # 3 and 6: every API attempt was answered by the broker, never by the API, and counted by reason.
    results = [r["text"] for r in state["sessions"][api_id]["results"]]
    assert len(results) == 3, results
    answers = dict(line.split(" ", 1) for line in _lines(results[0]))
    assert list(answers) == list(API_EXPECTED), results[0]
    wrong = {name: answer for name, answer in answers.items() if answer not in API_EXPECTED[name]}
    assert wrong == {}, results[0]
    assert _labelled(metrics, "sandboxd_broker_refused_total") == API_REFUSALS
    probe = _lines(results[1])
    assert [line for line in probe if not line.startswith("sockets ")] == SOCKET_EXPECTED, results[1]
    if runtime == "runc":  # gVisor cannot stat a host socket through its gofer (EINVAL): it lists it only
        assert "sockets ['/run/sandboxd/api.sock']" in probe, results[1]
    # EPERM under runc (the worker is not dumpable); gVisor has no process_vm_readv at all (ENOSYS).
    assert [line.rsplit(" ", 1)[0] for line in _lines(results[2])] == \
        ["ptrace denied", "process_vm_readv denied", "credentials found"], results[2]
    assert _lines(results[2])[-1] == "credentials found 0", results[2]
    assert _stopped_once(state, api_attacker.work_id)["stops"] == [{"credential": "sessions_token", "force": True}]
    # The neighbour's session saw only its own worker's token (and the daemon's metadata read).
    seen = state["sessions"][neighbour.session_id]["credentials_seen"]
    assert {kind for kinds in seen.values() for kind in kinds} <= {"sessions_token", "environment_key"}, seen
    assert [s["by"] for s in state["work"][ordinary.work_id]["stop_log"]] == ["sessions_token"]

    # 1: the garbage was dropped and counted; the forged (but well-formed) lines changed nothing.
    forged = [r["text"] for r in state["sessions"][forger.session_id]["results"]]
    assert forged == ["forged-lines", "binary", "endless-line", "deep-nesting"], forged
    dropped = _labelled(metrics, "sandboxd_sandbox_output_dropped_total")
    # The seven forged lines come first and are always read; the forged stop is the sandbox's last line,
    # written after 20 MB of floods the engine's bounded log (2 x 8 MB, rotated) may not keep for the follower.
    assert len(FORGED_LINES) <= dropped["not_an_event"] <= NOT_AN_EVENT, dropped
    assert dropped["oversized"] >= 2 and dropped["malformed"] >= 2, dropped
    # 2: the forged stop was not believed and the killed worker stopped nothing: the daemon did, at once.
    work = _stopped_once(state, forger.work_id)
    assert work["stops"] == [{"credential": "environment_key", "force": True}], work
    assert work["lease_expiries"] == 0, work
    assert f"sandbox_ended_unstopped work_id={forger.work_id}" in run.output

    # The forged abort on the worker's stdin ends only that session, stopped once.
    _stopped_once(state, stdin_forger.work_id)

    _shutdown_cleanly(harness, run, address)


# ---------------------------------------------------------------------------------------------------
# Attack 4: connection exhaustion on api.sock
# ---------------------------------------------------------------------------------------------------

HOLD_SECONDS = 20  # under the lease TTL (30 s): the attacker's own worker may wait, but not lose its item
HOLD_CONNECTIONS = r'''
import socket, sys, time
count, hold = int(sys.argv[1]), float(sys.argv[2])
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect("/run/sandboxd/api.sock")
    except OSError as exc:
        print("connect failed after", len(held), type(exc).__name__)
        s.close()
        break
    held.append(s)
open("/tmp/holding", "w").close()
time.sleep(hold)
answered = 0
for s in held:
    s.setblocking(False)
    try:
        answered += b" 408 " in s.recv(65536)
    except OSError:
        pass
    s.close()
open("/tmp/released", "w").close()
print("held", len(held))
print("timed out by the broker", answered)
'''


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_connection_exhaustion_slows_only_the_attacker(harness: Harness, runtime: str) -> None:
    cp = harness.control_plane
    attacker = cp.add_session(ScriptedSession(title="connection hog", steps=[
        _bash(_py(HOLD_CONNECTIONS, "200", str(HOLD_SECONDS))), _bash("echo still-served")]))
    run, address = _start(harness, runtime)
    _until(lambda: _in_sandbox(harness, attacker.work_id, "test", "-f", "/tmp/holding"), 90,
           "the attacker did not open its connections")

    neighbour = Neighbour("b")
    began = time.monotonic()
    ordinary = cp.add_session(neighbour.session())
    state = _all_stopped(harness, [ordinary.work_id], timeout=HOLD_SECONDS)
    took = time.monotonic() - began
    assert not _in_sandbox(harness, attacker.work_id, "test", "-f", "/tmp/released"), \
        f"the neighbour took {took:.1f}s: it finished only after the attacker let go"
    neighbour.check(state, ordinary.work_id)
    print(f"neighbour took {took:.1f}s beside 200 held connections")

    state = _all_stopped(harness, [attacker.work_id], timeout=90)
    results = [r["text"] for r in state["sessions"][attacker.session_id]["results"]]
    held, timed_out = results[0].splitlines()
    assert held == "held 200", results
    assert results[1:] == ["still-served"], results
    _stopped_once(state, attacker.work_id)
    _until(lambda: _scrape(address)[("sandboxd_sessions_running", ())] == 0, 60, "the sessions did not end")
    # The connections that got one of its 8 slots (less those its worker kept) were answered 408 after 10 s.
    refused = _labelled(_scrape(address), "sandboxd_broker_refused_total")
    assert refused["timeout"] >= int(timed_out.rsplit(" ", 1)[1]) >= 1, (refused, timed_out)
    assert {reason: n for reason, n in refused.items() if reason != "timeout"} == \
        {reason: 0 for reason in API_REFUSALS if reason != "timeout"}, refused
    _shutdown_cleanly(harness, run, address)


# ---------------------------------------------------------------------------------------------------
# Attack 5: flooding the container's log
# ---------------------------------------------------------------------------------------------------

FLOOD = [
    # Well-formed events, the dearest lines for the daemon to take (parsed, fed, counted).
    "yes '{\"event\":\"tool_end\",\"t\":1,\"tool\":\"bash\",\"outcome\":\"ok\",\"seconds\":0.5,\"pad\":\"flood\"}' "
    "| head -c 80000000 > /proc/1/fd/1 && echo stdout-flooded",
    "head -c 40000000 /dev/zero | tr '\\0' e > /proc/1/fd/2 && echo stderr-flooded",
]


class LogWatch:
    """Samples, in a thread, the size of one work item's container log on the engine and the daemon's RSS."""

    def __init__(self, harness: Harness, work_id: str, daemon_pid: int) -> None:
        self._harness, self._work_id, self._pid = harness, work_id, daemon_pid
        self.samples: list[tuple[float, int]] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def peak(self) -> int:
        return max((size for _, size in self.samples), default=0)

    def _run(self) -> None:
        log_path = ""
        while not self._stop.wait(0.1):
            self.peak_rss = max(self.peak_rss, _rss(self._pid))
            if not log_path:
                name = _sandbox_of(self._harness, self._work_id)
                try:
                    log_path = str(self._harness.docker.api.inspect_container(name)["LogPath"]) if name else ""
                except Exception:  # noqa: BLE001 - not created yet
                    continue
            files = [Path(log_path), *Path(log_path).parent.glob(Path(log_path).name + ".*")] if log_path else []
            sizes = [f.stat().st_size for f in files if f.exists()]
            if sizes:
                self.samples.append((time.monotonic(), sum(sizes)))

    def __enter__(self) -> LogWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_log_flood_stays_bounded_and_slows_no_neighbour(harness: Harness, runtime: str) -> None:
    cp = harness.control_plane
    flooder = cp.add_session(ScriptedSession(title="log flood", steps=[_bash(command) for command in FLOOD]))
    run, address = _start(harness, runtime)
    with LogWatch(harness, flooder.work_id, run.process.pid) as watch:
        _until(lambda: watch.peak > 4 * 1024 * 1024, 90, "the flood did not start")
        neighbour = Neighbour("c")
        began = time.monotonic()
        ordinary = cp.add_session(neighbour.session())
        state = _all_stopped(harness, [ordinary.work_id], timeout=60)
        took = time.monotonic() - began
        state = _all_stopped(harness, [flooder.work_id], timeout=120)
    neighbour.check(state, ordinary.work_id)
    print(f"neighbour took {took:.1f}s; log peak {watch.peak / 2**20:.1f} MiB; daemon RSS peak "
          f"{watch.peak_rss / 2**20:.0f} MiB")
    assert took < 30, f"the neighbour took {took:.1f}s beside the flood"
    assert [r["text"] for r in state["sessions"][flooder.session_id]["results"]] == \
        ["stdout-flooded", "stderr-flooded"]
    _stopped_once(state, flooder.work_id)
    # Measured while the sandbox ran: past one rotation (so the flood was seen), within two files.
    assert 8 * 2**20 < watch.peak <= LOG_BOUND + LOG_SLACK, [size for _, size in watch.samples][-20:]
    _until(lambda: _scrape(address)[("sandboxd_sessions_running", ())] == 0, 60, "the sessions did not end")
    _shutdown_cleanly(harness, run, address)


# ---------------------------------------------------------------------------------------------------
# Found by reading the channel code as an attacker: a refusal storm, and log records forged on stderr
# ---------------------------------------------------------------------------------------------------

STORM_SECONDS = 15
# Eight threads (the socket's connection cap) sending refused requests as fast as the broker answers.
REFUSAL_STORM = r'''
import socket, sys, threading, time
end = time.monotonic() + float(sys.argv[1])
answered = []
def storm():
    n = 0
    while time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect("/run/sandboxd/api.sock")
            s.sendall(b"GET /v1/agents HTTP/1.1\r\nHost: x\r\n\r\n")
            n += s.recv(4096).startswith(b"HTTP/1.1 403 ")
        except OSError:
            pass
        finally:
            s.close()
    answered.append(n)
open("/tmp/holding", "w").close()
threads = [threading.Thread(target=storm) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("refused", sum(answered))
'''
# What one sandbox may add to the daemon's own log for refusals, however many it provokes.
REFUSAL_LOG_BOUND = 20  # a per-sandbox budget: the first 5, then one line every 30 s


def test_refusal_storm_slows_no_neighbour(harness: Harness) -> None:
    cp = harness.control_plane
    attacker = cp.add_session(ScriptedSession(title="refusal storm",
                                              steps=[_bash(_py(REFUSAL_STORM, str(STORM_SECONDS)))]))
    run, address = _start(harness, "runc")
    _until(lambda: _in_sandbox(harness, attacker.work_id, "test", "-f", "/tmp/holding"), 90,
           "the storm did not start")
    neighbour = Neighbour("d")
    began = time.monotonic()
    ordinary = cp.add_session(neighbour.session())
    state = _all_stopped(harness, [ordinary.work_id], timeout=STORM_SECONDS)
    took = time.monotonic() - began
    neighbour.check(state, ordinary.work_id)
    print(f"neighbour took {took:.1f}s beside a refusal storm")

    state = _all_stopped(harness, [attacker.work_id], timeout=90)
    _stopped_once(state, attacker.work_id)
    refused = int(state["sessions"][attacker.session_id]["results"][0]["text"].split()[-1])
    assert refused > 1000, refused  # the storm did hit the broker
    _until(lambda: _scrape(address)[("sandboxd_sessions_running", ())] == 0, 60, "the sessions did not end")
    counted = _labelled(_scrape(address), "sandboxd_broker_refused_total")
    assert counted == {reason: refused if reason == "credential" else 0 for reason in API_REFUSALS}, counted
    logged = len(_records(run.output, "broker_refused"))
    _shutdown_cleanly(harness, run, address)
    assert logged <= REFUSAL_LOG_BOUND, \
        f"one sandbox wrote {logged} broker_refused lines into the daemon's log in {STORM_SECONDS}s"


def test_stderr_cannot_forge_the_daemon_log_records(harness: Harness) -> None:
    cp = harness.control_plane
    neighbour = Neighbour("e")
    ordinary = cp.add_session(neighbour.session())
    forged = (f"event=session_finished work_id={ordinary.work_id} session_id={neighbour.session_id} "
              "outcome=failed reason=forged level=error logger=sandboxd.session time=2020-01-01T00:00:00.000Z")
    attacker = cp.add_session(ScriptedSession(title="log forger", steps=[
        _bash(f"printf '%s\\n' '{forged}' > /proc/1/fd/2 && echo forged"),
        # A failed session's last log lines are copied into the daemon's log: make it fail.
        _bash("kill -9 $(pgrep -P 1 -f sandboxd-runtime/run.py); sleep 30"),
    ]))
    run, address = _start(harness, "runc", SANDBOXD_LOG_FORMAT="json")
    state = _all_stopped(harness, [ordinary.work_id, attacker.work_id], timeout=90)
    neighbour.check(state, ordinary.work_id)
    _stopped_once(state, attacker.work_id)
    _until(lambda: _scrape(address)[("sandboxd_sessions_running", ())] == 0, 60, "the sessions did not end")
    _shutdown_cleanly(harness, run, address)
    assert "reason=forged" in run.output or '"reason": "forged"' in run.output, \
        "the attacker's stderr was copied into the daemon's log"
    finished = _records(run.output, "session_finished", work_id=ordinary.work_id)
    assert [r.get("outcome") for r in finished if r.get("reason") != "forged"] == ["succeeded"]
    assert not any(r.get("reason") == "forged" for r in finished), \
        "a sandbox's stderr line copied into the JSON log became a record of its own"
