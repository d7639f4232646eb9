"""The systemd units: `systemd-analyze verify` passes, the sandboxing scores at most 2.5, and the
units agree with the daemon (stop timeout above its shutdown grace, credentials as files, reload
is the SIGHUP hand-off). tests/integration/test_systemd_real.py runs them under a real systemd.

`verify` also checks that ExecStart= names an executable, and loads the units the service
depends on (sysinit.target, ...). Rather than installing sandboxd at /opt/sandboxd on the test
machine, each check runs with `--root=` on a throw-away tree: the host's own unit directory
(copied), our units in etc/systemd/system, and executable stubs for ExecStart= and ExecReload=.
`security --offline=yes` reads the unit files only; it runs no service.
"""

from __future__ import annotations

import configparser
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sandboxd.settings import Settings, load_settings
from tests.conftest import REPO

SYSTEMD = REPO / "systemd"
UNITS = {"sandboxd.service": "sandboxd.service", "sandboxd@.service": "sandboxd@prod.service"}
MAX_EXPOSURE = 2.5
HARDENING = (
    "NoNewPrivileges", "CapabilityBoundingSet", "ProtectSystem", "ProtectHome", "PrivateDevices",
    "RestrictAddressFamilies", "SystemCallFilter", "SystemCallArchitectures", "RestrictNamespaces",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "LockPersonality",
    "MemoryDenyWriteExecute", "RestrictSUIDSGID", "UMask", "LimitCORE",
)


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd)", pytrace=False)
    return path


def host_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    pytest.fail("no systemd unit directory with sysinit.target on this machine", pytrace=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file-system root holding systemd's units, ours, and a stub ExecStart binary."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(host_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(SYSTEMD / unit, root / "etc/systemd/system" / unit)
    for path in ("opt/sandboxd/bin/sandboxd", "bin/kill"):  # ExecStart= and ExecReload=
        stub = root / path
        stub.parent.mkdir(parents=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run([systemd_analyze(), *args, f"--root={root}"], capture_output=True, text=True,
                          env=env, timeout=120)


def unit_file(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    counter = itertools.count()
    parser.read_string(
        # configparser keeps one value per key; systemd appends repeated ones, so number them.
        re.sub(r"^(SystemCallFilter|Environment|LoadCredential)=", lambda m: f"{m.group(1)}.{next(counter)}=",
               (SYSTEMD / name).read_text(), flags=re.M)
    )
    return parser


@pytest.mark.parametrize("unit", UNITS.values())
def test_verify_passes_without_a_warning(root: Path, unit: str) -> None:
    result = analyze(root, "verify", "--man=no", unit)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_verify_would_catch_a_broken_unit(root: Path, tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive warns, a missing ExecStart binary errors."""
    broken = root / "etc/systemd/system/sandboxd-broken.service"
    broken.write_text((SYSTEMD / "sandboxd.service").read_text().replace("ProtectHome=", "ProtectHom="))
    assert "Unknown key" in analyze(root, "verify", "--man=no", broken.name).stderr
    broken.write_text((SYSTEMD / "sandboxd.service").read_text().replace("/opt/sandboxd/bin/", "/opt/missing/"))
    assert analyze(root, "verify", "--man=no", broken.name).returncode != 0
    broken.unlink()


def exposure(root: Path, unit: str) -> float:
    result = analyze(root, "security", "--offline=yes", "--no-pager", unit)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("unit", UNITS.values())
def test_security_exposure_is_at_most_2_5(root: Path, unit: str) -> None:
    assert exposure(root, unit) <= MAX_EXPOSURE


def test_readme_states_the_measured_exposure(root: Path) -> None:
    figure = exposure(root, "sandboxd.service")
    readme = (SYSTEMD / "README.md").read_text()
    assert f"exposure level for sandboxd.service: {figure:.1f}" in readme


def test_template_has_the_same_hardening_and_its_own_paths() -> None:
    def hardening(name: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for key, value in unit_file(name)["Service"].items():
            if (base := key.split(".")[0]) in HARDENING:
                found.setdefault(base, []).append(value)
        return found

    assert set(hardening("sandboxd.service")) == set(HARDENING)
    assert hardening("sandboxd.service") == hardening("sandboxd@.service")
    template = unit_file("sandboxd@.service")["Service"]
    for key in ("StateDirectory", "ConfigurationDirectory", "ExecStart"):
        assert "%i" in template[key], key


@pytest.mark.parametrize("name", UNITS)
def test_unit_matches_the_daemon(name: str) -> None:
    service = unit_file(name)["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    # reload = hand off running sandboxes and re-execute in place (SIGHUP); restart drains (SIGTERM).
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["WatchdogSec"].endswith("s") and int(service["WatchdogSec"][:-1]) >= 10
    # systemd must not SIGKILL the daemon while its sessions finish and their sandboxes stop.
    defaults = Settings.model_fields
    grace = float(defaults["shutdown_grace_seconds"].default) + float(defaults["stop_timeout_seconds"].default)
    assert int(service["TimeoutStopSec"].removesuffix("s")) > grace
    # Secrets are credentials (files), never environment variables.
    credentials = [v for k, v in service.items() if k.startswith("LoadCredential")]
    assert any(v.startswith("environment_key:") for v in credentials)
    environment = [v for k, v in service.items() if k.startswith("Environment")]
    assert not [v for v in environment if re.search(r"KEY|TOKEN|SECRET", v.upper())]
    # Workspaces and caches live in the state directory, never in a private /tmp dockerd cannot see.
    assert f"SANDBOXD_STATE_DIR=/var/lib/{service['StateDirectory']}" in environment
    assert service["SupplementaryGroups"] == "docker" and service["User"] == "sandboxd"


def test_example_config_names_every_setting_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SANDBOXD_") or n == "CREDENTIALS_DIRECTORY"]:
        monkeypatch.delenv(name)
    text = (SYSTEMD / "sandboxd.toml.example").read_text()
    active = tmp_path / "active.toml"
    active.write_text(text)
    assert load_settings([], prog="sandboxd run", config_file=str(active), secrets_dir=[]).environment_id
    # Every commented-out line `# key = value` is a valid setting with a valid value.
    everything = re.sub(r"^# ([a-z_]+ = .*)$", r"\1", text, flags=re.M)
    keys = set(re.findall(r"^([a-z_]+) = ", everything, re.M))
    assert keys == set(Settings.model_fields) - {"environment_key", "api_key"}
    full = tmp_path / "full.toml"
    full.write_text(everything)
    load_settings([], prog="sandboxd run", config_file=str(full), secrets_dir=[])
