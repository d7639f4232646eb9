"""Credential rules, placeholders and the header rewrite (sandboxd.network.credentials), without sockets."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from sandboxd.network.credentials import (
    CredentialRule,
    Credentials,
    CredentialUnavailable,
    PlaceholderMisuse,
    carries_placeholder,
    opted_in,
)

KEY = b"k" * 32


def rule(tmp_path: Path, **change: object) -> CredentialRule:
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text("s3cret\n")
    fields: dict[str, object] = {"name": "api", "host": "api.example.com", "port": 443, "header": "Authorization",
                                 "format": "bearer", "secret_file": secret, "placeholder_env": "API_TOKEN"}
    return CredentialRule.parse(**(fields | change))  # type: ignore[arg-type]


def test_placeholders_differ_per_sandbox_and_rule_and_are_stable() -> None:
    credentials = Credentials([], KEY)
    one = credentials.placeholder("sandboxd-a", "api")
    assert one == Credentials([], KEY).placeholder("sandboxd-a", "api")  # an adopting daemon derives the same
    assert one != credentials.placeholder("sandboxd-b", "api") != credentials.placeholder("sandboxd-a", "git")
    assert one.startswith("sandboxd-credential-api-") and carries_placeholder(one.upper())


def test_a_wildcard_rule_matches_subdomains_on_its_port_only(tmp_path: Path) -> None:
    wildcard = rule(tmp_path, host="*.Example.COM.")
    assert wildcard.matches("a.example.com", 443) and not wildcard.matches("example.com", 443)
    assert not wildcard.matches("a.example.com", 80)


def test_the_rewrite_injects_strips_and_refuses(tmp_path: Path) -> None:
    bearer, basic = rule(tmp_path), rule(tmp_path, name="git", format="basic", header="X-Auth",
                                        placeholder_env="GIT_TOKEN")
    credentials = Credentials([bearer, basic], KEY)
    mine, git = credentials.placeholder("me", "api"), credentials.placeholder("me", "git")
    encoded = base64.b64encode(f"user:{git}".encode()).decode()
    done = credentials.rewrite([("Host", "api.example.com"), ("authorization", f"bearer {mine}"),
                                ("X-Auth", f"Basic {encoded}"), ("Authorization", "Bearer own")], "/", [bearer, basic],
                               "me")
    assert done.fields == (("Host", "api.example.com"), ("authorization", "Bearer s3cret"),
                           ("X-Auth", "Basic " + base64.b64encode(b"user:s3cret").decode()))
    assert (done.injected, done.stripped) == (("api", "git"), 1)
    assert "s3cret" not in repr(done)
    with pytest.raises(PlaceholderMisuse):
        credentials.rewrite([("Cookie", f"t={mine}")], "/", [bearer], "me")
    with pytest.raises(PlaceholderMisuse):
        credentials.rewrite([], f"/?t={mine}", [bearer], "me")
    other = credentials.rewrite([("Authorization", f"Bearer {credentials.placeholder('you', 'api')}")], "/",
                                [bearer], "me")
    assert other.fields == () and other.stripped == 1


@pytest.mark.parametrize("content", [b"", b"two\nlines\n", b"with space", b"x" * 9000, b"\xff\xfe"])
def test_a_secret_file_must_be_one_line_of_visible_ascii(tmp_path: Path, content: bytes) -> None:
    bad = rule(tmp_path)
    bad.secret_file.write_bytes(content)
    with pytest.raises(CredentialUnavailable):
        bad.secret()
    (tmp_path / "secret").unlink()
    with pytest.raises(CredentialUnavailable):
        bad.secret()


def test_opt_in_rules_apply_only_to_sessions_that_ask(tmp_path: Path) -> None:
    everyone, asked = rule(tmp_path), rule(tmp_path, name="git", session_opt_in=True, placeholder_env="GIT_TOKEN")
    credentials = Credentials([everyone, asked], KEY)
    assert credentials.rules_for("api.example.com", 443) == (everyone,)
    assert credentials.rules_for("api.example.com", 443, frozenset({"git"})) == (everyone, asked)
    assert opted_in({"egress_credentials": " git, index ,Bad Name,,"}) == {"git", "index"}
    assert opted_in({}) == frozenset() and len(opted_in({"egress_credentials": ",".join(["a"] * 999)})) == 1


def test_names_and_variables_are_unique(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        Credentials([rule(tmp_path), rule(tmp_path, placeholder_env="OTHER")], KEY)
