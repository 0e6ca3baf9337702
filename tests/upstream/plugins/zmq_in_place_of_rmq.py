"""pytest plugin of the upstream runner: plumpy's and kiwipy's RabbitMQ tests, run unmodified on aiida-zmq.

Loaded by ``tests/upstream/run.py`` with ``-p zmq_in_place_of_rmq``. It starts one ``aiida-zmq serve`` for the session
and replaces kiwipy's ``RmqThreadCommunicator.connect`` and ``kiwipy.rmq.connect``, which these tests call with a
RabbitMQ URL and random exchange and queue names, by :func:`aiida_zmq.connect` to that broker:

- ``task_queue``, ``task_prefetch_count``, ``encoder`` and ``decoder`` are passed on as given, kiwipy's defaults
  included (YAML; a prefetch count of 0, which is "no limit" to RabbitMQ);
- ``connection_params`` and ``connection_factory`` name RabbitMQ and are dropped, and so are ``message_exchange`` and
  ``task_exchange``: aiida-zmq has one namespace per broker, and a test's communicators are closed before the next
  test starts, so the random names kept nothing apart that needs keeping apart here. ``testing_mode`` (auto-deleting
  exchanges), ``task_prefetch_size`` and ``async_task_timeout`` have no counterpart.

Python processes that the tests start get the same swap (``subprocesses/sitecustomize.py``, on their ``PYTHONPATH``):
test_jupyter_notebook runs ``kiwipy.connect('amqp://127.0.0.1')`` in a Jupyter kernel.

One private attribute is given to the communicator: ``_loop``, an asyncio loop nothing runs, because plumpy's
``test_process_comms.py`` fixture calls ``communicator._loop.set_debug(True)`` (``RmqThreadCommunicator``'s private
loop) before any test. Nothing else is changed: a test that asks the communicator for what only RabbitMQ has fails,
and is on the runner's list of expected failures with that reason.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import pytest

ENDPOINT_VARIABLE = 'AIIDA_ZMQ_UPSTREAM_ENDPOINT'
# Holds a sitecustomize.py that makes the same swap in the Python processes the tests start (test_jupyter_notebook's
# Jupyter kernel runs kiwipy.connect('amqp://127.0.0.1') in a process of its own).
SUBPROCESSES = Path(__file__).resolve().parent / 'subprocesses'

_broker: Any = None
_base: Path | None = None
_saved_environment: dict[str, str | None] = {}


def install(endpoint: str) -> None:
    """Make kiwipy's RabbitMQ thread communicator (``RmqThreadCommunicator.connect``, ``kiwipy.rmq.connect`` and so
    ``kiwipy.connect('amqp://...')``) an aiida-zmq communicator connected to ``endpoint``."""
    import kiwipy.rmq
    from kiwipy.rmq import defaults

    import aiida_zmq

    def connect(
        connection_params: Any = None,
        connection_factory: Any = None,
        message_exchange: str = defaults.MESSAGE_EXCHANGE,
        task_exchange: str = defaults.TASK_EXCHANGE,
        task_queue: str = defaults.TASK_QUEUE,
        task_prefetch_size: int = defaults.TASK_PREFETCH_SIZE,
        task_prefetch_count: int = defaults.TASK_PREFETCH_COUNT,
        encoder: Any = defaults.ENCODER,
        decoder: Any = defaults.DECODER,
        testing_mode: bool = False,
        async_task_timeout: Any = None,
    ) -> Any:
        communicator = aiida_zmq.connect(
            endpoint,
            task_queue=task_queue,
            task_prefetch_count=task_prefetch_count,
            encoder=encoder,
            decoder=decoder,
        )
        # plumpy's tests/rmq/test_process_comms.py fixture calls ``communicator._loop.set_debug(True)``: the private
        # asyncio loop of RmqThreadCommunicator's thread. aiida-zmq's communicator runs no asyncio loop (kiwipy's API
        # has none); it gets one here that nothing runs, on which that call does what it does on any idle loop.
        loop = asyncio.new_event_loop()
        communicator._loop = loop
        weakref.finalize(communicator, loop.close)
        return communicator

    def connect_classmethod(cls: type, *args: Any, **kwargs: Any) -> Any:
        return connect(*args, **kwargs)

    kiwipy.rmq.RmqThreadCommunicator.connect = classmethod(connect_classmethod)  # type: ignore[method-assign]
    kiwipy.rmq.connect = connect
    kiwipy.rmq.threadcomms.connect = connect


def pytest_configure(config: pytest.Config) -> None:
    global _broker, _base
    from aiida_zmq.testing import BrokerProcess

    if _broker is not None:
        return
    _base = Path(tempfile.mkdtemp(prefix='azup-'))  # short: the broker's ipc:// socket lives in it
    _broker = BrokerProcess(_base / 'broker').start()
    install(_broker.endpoint)
    for name, value in (
        (ENDPOINT_VARIABLE, _broker.endpoint),
        ('PYTHONPATH', os.pathsep.join(filter(None, [str(SUBPROCESSES), os.environ.get('PYTHONPATH')]))),
    ):
        _saved_environment[name] = os.environ.get(name)
        os.environ[name] = value


def pytest_report_header(config: pytest.Config) -> str:
    endpoint = _broker.endpoint if _broker is not None else '?'
    return f'kiwipy.rmq.RmqThreadCommunicator.connect -> aiida_zmq.connect({endpoint!r})'


def pytest_unconfigure(config: pytest.Config) -> None:
    global _broker, _base
    for name, value in _saved_environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved_environment.clear()
    if _broker is not None:
        code = _broker.stop()
        if code not in (0, -15):
            print(f'the aiida-zmq broker of the session exited with {code}; its log:\n{_broker.log()[-4000:]}')
        _broker = None
    if _base is not None:
        shutil.rmtree(_base, ignore_errors=True)
        _base = None
