"""The command specs of protocol.py are the one home of a command's traits: the tables derived from them agree with
the wire format, and the broker has a handler for exactly the commands a client sends."""

from __future__ import annotations

from aiida_zmq import protocol, session
from aiida_zmq.broker.handlers import HANDLERS
from aiida_zmq.protocol import SPECS, Command, Direction


def test_every_command_has_one_spec():
    assert set(SPECS) == set(Command)
    assert protocol.ARGUMENTS == {command: spec.arguments for command, spec in SPECS.items()}


def test_requests_and_answers_carry_the_correlation_first():
    for command in protocol.REQUESTS:
        assert SPECS[command].direction is Direction.TO_BROKER, command
        assert SPECS[command].arguments[0] == 'correlation', command
    for command in protocol.ANSWERS:
        assert SPECS[command].direction is Direction.TO_CLIENT, command
        assert SPECS[command].arguments[0] == 'correlation', command
    assert protocol.SESSIONLESS <= protocol.REQUESTS  # answered on the socket they came from, by correlation
    assert session.ANSWERS is protocol.ANSWERS


def test_the_broker_handles_exactly_what_clients_send():
    assert set(HANDLERS) == protocol.FROM_CLIENT
