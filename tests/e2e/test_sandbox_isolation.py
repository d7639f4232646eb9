"""What a session's tools can see and do inside a real sandbox: nothing the daemon does not hand them."""

from __future__ import annotations

import json
import threading
from typing import Any

from sandboxd.controlplane.scenario import Expect, ScriptedSession, ToolStep
from tests.e2e.conftest import Harness

# Read every environ the sandbox user can read; print them NUL-separated so the test sees the values.
READ_ENVIRONS = "for f in /proc/[0-9]*/environ; do cat \"$f\" 2>/dev/null | tr '\\0' '\\n'; done; echo END-ENVIRONS"


def _results(state: dict[str, Any], session_id: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = state["sessions"][session_id]["results"]
    return results


def _inspect_while_running(harness: Harness, found: list[dict[str, Any]], stop: threading.Event) -> None:
    filters = {"label": ["io.sandboxd.managed=true", f"io.sandboxd.instance={harness.worker_id}"]}
    records = {"label": [*filters["label"], "io.sandboxd.role=assignment"]}
    while not stop.is_set() and not found:
        for volume in harness.docker.api.volumes(filters=records).get("Volumes") or []:
            name = volume["Labels"]["io.sandboxd.sandbox"]
            found.append({**harness.docker.api.inspect_container(name), "record": volume["Labels"]})
        stop.wait(0.1)


def test_sandbox_is_hardened_and_never_sees_the_environment_key(harness: Harness) -> None:
    cp = harness.control_plane
    steps = [
        ToolStep(name="bash", input={"command": "id -u; id -g"}, expect=Expect(is_error=False, contains=["10001"])),
        ToolStep(name="bash", input={"command": "grep Cap /proc/self/status"}, expect=Expect(is_error=False)),
        ToolStep(name="bash", input={"command": "touch /etc/x"}, expect=Expect(is_error=True)),
        ToolStep(name="bash", input={"command": READ_ENVIRONS + "; sleep 2"}, expect=Expect(contains=["END-ENVIRONS"])),
        ToolStep(name="bash", input={"command": "touch /tmp/ok && touch /workspace/ok && echo writable"},
                 expect=Expect(is_error=False, contains=["writable"])),
        ToolStep(name="bash", input={"command": "cat /proc/1/cmdline | tr '\\0' ' '"}, expect=Expect(is_error=False)),
    ]
    session = cp.add_session(ScriptedSession(steps=steps))
    found: list[dict[str, Any]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_inspect_while_running, args=(harness, found, stop))
    watcher.start()
    try:
        run = harness.drain()
    finally:
        stop.set()
        watcher.join(10)

    assert run.returncode == 0, run.output[-4000:]
    state = cp.state_snapshot()
    results = _results(state, session.session_id)
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]]
    uid, caps, touch, environs, writable, init_cmdline = (r["text"] for r in results)
    assert uid.split() == ["10001", "10001"]
    cap_lines = dict(line.split(":\t") for line in caps.strip().splitlines())
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(cap_lines[name], 16) == 0, f"{name} is {cap_lines[name]}"
    assert "Read-only file system" in touch
    assert cp.environment_key not in environs
    assert cp.api_key not in environs
    assert "ANTHROPIC_" not in environs.replace("ANTHROPIC_BASE_URL", ""), "only the base URL is in the environment"
    assert "init" in init_cmdline, "an init process is PID 1"

    # What `docker inspect` shows of the sandbox holds no credential either.
    assert found, "the sandbox was not observed while running"
    inspected = json.dumps(found[0])
    assert cp.environment_key not in inspected and cp.api_key not in inspected
    config, host = found[0]["Config"], found[0]["HostConfig"]
    assert config["User"] == "10001:10001"
    assert [e.split("=", 1)[0] for e in config["Env"] if e.startswith("ANTHROPIC")] == ["ANTHROPIC_BASE_URL"]
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"] and host["Init"] is True
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["PidsLimit"] and host["Memory"] and host["NanoCpus"]
    assert found[0]["record"]["io.sandboxd.work-id"] == session.work_id, "the assignment is recorded on the engine"
    assert harness.leftovers() == {"containers": [], "volumes": []}
