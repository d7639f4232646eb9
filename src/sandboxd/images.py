"""Which image a session's sandbox runs: the default `image`, or one a session names from an allow-list.

A session picks an image with its metadata key `image` (a value of at most 512 characters, chosen by
whoever creates the session: untrusted). The operator decides what may run with `allowed_images`:
exact references (`python:3.13`, `registry.example.com/team/dev@sha256:<64 hex>`) or patterns in
which `*` stands for any characters but `/` and `**` for any characters at all
(`registry.example.com/team/**`, `node:22*`), as GitLab Runner's `allowed_images` does. A reference
without a tag or digest means `:latest`, on both sides. Without `allowed_images`, only the default
image runs, and a session that names another is refused.

Everything here is pure (no engine call): a refused image fails its session before any container
starts. `image_pull_policies` gives a pull policy per pattern (the first match wins, else
`pull_policy`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from .errors import LaunchError

METADATA_KEY = "image"
MAX_REFERENCE = 255
# A Docker image reference: [registry[:port]/]path[:tag][@digest], lowercase path components.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]{1,5})?"
_REFERENCE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::(?P<tag>[\w][\w.-]{{0,127}}))?(?:@(?P<digest>sha256:[0-9a-f]{{64}}))?$"
)
_PATTERN_CHARS = re.compile(r"^[A-Za-z0-9._:/@*\-]+$")
PULL_POLICIES = ("never", "missing", "always")


def normalize(reference: str) -> str:
    """`reference` with `:latest` added when it has neither tag nor digest; ImageRefused if malformed."""
    if len(reference) > MAX_REFERENCE or not _REFERENCE.match(reference):
        raise ImageRefused("image_invalid", f"image {_shown(reference)} is not a valid image reference")
    match = _REFERENCE.match(reference)
    assert match is not None
    if match.group("tag") is None and match.group("digest") is None:
        return reference + ":latest"
    return reference


def _shown(text: str) -> str:
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*)", pattern)
    body = "".join(".*" if p == "**" else "[^/]*" if p == "*" else re.escape(p) for p in parts)
    return re.compile(f"^{body}$")


def _matches(pattern: str, reference: str) -> bool:
    if "*" not in pattern:
        return normalize(pattern) == reference
    if _compiled(pattern).match(reference):
        return True
    # `python*` also admits `python` written without a tag (normalized to python:latest).
    return reference.endswith(":latest") and bool(_compiled(pattern).match(reference.removesuffix(":latest")))


class ImageRefused(LaunchError):
    """A session's image is not one this daemon runs (reason image_not_allowed or image_invalid)."""


@dataclass(frozen=True)
class ImagePolicy:
    """The default image, what sessions may name instead, and each image's pull policy."""

    default: str
    allowed: tuple[str, ...] = ()
    pull_policies: tuple[tuple[str, str], ...] = ()
    default_pull_policy: str = "missing"

    @classmethod
    def of(cls, default: str, allowed: Iterable[str] = (), pull_policies: Mapping[str, str] | None = None,
           default_pull_policy: str = "missing") -> ImagePolicy:
        allowed = tuple(allowed)
        for pattern in (*allowed, *(pull_policies or {})):
            check_pattern(pattern)
        for pattern, policy in (pull_policies or {}).items():
            if policy not in PULL_POLICIES:
                raise ValueError(f"image_pull_policies[{pattern!r}] = {policy!r}: "
                                 f"use one of {', '.join(PULL_POLICIES)}")
        return cls(default, allowed, tuple((pull_policies or {}).items()), default_pull_policy)

    @property
    def per_session(self) -> bool:
        """Whether sessions may name an image other than the default."""
        return bool(self.allowed)

    def is_default(self, reference: str) -> bool:
        return normalize(reference) == normalize(self.default)

    def choose(self, metadata: Mapping[str, str]) -> str | None:
        """The image a session's metadata names (None: the default); ImageRefused for one not allowed."""
        raw = metadata.get(METADATA_KEY)
        if raw is None or not raw.strip():
            return None
        reference = normalize(raw.strip())
        if reference == normalize(self.default):
            return None
        if not self.allowed:
            raise ImageRefused("image_not_allowed", f"image {_shown(raw)} is not allowed: this daemon runs only "
                               f"{self.default!r} (allowed_images is empty)")
        if not any(_matches(pattern, reference) for pattern in self.allowed):
            raise ImageRefused("image_not_allowed", f"image {_shown(raw)} is not in allowed_images")
        return reference

    def pull_policy(self, reference: str) -> str:
        normalized = normalize(reference)
        for pattern, policy in self.pull_policies:
            if _matches(pattern, normalized):
                return policy
        return self.default_pull_policy


def check_pattern(pattern: str) -> None:
    """ValueError for an allow-list entry that is neither a reference nor a pattern of one."""
    if not pattern or len(pattern) > MAX_REFERENCE or not _PATTERN_CHARS.match(pattern):
        raise ValueError(f"image pattern {_shown(pattern)}: letters, digits and . _ : / @ - * only")
    if "*" not in pattern:
        try:
            normalize(pattern)  # an exact entry must be a valid reference
        except ImageRefused as exc:
            raise ValueError(str(exc)) from None
