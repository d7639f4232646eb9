"""Settings: one model from flags, environment, secret files and a TOML file; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandboxd.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SANDBOXD_MAX_SESSIONS", "SANDBOXD_ENVIRONMENT_KEY", "SANDBOXD_CONFIG", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


def test_priority_flags_over_env_over_config_and_secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sandboxd.toml"
    config.write_text('max_sessions = 7\nimage = "from-config"\nnetwork_mode = "none"\n')
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "environment_key").write_text("sk-ant-oat01-from-file\n")
    monkeypatch.setenv("SANDBOXD_IMAGE", "from-env")
    monkeypatch.setenv("SANDBOXD_NETWORK_MODE", "host")

    s = load_settings(["--network-mode", "bridge"], prog="t", config_file=str(config), secrets_dir=[secrets])

    assert (s.max_sessions, s.image, s.network_mode) == (7, "from-env", "bridge")
    assert s.environment_key is not None and s.environment_key.get_secret_value() == "sk-ant-oat01-from-file"
    assert "sk-ant-oat01" not in repr(s)


def test_systemd_credentials_directory_is_a_secret_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "api_key").write_text("sk-ant-api-x")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    s = load_settings([], prog="t")
    assert s.api_key is not None and s.api_key.get_secret_value() == "sk-ant-api-x"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--max-sessions", "0"], "`max_sessions` (--max-sessions or SANDBOXD_MAX_SESSIONS)"),
        (["--metrics-address", "nope"], "`metrics_address`"),
        (["--sandbox-user", "root"], "`sandbox_user`"),
        (["--base-url", "ftp://x"], "`base_url`"),
        (["--pull-policy", "sometimes"], None),
    ],
)
def test_bad_settings_are_errors_naming_the_setting(argv: list[str], named: str | None) -> None:
    with pytest.raises((ConfigError, SystemExit)) as caught:
        load_settings(argv, prog="t")
    if named is not None:
        assert isinstance(caught.value, ConfigError) and named in str(caught.value)


def test_secrets_are_never_flags() -> None:
    with pytest.raises(ConfigError, match="cannot be a flag"):
        load_settings(["--environment-key=sk-ant-oat01-x"], prog="t")


def test_missing_required_setting_names_it(tmp_path: Path) -> None:
    s = load_settings([], prog="t")
    with pytest.raises(ConfigError, match="`environment_id`.*`environment_key`"):
        s.require("environment_id", "environment_key", command="run")


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings([], prog="t", config_file=str(tmp_path / "absent.toml"))


CREDENTIAL = {"name": "github", "host": "*.github.com", "format": "basic", "secret_file": "/run/creds/gh",
              "placeholder_env": "GITHUB_TOKEN"}


def test_egress_credentials_come_as_json_in_the_environment_and_as_toml(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOXD_EGRESS_CREDENTIALS", json.dumps([CREDENTIAL]))
    (rule,) = load_settings([], prog="t").egress_credentials
    assert (rule.name, rule.port, rule.header, rule.rule().wildcard) == ("github", 443, "Authorization", True)
    monkeypatch.delenv("SANDBOXD_EGRESS_CREDENTIALS")
    config = tmp_path / "sandboxd.toml"
    config.write_text('egress_credentials = [{ name = "api", host = "api.example.com", port = 8443, '
                      'secret_file = "/s", placeholder_env = "API_TOKEN" }]\n')
    (rule,) = load_settings([], prog="t", config_file=str(config)).egress_credentials
    assert (rule.host, rule.port, rule.format) == ("api.example.com", 8443, "bearer")


@pytest.mark.parametrize("change", [
    {"secret": "the-value"},  # never a plain value: a file
    {"name": "Has Spaces"},
    {"host": "10.0.0.1"},
    {"header": "Host"},
    {"header": "Proxy-Authorization"},
    {"placeholder_env": "SANDBOXD_API_SOCKET"},
    {"placeholder_env": "HTTPS_PROXY"},
    {"format": "digest"},
])
def test_bad_egress_credentials_are_configuration_errors(monkeypatch: pytest.MonkeyPatch,
                                                         change: dict[str, str]) -> None:
    monkeypatch.setenv("SANDBOXD_EGRESS_CREDENTIALS", json.dumps([CREDENTIAL | change]))
    with pytest.raises(ConfigError, match="egress_credentials"):
        load_settings([], prog="t")


def test_an_egress_ca_needs_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="egress_ca_key_file"):
        load_settings(["--egress-ca-cert-file", str(tmp_path / "ca.crt")], prog="t")
