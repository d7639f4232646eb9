"""A failed sandbox creation reports one bounded LaunchError, also when two of its steps failed at once."""

from __future__ import annotations

import requests

from sandboxd.containers import _first_cause
from sandboxd.errors import LaunchError


def test_a_single_error_is_itself() -> None:
    error = LaunchError("image_missing", "no such image")
    assert _first_cause(error) is error


def test_the_launch_error_wins_over_an_engine_error_raised_beside_it() -> None:
    missing = LaunchError("image_missing", "no such image")
    down = requests.ConnectionError("engine gone")
    assert _first_cause(ExceptionGroup("both", [down, ExceptionGroup("inner", [missing])])) is missing


def test_an_engine_error_is_found_inside_the_group() -> None:
    down = requests.ConnectionError("engine gone")
    assert _first_cause(ExceptionGroup("one", [down])) is down


def test_anything_else_stays_the_group() -> None:
    group = ExceptionGroup("bug", [ValueError("not an engine error")])
    assert _first_cause(group) is group
