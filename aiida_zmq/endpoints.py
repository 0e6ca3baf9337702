"""The ZeroMQ endpoints of this project: ``ipc://PATH`` (a unix socket file) and ``tcp://HOST:PORT``.

One place that knows how an ``ipc://`` endpoint names its socket file, for the broker (which binds and guards it),
its clients (which check it before they connect) and the tools that look for an arbiter. No imports of this project.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ('IPC', 'ipc_path', 'socket_file')

IPC = 'ipc://'


def ipc_path(endpoint: str) -> str | None:
    """The socket path of an ``ipc://`` endpoint (``@name`` for an abstract socket), ``None`` for any other."""
    return endpoint[len(IPC) :] if endpoint.startswith(IPC) else None


def socket_file(endpoint: str) -> Path:
    """The socket file of an endpoint known to be ``ipc://`` (one this broker bound); :class:`ValueError` else."""
    path = ipc_path(endpoint)
    if path is None:
        raise ValueError(f'{endpoint!r} is not an ipc:// endpoint')
    return Path(path)
