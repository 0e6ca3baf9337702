"""The broker's handlers, one module per family of commands, and the one table that dispatches to them.

A handler is ``handler(broker, peer, args)``: ``broker`` the :class:`~aiida_zmq.broker.context.Context`, ``peer`` the
:class:`~aiida_zmq.broker.peers.Client` of the session it came from (or, for the commands of
``protocol.SESSIONLESS`` and for HELLO, a :class:`~aiida_zmq.broker.peers.Sender` when there is none), ``args`` the
argument frames in the order of ``protocol.SPECS``. A handler raises ``ProtocolError`` (or ``UnicodeDecodeError``)
for a malformed argument: the broker counts and drops the message. A new command is one entry in
``protocol.SPECS``, one function in its family's module, one line here.
"""

from __future__ import annotations

from collections.abc import Callable

from ...protocol import Command
from . import admin, broadcast, rpc, session, tasks

__all__ = ('HANDLERS', 'Handler')

Handler = Callable[..., None]

#: One handler per command a client sends (``protocol.FROM_CLIENT``).
HANDLERS: dict[Command, Handler] = {
    # Session
    Command.HELLO: session.hello,
    Command.HEARTBEAT: session.heartbeat,
    Command.BYE: session.bye,
    # Tasks
    Command.TASK_SEND: tasks.send,
    Command.TASK_SUBMIT: tasks.submit,
    Command.CONSUME: tasks.consume,
    Command.CANCEL: tasks.cancel,
    Command.TASK_GET: tasks.get,
    Command.TASK_REPLY: tasks.reply,
    Command.TASK_ACK: tasks.ack,
    Command.TASK_NACK: tasks.nack,
    # RPC
    Command.RPC_REGISTER: rpc.register,
    Command.RPC_UNREGISTER: rpc.unregister,
    Command.RPC_CALL: rpc.call,
    Command.RPC_SUBMIT: rpc.submit,
    Command.RPC_REPLY: rpc.reply,
    # Broadcast
    Command.SUBSCRIBE: broadcast.subscribe,
    Command.UNSUBSCRIBE: broadcast.unsubscribe,
    Command.PUBLISH: broadcast.publish,
    # Administration
    Command.ADMIN: admin.admin,
}
