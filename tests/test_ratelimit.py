"""The rate-limited log: a repeated event is logged a few times per interval, then counted and reported."""

from __future__ import annotations

import logging

import pytest

from aiida_zmq.ratelimit import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_counted_then_reported(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RateLimitedLog(logging.getLogger('test.ratelimit'), burst=3, interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, 'test.ratelimit'):
        logged = [log.warning('bad message %d', i, key=('malformed', b'peer')) for i in range(1000)]
    assert logged.count(True) == 3
    assert len(caplog.records) == 3
    assert 'counted, not logged' in caplog.records[-1].getMessage()
    assert log.suppressed_total == 997
    caplog.clear()
    clock.now += 10.0
    with caplog.at_level(logging.WARNING, 'test.ratelimit'):
        assert log.warning('bad message again', key=('malformed', b'peer'))
    assert '997 similar message(s) suppressed' in caplog.records[0].getMessage()


def test_keys_are_independent_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RateLimitedLog(logging.getLogger('test.ratelimit'), burst=1, interval=10.0, max_keys=100, clock=clock)
    with caplog.at_level(logging.WARNING, 'test.ratelimit'):
        for peer in range(10_000):
            log.warning('bad message from %d', peer, key=('malformed', peer))
    # 100 keys of their own, then every further peer shares one overflow window: 101 lines, not 10,000.
    assert len(caplog.records) == 101
    assert len(log._windows) == 101
    clock.now += 30.0
    log.warning('after the flood', key=('malformed', 'new'))
    assert len(log._windows) <= 2  # idle keys forgotten


def test_disabled_level_costs_nothing() -> None:
    logger = logging.getLogger('test.ratelimit.quiet')
    logger.setLevel(logging.ERROR)
    log = RateLimitedLog(logger)
    assert not log.warning('not logged', key='key')
    assert not log._windows
