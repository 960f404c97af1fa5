"""Misuse gets a clear error that says what to do (docs/api.md: every
member's contract names its errors; "Threads" for NotRegisteredError)."""

from __future__ import annotations

import pytest

import qsbr


@pytest.mark.parametrize("method", ["quiescent", "detach", "attach", "unregister"])
def test_per_thread_calls_need_registration(domain: qsbr.Domain, method: str) -> None:
    with pytest.raises(qsbr.NotRegisteredError, match="register"):
        getattr(domain, method)()


def test_retire_and_defer_need_registration(domain: qsbr.Domain) -> None:
    with pytest.raises(qsbr.NotRegisteredError, match="register"):
        domain.retire(object(), print)
    with pytest.raises(qsbr.NotRegisteredError, match="register"):
        domain.defer(print)
    assert domain.pending == 0


def test_detached_context_needs_registration(domain: qsbr.Domain) -> None:
    with pytest.raises(qsbr.NotRegisteredError):
        with domain.detached():
            pass


def test_not_registered_error_is_a_runtime_error() -> None:
    assert issubclass(qsbr.NotRegisteredError, RuntimeError)


def test_register_twice(domain: qsbr.Domain) -> None:
    domain.register()
    with pytest.raises(RuntimeError, match="already registered"):
        domain.register()
    domain.unregister()
    domain.register()  # fine again after unregister
    domain.unregister()


def test_non_callable_release_is_refused_at_retire(domain: qsbr.Domain) -> None:
    domain.register()
    with pytest.raises(TypeError, match="callable"):
        domain.retire(object(), "close")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        domain.defer(42)  # type: ignore[arg-type]
    assert domain.pending == 0
    domain.unregister()


@pytest.mark.parametrize("limit", [0, -1])
def test_deferred_limit_below_one(limit: int) -> None:
    with pytest.raises(ValueError, match="deferred_limit"):
        qsbr.Domain(deferred_limit=limit)


@pytest.mark.parametrize("limit", [1.5, "10", True])
def test_deferred_limit_must_be_an_int(limit: object) -> None:
    with pytest.raises(TypeError, match="deferred_limit"):
        qsbr.Domain(deferred_limit=limit)  # type: ignore[arg-type]


def test_bad_constructor_options() -> None:
    with pytest.raises(ValueError):
        qsbr.Domain(reclaim_interval=0)
    with pytest.raises(TypeError):
        qsbr.Domain(on_release_error=3)  # type: ignore[arg-type]


def test_keyword_only_options() -> None:
    with pytest.raises(TypeError):
        qsbr.Domain(5)  # type: ignore[misc]
