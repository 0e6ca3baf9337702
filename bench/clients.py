"""Client side: how each broker's kiwipy communicator is created, as AiiDA creates it.

Everything here must be picklable and cheap to import: it runs in every spawned actor.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from concurrent.futures import Future
from typing import Any

# AiiDA's defaults: ``daemon.worker_process_slots`` and ``broker.task_timeout``.
AIIDA_PREFETCH = 200
AIIDA_TASK_TIMEOUT = 10
RMQ_PREFIX = 'aiida-zmq-bench'


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    """Everything an actor needs to connect: ``kind`` is aiida-zmq, core.zeromq or rabbitmq."""

    kind: str
    endpoint: str
    codec: str = 'default'  # 'default' (the broker's own), 'aiida' (AiiDA's YAML) or 'json'
    queue: str = 'aiida-zmq-bench.tasks'
    prefetch: int = AIIDA_PREFETCH
    source: str | None = None  # an earlier aiida-zmq's source tree to import instead (``--baseline``)

    def with_fresh_queue(self) -> ClientSpec:
        """The same spec with a task queue of its own (core.zeromq has only one queue, so this is a no-op there)."""
        return dataclasses.replace(self, queue=f'{RMQ_PREFIX}.tasks.{uuid.uuid4().hex[:12]}')


def _json_encode(obj: Any) -> bytes:
    return json.dumps(obj).encode('utf-8')


def _json_decode(data: bytes | str) -> Any:
    return json.loads(data)


def codec(name: str) -> dict[str, Any]:
    """``encoder``/``decoder`` keyword arguments for ``name`` (empty for the broker's default)."""
    if name == 'json':
        return {'encoder': _json_encode, 'decoder': _json_decode}
    if name == 'aiida':
        import functools

        from aiida.orm.utils import serialize

        return {'encoder': functools.partial(serialize.serialize, encoding='utf-8'),
                'decoder': serialize.deserialize_unsafe}  # fmt: skip
    return {}


def _use_source(spec: ClientSpec) -> None:
    """Import aiida_zmq from ``spec.source`` in this (spawned, fresh) actor: the baseline of a before/after run."""
    if spec.source is None:
        return
    if 'aiida_zmq' in sys.modules:
        loaded = sys.modules['aiida_zmq'].__file__ or ''
        if not loaded.startswith(spec.source):
            raise RuntimeError(f'aiida_zmq was imported from {loaded} before the baseline {spec.source}')
        return
    sys.path.insert(0, spec.source)


def preload(spec: ClientSpec) -> None:
    """Import what :func:`connect` needs, so that timing a connection does not time imports."""
    _use_source(spec)
    codec(spec.codec)
    if spec.kind == 'aiida-zmq':
        import aiida_zmq.communicator  # noqa: F401  (kiwipy and its imports, as for the others)
    elif spec.kind == 'core.zeromq':
        import aiida.brokers.zeromq.communicator  # noqa: F401
    else:
        import kiwipy.rmq  # noqa: F401


def connect(spec: ClientSpec) -> Any:
    """Return a started ``kiwipy.Communicator`` for ``spec``."""
    _use_source(spec)
    kw = codec(spec.codec)
    if spec.kind == 'aiida-zmq':
        import aiida_zmq

        return aiida_zmq.connect(spec.endpoint, task_queue=spec.queue, task_prefetch_count=spec.prefetch, **kw)
    if spec.kind == 'core.zeromq':
        # As aiida.brokers.zeromq.broker.ZeromqBroker.get_communicator does; it has no codec option (JSON inside).
        from aiida.brokers.zeromq.communicator import ZeromqCommunicator

        comm = ZeromqCommunicator(
            router_endpoint=spec.endpoint, task_timeout=AIIDA_TASK_TIMEOUT, task_prefetch_count=spec.prefetch
        )
        comm.start()
        return comm
    if spec.kind == 'rabbitmq':
        # As aiida.brokers.rabbitmq.broker.RabbitmqBroker._create_communicator does.
        from kiwipy.rmq import RmqThreadCommunicator

        return RmqThreadCommunicator.connect(
            connection_params={'url': spec.endpoint},
            message_exchange=f'{RMQ_PREFIX}.messages',
            task_exchange=f'{RMQ_PREFIX}.tasks',
            task_queue=spec.queue,
            task_prefetch_count=spec.prefetch,
            async_task_timeout=AIIDA_TASK_TIMEOUT,
            testing_mode=False,
            **kw,
        )
    raise ValueError(f'unknown broker kind {spec.kind!r}')


def resolve(value: Any, deadline: float) -> Any:
    """The final value of a kiwipy future (futures may resolve to futures), waiting at most until ``deadline``."""
    while isinstance(value, Future):
        value = value.result(timeout=max(0.0, deadline - time.monotonic()))
    return value
