"""The fakes keep up with the real backend and queue: same public methods, same sync/async shape."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest

from sandboxd.containers import DockerBackend
from sandboxd.queue import WorkQueue
from tests.unit.fakes import FakeBackend, FakeQueue


def _public(cls: type) -> dict[str, Callable[..., object]]:
    return {name: member for name, member in vars(cls).items()
            if not name.startswith("_") and callable(member) and not isinstance(member, classmethod)}


@pytest.mark.parametrize(("real", "fake", "not_needed"), [
    (DockerBackend, FakeBackend, set()),
    (WorkQueue, FakeQueue, {"aclose"}),  # closed by the composition root, never by the daemon
])
def test_a_fake_has_every_public_method_of_the_real_thing(real: type, fake: type, not_needed: set[str]) -> None:
    for name, member in _public(real).items():
        if name in not_needed:
            continue
        assert hasattr(fake, name), f"{fake.__name__} lacks {name}"
        mine = getattr(fake, name)
        real_kind = inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
        fake_kind = inspect.iscoroutinefunction(mine) or inspect.isasyncgenfunction(mine)
        # `claims` returns the SDK's async iterator; the fake is an async generator: both iterate with `async for`.
        if name != "claims":
            assert real_kind == fake_kind, f"{fake.__name__}.{name}: async on one side only"
        real_params = [p for p in inspect.signature(member).parameters if p != "self"]
        fake_params = [p for p in inspect.signature(mine).parameters if p != "self"]
        assert fake_params == real_params, f"{fake.__name__}.{name}{fake_params} != {real_params}"


def test_the_fake_backend_has_a_spec_with_an_instance() -> None:
    assert FakeBackend().spec.instance
