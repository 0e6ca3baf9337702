"""Circus hooks of the broker watcher in an AiiDA daemon's arbiter (run inside ``circusd``: cheap, never raising).

On ``verdi daemon stop`` (circus ``quit``) and ``restart``, circus stops every watcher at the same time: the workers
and the broker get SIGTERM together. A worker that shuts down needs the broker for a moment longer: to say goodbye
(its held tasks go back to the queue at once), and to get the confirmation of tasks it was sending (a child process
submitted just then). Without the broker those tasks would wait for the broker's next start with no holder to
release them, and a child whose task was never stored would be stuck. So the broker watcher waits, in its
``before_stop`` hook, until the processes of the other watchers that are being stopped have exited, bounded.

The hook blocks the arbiter's event loop while it waits, which is harmless here: the worker processes stop on their own
after SIGTERM (circus has already signalled them) and nothing else is asked of the arbiter during a stop.
"""

from __future__ import annotations

import logging
import time
import typing as t

__all__ = ('DRAIN_TIMEOUT', 'wait_for_stopping_workers')

LOGGER = logging.getLogger('circus')

# Upper bound of the wait: past it, the broker stops anyway (its store keeps every task; nothing is lost, tasks of a
# worker still alive are handed out again at the broker's next start).
DRAIN_TIMEOUT = 15.0
POLL_INTERVAL = 0.05


def _stopping_pids(arbiter: t.Any, broker_watcher: str) -> list[int]:
    """Pids that circus is stopping in watchers other than the broker's own and its plugins'.

    Those are named from the broker's name (:func:`aiida_zmq.circus.sibling_watchers`), never by a pattern: AiiDA's
    workers may have any name, and they are exactly what the broker must wait for.
    """
    from aiida_zmq.circus import sibling_watchers

    own = sibling_watchers(broker_watcher)
    pids = []
    for watcher in arbiter.iter_watchers():
        if watcher.name.lower() in own:
            continue
        for process in list(watcher.processes.values()):
            if getattr(process, 'stopping', False):
                pids.append(process.pid)
    return pids


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for_stopping_workers(watcher: t.Any, arbiter: t.Any, hook_name: str, **kwargs: t.Any) -> bool:
    """``before_stop`` hook: wait until the processes of other watchers that circus is stopping have exited.

    Only processes circus is stopping right now count (``process.stopping``), so stopping the broker watcher alone
    (``circusctl stop zmq-broker-PROFILE``) does not wait for workers that keep running.
    """
    try:
        started = time.monotonic()
        deadline = started + DRAIN_TIMEOUT
        pids = waited = _stopping_pids(arbiter, watcher.name)
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            if pids:
                time.sleep(POLL_INTERVAL)
        if pids:
            LOGGER.warning(
                '%s: workers %s still running after %.0fs; stopping the broker', watcher.name, pids, DRAIN_TIMEOUT
            )
        else:
            LOGGER.info(
                '%s: workers %s stopped after %.2fs; stopping the broker',
                watcher.name,
                waited,
                time.monotonic() - started,
            )
    except Exception:  # a hook must never break the arbiter's stop
        LOGGER.exception('%s: before_stop hook failed', getattr(watcher, 'name', '?'))
    return True
