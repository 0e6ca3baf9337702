"""kiwipy's responses, both ways, for tasks and RPCs alike.

:func:`follow_future` answers with a subscriber's return value (following the futures it may resolve to), and
:func:`settle` applies a response that came back to the future of the task or RPC that waits for it. The dictionaries
are kiwipy's own (``kiwipy.rmq.utils``), so a peer on RabbitMQ would read them the same.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import kiwipy
from kiwipy.rmq.utils import (
    CANCELLED_KEY,
    EXCEPTION_KEY,
    PENDING_KEY,
    RESULT_KEY,
    cancelled_response,
    exception_response,
    pending_response,
    result_response,
)

__all__ = ('follow_future', 'settle')


def follow_future(result: Any, answer: Callable[[bool, dict], None]) -> None:
    """Answer with ``result``; if it is a future, answer 'pending' and follow it (and any future it resolves to).

    ``answer(final, response)`` is called with kiwipy's response dictionaries, the last one with ``final`` true.
    """
    if not isinstance(result, concurrent.futures.Future):
        answer(True, result_response(result))
        return
    answer(False, pending_response())

    def done(future: concurrent.futures.Future) -> None:
        if future.cancelled():
            answer(True, cancelled_response())
            return
        try:
            value = future.result()
        except Exception as exception:
            answer(True, exception_response(exception))
            return
        follow_future(value, answer)

    result.add_done_callback(done)


def settle(
    future: concurrent.futures.Future, payload: bytes, final: bool, decoder: Callable[[bytes], Any]
) -> kiwipy.Future | None:
    """Apply the response in ``payload`` to ``future``; return the future that waits for the next response when the
    remote side answered with a future ('pending': ``future`` resolves to it), else ``None``."""
    try:
        response = decoder(payload)
    except Exception as exception:
        future.set_exception(kiwipy.RemoteException(f'undecodable response: {exception}'))
        return None
    if not isinstance(response, dict):  # a peer with another codec, or a bug: fail this future, not the I/O thread
        future.set_exception(kiwipy.RemoteException(f'unknown response {response!r}'))
        return None
    if not final and PENDING_KEY in response:
        inner: kiwipy.Future = kiwipy.Future()
        future.set_result(inner)
        return inner
    if CANCELLED_KEY in response:
        future.cancel()
    elif EXCEPTION_KEY in response:
        future.set_exception(kiwipy.RemoteException(response[EXCEPTION_KEY]))
    elif RESULT_KEY in response:
        future.set_result(response[RESULT_KEY])
    else:
        future.set_exception(kiwipy.RemoteException(f'unknown response {response!r}'))
    return None
