"""The codec of the ``zmq`` broker: every kind of message AiiDA sends round-trips exactly, and plain ones are faster.

No profile is needed: AiiDA's YAML (``aiida.orm.utils.serialize``) handles everything here without storage.
"""

from __future__ import annotations

import datetime
import time
import typing as t

import pytest
from kiwipy.rmq.utils import cancelled_response, exception_response, pending_response, result_response
from plumpy.process_comms import MessageBuilder, create_continue_body, create_launch_body

from aiida_zmq.aiida.broker import aiida_codec
from aiida_zmq.codec import JSON_TAG

# What AiiDA and plumpy put on the wire: process tasks, control RPCs and their answers, state-change broadcasts.
PLAIN = [
    create_continue_body(pid=1234, nowait=False),
    create_continue_body(pid=1234, tag='checkpoint', nowait=True),
    MessageBuilder.kill('Killed through `verdi process kill`', force_kill=True),
    MessageBuilder.pause('Paused through `verdi process pause`'),
    MessageBuilder.play(),
    MessageBuilder.status(),
    {'body': None, 'sender': 1234, 'subject': 'state_changed.waiting.running', 'correlation_id': None},
    result_response(True),
    result_response({'ctime': 1764182400.5, 'paused': False, 'process_string': 'WorkChain<1234>', 'state': 'waiting'}),
    pending_response(),
    cancelled_response('cancelled'),
    exception_response(RuntimeError('boom')),
    {'unicode': 'Ünïcödé ✓', 'big': 2**62, 'negative': -1.5e-300, 'nested': [[{}], []]},
]
# Not plain JSON: these must go through AiiDA's YAML and come back with their types.
NON_PLAIN = [
    create_launch_body(datetime.date, init_args=(1, 2), init_kwargs={'a': 1}),
    {1: 'int key'},
    {'tuple': (1, 2), 'set': {3}},
    {'when': datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.timezone.utc)},
    {'nan': float('nan')},
    (1, 'two'),
]


def _same(left: t.Any, right: t.Any) -> bool:
    """Equal with the same types all the way down (``1 == 1.0`` and ``(1,) == [1]`` are not good enough)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same(left[key], right[key]) for key in left)
    if isinstance(left, list | tuple):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, float) and left != left:
        return right != right
    return left == right


@pytest.mark.parametrize('kind', ['hybrid', 'yaml'])
@pytest.mark.parametrize('message', PLAIN + NON_PLAIN, ids=lambda message: str(message)[:40])
def test_round_trip(kind: str, message: t.Any) -> None:
    encode, decode = aiida_codec(kind)
    data = encode(message)
    assert isinstance(data, bytes)
    assert _same(decode(data), message)


def test_hybrid_uses_json_only_for_plain_messages() -> None:
    encode, _ = aiida_codec('hybrid')
    assert all(encode(message).startswith(JSON_TAG) for message in PLAIN)
    assert not any(encode(message).startswith(JSON_TAG) for message in NON_PLAIN)


def test_either_decoder_reads_either_encoding() -> None:
    """A profile switched between ``hybrid`` and ``yaml`` still reads the tasks stored before the switch."""
    encode_hybrid, decode_hybrid = aiida_codec('hybrid')
    encode_yaml, decode_yaml = aiida_codec('yaml')
    for message in PLAIN + NON_PLAIN:
        assert _same(decode_yaml(encode_hybrid(message)), message)
        assert _same(decode_hybrid(encode_yaml(message)), message)


def test_hybrid_is_faster_on_plain_messages() -> None:
    def cost(kind: str) -> float:
        encode, decode = aiida_codec(kind)
        started = time.perf_counter()
        for _ in range(50):
            for message in PLAIN:
                decode(encode(message))
        return (time.perf_counter() - started) / (50 * len(PLAIN))

    yaml_cost, hybrid_cost = cost('yaml'), cost('hybrid')
    print(f'\nround trip per plain message: yaml {yaml_cost * 1e6:.0f} us, hybrid {hybrid_cost * 1e6:.0f} us')
    # Measured ~10-30x; 3x leaves room for a loaded machine.
    assert hybrid_cost * 3 < yaml_cost
