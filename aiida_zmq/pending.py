"""A client's requests waiting for the broker's answer: one table, correlation to future, and one way to fail them.

Each entry is keyed by the request's correlation and by the command that answers it (``DONE``, ``TASK_RESULT``,
``RPC_RESULT``, ``RPC_REGISTERED``, ``TASK_GOT``, ``ADMIN_REPLY``): one request may wait for two answers (an RPC
through the session waits for its routing, ``DONE``, and for its result). An ``ERROR`` or ``RPC_UNROUTABLE`` for a
correlation fails whatever waits under it (:meth:`Pending.fail`); the end of the session fails everything
(:meth:`Pending.fail_all`).

Threads: the I/O thread resolves entries; caller threads add some (a task's or an RPC's result future is added
before the request goes out on the caller's own socket, since the answer may reach the I/O thread before the caller
hears the confirm) and drop them when they give up. So a lock guards the table; futures are completed outside it, as
their callbacks may call back in.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable

from .protocol import Command

__all__ = ('Pending',)

Future = concurrent.futures.Future


class Pending:
    """The requests waiting for an answer; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[bytes, dict[Command, Future]] = {}  # guarded by _lock

    def __len__(self) -> int:
        with self._lock:
            return sum(len(answers) for answers in self._waiting.values())

    def add(self, correlation: bytes, answer: Command, future: Future) -> None:
        """``future`` waits for the ``answer`` to the request ``correlation`` (replacing any that did)."""
        with self._lock:
            answers = self._waiting.get(correlation)
            if answers is None:
                self._waiting[correlation] = {answer: future}
            else:
                answers[answer] = future

    def pop(self, correlation: bytes, answer: Command) -> Future | None:
        """The future waiting for ``answer`` to ``correlation``, no longer waiting; ``None`` if none was."""
        with self._lock:
            answers = self._waiting.get(correlation)
            if answers is None:
                return None
            future = answers.pop(answer, None)
            if not answers:
                del self._waiting[correlation]
            return future

    def forget(self, correlation: bytes) -> None:
        """Nobody waits for the request ``correlation`` any more (its caller gave up): drop it, unfailed."""
        with self._lock:
            self._waiting.pop(correlation, None)

    def fail(self, correlation: bytes, exception: BaseException) -> None:
        """Fail everything waiting for an answer to ``correlation`` (the broker refused it, or could not route it)."""
        with self._lock:
            answers = self._waiting.pop(correlation, None)
        for future in answers.values() if answers else ():
            _fail(future, exception)

    def fail_all(
        self, exception: BaseException | Callable[[bytes], BaseException], answer: Command | None = None
    ) -> None:
        """Fail every waiting future (only those waiting for ``answer``, if given); ``exception`` may be made per
        correlation."""
        failed: list[tuple[bytes, Future]] = []
        with self._lock:
            for correlation, answers in list(self._waiting.items()):
                if answer is None:
                    failed.extend((correlation, future) for future in answers.values())
                    del self._waiting[correlation]
                elif answer in answers:
                    failed.append((correlation, answers.pop(answer)))
                    if not answers:
                        del self._waiting[correlation]
        for correlation, future in failed:
            _fail(future, exception(correlation) if callable(exception) else exception)


def _fail(future: Future, exception: BaseException) -> None:
    if not future.done():
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile by its caller
            future.set_exception(exception)
