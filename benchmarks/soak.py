"""Soak: hundreds of small sessions through the real `sandboxd run` daemon, with faults throughout.

Runs the local control plane in-process and the daemon as a subprocess (as tests/e2e does: the
SANDBOXD_* environment, `--secrets-dir`, host networking, a unique worker id that is also the
sandboxes' `io.sandboxd.instance` label). Faults, all seeded: API 5xx on heartbeats, event
sends and more, slow responses past the callers' timeouts, dropped event streams, revoked
leases, upstream cancels, sessions terminated with tool calls pending, sandboxes OOM-killed
(a tool step allocating past SANDBOXD_MEMORY_LIMIT) and `docker kill`ed, the daemon SIGKILLed
and restarted, and (optional, disruptive) the Docker engine restarted once, with its flags
(scripts/setup-engine.sh: live-restore, so the sessions running then are expected to complete).

It ends by itself (every work item stopped, or the duration limit), stops the daemon, and
prints a table: items stopped exactly once / twice+ / never (lost), orphan containers and
volumes, and sessions completed per fault class. Exit status 1 if anything was lost or left.

    python benchmarks/soak.py [--sessions 300] [--seed 1] [--engine-restart/--no-engine-restart]
                              [--workspace-quota auto|filesystem|poll] [--private-engine]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import docker  # noqa: E402
import docker.errors  # noqa: E402
import requests  # noqa: E402

from sandboxd.controlplane import (  # noqa: E402
    ControlPlane,
    Expect,
    FaultPlan,
    FaultRule,
    Scenario,
    ScriptedSession,
    ToolStep,
)

IMAGE = os.environ.get("SANDBOXD_TEST_IMAGE", "sandboxd-sandbox:latest")
INSTANCE_LABEL = "io.sandboxd.instance"
WORK_LABEL = "io.sandboxd.work-id"
SANDBOX_LABEL = "io.sandboxd.sandbox"  # newer daemons: pooled containers; the work id is on the assignment volume
HELD = ("starting", "active", "stopping")
# Fault classes a session is built for; daemon kills and the engine restart hit whatever runs then.
CLASSES = {  # class: (share of sessions, expected to complete)
    "none": (0.30, True),
    "multi_turn": (0.20, True),
    "lease_lost": (0.08, True),
    "stream_drop": (0.08, True),
    "oom": (0.07, False),
    "docker_kill": (0.09, False),
    "cancel": (0.09, False),
    "terminated": (0.09, False),
}
# Fill the tmpfs /tmp past the memory limit: tmpfs pages count against the sandbox's cgroup but
# belong to no process, so the OOM killer picks the largest process, the sandbox's worker (a
# tool allocating in its own memory would just be the one killed, and the sandbox would live).
OOM_COMMAND = "head -c 400m /dev/zero > /tmp/soak-fill; echo survived"


def api_faults(seed: int) -> FaultPlan:
    """Rate-based faults on every request of the run (heartbeat timeouts: the SDK bounds a beat
    by half the 12 s TTL, so the 8 s delay times out and is retried)."""
    rule = FaultRule
    return FaultPlan(seed=seed, rules=[
        rule(route="heartbeat", rate=0.05), rule(route="events_send", rate=0.05, status=500),
        rule(route="heartbeat", kind="delay", rate=0.02, delay_seconds=8.0),
        rule(route="events_send", kind="delay", rate=0.03, delay_seconds=2.0),
        rule(route="session", kind="delay", rate=0.03, delay_seconds=2.0),
        rule(route="stream", kind="drop", rate=0.05, after_events=3),
        rule(route="events_list", rate=0.03), rule(route="poll", rate=0.02), rule(route="ack", rate=0.02),
        rule(route="stop", rate=0.03, status=502),
    ])


def _bash(command: str, *contains: str, is_error: bool | None = False) -> ToolStep:
    return ToolStep(name="bash", input={"command": command}, expect=Expect(is_error=is_error, contains=list(contains)))


def build_session(index: int, kind: str, rng: random.Random) -> ScriptedSession:
    """A small session for fault class `kind` (a few tool calls; targeted ones have a slow step)."""
    tag = f"soak{index:04d}"
    path = f"notes/{tag}.txt"
    base = [
        _bash(f"echo {tag}-hello", f"{tag}-hello"),
        ToolStep(name="write", input={"file_path": path, "content": f"{tag}\n"}, expect=Expect(is_error=False)),
        ToolStep(name="read", input={"file_path": path}, expect=Expect(is_error=False, contains=[tag])),
    ][: rng.randint(2, 3)]
    # Longer than a heartbeat interval (TTL/2) where the holder learns of the fault from a heartbeat.
    slow = _bash(f"sleep {8 if kind in ('cancel', 'lease_lost') else 3}; echo {tag}-slow", f"{tag}-slow")
    meta = {"soak_class": kind}
    if kind == "multi_turn":
        turns = [[_bash(f"echo {tag}-t{t}-{s}", f"{tag}-t{t}-{s}") for s in range(rng.randint(1, 2))]
                 for t in range(rng.randint(2, 3))]
        return ScriptedSession(title=tag, metadata=meta, turns=turns, end=rng.choice(["terminate", "idle"]))
    if kind == "oom":
        steps = [base[0], _bash(OOM_COMMAND, is_error=None), _bash(f"echo {tag}-after")]
    elif kind in ("docker_kill", "lease_lost", "cancel", "stream_drop"):
        steps = [base[0], slow, *base[1:]]
    else:
        steps = base
    terminate = 1 if kind == "terminated" else None
    return ScriptedSession(title=tag, metadata=meta, steps=steps, terminate_after_results=terminate)


def plan_sessions(count: int, seed: int) -> list[tuple[str, ScriptedSession]]:
    rng = random.Random(seed)
    kinds = [k for k, (share, _) in CLASSES.items() for _ in range(max(1, round(share * count)))]
    rng.shuffle(kinds)
    kinds = (kinds * 2)[:count]
    return [(kind, build_session(i, kind, rng)) for i, kind in enumerate(kinds)]


@dataclass
class SoakConfig:
    sessions: int
    seed: int
    engine_restart: bool
    max_sessions: int
    duration_limit_seconds: float
    daemon_kills: int
    memory_limit: str
    lease_ttl_seconds: int
    max_idle_seconds: float
    workdir: Path
    json_out: Path | None
    daemon_src: Path
    workspace_quota: str | None = None  # the daemon's default when None
    private_engine: bool = False


class DaemonProcess:
    """`sandboxd run` as a subprocess, killed and restarted at will; one log file per start."""

    def __init__(self, plane: ControlPlane, config: SoakConfig, worker_id: str) -> None:
        self.plane, self.config, self.worker_id = plane, config, worker_id
        self.secrets = config.workdir / "secrets"
        plane.write_secret_files(self.secrets)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def env(self) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.config.workdir),
            "SANDBOXD_BASE_URL": self.plane.url,
            "SANDBOXD_ENVIRONMENT_ID": self.plane.environment_id,
            "SANDBOXD_NETWORK_MODE": "host",
            "SANDBOXD_IMAGE": IMAGE,
            "SANDBOXD_PULL_POLICY": "never",
            "SANDBOXD_STATE_DIR": str(self.config.workdir / "state"),
            "SANDBOXD_WORKER_ID": self.worker_id,
            "SANDBOXD_METRICS_ADDRESS": "",
            "SANDBOXD_MAX_IDLE_SECONDS": str(self.config.max_idle_seconds),
            "SANDBOXD_MAX_SESSIONS": str(self.config.max_sessions),
            "SANDBOXD_MEMORY_LIMIT": self.config.memory_limit,
            "SANDBOXD_SHUTDOWN_GRACE_SECONDS": "30",
            "SANDBOXD_MAX_SESSION_SECONDS": "300",
            "SANDBOXD_ALLOW_INSECURE_HTTP": "true",
            "PYTHONPATH": str(self.config.daemon_src),
        }
        if self.config.workspace_quota:
            env["SANDBOXD_WORKSPACE_QUOTA"] = self.config.workspace_quota
        passed = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")
        env.update({k: v for k, v in os.environ.items() if k in passed})
        return env

    def start(self) -> None:
        log = (self.config.workdir / f"daemon-{self.starts}.log").open("wb")
        command = [sys.executable, "-m", "sandboxd", "run", "--secrets-dir", str(self.secrets)]
        self.process = subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=self.config.workdir)
        log.close()
        self.starts += 1

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 90) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has exited: PID 1 here may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Engine:
    """The Docker engine: a client that survives a restart, and the restart itself."""

    def __init__(self) -> None:
        self.client = docker.from_env(timeout=30)

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A Docker call that returns None when the engine is down or the object is gone."""
        try:
            return fn(*args, **kwargs)
        except (docker.errors.DockerException, requests.RequestException):
            return None

    def containers(self, instance: str, work_id: str | None = None) -> list[dict[str, Any]]:
        labels = [f"{INSTANCE_LABEL}={instance}"] + ([f"{WORK_LABEL}={work_id}"] if work_id else [])
        return self.call(self.client.api.containers, all=True, filters={"label": labels}) or []

    def container_of(self, instance: str, work_id: str) -> list[dict[str, Any]]:
        """The containers serving `work_id`: labelled with it, or named by its assignment volume."""
        found = self.containers(instance, work_id)
        if found:
            return found
        labels = [f"{INSTANCE_LABEL}={instance}", f"{WORK_LABEL}={work_id}"]
        listing = self.call(self.client.api.volumes, filters={"label": labels}) or {}
        names = {(v.get("Labels") or {}).get(SANDBOX_LABEL) for v in listing.get("Volumes") or []} - {None}
        for name in names:
            found += self.call(self.client.api.containers, all=True,
                               filters={"label": [f"{INSTANCE_LABEL}={instance}", f"{SANDBOX_LABEL}={name}"]}) or []
        return found

    def volumes(self, instance: str) -> list[str]:
        listing = self.call(self.client.api.volumes, filters={"label": f"{INSTANCE_LABEL}={instance}"}) or {}
        return [v["Name"] for v in listing.get("Volumes") or []]

    def foreign_running(self, instance: str) -> list[str]:
        running = self.call(self.client.api.containers) or []
        return [c["Names"][0] for c in running if (c.get("Labels") or {}).get(INSTANCE_LABEL) != instance]

    @staticmethod
    def dockerd_pid() -> int | None:
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (entry / "comm").read_text().strip() == "dockerd":
                    return int(entry.name)
            except OSError:
                continue
        return None

    def live_restore(self) -> bool:
        return bool((self.call(self.client.info) or {}).get("LiveRestoreEnabled"))

    def restart(self) -> float:
        """SIGTERM dockerd, wait for it to exit, start it again as scripts/setup-engine.sh does."""
        began = time.monotonic()
        pid = self.dockerd_pid()
        if pid is None:
            raise RuntimeError("no dockerd process found")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        subprocess.run([str(ROOT / "scripts" / "setup-engine.sh")], check=True, start_new_session=True,
                       stdout=subprocess.DEVNULL)
        self.client = docker.from_env(timeout=30)
        return time.monotonic() - began


# scripts/setup-engine.sh's dockerd flags (live-restore among them).
ENGINE_FLAGS = ("--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--live-restore")


class PrivateEngine(Engine):
    """A dockerd of the soak's own beside the machine's, with the flags of scripts/setup-engine.sh and
    its own data root, exec root and socket: restarting it disturbs no one else's sandboxes, and no one
    else's keep it from restarting. The sandbox image is copied into it from the machine's engine."""

    def __init__(self, root: Path, image: str) -> None:
        self.root = root
        self.host = f"unix://{root}/docker.sock"
        (root / "daemon.json").write_text("{}\n")
        self.process: subprocess.Popen[bytes] | None = None
        self._start()
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        subprocess.run(["docker", "-H", self.host, "load", "-q"], stdin=save.stdout, check=True,
                       stdout=subprocess.DEVNULL)
        if save.wait() != 0:
            raise RuntimeError(f"docker save {image} failed")
        os.environ["DOCKER_HOST"] = self.host  # the daemon, the OOM watch and every client from here on
        self.client = docker.DockerClient(base_url=self.host, timeout=30)

    def _start(self) -> None:
        with (self.root / "dockerd.log").open("ab") as log:
            self.process = subprocess.Popen(
                ["dockerd", *ENGINE_FLAGS, "--data-root", str(self.root / "data"), "--exec-root",
                 str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"), "--host", self.host,
                 "--config-file", str(self.root / "daemon.json")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        client = docker.DockerClient(base_url=self.host, timeout=5, version="1.41")  # asks nothing yet
        deadline = time.monotonic() + 60
        while self.call(client.ping) is None:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the private dockerd did not come up; see {self.root / 'dockerd.log'}")
            time.sleep(0.2)
        client.close()

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(90)

    def restart(self) -> float:
        """SIGTERM the private dockerd, wait for it to exit, start it again with the same flags."""
        began = time.monotonic()
        self._stop()
        self._start()
        self.client = docker.DockerClient(base_url=self.host, timeout=30)
        return time.monotonic() - began

    def close(self) -> None:
        """Stop it and remove its files (its containers are gone by now): first what it left mounted
        below its root (the data root, the default network namespace), deepest first."""
        self._stop()
        prefix = f"{self.root}/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", mount], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Soak:
    config: SoakConfig
    plane: ControlPlane
    engine: Engine
    daemon: DaemonProcess
    worker_id: str
    kinds: dict[str, str]  # session_id: fault class
    fired: dict[str, int] = field(default_factory=dict)  # session_id: attempts of its targeted fault
    hit_by: dict[str, set[str]] = field(default_factory=dict)  # session_id: {"daemon_kill", ...}
    events: Counter[str] = field(default_factory=Counter)
    oom_containers: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    stop_watch: threading.Event = field(default_factory=threading.Event)

    def progress(self, state: dict[str, Any]) -> float:
        ended = sum(1 for s in state["sessions"].values()
                    if s["status"] == "terminated" or state["work"][s["work_id"]]["state"] == "stopped")
        return ended / max(1, len(state["sessions"]))

    def finished(self, state: dict[str, Any]) -> bool:
        return not state["stop_summary"]["not_stopped"]

    def fire_targeted(self, state: dict[str, Any]) -> None:
        """Each targeted session gets its fault once its item is active and a first result is in."""
        for session_id, kind in self.kinds.items():
            if kind not in ("docker_kill", "lease_lost", "cancel", "stream_drop") or self.fired.get(session_id, 0) < 0:
                continue
            record = state["sessions"][session_id]
            item = state["work"][record["work_id"]]
            if item["state"] != "active" or not record["results"] or record["done"]:
                continue
            self.fired[session_id] = self.fired.get(session_id, 0) + 1
            done = self._fire(kind, session_id, record["work_id"])
            if done or self.fired[session_id] > 40:
                self.fired[session_id] = -1
                self.events[f"{kind}{'' if done else '_missed'}"] += 1

    def _fire(self, kind: str, session_id: str, work_id: str) -> bool:
        try:
            if kind == "lease_lost":
                self.plane.revoke_lease(work_id)
            elif kind == "cancel":
                self.plane.request_stop(work_id)
            elif kind == "stream_drop":
                return self.plane.drop_streams(session_id) > 0
            else:
                found = self.engine.container_of(self.worker_id, work_id)
                running = [c for c in found if c.get("State") == "running"]
                if not running:
                    return False
                self.engine.client.api.kill(running[0]["Id"])
        except Exception:  # noqa: BLE001 - the item or container moved on meanwhile; try again next tick
            return False
        return True

    def mark_running(self, state: dict[str, Any], tag: str) -> None:
        for session_id, record in state["sessions"].items():
            if state["work"][record["work_id"]]["state"] in HELD:
                self.hit_by.setdefault(session_id, set()).add(tag)

    def kill_daemon(self) -> None:
        self.mark_running(self.plane.state_snapshot(), "daemon_kill")
        self.daemon.kill()
        self.events["daemon_kill"] += 1
        time.sleep(1.0)
        self.daemon.start()

    def restart_engine(self, last_chance: bool) -> bool:
        """Restart the engine, unless others' containers run on it now (then False: try again later)."""
        foreign = self.engine.foreign_running(self.worker_id)
        if foreign:
            if last_chance:
                print(f"engine restart skipped: others' containers kept running ({', '.join(foreign[:3])})",
                      flush=True)
                self.events["engine_restart_skipped"] += 1
            return False
        self.mark_running(self.plane.state_snapshot(), "engine_restart")
        took = self.engine.restart()
        self.events["engine_restart"] += 1
        print(f"engine restarted in {took:.1f}s", flush=True)
        return True

    def watch_oom(self) -> None:
        """Count OOM kills of this run's sandboxes from the engine's event stream (re-opened after a restart)."""
        while not self.stop_watch.is_set():
            try:
                client = docker.from_env(timeout=30)
                filters = {"event": "oom", "label": f"{INSTANCE_LABEL}={self.worker_id}"}
                stream = client.events(decode=True, filters=filters, since=int(time.time()) - 1)
                for event in stream:  # by container: pooled sandboxes carry no work-id label
                    self.oom_containers.add(str(event.get("Actor", {}).get("ID") or event.get("id")))
                    if self.stop_watch.is_set():
                        break
            except Exception:  # noqa: BLE001 - the engine is restarting
                time.sleep(1)

    def run(self) -> dict[str, Any]:
        cfg = self.config
        kill_at = [0.1 + 0.7 * (n + 1) / (cfg.daemon_kills + 1) for n in range(cfg.daemon_kills)]
        engine_at, engine_retry = (0.5 if cfg.engine_restart else None), 0.0
        threading.Thread(target=self.watch_oom, daemon=True, name="oom-watch").start()
        self.daemon.start()
        deadline = self.started + cfg.duration_limit_seconds
        last_print = 0.0
        timed_out = False
        while True:
            state = self.plane.state_snapshot()
            if self.finished(state):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            self.fire_targeted(state)
            progress = self.progress(state)
            if kill_at and progress >= kill_at[0]:
                kill_at.pop(0)
                self.kill_daemon()
            if engine_at is not None and progress >= engine_at and time.monotonic() >= engine_retry:
                # Between 50% and 85% of the run, at a moment no one else's containers run.
                engine_retry = time.monotonic() + 2
                if self.restart_engine(last_chance=progress >= 0.85) or progress >= 0.85:
                    engine_at = None
            if time.monotonic() - last_print > 15:
                last_print = time.monotonic()
                print(f"[{time.monotonic() - self.started:5.0f}s] progress {progress:.0%} items "
                      f"{state['stop_summary']['items']} open {len(state['stop_summary']['not_stopped'])}", flush=True)
            time.sleep(0.25)
        self.plane.set_faults(FaultPlan())  # the daemon's own shutdown is not a fault under test
        code = self.daemon.stop()
        time.sleep(1.0)
        self.stop_watch.set()
        state = self.plane.state_snapshot()
        (self.config.workdir / "state.json").write_text(json.dumps(state, indent=1))
        return self.report(state, timed_out, code)

    def report(self, state: dict[str, Any], timed_out: bool, daemon_exit: int | None) -> dict[str, Any]:
        containers = [c["Names"][0].lstrip("/") for c in self.engine.containers(self.worker_id)]
        volumes = self.engine.volumes(self.worker_id)
        staging = self.config.workdir / "state" / "staging"
        counts = {w: item["times_stopped"] for w, item in state["work"].items()}
        classes: dict[str, dict[str, int]] = {}
        for session_id, kind in self.kinds.items():
            record = state["sessions"][session_id]
            for tag in (kind, *sorted(self.hit_by.get(session_id, ()))):
                row = classes.setdefault(tag, {"sessions": 0, "completed": 0})
                row["sessions"] += 1
                row["completed"] += int(record["done"])
        return {
            "sessions": len(self.kinds),
            "seed": self.config.seed,
            "engine_live_restore": self.engine.live_restore(),
            "workspace_quota": self.config.workspace_quota or "default",
            "duration_seconds": round(time.monotonic() - self.started, 1),
            "timed_out": timed_out,
            "daemon_exit": daemon_exit,
            "items": len(counts),
            "stopped_once": sum(1 for n in counts.values() if n == 1),
            "stopped_more": sorted(w for w, n in counts.items() if n > 1),
            "stop_conflicts": sum(item["stop_conflicts"] for item in state["work"].values()),
            "lost": sorted(w for w, item in state["work"].items() if item["state"] != "stopped"),
            "orphan_containers": containers,
            "orphan_volumes": volumes,
            "staging_leftovers": sorted(p.name for p in staging.iterdir()) if staging.exists() else [],
            "classes": classes,
            "events": dict(self.events),
            "stopped_by": dict(Counter(i["stop_log"][0]["by"] for i in state["work"].values() if i["stop_log"])),
            "lease_expiries": sum(i["lease_expiries"] for i in state["work"].values()),
            "heartbeat_412s": sum(i["heartbeat_412s"] for i in state["work"].values()),
            "claims_beyond_first": sum(max(0, i["claims"] - 1) for i in state["work"].values()),
            "per_session": {
                sid: {"class": kind, "hit_by": sorted(self.hit_by.get(sid, ())), "done": state["sessions"][sid]["done"],
                      "status": state["sessions"][sid]["status"], "work_ids": state["sessions"][sid]["work_ids"]}
                for sid, kind in self.kinds.items()
            },
            "oom_kills_seen": len(self.oom_containers),
            "faults_injected": state["faults"]["injected"],
            "stop_logs_of_stopped_more": {w: state["work"][w]["stop_log"] for w, n in counts.items() if n > 1},
        }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['sessions']} sessions, seed {result['seed']}, {result['duration_seconds']}s"
        f"{' (DURATION LIMIT REACHED)' if result['timed_out'] else ''}; daemon exit {result['daemon_exit']}",
        f"  engine live-restore: {result['engine_live_restore']}; workspace_quota: {result['workspace_quota']}",
        f"  {'work items':<30}{result['items']:>6}",
        f"  {'stopped exactly once':<30}{result['stopped_once']:>6}",
        f"  {'stopped twice+':<30}{len(result['stopped_more']):>6}",
        f"  {'redundant stops refused (409)':<30}{result['stop_conflicts']:>6}",
        f"  {'never stopped (lost)':<30}{len(result['lost']):>6}",
        f"  {'orphan containers':<30}{len(result['orphan_containers']):>6}",
        f"  {'orphan volumes':<30}{len(result['orphan_volumes']):>6}",
        f"  {'staging leftovers':<30}{len(result['staging_leftovers']):>6}",
        "",
        f"  {'fault class':<18}{'sessions':>9}{'completed':>11}{'rate':>7}  expected to complete",
    ]
    for kind, row in result["classes"].items():
        expected = ("yes" if CLASSES[kind][1] else "no") if kind in CLASSES else "with adoption"
        if kind == "engine_restart":
            expected = "yes (live-restore)" if result["engine_live_restore"] else "no (no live-restore)"
        rate = f"{row['completed'] / row['sessions']:.0%}" if row["sessions"] else "-"
        lines.append(f"  {kind:<18}{row['sessions']:>9}{row['completed']:>11}{rate:>7}  {expected}")
    lines.append("")
    lines.append("  harness events: " + ", ".join(f"{k}={v}" for k, v in sorted(result["events"].items())))
    lines.append(f"  sandboxes OOM-killed (engine events): {result['oom_kills_seen']}")
    lines.append("  first stop by: " + ", ".join(f"{k}={v}" for k, v in sorted(result["stopped_by"].items()))
                 + "  (sessions_token: the sandbox; environment_key: the daemon)")
    lines.append(f"  lease expiries: {result['lease_expiries']}  heartbeat 412s: {result['heartbeat_412s']}"
                 f"  re-claims: {result['claims_beyond_first']}")
    lines.append("  faults injected: " + ", ".join(f"{k}={v}" for k, v in result["faults_injected"].items()))
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> SoakConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine-restart", action=argparse.BooleanOptionalAction, default=True,
                        help="restart the Docker engine once mid-run (disruptive; skipped if others' containers run)")
    parser.add_argument("--max-sessions", type=int, default=6, help="the daemon's concurrent sessions")
    parser.add_argument("--duration-limit-seconds", type=float, default=1800)
    parser.add_argument("--daemon-kills", type=int, default=4, help="SIGKILL and restart the daemon this many times")
    parser.add_argument("--memory-limit", default="192m", help="SANDBOXD_MEMORY_LIMIT (the OOM step exceeds it)")
    parser.add_argument("--lease-ttl-seconds", type=int, default=12)
    parser.add_argument("--max-idle-seconds", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, help="logs and state (default: a new temp dir, kept)")
    parser.add_argument("--json-out", type=Path, help="also write the result as JSON here")
    parser.add_argument("--private-engine", action="store_true",
                        help="run the sandboxes on a dockerd of the soak's own (the flags of scripts/setup-engine.sh), "
                             "so the engine restart neither disturbs others nor waits for them")
    parser.add_argument("--workspace-quota", choices=["auto", "filesystem", "poll"],
                        help="SANDBOXD_WORKSPACE_QUOTA of the daemon (default: the daemon's default)")
    parser.add_argument("--daemon-src", type=Path, default=ROOT / "src",
                        help="the directory holding the daemon's `sandboxd` package; copied at start, so every "
                             "restart during the run runs the same code")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sandboxd-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    daemon_src = workdir / "daemon-src"
    shutil.rmtree(daemon_src, ignore_errors=True)
    shutil.copytree(args.daemon_src / "sandboxd", daemon_src / "sandboxd", ignore=shutil.ignore_patterns("__pycache__"))
    return SoakConfig(args.sessions, args.seed, args.engine_restart, args.max_sessions, args.duration_limit_seconds,
                      args.daemon_kills, args.memory_limit, args.lease_ttl_seconds, args.max_idle_seconds,
                      workdir, args.json_out, daemon_src, args.workspace_quota, args.private_engine)


def main(argv: list[str] | None = None) -> int:
    config = _parse(argv)
    worker_id = f"soak-{uuid.uuid4().hex[:10]}"
    planned = plan_sessions(config.sessions, config.seed)
    scenario = Scenario(lease_ttl_seconds=config.lease_ttl_seconds, reclaim_older_than_ms=3000,
                        faults=api_faults(config.seed), sessions=[s for _, s in planned])
    print(f"soak worker_id={worker_id} workdir={config.workdir}", flush=True)
    engine = PrivateEngine(Path(tempfile.mkdtemp(prefix="sbxe-")), IMAGE) if config.private_engine else Engine()
    try:
        with ControlPlane(scenario) as plane:
            daemon = DaemonProcess(plane, config, worker_id)
            soak = Soak(config, plane, engine, daemon, worker_id, {s.session_id: k for k, s in planned})
            try:
                result = soak.run()
            finally:
                daemon.kill()
        print(render(result), flush=True)
        if config.json_out:
            config.json_out.write_text(json.dumps(result, indent=2))
        for container in result["orphan_containers"]:  # reported above; do not leave them behind
            engine.call(engine.client.api.remove_container, container, force=True, v=True)
        for volume in result["orphan_volumes"]:
            engine.call(engine.client.api.remove_volume, volume, force=True)
    finally:
        if isinstance(engine, PrivateEngine):
            engine.close()
    return 1 if result["lost"] or result["orphan_containers"] or result["orphan_volumes"] else 0


if __name__ == "__main__":
    sys.exit(main())
