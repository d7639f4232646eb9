"""Running git: a hardened environment, per-host credentials, cancellation, and error reasons.

Every git process gets a fixed environment built here (nothing of the daemon's own): no system or
global config, no prompts, no hooks, no redirects, only the transports a step needs. Credentials
reach git only through that environment — an `http.<url>.extraHeader` config entry for https, an
identity file in GIT_SSH_COMMAND for ssh — so they are never in argv, a config file or a log line.
Each git runs in its own process group, killed whole when the fetch is cancelled or times out.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream

from ..errors import WorkspaceError
from .config import WorkspaceConfig
from .urls import Remote

log = logging.getLogger(__name__)

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STDERR_KEEP = 8192
_HARDENING = (
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    ("core.logAllRefUpdates", "false"),
    ("credential.helper", ""),
    ("protocol.version", "2"),
    ("http.followRedirects", "false"),
    ("fetch.recurseSubmodules", "false"),
    ("submodule.recurse", "false"),
    ("gc.autoDetach", "false"),
    ("maintenance.autoDetach", "false"),
    ("init.defaultBranch", "main"),
    ("advice.detachedHead", "false"),
)
# Checked in order; git's messages are English because the environment sets LC_ALL=C.
_REASONS = (
    ("auth_failed", re.compile(r"could not read (username|password)|authentication failed|terminal prompts "
                               r"disabled|http 40[13]|permission denied|host key verification failed", re.I)),
    ("unreachable", re.compile(r"could not resolve|couldn't connect|failed to connect|connection refused|"
                               r"connection timed out|no route to host|network is unreachable|connection reset",
                               re.I)),
    ("ref_not_found", re.compile(r"couldn't find remote ref|not our ref|unadvertised object|no such ref", re.I)),
    ("not_found", re.compile(r"repository .* not found|not found|does not appear to be a git repository|http 404",
                             re.I)),
)


# What git says after every ssh failure, whatever the cause: not worth reporting when ssh said more.
_GENERIC_ADVICE = re.compile(
    r"^(fatal: Could not read from remote repository\.|Please make sure you have the correct access rights"
    r"|and the repository exists\.)"
)

_DIAGNOSIS = re.compile(
    r"Host key verification failed|Permission denied|Could not resolve|Connection refused|timed out"
    r"|Authentication failed|not found|couldn't find remote ref",
    re.IGNORECASE,
)


class GitFailed(Exception):
    """A git command exited non-zero; `stderr` is already scrubbed of secrets."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"git {argv[1] if len(argv) > 1 else ''} exited {returncode}: {stderr}")
        self.returncode = returncode
        self.stderr = stderr

    def last_line(self) -> str:
        """The most telling line of git's output: ssh's own diagnosis (host key, permission) over
        git's generic "could not read from remote" advice, else git's last word."""
        lines = [line.strip() for line in self.stderr.strip().splitlines() if line.strip(" @\t")]
        diagnosis = [line for line in lines if _DIAGNOSIS.search(line)]
        specific = diagnosis or [line for line in lines if not _GENERIC_ADVICE.search(line)]
        if specific:
            return specific[0].removeprefix("fatal: ")
        return lines[-1].removeprefix("fatal: ") if lines else f"exit status {self.returncode}"

    def reason(self) -> str:
        for reason, pattern in _REASONS:
            if pattern.search(self.stderr):
                return reason
        return "fetch_failed"

    def as_workspace_error(self, what: str) -> WorkspaceError:
        return WorkspaceError(self.reason(), f"{what}: {self.last_line()}")


@dataclass(frozen=True)
class GitEnv:
    """A git process environment; `secrets` are scrubbed from anything git prints."""

    env: Mapping[str, str]
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        return "GitEnv(...)"


def _config_env(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    env = {"GIT_CONFIG_COUNT": str(len(pairs))}
    for i, (key, value) in enumerate(pairs):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


def base_env(home: Path, protocols: str) -> dict[str, str]:
    return {
        "PATH": _PATH,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home),
        "LC_ALL": "C",
        "LANG": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "GIT_PROTOCOL_FROM_USER": "0",
        "GIT_ALLOW_PROTOCOL": protocols,
    }


def local_env(home: Path) -> GitEnv:
    """For work on the mirror cache and the checkout: the file transport only, no network."""
    return GitEnv({**base_env(home, "file"), **_config_env(_HARDENING)})


class Credentials:
    """Reads per-host token and key files at use, so a rotated token needs no restart."""

    def __init__(self, config: WorkspaceConfig) -> None:
        self._config = config

    async def remote_env(self, remote: Remote, home: Path, *, timeout_seconds: float) -> GitEnv:
        """The environment for a git command talking to `remote` (and only to it)."""
        protocols = "https:ssh" + (":http" if self._config.allow_insecure_http else "")
        env = base_env(home, protocols)
        # Objects are checked once, on their way into the mirror cache; local copies from it need not be.
        pairs = [*_HARDENING, ("transfer.fsckObjects", "true")]
        secrets: tuple[str, ...] = ()
        if remote.scheme in ("https", "http"):
            token_file = self._lookup(self._config.git_token_files, remote)
            if token_file is not None:
                user, token = await self._read_token(token_file, remote)
                header = base64.b64encode(f"{user}:{token}".encode()).decode()
                scope = f"{remote.scheme}://{remote.hostport}/"
                pairs.append((f"http.{scope}.extraHeader", f"Authorization: Basic {header}"))
                secrets = (token, header)
        else:
            env["GIT_SSH_COMMAND"] = self._ssh_command(remote, timeout_seconds)
            env["GIT_SSH_VARIANT"] = "ssh"
        return GitEnv({**env, **_config_env(pairs)}, secrets)

    @staticmethod
    def _lookup(files: Mapping[str, Path], remote: Remote) -> Path | None:
        return files.get(remote.hostport) or files.get(remote.host)

    async def _read_token(self, path: Path, remote: Remote) -> tuple[str, str]:
        try:
            text = (await anyio.Path(path).read_text()).strip()
        except (OSError, UnicodeDecodeError):
            raise WorkspaceError("auth_failed", f"the token file configured for {remote.hostport} cannot be "
                                 "read") from None
        lines = text.splitlines()
        user, sep, token = lines[0].partition(":") if len(lines) == 1 else ("", "", "")
        if not sep:
            user, token = "x-access-token", user
        if not token or not user:
            raise WorkspaceError("auth_failed", f"the token file configured for {remote.hostport} is empty or "
                                 "has more than one line")
        return user, token

    def _ssh_command(self, remote: Remote, timeout_seconds: float) -> str:
        known_hosts = self._config.git_ssh_known_hosts_file or Path("/dev/null")
        argv = [
            "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", f"ConnectTimeout={max(1, int(min(timeout_seconds, 60)))}",
        ]
        key = self._lookup(self._config.git_ssh_key_files, remote)
        if key is not None:
            argv += ["-i", str(key)]
        return shlex.join(argv)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return text


async def _drain(stream: ByteReceiveStream | None, sink: bytearray, limit: int | None) -> None:
    if stream is None:
        return
    async for chunk in stream:
        sink.extend(chunk)
        if limit is not None and len(sink) > limit:
            del sink[: len(sink) - limit]


async def run_git(args: Sequence[str], env: GitEnv, *, cwd: Path | None = None) -> str:
    """Run `git args...`; return stdout. Raises GitFailed; on cancellation the whole process group dies."""
    argv = ["git", *args]
    log.debug("git_command cwd=%s argv=%s", cwd, shlex.join(argv))
    out, err = bytearray(), bytearray()
    process = await anyio.open_process(
        argv, env=dict(env.env), cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_drain, process.stdout, out, None)
            tg.start_soon(_drain, process.stderr, err, _STDERR_KEEP)
        returncode = await process.wait()
    except BaseException:
        _kill_group(process.pid)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    if returncode != 0:
        raise GitFailed(argv, returncode, _scrub(err.decode("utf-8", "replace"), env.secrets))
    return out.decode("utf-8", "replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
