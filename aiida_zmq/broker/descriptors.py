"""The broker's file descriptors (issue 21.3): every connection a peer opens costs the broker one.

libzmq aborts the whole process when ``accept()`` on an ipc endpoint fails with "Too many open files"
(``src/ipc_listener.cpp``), and on a TCP endpoint it spins on the listener. The common soft limit (1,024) let about
1,000 idle connections of one local user kill the broker with everyone's tasks in flight. At start the broker raises
its soft limit to the hard one (the kernel allows it without privileges; the hard limit is usually far higher, so an
attacker needs as many descriptors of its own). Connections that never finish ZeroMQ's handshake (an idle TCP
connection, a CURVE peer that never authenticates) are closed after ``peer_timeout`` (``ZMQ_HANDSHAKE_IVL``, set in
``datadir.py``).
"""

from __future__ import annotations

import logging
import resource

__all__ = ('raise_soft_limit',)

LOGGER = logging.getLogger(__name__)


def raise_soft_limit() -> tuple[int, int]:
    """Raise this process's soft descriptor limit to its hard limit; return (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exception:  # a hard limit above the kernel's nr_open (macOS: OPEN_MAX)
        LOGGER.warning('could not raise the descriptor limit from %d to %d: %s', soft, hard, exception)
        return soft, hard
    LOGGER.info('descriptor limit raised from %d to %d (its hard limit): each connection holds one', soft, hard)
    return hard, hard
