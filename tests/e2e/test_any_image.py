"""Any image with /bin/bash is a sandbox: the worker runtime is brought in, read-only, by the daemon.

Three images, under runc and gVisor: a Debian minbase with bash and no Python (the local base image),
an image of nothing but statically linked bash and busybox (no libc, no loader: built here from
Debian's bash-static and busybox-static), and our own. In each, a session runs the six tools (grep
without rg in the first two, with rg in ours), finds its skill in /workspace/skills, and gets its
/workspace back in turn 2. Sessions name their image with the metadata key `image`, from
allowed_images; one naming an image off the list and one naming a missing image are stopped with
their reasons, before any container of theirs starts, while the others complete.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from sandboxd.controlplane.scenario import Expect, ScriptedSession, SkillSpec, ToolStep
from tests.e2e.conftest import Harness

MINBASE = "sandboxd-test-minbase:latest"
STATIC = "sandboxd-test-static:latest"


def _run(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}", pytrace=False)
    return result.stdout


@pytest.fixture(scope="session")
def foreign_images(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The two foreign images, built offline from Debian packages (no registry)."""
    import docker.errors

    # A minbase: what images/build-base.sh debootstraps (bash, no Python, no rg), tagged for this test.
    for base in ("sandboxd-base:bookworm", "debian:bookworm-slim"):
        try:
            docker_client.images.get(base).tag(MINBASE)
            break
        except docker.errors.ImageNotFound:
            continue
    else:
        pytest.fail("no bookworm base image (images/build-base.sh makes sandboxd-base:bookworm)", pytrace=False)
    # Static bash and busybox: no libc, no loader, no /etc, nothing else.
    work = tmp_path_factory.mktemp("static-image")
    _run("apt-get", "download", "bash-static", "busybox-static", cwd=work)
    root = work / "root"
    for deb in work.glob("*.deb"):
        _run("dpkg-deb", "-x", str(deb), str(root))
    image_root = work / "image"
    (image_root / "bin").mkdir(parents=True)
    (image_root / "tmp").mkdir(mode=0o1777)
    (image_root / "bin" / "bash").write_bytes((root / "bin" / "bash-static").read_bytes())
    (image_root / "bin" / "busybox").write_bytes((root / "bin" / "busybox").read_bytes())
    (image_root / "bin" / "bash").chmod(0o755)
    (image_root / "bin" / "busybox").chmod(0o755)
    for applet in _run(str(image_root / "bin" / "busybox"), "--list").split():
        if applet not in ("bash", "busybox"):
            (image_root / "bin" / applet).symlink_to("busybox")
    archive = work / "image.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(image_root, arcname=".")
    _run("docker", "import", "-c", "ENV PATH=/bin", str(archive), STATIC)
    # Neither holds a Python or a dynamic loader the runtime could lean on.
    for image, probe in ((MINBASE, "command -v python3 || echo no-python"), (STATIC, "ls /lib /lib64 /usr 2>&1; echo")):
        output = _run("docker", "run", "--rm", "--network", "none", image, "/bin/bash", "-c", probe)
        assert "python3" not in output.replace("no-python", ""), output
    return {"minbase": MINBASE, "static": STATIC}


def _bash(command: str, **expect: Any) -> ToolStep:
    return ToolStep(name="bash", input={"command": command}, expect=Expect(**expect))


def _session(image: str | None, tag: str) -> ScriptedSession:
    """Six tools, a skill and a kept /workspace across two turns, in `image`."""
    line, edited = f"hello {tag}", f"edited {tag}"
    turn1 = [
        _bash(f"echo marker-{tag} $HOME $(id -u) && cat skills/demo-skill/SKILL.md && echo kept-{tag} > kept.txt",
              is_error=False, contains=[f"marker-{tag} /tmp 10001", "demo 42"]),
        ToolStep(name="write", input={"file_path": "notes/hello.txt", "content": f"{line}\nsecond\n"},
                 expect=Expect(is_error=False, contains=["wrote"])),
        ToolStep(name="read", input={"file_path": "notes/hello.txt"}, expect=Expect(is_error=False, contains=[line])),
        ToolStep(name="edit", input={"file_path": "notes/hello.txt", "old_string": line, "new_string": edited},
                 expect=Expect(is_error=False)),
        ToolStep(name="glob", input={"pattern": "notes/*.txt"}, expect=Expect(is_error=False, contains=["hello.txt"])),
        ToolStep(name="grep", input={"pattern": f"^edited {tag}$"},
                 expect=Expect(is_error=False, contains=["hello.txt", edited])),
    ]
    turn2 = [_bash("cat kept.txt notes/hello.txt", is_error=False, contains=[f"kept-{tag}", edited])]
    return ScriptedSession(
        metadata={"image": image} if image else {},
        skills=[SkillSpec(skill_id=f"skill_{tag}", name="demo-skill", files={"SKILL.md": "# demo 42\n"})],
        turns=[turn1, turn2],
    )


@pytest.mark.parametrize(("runtime", "quota"), [("runc", "filesystem"), ("runsc", "filesystem"), ("runc", "poll")])
def test_sessions_run_in_foreign_images_beside_ours(
    harness: Harness, foreign_images: dict[str, str], runtime: str, quota: str
) -> None:
    """`quota` poll: /workspace is a plain volume, given the sandbox user's ownership before the sandbox starts."""
    cp = harness.control_plane
    sessions = {
        "minbase": cp.add_session(_session(foreign_images["minbase"], "minbase")),
        "static": cp.add_session(_session(foreign_images["static"], "static")),
        "ours": cp.add_session(_session(None, "ours")),
    }
    off_list = cp.add_session(ScriptedSession(metadata={"image": "registry.example.com/evil:1"}, steps=[
        _bash("echo never")]))
    missing = cp.add_session(ScriptedSession(metadata={"image": "sandboxd-test-missing:1"}, steps=[
        _bash("echo never")]))
    env = {
        "SANDBOXD_ALLOWED_IMAGES": json.dumps(["sandboxd-test-*"]),
        "SANDBOXD_RUNTIME_IMAGE": harness.image,
        "SANDBOXD_RUNTIME": runtime,
        "SANDBOXD_WORKSPACE_QUOTA": quota,
        "SANDBOXD_MAX_SESSIONS": "3",
    }
    run = harness.start("run", **env)
    try:
        state = cp.wait_for(lambda s: all(s["sessions"][x.session_id]["done"] for x in sessions.values())
                            and all(s["work"][x.work_id]["state"] == "stopped" for x in (off_list, missing)),
                            timeout=300)
    finally:
        harness.signal(run)
        harness.wait(run, timeout=90)
    for name, session in sessions.items():
        record = state["sessions"][session.session_id]
        assert record["passed"], (name, record["results"], run.output[-4000:])
        assert len(record["work_ids"]) == 2, (name, record["work_ids"])
        assert record["duplicates"] == [], name
    for session, reason in ((off_list, "image_not_allowed"), (missing, "image_missing")):
        work = state["work"][session.work_id]
        assert work["state"] == "stopped" and len(work["stops"]) == 1, work
        assert state["sessions"][session.session_id]["results"] == [], "no tool of it ever ran"
        assert f"work_id={session.work_id}" in run.output and reason in run.output, run.output[-4000:]
    assert "image_unavailable image='sandboxd-test-missing:1'" in run.output
    assert f"workspace_quota mode={quota}" in run.output or quota == "poll"
    assert run.output.count("runtime_volume_created") <= 1
    assert harness.leftovers() == {"containers": [], "volumes": []}


def test_a_restarted_daemon_adopts_sandboxes_of_foreign_images(
    harness: Harness, foreign_images: dict[str, str]
) -> None:
    """Adoption does not care which image a sandbox runs: SIGKILL the daemon mid-tool-call, start another."""
    cp = harness.control_plane
    sessions = [cp.add_session(ScriptedSession(metadata={"image": foreign_images[name]}, steps=[
        _bash(f"sleep 5; echo slept-{name}", is_error=False, contains=[f"slept-{name}"]),
        _bash(f"echo after-{name}", is_error=False, contains=[f"after-{name}"]),
    ])) for name in ("minbase", "static")]
    env = {"SANDBOXD_ALLOWED_IMAGES": json.dumps(["sandboxd-test-*"]), "SANDBOXD_RUNTIME_IMAGE": harness.image}
    first = harness.start("run", **env)
    cp.wait_for(lambda s: all(s["sessions"][x.session_id]["events"] >= 2 for x in sessions), timeout=90)
    first.process.kill()
    harness.wait(first, timeout=10)
    second = harness.start("run", **env)
    try:
        state = cp.wait_for(lambda s: all(s["work"][x.work_id]["state"] == "stopped" for x in sessions), timeout=120)
    finally:
        harness.signal(second)
        harness.wait(second, timeout=90)
    for session in sessions:
        assert state["sessions"][session.session_id]["passed"], state["sessions"][session.session_id]
        work = state["work"][session.work_id]
        assert work["claims"] == 1 and len(work["stops"]) == 1, work
    assert second.output.count("sandbox_adopted") == 2, second.output[-4000:]
    assert harness.leftovers() == {"containers": [], "volumes": []}
