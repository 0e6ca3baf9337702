"""`aiida-zmq migrate`: tasks move to a real RabbitMQ server and back, none lost, none duplicated."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
from click.testing import CliRunner

import aiida_zmq
from aiida_zmq.cli.main import main
from aiida_zmq.migrate import rabbitmq_communicator

RABBITMQ = ('127.0.0.1', 5672)


def rabbitmq_running() -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(RABBITMQ) == 0


pytestmark = pytest.mark.skipif(
    not rabbitmq_running(),
    reason='no RabbitMQ on 127.0.0.1:5672 (tests/run.sh starts one when rabbitmq-server is installed)',
)


def run(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, '--json'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index('{') :])


# 1,000 in the default run; the 10,000 of the issue with --run-slow (it alone took 47 s on a busy 2-core machine).
@pytest.mark.parametrize('count', [1_000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_round_trip_through_rabbitmq(zmq_broker, count):
    prefix = f'aiida-zmq-test-{uuid.uuid4().hex[:8]}'
    queue = f'{prefix}.process.queue'
    target = ('--endpoint', zmq_broker.endpoint, '--prefix', prefix, '--queue', queue)
    producer = aiida_zmq.connect(zmq_broker.endpoint)
    sent = [{'task': 'continue', 'args': {'pid': number, 'padding': 'x' * 200}} for number in range(count)]
    for body in sent:
        producer.task_queue(queue).task_send(body, no_reply=True)

    assert run('migrate', '--to', 'rabbitmq', '--dry-run', *target)['would_move'] == {queue: count}
    assert run('migrate', '--to', 'rabbitmq', *target)['moved'] == {queue: count}
    assert producer.admin('status')['queues'][queue]['depth'] == 0

    rabbit = rabbitmq_communicator(
        'amqp://guest:guest@127.0.0.1:5672/', message_exchange=f'{prefix}.messages', task_exchange=f'{prefix}.tasks'
    )
    try:
        with rabbit.task_queue(queue).next_task(timeout=5) as task:
            assert task.body == sent[0]  # decoded and encoded again for RabbitMQ, oldest first
            task.requeue()
    finally:
        rabbit.close()

    assert run('migrate', '--from', 'rabbitmq', *target)['moved'] == {queue: count}
    received = [task.body for task in producer.task_queue(queue)]
    assert len(received) == count  # none lost, none duplicated
    assert sorted(received, key=lambda task: task['args']['pid']) == sent
    assert received[:10] == sent[:10]  # FIFO survives the trip (the requeued first task went back to the front)
    producer.close()


def test_migrate_needs_a_direction(zmq_broker):
    result = CliRunner().invoke(main, ['migrate', '--endpoint', zmq_broker.endpoint, '--prefix', 'p'])
    assert result.exit_code == 2
    assert '--to rabbitmq' in result.output
