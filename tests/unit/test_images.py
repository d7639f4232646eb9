"""Which image a session runs: the default, or one its metadata names from allowed_images (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.images import ImagePolicy, ImageRefused, normalize
from sandboxd.settings import Settings

DIGEST = "sha256:" + "ab" * 32


def test_references_are_normalized_to_a_tag() -> None:
    assert normalize("python") == "python:latest"
    assert normalize("python:3.13") == "python:3.13"
    assert normalize(f"registry.example.com:5000/team/dev@{DIGEST}") == f"registry.example.com:5000/team/dev@{DIGEST}"
    for bad in ("", "Python:3", "python:3 ; rm", "a" * 300, "../etc", "python:", "x@sha256:short", "-x"):
        with pytest.raises(ImageRefused) as refused:
            normalize(bad)
        assert refused.value.reason == "image_invalid"


def test_without_an_allow_list_only_the_default_runs() -> None:
    policy = ImagePolicy.of("sandboxd-sandbox:latest")
    assert not policy.per_session
    assert policy.choose({}) is None
    assert policy.choose({"image": "sandboxd-sandbox"}) is None  # :latest, the default itself
    with pytest.raises(ImageRefused) as refused:
        policy.choose({"image": "python:3.13"})
    assert refused.value.reason == "image_not_allowed" and "allowed_images is empty" in str(refused.value)


def test_exact_digest_and_pattern_entries() -> None:
    policy = ImagePolicy.of("sandboxd-sandbox:latest", [
        "python:3.13", f"registry.example.com/pinned@{DIGEST}", "registry.example.com/team/*", "node:22*",
        "mirror.example.com/**",
    ])
    assert policy.per_session
    assert policy.choose({"image": "python:3.13"}) == "python:3.13"
    assert policy.choose({"image": f"registry.example.com/pinned@{DIGEST}"}) == f"registry.example.com/pinned@{DIGEST}"
    assert policy.choose({"image": "registry.example.com/team/dev:1"}) == "registry.example.com/team/dev:1"
    assert policy.choose({"image": "node:22-bookworm"}) == "node:22-bookworm"
    assert policy.choose({"image": "mirror.example.com/a/b/c:9"}) == "mirror.example.com/a/b/c:9"
    assert policy.choose({"image": "sandboxd-sandbox:latest"}) is None
    for refused_image in ("python:3.12", "python", "registry.example.com/team/sub/dev:1",
                          "registry.example.com/pinned:latest", "node:20", "evil.example.com/mirror.example.com/x"):
        with pytest.raises(ImageRefused) as refused:
            policy.choose({"image": refused_image})
        assert refused.value.reason == "image_not_allowed", refused_image


def test_pull_policy_per_pattern_first_match_wins() -> None:
    policy = ImagePolicy.of("sandboxd-sandbox:latest", ["**"], {"python:*": "always", "**": "never"}, "missing")
    assert policy.pull_policy("python:3.13") == "always"
    assert policy.pull_policy("node:22") == "never"
    assert ImagePolicy.of("x:1").pull_policy("x:1") == "missing"
    with pytest.raises(ValueError, match="use one of"):
        ImagePolicy.of("x:1", pull_policies={"python:*": "sometimes"})


def test_settings_refuse_a_malformed_entry() -> None:
    with pytest.raises(ValueError, match="allowed_images"):
        Settings(environment_id="env_x", allowed_images=["python 3"])
    with pytest.raises(ValueError, match="image_pull_policies"):
        Settings(environment_id="env_x", image_pull_policies={"Not/Valid:": "always"})


@given(st.text(max_size=600))
def test_choose_is_total_on_any_metadata_value(value: str) -> None:
    policy = ImagePolicy.of("sandboxd-sandbox:latest", ["registry.example.com/**", "python:3.*"])
    try:
        chosen = policy.choose({"image": value})
    except ImageRefused as exc:
        assert exc.reason in ("image_invalid", "image_not_allowed")
        assert len(str(exc)) < 400
    else:
        assert chosen is None or chosen.startswith(("registry.example.com/", "python:3."))
