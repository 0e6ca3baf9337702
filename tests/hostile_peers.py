"""Raw ZeroMQ peers that speak the protocol by hand, as a hostile or buggy client would (issue 21's red team).

A :class:`Peer` builds every message from the protocol's own argument names (:data:`aiida_zmq.protocol.ARGUMENTS`),
so that the tests speak whatever version of the protocol the code under test speaks: an argument the test does not
name is sent empty (a new one, such as HELLO's ``secret``, is then absent for an attacker that does not know it).
The tests using it run against real ``aiida-zmq serve`` processes (:class:`aiida_zmq.testing.BrokerProcess`).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import psutil
import zmq

from aiida_zmq import protocol
from aiida_zmq.protocol import ARGUMENTS, Command


def message(command: Command, **arguments: bytes) -> list[bytes]:
    """The frames of ``command`` with these arguments by name; those not given are empty, those this version of the
    protocol does not have (HELLO's ``secret`` before AZMQ/3) are left out."""
    names = ARGUMENTS[command]
    return protocol.encode(command, *(arguments.get(name, b'') for name in names))


def argument(reply: protocol.Message, name: str) -> bytes:
    """An argument of a decoded message by name (empty when this protocol version has no such argument)."""
    names = ARGUMENTS[reply.command]
    return bytes(reply.args[names.index(name)]) if name in names else b''


class Peer:
    """A bare DEALER socket, optionally with a chosen routing id, that sends what it is told to."""

    def __init__(self, endpoint: str, *, routing_id: bytes | None = None, rcvhwm: int | None = None) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, 5000)
        if routing_id is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        if rcvhwm is not None:
            self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
            self.socket.setsockopt(zmq.RCVBUF, 4096)
        self.socket.connect(endpoint)
        self.correlations = (b'h%d' % n for n in range(1, 1 << 62))
        self.secret: bytes | None = None  # once welcomed: the secret of its session (b'' before AZMQ/3)
        self.last_sent = 0.0

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, command: Command, **arguments: bytes) -> None:
        self.socket.send_multipart(message(command, **arguments))
        self.last_sent = time.monotonic()

    def recv(self, timeout: float = 5.0) -> protocol.Message | None:
        """The next message within ``timeout``; a peer that said HELLO heartbeats meanwhile, as a client does (the
        test brokers declare a client dead after 2 s of silence)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.secret is not None and time.monotonic() - self.last_sent > 0.2:
                self.send(Command.HEARTBEAT)
            left = deadline - time.monotonic()
            if self.socket.poll(int(max(0.0, min(left, 0.2)) * 1000)):
                return protocol.decode(self.socket.recv_multipart())
            if left <= 0:
                return None

    def drain(self, quiet: float = 0.5, bound: float = 10.0) -> list[protocol.Message]:
        """What the broker sends (heartbeats aside) until it was quiet for ``quiet`` seconds (at most ``bound``)."""
        messages: list[protocol.Message] = []
        end = time.monotonic() + bound
        last = time.monotonic()
        while time.monotonic() - last < quiet and time.monotonic() < end:
            reply = self.recv(0.1)
            if reply is not None and reply.command is not Command.HEARTBEAT:
                messages.append(reply)
                last = time.monotonic()
        return messages

    def expect(self, *commands: Command, timeout: float = 5.0, correlation: bytes | None = None) -> protocol.Message:
        """The next message of one of these kinds (any: none given) and correlation, skipping the others."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            reply = self.recv(left) if left > 0 else None
            if reply is None:
                kinds = '/'.join(command.name for command in commands) or 'answer'
                raise TimeoutError(f'no {kinds} {correlation!r} within {timeout}s')
            if commands and reply.command not in commands:
                continue
            if correlation is None or (reply.args and bytes(reply.args[0]) == correlation):
                return reply

    def hello(self, name: bytes = b'raw', reclaim: bytes = b'', secret: bytes | None = None) -> protocol.Message:
        """Say HELLO (with ``secret``, or the one this peer was welcomed with) and return the answer."""
        self.send(
            Command.HELLO,
            name=name,
            heartbeat_ms=b'5000',
            reclaim=reclaim,
            pid=b'0',
            secret=(self.secret or b'') if secret is None else secret,
        )
        reply = self.expect(Command.WELCOME, Command.ERROR)
        if reply.command is Command.WELCOME:
            self.secret = argument(reply, 'secret')
        return reply

    def admin(self, op: str, **arguments: object) -> dict:
        correlation = next(self.correlations)
        self.send(Command.ADMIN, correlation=correlation, request=json.dumps({'op': op, **arguments}).encode())
        reply = self.expect(Command.ADMIN_REPLY, Command.ERROR, correlation=correlation)
        assert reply.command is Command.ADMIN_REPLY and bytes(reply.args[1]) == b'ok', reply
        return json.loads(reply.args[2])

    def close(self) -> None:
        self.socket.close(0)


@contextlib.contextmanager
def admin_peer(endpoint: str):
    with Peer(endpoint) as peer:
        assert peer.hello(b'admin').command is Command.WELCOME
        yield peer


def status(endpoint: str) -> dict:
    with admin_peer(endpoint) as peer:
        return peer.admin('status')


def routing_ids_in_log(log: str) -> list[bytes]:
    """What an attacker reads in the broker's log: the routing ids of the clients that connected."""
    return [match.encode() for match in re.findall(r'connected \((c[0-9a-f]{32})\)', log)]


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
