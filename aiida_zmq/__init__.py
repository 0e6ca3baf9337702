"""aiida-zmq: a message broker for AiiDA that needs no RabbitMQ.

``aiida_zmq.connect(endpoint)`` returns a started :class:`kiwipy.Communicator`; ``aiida-zmq serve`` runs the broker.
"""

from __future__ import annotations

import typing as t
from typing import Any

if t.TYPE_CHECKING:
    from .communicator import ZmqCommunicator

__version__ = '0.1.0'

__all__ = ('__version__', 'connect')


def connect(endpoint: str | None = None, **options: Any) -> ZmqCommunicator:
    """Return a started communicator for the broker at ``endpoint``; see :func:`aiida_zmq.communicator.connect`."""
    from .communicator import connect as _connect

    return _connect(endpoint, **options)
