"""Custom skills served by the local control plane.

Owns the skill-version object (`skill_version`, with a stable `skillver_...`
id), version resolution (`latest`, the version string, or the version id),
and the zip archive of a skill's files under a single `<name>/` wrapper dir.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable
from typing import Any

from .errors import ApiError
from .scenario import SkillSpec


def version_id(skill: SkillSpec) -> str:
    """The stable `skillver_...` id of one skill version."""
    digest = hashlib.sha256(f"{skill.skill_id}\0{skill.version}".encode()).hexdigest()
    return f"skillver_{digest[:20]}"


def find_skill(skills: Iterable[SkillSpec], skill_id: str, version: str) -> SkillSpec:
    """The skill `skill_id` at `version` (`latest`, a version string or a version id); else 404."""
    candidates = [s for s in skills if s.skill_id == skill_id]
    if not candidates:
        raise ApiError(404, f"skill {skill_id} not found")
    if version == "latest":
        return candidates[-1]
    for skill in candidates:
        if version in (skill.version, version_id(skill)):
            return skill
    raise ApiError(404, f"version {version} of skill {skill_id} not found")


def version_json(skill: SkillSpec, created_at: str) -> dict[str, Any]:
    """The `BetaSkillVersion` object."""
    return {
        "type": "skill_version",
        "id": version_id(skill),
        "skill_id": skill.skill_id,
        "version": skill.version,
        "name": skill.name,
        "description": skill.description,
        "directory": skill.name,
        "created_at": created_at,
    }


def skill_zip(skill: SkillSpec) -> bytes:
    """A zip of the skill's files, wrapped in one `<name>/` directory like a real upload."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path, text in sorted(skill.files.items()):
            archive.writestr(f"{skill.name}/{path.lstrip('/')}", text)
    return buffer.getvalue()
