"""Dispatchers: inline runs now; ThreadDispatcher runs in order on its own thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from plateflow.runtime import DispatcherClosed, ThreadDispatcher, inline_dispatcher


def test_inline_dispatcher_runs_now_on_the_calling_thread() -> None:
    seen: list[int] = []
    inline_dispatcher(lambda: seen.append(threading.get_ident()))
    assert seen == [threading.get_ident()]


def test_thread_dispatcher_runs_in_order_on_its_own_thread() -> None:
    seen: list[tuple[int, int]] = []

    def note(i: int) -> Callable[[], None]:
        return lambda: seen.append((i, threading.get_ident()))

    with ThreadDispatcher() as dispatcher:
        for i in range(100):
            dispatcher(note(i))
    assert [i for i, _ in seen] == list(range(100))
    assert {ident for _, ident in seen} == {dispatcher.thread_id}
    assert dispatcher.thread_id != threading.get_ident()
    stats = dispatcher.statistics()
    assert (stats.submitted, stats.completed, stats.pending, stats.closed) == (100, 100, 0, True)


def test_errors_go_to_on_error_and_the_worker_carries_on() -> None:
    errors: list[tuple[BaseException, int]] = []
    ran: list[int] = []
    boom = ValueError("boom")

    def fail() -> None:
        raise boom

    dispatcher = ThreadDispatcher(on_error=lambda exc: errors.append((exc, threading.get_ident())))
    dispatcher(fail)
    dispatcher(lambda: ran.append(1))
    assert dispatcher.close(timeout=5)
    assert errors == [(boom, dispatcher.thread_id)]
    assert ran == [1]
    assert dispatcher.statistics().errors == 1


def test_close_is_idempotent_and_refuses_new_work() -> None:
    dispatcher = ThreadDispatcher()
    assert dispatcher.close(timeout=5)
    assert dispatcher.close(timeout=5)
    with pytest.raises(DispatcherClosed):
        dispatcher(lambda: None)
    assert "closed" in repr(dispatcher)


def test_close_from_a_callable_on_the_worker_does_not_deadlock() -> None:
    dispatcher = ThreadDispatcher()
    results: list[bool] = []
    done = threading.Event()

    def close_self() -> None:
        results.append(dispatcher.close(timeout=5))
        done.set()

    dispatcher(close_self)
    assert done.wait(5)
    assert dispatcher.close(timeout=5)
    assert results == [False]
