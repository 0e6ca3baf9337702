"""Move queued tasks between an aiida-zmq broker and a RabbitMQ server: the way out for users who outgrow one machine.

The two brokers wrap a task differently (kiwipy's RabbitMQ publisher encodes ``(task, no_reply)``, aiida-zmq encodes
the task alone), so each task is decoded from the source and encoded for the destination with the codec its users
use: AiiDA's YAML codec for a profile, each side's default otherwise. One task at a time, the order of each queue kept:

1. take the next task from the source queue (it is now held by this process, not gone);
2. publish it to the destination and wait for the destination's confirm (RabbitMQ's publisher confirm, or aiida-zmq's
   commit confirm);
3. acknowledge it at the source, which deletes it there.

Interrupted at any point (Ctrl-C, a crash, a broker going away), a task is in the source, in the destination, or, only
for the one task between steps 2 and 3, in both: never in neither. A held task that was not acknowledged goes back
to the source queue when this process's session ends. Results of moved tasks do not reach their original senders
(AiiDA sends its tasks with ``no_reply``).

The source and destination are kiwipy communicators with ``task_queue(name)``: a running aiida-zmq broker's
``ZmqCommunicator``, RabbitMQ's, or, for a broker that is not running, an offline ``ProfileCommunicator`` of
:mod:`aiida_zmq.aiida.communicator`, which works on the broker's store under the broker's lock (as ``submit_offline``
does): there, the destination's confirm is the store's commit, and acknowledging deletes the row and commits; a task
not acknowledged simply stays in the store. A broker that starts during a move out of the store waits for the lock;
one that starts during a move into it takes the store over, and the remaining tasks are sent through it.

From and to core.zeromq (aiida-core 2.9's own ZeroMQ broker) there is no broker to confirm anything: see
:mod:`aiida_zmq.core_zeromq_move`.

No AiiDA import here: the CLI (:mod:`aiida_zmq.cli.admin`, :mod:`aiida_zmq.cli.aiida`) maps a profile to queue and
exchange names, to its RabbitMQ URL, to core.zeromq's directory and to AiiDA's codec, and passes them in.
"""

from __future__ import annotations

import logging
import typing as t
from collections.abc import Callable

import kiwipy

__all__ = ('move_queue', 'rabbitmq_communicator')

LOGGER = logging.getLogger(__name__)


def rabbitmq_communicator(
    url: str, *, message_exchange: str, task_exchange: str, **codec: t.Any
) -> kiwipy.Communicator:
    """A RabbitMQ communicator on the given exchanges (for a profile, the names AiiDA gives them).

    ``codec``: ``encoder`` and ``decoder`` as AiiDA passes them, or nothing for kiwipy's defaults.
    """
    from kiwipy.rmq import RmqThreadCommunicator

    return RmqThreadCommunicator.connect(
        connection_params={'url': url}, message_exchange=message_exchange, task_exchange=task_exchange, **codec
    )


def move_queue(
    source: kiwipy.Communicator,
    destination: kiwipy.Communicator,
    queue: str,
    *,
    on_moved: Callable[[int], None] | None = None,
) -> int:
    """Move the tasks of ``queue`` from ``source`` to the queue of the same name at ``destination``; return how many."""
    target = destination.task_queue(queue)
    moved = 0
    for task in source.task_queue(queue):
        failure: Exception | None = None
        with task.processing() as outcome:
            try:
                # Published and confirmed before the source forgets it: an interruption after this line leaves a copy
                # on each side.
                target.task_send(task.body, no_reply=True)
            except Exception as exception:
                # Not raised through ``processing()``: kiwipy (and aiida-zmq) take an exception there as the task's
                # outcome and acknowledge the task, which would delete a task the destination never confirmed. With
                # the outcome left unset the source puts it back.
                failure = exception
            else:
                outcome.set_result(None)
        if failure is not None:
            raise failure
        moved += 1
        if on_moved is not None:
            on_moved(moved)
    LOGGER.info('moved %d task(s) of queue %s', moved, queue)
    return moved
