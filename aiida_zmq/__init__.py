"""aiida-zmq: a message broker for AiiDA that needs no RabbitMQ.

``aiida_zmq.connect(endpoint)`` returns a started :class:`kiwipy.Communicator`; ``aiida-zmq serve`` runs the broker.
"""

from __future__ import annotations

import functools
import typing as t
from typing import Any

if t.TYPE_CHECKING:
    from .communicator import ZmqCommunicator

    __version__: str

__all__ = ('__version__', 'connect')


def connect(endpoint: str | None = None, **options: Any) -> ZmqCommunicator:
    """Return a started communicator for the broker at ``endpoint``; see :func:`aiida_zmq.communicator.connect`."""
    from .communicator import connect as _connect

    return _connect(endpoint, **options)


@functools.cache
def _version() -> str:
    # Written once, in pyproject.toml; an installed package (wheel, sdist or editable) carries it in its metadata.
    # Read on first use: importlib.metadata costs a command's start-up more than the rest of this package's import.
    from importlib import metadata

    try:
        return metadata.version('aiida-zmq')
    except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return '0+unknown'


def __getattr__(name: str) -> Any:
    if name == '__version__':
        return _version()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
