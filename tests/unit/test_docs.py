"""The documented exit codes and CI jobs stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sandboxd.daemon import ExitStatus

REPO = Path(__file__).resolve().parents[2]
CODES = {name: value for name, value in vars(ExitStatus).items() if name.isupper()}


def _table_codes(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (.+?) \|", text, re.MULTILINE)}


def test_ci_recipe_lists_every_exit_status_by_name() -> None:
    table = _table_codes((REPO / "docs" / "ci-drain.md").read_text())
    assert {code: cell.strip("` ") for code, cell in table.items()} == {v: k for k, v in CODES.items()}


def test_readme_lists_every_exit_status() -> None:
    assert set(_table_codes((REPO / "README.md").read_text())) == set(CODES.values())


def test_ci_jobs_in_the_recipe_are_valid_yaml() -> None:
    blocks = re.findall(r"```ya?ml\n(.*?)```", (REPO / "docs" / "ci-drain.md").read_text(), re.DOTALL)
    assert len(blocks) >= 2, "a GitHub Actions job and a GitLab CI job"
    jobs = [yaml.safe_load(block) for block in blocks]
    assert any("jobs" in job for job in jobs), "a GitHub Actions workflow"
    assert any(any(isinstance(v, dict) and "script" in v for v in job.values()) for job in jobs), "a GitLab job"
    assert all("sandboxd" in block and "drain" in block for block in blocks)
