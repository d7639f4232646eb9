"""Every setting of sandboxd, as one pydantic-settings model.

Sources, highest priority first: command-line flags (`--max-sessions 3`), environment variables
(`SANDBOXD_MAX_SESSIONS=3`), secret files named after the field (`environment_key`, `api_key`) in
the secrets directories (`--secrets-dir`, systemd's `$CREDENTIALS_DIRECTORY`, `/run/secrets`), a
TOML config file (`--config` / `SANDBOXD_CONFIG`, default `/etc/sandboxd/sandboxd.toml` if
present), then the defaults below. The CLI builds the model once and hands narrow views down;
nothing below the CLI reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    CliSuppress,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigError
from .images import check_pattern
from .network.credentials import CredentialRule

ENV_PREFIX = "SANDBOXD_"
DEFAULT_CONFIG_FILE = Path("/etc/sandboxd/sandboxd.toml")
DEFAULT_SECRETS_DIRS = (Path("/run/secrets"),)
SECRET_FIELDS = ("environment_key", "api_key")


class EgressCredential(BaseModel):
    """One credential rule of `egress_credentials` (see sandboxd.network.credentials). No secret value: a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="A short label (a-z 0-9 _ -, at most 32): logs and the metric's `rule` label.")
    host: str = Field(description="The host it is injected for: an exact name or *.suffix.")
    port: int = Field(443, ge=1, le=65535, description="The port (HTTPS only).")
    header: str = Field("Authorization", description="The header that carries it.")
    format: Literal["bearer", "basic", "replace"] = Field(
        "bearer", description="bearer: `Bearer <placeholder>`; basic: `Basic base64(user:<placeholder>)` (git, "
        "pip); replace: the placeholder anywhere in the header's value.",
    )
    secret_file: Path = Field(description="The file holding the real value (a systemd credential, a mounted "
                              "Kubernetes Secret key), read at each use.")
    placeholder_env: str = Field(description="The environment variable in which sandboxes see their placeholder.")
    session_opt_in: bool = Field(
        False, description="Inject only for sessions whose metadata names this rule (egress_credentials = "
        "\"name,...\"); else for every session.",
    )

    @model_validator(mode="after")
    def _check(self) -> EgressCredential:
        self.rule()  # raises ValueError naming the problem
        return self

    def rule(self) -> CredentialRule:
        return CredentialRule.parse(name=self.name, host=self.host, port=self.port, header=self.header,
                                    format=self.format, secret_file=self.secret_file,
                                    placeholder_env=self.placeholder_env, session_opt_in=self.session_opt_in)


class Settings(BaseSettings):
    """The daemon's configuration. Field descriptions double as `--help` text."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        populate_by_name=True,
    )

    # --- control plane -------------------------------------------------------------------------
    environment_id: str | None = Field(None, description="The self_hosted environment to serve (env_...).")
    # Secrets are not command-line flags: argv is world-readable through /proc.
    environment_key: CliSuppress[SecretStr | None] = Field(
        None, description="The environment key (sk-ant-oat01-...). Prefer a secret file `environment_key`."
    )
    api_key: CliSuppress[SecretStr | None] = Field(
        None,
        description="A Claude API key, used only for queue stats and Files API downloads; never sent to a "
        "sandbox. Prefer a secret file `api_key`.",
    )
    base_url: str = Field("https://api.anthropic.com", description="The Anthropic API base URL.")
    sandbox_base_url: str | None = Field(
        None, description="The API base URL as seen from inside a sandbox (default: base_url)."
    )
    worker_id: str | None = Field(None, description="Worker id sent on each poll (default: <hostname>-<random>).")
    poll_block_ms: int = Field(999, ge=1, le=999, description="Long-poll hold time per poll request.")
    reclaim_older_than_ms: int | None = Field(
        None, ge=1, description="Reclaim un-acked work older than this (server default when unset)."
    )

    # --- capacity and lifetime ------------------------------------------------------------------
    max_sessions: int = Field(4, ge=1, le=1024, description="Sessions (containers) run at once.")
    max_session_seconds: float = Field(3600.0, gt=0, description="A session's container is stopped after this.")
    shutdown_grace_seconds: float = Field(
        60.0, ge=0, description="On SIGTERM, how long running sessions may finish before being stopped."
    )
    stop_timeout_seconds: float = Field(
        10.0, ge=0, description="How long a container gets between SIGTERM and SIGKILL."
    )
    drain_timeout_seconds: float | None = Field(
        None, gt=0, description="drain: bound on the total run time; past it sessions are stopped (exit 4)."
    )
    shutdown_mode: Literal["drain", "handoff"] = Field(
        "drain",
        description="What SIGTERM does: drain (running sessions get shutdown_grace_seconds, then are stopped) "
        "or handoff (stop claiming and leave running sandboxes to the next daemon on the same engine). "
        "SIGUSR2 always hands off; SIGHUP hands off and re-executes the daemon in place.",
    )
    stall_tool_seconds: float = Field(
        900.0, gt=0, description="A tool call running longer than this flags its session as stalled."
    )
    stall_silence_seconds: float = Field(
        300.0, gt=0, description="A sandbox silent (no heartbeat, no tool event) this long is flagged as stalled."
    )
    disk_check_interval_seconds: float = Field(
        2.0, gt=0, description="How often /workspace sizes are checked against workspace_max_bytes."
    )
    warm_pool_size: int = Field(
        1, ge=0, le=256,
        description="Pre-started sandboxes waiting for work (0 disables the pool); each costs about 75 MiB.",
    )
    warm_pool_max_age_seconds: float = Field(
        3600.0, gt=0, description="A warm pool member older than this is replaced."
    )
    max_file_bytes: int | None = Field(
        None, ge=1,
        description="Size cap for a whole-file `read` and for `edit` in a sandbox (the SDK's max_file_bytes); "
        "unset: the SDK's default.",
    )
    max_idle_seconds: float = Field(
        60.0, gt=0, description="A session ends this long after it goes idle (SDK max_idle)."
    )
    allow_environment_key_in_sandbox: bool = Field(
        False,
        description="Hand the environment key to a sandbox whose work item carries no usable secret. "
        "Off by default: a sandbox never holds the environment key.",
    )

    # --- sandbox containers ---------------------------------------------------------------------
    image: str = Field(
        "sandboxd-sandbox:latest",
        description="The default sandbox image: ours, one built FROM it, or any image with /bin/bash (the worker "
        "runtime is brought in from runtime_image).",
    )
    pull_policy: Literal["never", "missing", "always"] = Field(
        "missing", description="Pull a sandbox image never, when missing, or before every session."
    )
    allowed_images: list[str] = Field(
        default_factory=list,
        description="Images a session may name with its metadata key `image`, besides the default: exact "
        "references, digests, or patterns (`*` within a path component, `**` across). Empty: only `image`.",
    )
    image_pull_policies: dict[str, Literal["never", "missing", "always"]] = Field(
        default_factory=dict,
        description="Pull policy per image pattern (the first match wins); other images use pull_policy.",
    )
    runtime_image: str = Field(
        "sandboxd-sandbox:latest",
        description="The image the sandbox worker runtime (the entrypoint with its own interpreter, libraries and "
        "the SDK, /opt/sandboxd-runtime) is taken from, once per version, into a read-only volume; keep it at the "
        "daemon's version.",
    )
    network_mode: str = Field(
        "none",
        description="Docker network mode of sandboxes. none (the default): no network; the API through the "
        "daemon's broker, egress only through the allow-list proxy. bridge/host/<net> give tools raw "
        "networking (cloud metadata, internal services...): an explicit opt-out.",
    )
    socket_dir: Path | None = Field(
        None, description="Where the daemon serves the broker and proxy sockets (default <state_dir>/run); "
        "the engine bind-mounts it into sandboxes, so it must be a path on the engine's host."
    )
    egress_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts tools may reach through the egress proxy: host (ports 80/443), host:port, "
        "*.suffix. Empty: no egress at all. Private, loopback, link-local and metadata addresses are refused "
        "unless listed exactly as host:port.",
    )
    egress_audit: bool = Field(
        False, description="Allow (and log and count as audit) what the egress allow-list would refuse."
    )
    egress_credentials: list[EgressCredential] = Field(
        default_factory=list,
        description="Credentials the egress proxy injects into HTTPS requests to their host (TLS terminated there "
        "with sandboxd's CA); sandboxes see only a placeholder. A JSON list in SANDBOXD_EGRESS_CREDENTIALS. "
        "See docs/network.md.",
    )
    egress_ca_cert_file: Path | None = Field(
        None, description="An operator CA certificate (PEM) for the proxy's intercepted hosts, with "
        "egress_ca_key_file; default: a CA sandboxd makes under <state_dir>/egress."
    )
    egress_ca_key_file: Path | None = Field(
        None, description="The unencrypted PEM key of egress_ca_cert_file."
    )
    egress_upstream_ca_file: Path | None = Field(
        None, description="Extra CA certificates (PEM) the proxy trusts, besides the system store, for the hosts "
        "it injects credentials into."
    )
    runtime: str | None = Field(None, description="OCI runtime for sandboxes, e.g. runsc for gVisor.")
    sandbox_user: str = Field("10001:10001", pattern=r"^\d+:\d+$", description="uid:gid sandboxes run as.")
    memory_limit: str = Field("2g", pattern=r"^\d+[bkmg]?$", description="Memory limit per sandbox.")
    cpus: float = Field(1.0, gt=0, description="CPU limit per sandbox, in cores.")
    pids_limit: int = Field(512, ge=16, description="Process limit per sandbox.")
    allow_unenforced_limits: bool = Field(
        False,
        description="Run sessions although the engine does not enforce memory_limit, pids_limit or cpus (a "
        "rootless engine without cgroup delegation), with a warning at every sandbox start. Off by default: "
        "such an engine gets no session (LaunchError limits_not_enforced, /readyz names the limit).",
    )
    tmp_size: str = Field("256m", pattern=r"^\d+[bkmg]?$", description="Size of the tmpfs /tmp of a sandbox.")
    container_log_lines: int = Field(40, ge=0, description="Last container log lines copied to the daemon log.")
    state_dir: Path = Field(Path("/var/lib/sandboxd"), description="Workspace staging and git mirror cache.")

    # --- workspace (session metadata) ------------------------------------------------------------
    git_allowed_hosts: list[str] = Field(
        default_factory=lambda: ["github.com", "gitlab.com", "bitbucket.org"],
        description="Hosts git repositories may be fetched from (host or host:port).",
    )
    file_allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts https file URLs may be downloaded from."
    )
    git_token_files: dict[str, Path] = Field(
        default_factory=dict,
        description="Per-host https token files: {host: /path/to/token}. A file holds one line, `token` "
        "(sent as user x-access-token) or `user:token`; read at each fetch, never logged.",
    )
    git_ssh_key_files: dict[str, Path] = Field(
        default_factory=dict, description="Per-host ssh private key files: {host: /path/to/key}."
    )
    git_ssh_known_hosts_file: Path | None = Field(
        None, description="known_hosts for ssh git URLs; without it ssh URLs are refused."
    )
    fetch_timeout_seconds: float = Field(
        300.0, gt=0, description="Bound on fetching one repository (with its submodules) or one file."
    )
    git_mirror_cache_max_bytes: int = Field(10 * 2**30, ge=0, description="Size bound of the git mirror cache.")
    file_max_bytes: int = Field(100 * 2**20, ge=1, description="Largest single file a session may name.")
    workspace_max_bytes: int = Field(2 * 2**30, ge=1, description="Largest total workspace a session may name.")
    workspace_max_inodes: int = Field(
        500_000, ge=1024, description="Most files and directories a sandbox's /workspace may hold (filesystem quota)."
    )
    workspace_quota: Literal["auto", "filesystem", "poll"] = Field(
        "auto",
        description="How /workspace is bounded: `filesystem` (a loop-mounted ext4 per sandbox; the kernel refuses "
        "writes past workspace_max_bytes and workspace_max_inodes; needs root on the engine's host), `poll` (the "
        "engine's volume sizes, checked every disk_check_interval_seconds), or `auto` (filesystem where possible).",
    )
    workspace_retention_seconds: float = Field(
        7 * 24 * 3600.0, ge=0,
        description="How long a session's /workspace is kept for its next work item (0 disables retention).",
    )
    workspace_store_dir: Path | None = Field(
        None,
        description="A directory shared by every daemon of the environment (NFS, EFS, RWX volume) where kept "
        "workspaces live; default: <state_dir>/workspaces, local to this host.",
    )
    workspace_store_max_bytes: int = Field(
        50 * 2**30, ge=1, description="Size cap of the workspace store; the oldest entries are evicted first."
    )
    allow_insecure_http: bool = Field(
        False, description="Allow plain http:// git and file URLs (for local test servers only)."
    )

    # --- observability --------------------------------------------------------------------------
    metrics_address: str | None = Field(
        "127.0.0.1:9464", description="host:port of /metrics, /healthz and /readyz; empty disables."
    )
    stats_interval_seconds: float = Field(15.0, gt=0, description="How often queue stats are collected.")
    ready_poll_window_seconds: float = Field(
        60.0, gt=0, description="/readyz fails when no poll succeeded for this long."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    @field_validator("metrics_address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if not value:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port, for example 127.0.0.1:9464")
        return value

    @field_validator("allowed_images", "image_pull_policies")
    @classmethod
    def _check_images(cls, value: Any) -> Any:
        for pattern in value:
            check_pattern(pattern)
        return value

    @model_validator(mode="after")
    def _check_egress_ca(self) -> Settings:
        if (self.egress_ca_cert_file is None) != (self.egress_ca_key_file is None):
            raise ValueError("egress_ca_cert_file and egress_ca_key_file go together")
        return self

    @field_validator("base_url", "sandbox_base_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/") if value else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Order is priority: flags (passed as init kwargs), env, secret files, config file.
        return init_settings, env_settings, *_EXTRA_SOURCES.get(settings_cls, ())

    def require(self, *names: str, command: str) -> None:
        """Raise ConfigError naming every setting in `names` that is unset."""
        missing = [n for n in names if getattr(self, n) in (None, "")]
        if missing:
            raise ConfigError(
                f"`sandboxd {command}` needs " + ", ".join(describe_setting(n) for n in missing)
            )

    @property
    def effective_sandbox_base_url(self) -> str:
        return self.sandbox_base_url or self.base_url


_EXTRA_SOURCES: dict[type[BaseSettings], tuple[PydanticBaseSettingsSource, ...]] = {}


def describe_setting(name: str) -> str:
    """How a user sets `name`: the flag, the variable and, for secrets, the file."""
    if name in SECRET_FIELDS:
        return f"`{name}` (a secret file named {name}, or {ENV_PREFIX}{name.upper()})"
    return f"`{name}` (--{name.replace('_', '-')} or {ENV_PREFIX}{name.upper()})"


def secrets_dirs(extra: Sequence[Path] = ()) -> list[Path]:
    """Secret directories that exist, in priority order: explicit, systemd credentials, /run/secrets."""
    candidates = [*extra]
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(os.environ["CREDENTIALS_DIRECTORY"]))
    candidates.extend(DEFAULT_SECRETS_DIRS)
    return [p for p in candidates if p.is_dir()]


def _config_file(flag_value: str | None) -> Path | None:
    value = flag_value or os.environ.get(ENV_PREFIX + "CONFIG")
    if value:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"config file {path} (from --config or {ENV_PREFIX}CONFIG) does not exist")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(
    argv: Sequence[str], *, prog: str, config_file: str | None = None, secrets_dir: Sequence[Path] = ()
) -> Settings:
    """Build the Settings from flags in `argv`, the environment, secret files and the config file.

    Raises ConfigError with a message naming each wrong setting; never a traceback.
    """
    for arg in argv:
        name = arg.removeprefix("--").split("=", 1)[0].replace("-", "_")
        if arg.startswith("--") and name in SECRET_FIELDS:
            raise ConfigError(f"{describe_setting(name)} cannot be a flag: argv is readable by every local user")
    cli: CliSettingsSource[Settings] = CliSettingsSource(
        Settings,
        cli_prog_name=prog,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_enforce_required=False,
        cli_hide_none_type=True,
        cli_avoid_json=True,
    )
    sources: list[PydanticBaseSettingsSource] = [
        SecretsSettingsSource(Settings, secrets_dir=[str(d) for d in secrets_dirs(secrets_dir)], env_prefix="")
    ]
    path = _config_file(config_file)
    if path is not None:
        sources.append(TomlConfigSettingsSource(Settings, toml_file=path))
    _EXTRA_SOURCES[Settings] = tuple(sources)
    try:
        return Settings(_cli_settings_source=cli(args=list(argv)))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    except (OSError, ValueError) as exc:  # unreadable config file, malformed TOML
        raise ConfigError(f"could not read the configuration: {exc}") from None
    finally:
        _EXTRA_SOURCES.pop(Settings, None)


def _format_validation_error(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "(settings)"
        field = str(err["loc"][0]) if err["loc"] else ""
        where = describe_setting(field) if field in Settings.model_fields else f"`{name}`"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


__all__ = ["ConfigError", "Settings", "describe_setting", "load_settings"]
