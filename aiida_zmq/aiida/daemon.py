"""Whether a profile's AiiDA daemon runs: its circus pid file names a live ``circusd`` of this user.

aiida-core's ``DaemonClient.is_daemon_running`` says only that the pid file exists; a daemon killed with -9 (or a
machine that lost power) leaves the file behind, and its pid goes to the next process. This is the check aiida-core
makes before it calls a daemon stale (``DaemonClient._check_pid_file``), written here from its public parts
(``get_daemon_pid`` and psutil) rather than through its private ``_is_pid_file_stale``.
"""

from __future__ import annotations

import logging
import typing as t

if t.TYPE_CHECKING:
    from aiida.engine.daemon.client import DaemonClient
    from aiida.manage.configuration.profile import Profile

__all__ = ('daemon_running', 'running_daemon_client')

LOGGER = logging.getLogger(__name__)

# The command lines of a daemon's arbiter, as aiida-core checks them (``start-circus`` from ``verdi daemon start``).
ARBITER_COMMANDS = ('start-circus', 'circusd')


def running_daemon_client(profile: Profile, client: DaemonClient | None = None) -> DaemonClient | None:
    """The profile's daemon client (``client``, else a new one) if its daemon runs, else ``None``.

    Ask this before ``DaemonClient.get_controller_endpoint``: that makes a new socket directory (and overwrites the
    sockets file) when it thinks the daemon is not running.
    """
    try:
        if client is None:
            from aiida.engine.daemon.client import DaemonClient

            client = DaemonClient(profile)
        pid = client.get_daemon_pid()
    except Exception as exception:  # no daemon directory yet, an unreadable pid file: no daemon to speak of
        LOGGER.debug('cannot tell whether the daemon of %s runs: %s', profile.name, exception)
        return None
    return client if pid is not None and _is_arbiter(pid) else None


def daemon_running(profile: Profile) -> bool:
    """Whether the profile's daemon runs."""
    return running_daemon_client(profile) is not None


def _is_arbiter(pid: int) -> bool:
    """Whether ``pid`` is a daemon's arbiter of this user (not a process that inherited the pid of a dead one)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return (
            any(command in process.cmdline() for command in ARBITER_COMMANDS)
            and process.username() == psutil.Process().username()
        )
    except psutil.Error:  # gone, or another user's: not this user's daemon
        return False
