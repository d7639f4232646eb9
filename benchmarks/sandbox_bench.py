"""What a sandbox costs: claim → first heartbeat, a burst of sessions, and the idle daemon.

Runs against the local control plane (in this process) with real containers and prints tables:
1. claim → first heartbeat (the control plane's ack stamp to its first accepted heartbeat stamp),
   p50/p95 over N one-bash-call sessions run one after another, for the SDK's
   `EnvironmentWorker.handle_item()` in this process (no isolation: the floor), a naive
   `docker run` per item (what a `--on-work` script does), `sandboxd run` cold, warm, and cold
   under gVisor; then where sandboxd's time goes (its log and the engine's events);
2. a burst of sessions at a fixed width: `sandboxd drain` vs `naive_worker.py` (the SDK poller and
   a `docker run` per item), both timed from process start to exit, in rounds (medians);
3. the idle daemon's CPU and RSS (pool of 1 and of 0) and an idle pool member's memory.
Every table carries the machine and the load average; a summary for the README comes last.
Nothing is asserted: the targets are printed next to the figures.

    python benchmarks/sandbox_bench.py [--sessions 5] [--burst 24] [--width 4] [--burst-runs 2]
                                       [--idle-seconds 30] [--skip gvisor|burst|idle|diagnostics]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import docker
import docker.errors
from anthropic import AsyncAnthropic
from anthropic.lib.environments import EnvironmentWorker
from naive_worker import naive_item  # benchmarks/ is on sys.path when this file is run
from prometheus_client.parser import text_string_to_metric_families

from sandboxd.controlplane.scenario import Expect, Scenario, ScriptedSession, ToolStep
from sandboxd.controlplane.server import ControlPlane
from sandboxd.protocol import Assignment, workspace_ready_line

IMAGE = os.environ.get("SANDBOXD_IMAGE", "sandboxd-sandbox:latest")
MAX_IDLE_SECONDS = 2.0
SESSION_TIMEOUT_SECONDS = 180.0
BENCH_LABEL = "io.sandboxd.bench"


# -- the machine and the figures ----------------------------------------------------------------

def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine() -> str:
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{datetime.now().astimezone():%Y-%m-%d %H:%M:%S %Z}  nproc={os.cpu_count()}  "
            f"mem={int(mem.split()[1]) // 1024} MiB  load={one}/{five}/{fifteen} (1/5/15 min)")


def p95(values: list[float]) -> float:
    """Inclusive interpolated 95th percentile (with 5 samples: 80 % of the way from the 4th to the max)."""
    return statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]


@dataclass
class Series:
    """One contender's per-session figures (seconds) and the load averages seen while measuring."""

    name: str
    values: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""
    error: str = ""

    def add_phase(self, name: str, seconds: float) -> None:
        self.phases.setdefault(name, []).append(seconds)

    @property
    def p50(self) -> float:
        return statistics.median(self.values)

    @property
    def p95(self) -> float:
        return p95(self.values)

    def load_text(self) -> str:
        return f"{min(self.loads):.1f}-{max(self.loads):.1f}" if self.loads else "-"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f}"


# -- the control plane ----------------------------------------------------------------------------

def one_bash_session(tag: str) -> ScriptedSession:
    marker = f"bench-{tag}"
    step = ToolStep(name="bash", input={"command": f"echo {marker}"}, expect=Expect(is_error=False, contains=[marker]))
    return ScriptedSession(title=f"bench {tag}", steps=[step])


def stamp(value: str | None) -> float:
    assert value is not None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def ack_to_first_heartbeat(cp: ControlPlane, work_id: str) -> tuple[float, float]:
    """(ack, first accepted heartbeat) wall-clock times, as the control plane stamped them.

    The `/_cp/state` snapshot has neither stamp, but the work item records both (`acknowledged_at`
    at the ack, `started_at` at the heartbeat that moved it to `active`): read under the state lock.
    """
    with cp.state._lock:  # noqa: SLF001 - the stamps are not in the public snapshot
        item = cp.state._queue.get(work_id)  # noqa: SLF001
        return stamp(item.acknowledged_at), stamp(item.started_at)


def wait_served(cp: ControlPlane, session_id: str, work_id: str) -> None:
    """Until the item is stopped; raises when its one tool call did not pass or it was claimed twice."""
    state = cp.wait_for(lambda s: s["work"][work_id]["state"] == "stopped", timeout=SESSION_TIMEOUT_SECONDS)
    session, work = state["sessions"][session_id], state["work"][work_id]
    if not session["passed"] or work["claims"] != 1:
        raise RuntimeError(f"{session_id} not served cleanly: passed={session['passed']} claims={work['claims']} "
                           f"results={session['results']}")


@contextmanager
def control_plane() -> Iterator[ControlPlane]:
    with ControlPlane(Scenario(lease_ttl_seconds=30)) as cp:
        yield cp


# -- contenders without sandboxd --------------------------------------------------------------------

async def _claim(cp: ControlPlane, client: AsyncAnthropic) -> Any:
    """Poll and ack one item with the SDK's poller (drain mode: it is already queued)."""
    claims = client.beta.environments.work.poller(environment_id=cp.environment_id,
                                                  environment_key=cp.environment_key, drain=True, auto_stop=False)
    try:
        return await anext(claims)
    finally:
        await claims.aclose()  # type: ignore[attr-defined]


# -- table 1: one contender per way of running a session --------------------------------------------

class Contender:
    """One way to run a session, against a control plane of its own; `one()` serves one session.

    Contenders take turns session by session (see `latency`), so each sees the same load; `settle`
    waits until the contender is quiet again (no refill or retirement spills into the next one).
    """

    key = ""

    def __init__(self, series: Series) -> None:
        self.series = series
        self.cp = ControlPlane(Scenario(lease_ttl_seconds=30))

    def open(self) -> None:
        self.cp.start()

    def one(self, i: int) -> None:
        sid, wid = self.cp.add_session(one_bash_session(f"{self.key}{i}"))
        self.series.loads.append(load())
        self.serve()
        wait_served(self.cp, sid, wid)
        ack, beat = ack_to_first_heartbeat(self.cp, wid)
        self.series.values.append(beat - ack)
        self.observed(wid, ack, beat)
        self.settle()

    def serve(self) -> None:
        """Claim and run the queued session (sandboxd claims it by itself)."""

    def observed(self, work_id: str, ack: float, beat: float) -> None:
        """Per-session detail for the profile."""

    def settle(self) -> None:
        """Wait until nothing of this contender runs in the background."""

    def close(self) -> None:
        self.cp.stop()


class InProcess(Contender):
    """(a) The SDK's worker on the item in this process: no container, no isolation (the floor)."""

    key = "inproc"

    def __init__(self) -> None:
        super().__init__(Series("in-process handle_item()", note="SDK poller ack, then "
                                "EnvironmentWorker.handle_item() in this process"))
        self._workdir = tempfile.mkdtemp(prefix="sbx-bench-")

    def serve(self) -> None:
        anyio.run(self._serve)

    async def _serve(self) -> None:
        async with AsyncAnthropic(base_url=self.cp.url, auth_token=self.cp.environment_key) as claimer, \
                AsyncAnthropic(base_url=self.cp.url, api_key=None, auth_token=None) as client:
            worker = EnvironmentWorker(client, workdir=self._workdir, max_idle=MAX_IDLE_SECONDS)
            item = await _claim(self.cp, claimer)
            await worker.handle_item(work_id=item.id, environment_id=item.environment_id, session_id=item.data.id,
                                     work_secret=item.secret)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._workdir, ignore_errors=True)


class Naive(Contender):
    """(b) A plain `docker run --network host` of the sandbox image per item, as a `--on-work` script would."""

    key = "naive"

    def __init__(self, bench_id: str) -> None:
        super().__init__(Series("naive docker run", note="plain docker run -i --rm --network host "
                                "(no hardening, no broker)"))
        self.bench_id = bench_id

    def serve(self) -> None:
        anyio.run(self._serve)

    async def _serve(self) -> None:
        async with AsyncAnthropic(base_url=self.cp.url, auth_token=self.cp.environment_key) as claimer:
            await naive_item(self.cp.url, await _claim(self.cp, claimer), f"{BENCH_LABEL}={self.bench_id}",
                             MAX_IDLE_SECONDS)


class Prestarted(Contender):
    """Diagnostic: a plain container (host network) started and waited for (`ready`), then claimed for.

    A pool of one without sandboxd: its stderr says when the entrypoint read the assignment, which
    splits the sandbox's own share. (sandboxd's own rows carry the broker's cost.)
    """

    def __init__(self, bench_id: str) -> None:
        super().__init__(Series("pre-started docker run (host)",
                                note="diagnostic: plain container, `ready` awaited, then claimed; host network"))
        self.key = "prehost"
        self.command = ["docker", "run", "-i", "--rm", "--label", f"{BENCH_LABEL}={bench_id}"]
        self._times: tuple[float, float] = (0.0, 0.0)

    def open(self) -> None:
        super().open()
        self.command += ["--network", "host", "-e", f"ANTHROPIC_BASE_URL={self.cp.url}", IMAGE,
                         "--workdir", "/workspace", "--max-idle", str(MAX_IDLE_SECONDS)]

    def serve(self) -> None:
        anyio.run(self._serve)

    async def _serve(self) -> None:
        async with AsyncAnthropic(base_url=self.cp.url, auth_token=self.cp.environment_key) as claimer:
            self._times = await prestarted_item(self.cp, claimer, self.command)

    def observed(self, work_id: str, ack: float, beat: float) -> None:
        written, assigned = self._times
        self.series.add_phase("ack → assignment written to stdin", written - ack)
        self.series.add_phase("written → entrypoint read it", assigned - written)
        self.series.add_phase("read → first heartbeat", beat - assigned)


async def prestarted_item(cp: ControlPlane, claimer: AsyncAnthropic, command: list[str]) -> tuple[float, float]:
    """Start the container, await `ready`, claim, hand the item over; (written, read by the entrypoint) times."""
    async with await anyio.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE) as process:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        buffered = b""
        with anyio.fail_after(120):
            while b'"event":"ready"' not in buffered:
                buffered += await process.stdout.receive()
        item = await _claim(cp, claimer)
        assignment = Assignment(item.id, item.environment_id, item.data.id, item.secret)
        written = time.time()
        await process.stdin.send(assignment.to_line() + workspace_ready_line())
        await process.stdin.aclose()
        async for _ in process.stdout:
            pass
        errors = b"".join([chunk async for chunk in process.stderr]).decode(errors="replace")
        if await process.wait() != 0:
            raise RuntimeError(f"pre-started container exited {process.returncode}: {errors[-1500:]}")
    line = next(x for x in errors.splitlines() if " assigned work_id=" in x)
    return written, datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


class SandboxdRun(Contender):
    """(c)-(e) `sandboxd run`: each session on an idle daemon whose pool members are ready."""

    def __init__(self, key: str, name: str, engine: docker.DockerClient, scratch: Path, *, pool: int,
                 runtime: str | None = None, network: str | None = None, image: str | None = None) -> None:
        super().__init__(Series(name, note=f"warm_pool_size={pool}, runtime={runtime or 'runc'}"
                                + (f", network_mode={network} (diagnostic: the daemon without the no-network wall)"
                                   if network else "")
                                + (f", image={image} (the worker runtime mounted from {IMAGE})" if image else "")))
        self.key, self.engine, self.scratch, self.pool, self.runtime = key, engine, scratch, pool, runtime
        self.network, self.image = network, image
        self.items: list[tuple[str, float, float]] = []
        self.daemon: Daemon | None = None
        self.events: EngineEvents | None = None

    def open(self) -> None:
        super().open()
        env = {"SANDBOXD_WARM_POOL_SIZE": str(self.pool)} | ({"SANDBOXD_RUNTIME": self.runtime} if self.runtime else {})
        env |= {"SANDBOXD_NETWORK_MODE": self.network} if self.network else {}
        env |= {"SANDBOXD_IMAGE": self.image, "SANDBOXD_RUNTIME_IMAGE": IMAGE} if self.image else {}
        self.daemon = Daemon(self.cp, self.scratch, "run", **env)
        self.events = EngineEvents(self.engine, self.daemon.instance)
        self.settle()

    def observed(self, work_id: str, ack: float, beat: float) -> None:
        self.items.append((work_id, ack, beat))

    def settle(self) -> None:
        assert self.daemon is not None
        self.daemon.wait_idle(self.pool)

    def close(self) -> None:
        try:
            if self.daemon is not None and self.events is not None:
                _profile(self.series, self.daemon, self.events, self.items)
        finally:
            if self.events is not None:
                self.events.close()
            if self.daemon is not None:
                self.daemon.cleanup(self.engine)
            super().close()


def latency(contenders: list[Contender], sessions: int) -> None:
    """Session i of every contender, in turn (the order rotates each round); a failed contender drops out."""
    opened: list[Contender] = []
    try:
        for contender in contenders:
            try:
                contender.open()
                opened.append(contender)
            except Exception as exc:  # noqa: BLE001 - one failed contender still leaves a report
                contender.series.error = f"{type(exc).__name__}: {str(exc)[:1500]}"
        for i in range(sessions):
            print(f"  round {i + 1}/{sessions} ...", file=sys.stderr, flush=True)
            for contender in opened[i % len(opened):] + opened[:i % len(opened)]:
                if contender.series.error:
                    continue
                try:
                    contender.one(i)
                except Exception as exc:  # noqa: BLE001
                    contender.series.error = f"{type(exc).__name__}: {str(exc)[:1500]}"
    finally:
        for contender in opened:
            try:
                contender.close()
            except Exception as exc:  # noqa: BLE001
                print(f"  closing {contender.key}: {exc}", file=sys.stderr)


# -- sandboxd as a subprocess -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """`sandboxd run|drain` against a control plane, with metrics on a loopback port and a JSON log."""

    def __init__(self, cp: ControlPlane, scratch: Path, command: str, *args: str, **env: str) -> None:
        self.cp, self.scratch = cp, scratch
        self.instance = f"bench-{uuid.uuid4().hex[:10]}"
        self.socket_dir = f"/tmp/sbx-{self.instance}"
        self.metrics_address = f"127.0.0.1:{free_port()}"
        self.log_path = scratch / f"{self.instance}.log"
        secrets = scratch / "secrets"
        cp.write_secret_files(secrets)
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch),
            "SANDBOXD_BASE_URL": cp.url, "SANDBOXD_ENVIRONMENT_ID": cp.environment_id,
            "SANDBOXD_SOCKET_DIR": self.socket_dir, "SANDBOXD_IMAGE": IMAGE, "SANDBOXD_PULL_POLICY": "never",
            "SANDBOXD_STATE_DIR": str(scratch / f"state-{self.instance}"), "SANDBOXD_WORKER_ID": self.instance,
            "SANDBOXD_METRICS_ADDRESS": self.metrics_address, "SANDBOXD_MAX_IDLE_SECONDS": str(MAX_IDLE_SECONDS),
            "SANDBOXD_ALLOW_INSECURE_HTTP": "true", "SANDBOXD_LOG_FORMAT": "json",
            **{k: v for k, v in os.environ.items() if k.startswith("DOCKER_")}, **env,
        }
        self.started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sandboxd", command, "--secrets-dir", str(secrets), *args],
                env=environment, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name{labels}; empty while the daemon does not answer."""
        try:
            with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def wait_until(self, predicate: Callable[[dict[str, float]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.metrics()):
            if self.process.poll() is not None:
                raise RuntimeError(f"sandboxd exited {self.process.returncode} waiting for {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sandboxd: no {what} within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.05)

    def wait_idle(self, pool: int) -> None:
        """Polling, no session running, and (with a pool) every member ready."""
        self.wait_until(lambda m: m.get("sandboxd_polls_total", 0) > 0 and m.get("sandboxd_sessions_running") == 0
                        and m.get("sandboxd_pool_ready", 0) >= pool, 120, f"idle daemon with pool {pool}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def cleanup(self, engine: docker.DockerClient) -> None:
        self.stop()
        filters = {"label": [f"io.sandboxd.instance={self.instance}"]}
        for container in engine.containers.list(all=True, filters=filters):
            container.remove(force=True, v=True)
        for volume in engine.volumes.list(filters=filters):
            volume.remove(force=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


class EngineEvents:
    """Engine event times by sandbox name, for one instance: container create/start, assignment recorded.

    The assignment record is a volume named `<sandbox>-assignment`; volume events carry no labels,
    so they are matched by name.
    """

    def __init__(self, engine: docker.DockerClient, instance: str) -> None:
        self.seen: dict[str, dict[str, float]] = {}
        self._streams = [
            engine.events(decode=True, filters={"type": "container", "label": f"io.sandboxd.instance={instance}"}),
            engine.events(decode=True, filters={"type": "volume", "event": "create"}),
        ]
        for stream in self._streams:
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        try:
            for event in stream:
                actor = event.get("Actor", {})
                name, action = actor.get("Attributes", {}).get("name", ""), event.get("Action", "")
                if event.get("Type") == "volume" and actor.get("ID", "").endswith("-assignment"):
                    name, action = actor["ID"].removesuffix("-assignment"), "record"
                if action in ("create", "start", "record"):
                    self.seen.setdefault(name, {})[action] = event["timeNano"] / 1e9
        except Exception:  # noqa: BLE001 - the stream was closed
            pass

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


def log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def _profile(series: Series, daemon: Daemon, events: EngineEvents, items: list[tuple[str, float, float]]) -> None:
    """Split each ack → first heartbeat at the engine's events and the daemon's session_started line."""
    started = {e["work_id"]: e for e in daemon.events() if e.get("event") == "session_started"}
    for work_id, ack, beat in items:
        line = started.get(work_id)
        if line is None:
            continue
        handed = log_time(line)
        container = events.seen.get(line.get("container", ""), {})
        record = container.get("record", handed)
        if "create" in container and container["create"] >= ack:  # created for this item (cold)
            series.add_phase("ack → container created", container["create"] - ack)
            series.add_phase("created → started", container.get("start", record) - container["create"])
            series.add_phase("started → assignment recorded", record - container.get("start", record))
        else:
            series.add_phase("ack → assignment recorded", record - ack)
        series.add_phase("recorded → session_started (stdin)", max(0.0, handed - record))
        series.add_phase("session_started → first heartbeat", beat - handed)


def sandboxd_burst(engine: docker.DockerClient, scratch: Path, count: int, width: int,
                   **env: str) -> tuple[float, float, float, int]:
    """`sandboxd drain --max-sessions width` over `count` sessions: (wall, ack-to-last-stop, load, pool hits)."""
    with control_plane() as cp:
        ids = [cp.add_session(one_bash_session(f"burst{i}")) for i in range(count)]
        loaded = load()
        began = time.monotonic()
        daemon = Daemon(cp, scratch, "drain", "--max-sessions", str(width), **env)
        try:
            code = daemon.process.wait(600)
            wall = time.monotonic() - began
            if code != 0:
                raise RuntimeError(f"sandboxd drain exited {code}:\n{daemon.tail()}")
            for sid, wid in ids:
                wait_served(cp, sid, wid)
            window = _ack_window(cp, [wid for _, wid in ids])
            sources = [e.get("source") for e in daemon.events() if e.get("event") == "session_started"]
        finally:
            daemon.cleanup(engine)
    return wall, window, max(loaded, load()), sources.count("pool")


BurstRun = tuple[float, float, float, int]  # wall, first ack → last stop, load, sessions from the pool


def bursts(engine: docker.DockerClient, scratch: Path, bench_id: str, args: argparse.Namespace, *,
           diagnostics: bool) -> dict[str, list[BurstRun]]:
    """`--burst-runs` rounds; the contenders' order rotates each round, so none always runs first (on
    the load the previous one left)."""
    contenders: dict[str, Callable[[], BurstRun]] = {
        "sandboxd": lambda: sandboxd_burst(engine, scratch, args.burst, args.width),
        "naive": lambda: naive_burst_run(bench_id, args.burst, args.width),
    }
    if diagnostics:
        contenders["host"] = lambda: sandboxd_burst(engine, scratch, args.burst, args.width,
                                                    SANDBOXD_NETWORK_MODE="host")
    runs: dict[str, list[BurstRun]] = {key: [] for key in contenders}
    keys = list(contenders)
    for round_ in range(args.burst_runs):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            print(f"  burst round {round_ + 1}/{args.burst_runs}: {key} ...", file=sys.stderr, flush=True)
            runs[key].append(contenders[key]())
    return runs


def median_run(runs: list[BurstRun]) -> BurstRun:
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
            max(r[2] for r in runs), round(statistics.median(r[3] for r in runs)))


def naive_burst_run(bench_id: str, count: int, width: int) -> tuple[float, float, float, int]:
    """`benchmarks/naive_worker.py` over `count` sessions: a process of its own, timed like `sandboxd drain`."""
    with control_plane() as cp:
        ids = [cp.add_session(one_bash_session(f"nburst{i}")) for i in range(count)]
        loaded = load()
        began = time.monotonic()
        worker = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("naive_worker.py")), "--base-url", cp.url,
             "--environment-id", cp.environment_id, "--width", str(width), "--label", f"{BENCH_LABEL}={bench_id}",
             "--max-idle", str(MAX_IDLE_SECONDS)],
            env={**os.environ, "ANTHROPIC_ENVIRONMENT_KEY": cp.environment_key}, capture_output=True, timeout=600,
            check=False,
        )
        wall = time.monotonic() - began
        if worker.returncode != 0:
            raise RuntimeError(f"naive_worker exited {worker.returncode}: {worker.stderr.decode()[-2000:]}")
        for sid, wid in ids:
            wait_served(cp, sid, wid)
        window = _ack_window(cp, [wid for _, wid in ids])
    return wall, window, max(loaded, load()), 0


def _ack_window(cp: ControlPlane, work_ids: list[str]) -> float:
    """From the first ack to the last stop, as the control plane stamped them."""
    with cp.state._lock:  # noqa: SLF001 - the stamps are not in the public snapshot
        items = [cp.state._queue.get(w) for w in work_ids]  # noqa: SLF001
        return max(stamp(i.stopped_at) for i in items) - min(stamp(i.acknowledged_at) for i in items)


# -- the idle daemon ---------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mib(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def member_memory(engine: docker.DockerClient, instance: str) -> str:
    """An idle pool member's memory: docker stats' figure (usage - inactive file) and the cgroup's own."""
    found = engine.containers.list(filters={"label": [f"io.sandboxd.instance={instance}"]})
    if not found:
        return "no pool member"
    container = found[0]
    stats = container.stats(stream=False)["memory_stats"]
    inactive = stats.get("stats", {}).get("total_inactive_file", stats.get("stats", {}).get("inactive_file", 0))
    parts = [f"docker stats {(stats['usage'] - inactive) / 2**20:.1f} MiB"]
    for path in (f"/sys/fs/cgroup/memory/docker/{container.id}/memory.usage_in_bytes",
                 f"/sys/fs/cgroup/system.slice/docker-{container.id}.scope/memory.current"):
        if os.path.exists(path):
            parts.append(f"cgroup {Path(path).name} {int(Path(path).read_text()) / 2**20:.1f} MiB")
    return ", ".join(parts)


def idle(engine: docker.DockerClient, scratch: Path, pool: int, seconds: float) -> dict[str, Any]:
    with control_plane() as cp:
        daemon = Daemon(cp, scratch, "run", SANDBOXD_WARM_POOL_SIZE=str(pool))
        try:
            daemon.wait_idle(pool)
            time.sleep(5)  # start-up work (image check, first stats) out of the window
            pid, loaded = daemon.process.pid, load()
            before, began = cpu_seconds(pid), time.monotonic()
            time.sleep(seconds)
            used, elapsed = cpu_seconds(pid) - before, time.monotonic() - began
            result = {"pool": pool, "cpu": 100 * used / elapsed, "rss": rss_mib(pid), "load": max(loaded, load()),
                      "member": member_memory(engine, daemon.instance) if pool else "-",
                      "polls": daemon.metrics().get("sandboxd_polls_total", 0)}
        finally:
            daemon.cleanup(engine)
    return result


# -- the report ---------------------------------------------------------------------------------------

def print_latency(rows: list[Series], sessions: int) -> None:
    print(f"\n1. claim → first heartbeat, {sessions} one-bash-call sessions per contender, one at a time, the "
          "contenders taking turns; ms, as the control plane stamped them (ack → first accepted heartbeat)")
    print(f"   {machine()}")
    print(f"   {'contender':<30} {'p50':>8} {'p95':>8} {'min':>8} {'max':>8}  {'load 1m':>9}  how")
    for s in rows:
        if s.error:
            print(f"   {s.name:<30} {'failed':>8}  {s.error}")
            continue
        print(f"   {s.name:<30} {ms(s.p50)} {ms(s.p95)} {ms(min(s.values))} {ms(max(s.values))}  "
              f"{s.load_text():>9}  {s.note}")
    for s in rows:
        if s.phases and not s.error:
            print(f"\n   where {s.name}'s time goes (p50 / max, ms; engine events, daemon and entrypoint logs)")
            for phase, values in s.phases.items():
                print(f"     {phase:<36} {ms(statistics.median(values))} {ms(max(values))}")


def targets(rows: dict[str, Series], burst: tuple[BurstRun, BurstRun] | None,
            idle_rows: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []

    def check(label: str, value: float, limit: float, unit: str = "ms", scale: float = 1000) -> None:
        verdict = "met" if value <= limit else "MISSED"
        out.append(f"{label}: {value * scale:.0f} {unit} vs target ≤ {limit * scale:.0f} {unit} → {verdict}")

    floor, warm, cold, plain = (rows.get(k) for k in ("inproc", "warm", "cold", "naive"))
    if floor and warm and not floor.error and not warm.error:
        check("warm p50", warm.p50, floor.p50 + 0.050)
        check("warm p95", warm.p95, floor.p95 + 0.150)
    if cold and plain and not cold.error and not plain.error:
        check("cold p50", cold.p50, plain.p50)
    if burst:
        (ours, *_), (theirs, *_) = burst
        verdict = "met" if ours <= 1.1 * theirs else "MISSED"
        out.append(f"burst wall: {ours:.1f} s vs target ≤ 1.1 × naive = {1.1 * theirs:.1f} s → {verdict}")
    for row in idle_rows:
        verdict = "met" if row["cpu"] < 1.0 else "MISSED"
        out.append(f"idle daemon CPU, pool {row['pool']}: {row['cpu']:.2f} % of a core vs target < 1 % → {verdict}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=5, help="sessions per contender in table 1")
    parser.add_argument("--burst", type=int, default=24, help="sessions in the burst (table 2)")
    parser.add_argument("--width", type=int, default=4, help="sessions at once in the burst")
    parser.add_argument("--burst-runs", type=int, default=2, help="rounds of the burst (medians are reported)")
    parser.add_argument("--warm-pool", type=int, default=1, help="warm_pool_size of the warm contender")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="CPU sampling window (table 3)")
    parser.add_argument("--skip", action="append", default=[], choices=["gvisor", "burst", "idle", "diagnostics"])
    args = parser.parse_args()
    engine = docker.from_env(timeout=120)
    bench_id = uuid.uuid4().hex[:10]
    print(f"sandbox benchmark, image {IMAGE}; {machine()}", flush=True)
    burst: tuple[BurstRun, BurstRun] | None = None
    idle_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sbx-bench-") as scratch_name:
        scratch = Path(scratch_name)
        contenders: list[Contender] = [
            InProcess(), Naive(bench_id),
            SandboxdRun("cold", "sandboxd cold (runc)", engine, scratch, pool=0),
            SandboxdRun("warm", f"sandboxd warm (pool {args.warm_pool})", engine, scratch, pool=args.warm_pool),
        ]
        foreign = foreign_image(engine)
        if foreign:
            contenders.append(SandboxdRun("coldforeign", "sandboxd cold, foreign image (runc)", engine, scratch,
                                          pool=0, image=foreign))
        if "diagnostics" not in args.skip:
            contenders += [SandboxdRun("coldhost", "sandboxd cold, host network", engine, scratch, pool=0,
                                       network="host"),
                           Prestarted(bench_id)]
        if "gvisor" not in args.skip:
            contenders.append(SandboxdRun("gvisor", "sandboxd cold (gVisor)", engine, scratch, pool=0,
                                          runtime="runsc"))
        rows = {c.key: c.series for c in contenders}
        try:
            latency(contenders, args.sessions)
            print_latency(list(rows.values()), args.sessions)
            if "burst" not in args.skip:
                print("  measuring the burst ...", file=sys.stderr, flush=True)
                try:
                    runs = bursts(engine, scratch, bench_id, args, diagnostics="diagnostics" not in args.skip)
                    burst = (median_run(runs["sandboxd"]), median_run(runs["naive"]))
                    diagnostic = median_run(runs["host"]) if runs.get("host") else None
                    print_burst(burst, diagnostic, args.burst, args.width, runs)
                except Exception as exc:  # noqa: BLE001 - e.g. the engine restarted under us; report the rest
                    print(f"\n2. burst: failed: {type(exc).__name__}: {str(exc)[:500]}")
            if "idle" not in args.skip:
                print("  measuring the idle daemon ...", file=sys.stderr, flush=True)
                try:
                    idle_rows = [idle(engine, scratch, pool, args.idle_seconds) for pool in (1, 0)]
                    print_idle(idle_rows, args.idle_seconds)
                except Exception as exc:  # noqa: BLE001
                    print(f"\n3. idle daemon: failed: {type(exc).__name__}: {str(exc)[:500]}")
        finally:
            leftovers(engine, bench_id)
    print_summary(rows, burst, idle_rows, args)


def foreign_image(engine: docker.DockerClient) -> str | None:
    """A bookworm minbase without Python (images/build-base.sh's, or Debian's slim image): the image a
    team brings, where the worker runtime is mounted from ours."""
    for candidate in ("sandboxd-base:bookworm", "debian:bookworm-slim"):
        try:
            engine.images.get(candidate)
            return candidate
        except docker.errors.ImageNotFound:
            continue
    print("  no bookworm minbase image: the foreign-image row is left out", file=sys.stderr)
    return None


def leftovers(engine: docker.DockerClient, bench_id: str) -> None:
    """Remove the naive contenders' containers (sandboxd's are removed with each daemon)."""
    try:
        for container in engine.containers.list(all=True, filters={"label": f"{BENCH_LABEL}={bench_id}"}):
            container.remove(force=True)
    except Exception as exc:  # noqa: BLE001 - the engine may be restarting; say what is left
        print(f"  could not remove leftovers labelled {BENCH_LABEL}={bench_id}: {exc}", file=sys.stderr)


def print_burst(burst: tuple[BurstRun, BurstRun], diagnostic: BurstRun | None, count: int, width: int,
                runs: dict[str, list[BurstRun]]) -> None:
    (ours, our_window, our_load, hits), (theirs, their_window, their_load, _) = burst
    rounds = len(runs["naive"])
    print(f"\n2. burst: {count} one-bash-call sessions queued, {width} at a time; seconds, median of {rounds} "
          "round(s), the order rotating; wall = process start to exit for both")
    print(f"   {machine()}")
    print(f"   {'contender':<44} {'wall':>7} {'1st ack→last stop':>18}  {'load 1m':>7}  runs (wall/window)")

    def each(key: str) -> str:
        return ", ".join(f"{r[0]:.1f}/{r[1]:.1f}" for r in runs[key])

    print(f"   {'sandboxd drain --max-sessions ' + str(width):<44} {ours:7.1f} {our_window:18.1f}  {our_load:7.1f}"
          f"  {each('sandboxd')}  (warm_pool_size=1, the default: {hits} of {count} from the pool)")
    print(f"   {'naive worker (naive_worker.py), width ' + str(width):<44} {theirs:7.1f} {their_window:18.1f}"
          f"  {their_load:7.1f}  {each('naive')}  (SDK poller + docker run --network host per item)")
    if diagnostic is not None:
        wall, window, loaded, pooled = diagnostic
        print(f"   {'sandboxd drain, network_mode=host':<44} {wall:7.1f} {window:18.1f}  {loaded:7.1f}"
              f"  {each('host')}  (diagnostic: the daemon without the no-network wall)")
    host = (f"; with network_mode=host: wall {diagnostic[0] / theirs:.2f}, "
            f"ack window {diagnostic[1] / their_window:.2f}") if diagnostic else ""
    print(f"   ratio sandboxd / naive: wall {ours / theirs:.2f}, ack window {our_window / their_window:.2f}{host}")


def print_idle(rows: list[dict[str, Any]], seconds: float) -> None:
    print(f"\n3. the idle daemon (sandboxd run, no work queued), CPU over {seconds:.0f} s from /proc/<pid>/stat")
    print(f"   {machine()}")
    print(f"   {'warm_pool_size':<15} {'CPU % of a core':>16} {'RSS MiB':>8} {'polls':>6}  {'load 1m':>7}  "
          "idle pool member")
    for r in rows:
        print(f"   {r['pool']:<15} {r['cpu']:16.2f} {r['rss']:8.1f} {r['polls']:6.0f}  {r['load']:7.1f}  {r['member']}")


def print_summary(rows: dict[str, Series], burst: tuple[BurstRun, BurstRun] | None, idle_rows: list[dict[str, Any]],
                  args: argparse.Namespace) -> None:
    print("\n---- summary for benchmarks/README.md (paste below the last run) ----")
    print(f"`make bench`, {machine()}:\n")
    print("| claim → first heartbeat | p50 ms | p95 ms | load 1m |")
    print("|---|---:|---:|---:|")
    for s in rows.values():
        if s.error:
            print(f"| {s.name} | failed | | |")
        else:
            print(f"| {s.name} | {s.p50 * 1000:.0f} | {s.p95 * 1000:.0f} | {s.load_text()} |")
    cold, gvisor = rows.get("cold"), rows.get("gvisor")
    if cold and gvisor and not cold.error and not gvisor.error:
        print(f"\ngVisor cost (cold start, p50): {(gvisor.p50 - cold.p50) * 1000:+.0f} ms over runc "
              f"({gvisor.p50 / cold.p50:.2f}×).")
    if burst:
        (ours, *_), (theirs, *_) = burst
        print(f"Burst of {args.burst} at width {args.width}: sandboxd {ours:.1f} s, naive docker run {theirs:.1f} s "
              f"(ratio {ours / theirs:.2f}).")
    for r in idle_rows:
        print(f"Idle daemon, pool {r['pool']}: {r['cpu']:.2f} % of a core, RSS {r['rss']:.0f} MiB"
              + (f"; idle pool member: {r['member']}." if r["pool"] else "."))
    print("\nTargets:")
    for line in targets(rows, burst, idle_rows):
        print(f"- {line}")


if __name__ == "__main__":
    main()
