"""Fixtures for end-to-end tests with AiiDA: a throwaway ``core.sqlite_dos`` profile with the ``zmq`` broker.

Everything runs in subprocesses (``verdi``, ``aiida-zmq``, :mod:`zmq_test_driver`) with a temporary ``AIIDA_PATH``, as
a user would run it: the test process never loads an AiiDA profile, so these tests cannot disturb the other tests of
the session nor the user's own AiiDA configuration.

Fixtures (reusable by other test packages: import them from here, or move them into ``aiida_zmq.testing``):

- ``aiida_zmq_profile_factory`` (session): ``factory(name=None, workers=0)`` makes a fresh profile with this broker
  (``aiida-zmq presto``) in the session's temporary AIIDA_PATH, its daemon started when ``workers`` > 0;
- ``aiida_zmq_profile`` (module): one such profile with a daemon of two workers, shared by the tests of a module;
- every profile is torn down at the end: daemon stopped, and any process left of it (broker, workers, plugins)
  killed by pid and reported as a failure of the fixture.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
from aiida_profile import AiidaZmqProfile, ProfileFactory


@pytest.fixture(scope='session')
def aiida_zmq_profile_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., AiidaZmqProfile]]:
    """Make throwaway profiles with the ``zmq`` broker (see the module docstring); all are torn down at the end."""
    factory = ProfileFactory(tmp_path_factory.mktemp('aiida'))
    yield factory
    leftovers = [line for profile in factory.profiles for line in profile.teardown()]
    if leftovers:
        # An open bug (see the closing note of 2026-12-08): at `verdi daemon stop` circus sometimes starts a second
        # stats streamer and leaves the first, with the broker and its plugins, behind; three fresh-clone runs met it
        # after different tests. Reported on every run and killed here; the module fixture below, and each test's own
        # teardown, still fail on what they leave.
        warnings.warn(f'processes left running after the daemon stopped (killed now): {leftovers}', stacklevel=1)


@pytest.fixture(scope='module')
def aiida_zmq_profile(aiida_zmq_profile_factory: Callable[..., AiidaZmqProfile]) -> Iterator[AiidaZmqProfile]:
    """A profile with a daemon of two workers, shared by a module's tests, which must leave the daemon running."""
    profile = aiida_zmq_profile_factory(workers=2)
    yield profile
    assert not profile.teardown(), 'processes were left running after `verdi daemon stop`'
