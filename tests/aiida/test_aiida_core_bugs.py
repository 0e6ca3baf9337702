"""aiida-core 2.9 bugs that users meet on any broker, shown on this broker and on RabbitMQ side by side.

None of them is the broker's to fix, but a user who meets one blames the broker first. ``docs/troubleshooting.md``
("Processes that aiida-core leaves stuck") says how to recognise each and what to type. Each test here asserts the
bug as it is today, on both brokers: when one starts failing on both, aiida-core has fixed it, and the page (and
``aiida-zmq explain``'s advice) should say so.

- ``#6569``/``#3694``: aiida-core saves a checkpoint on pause but not on play, so a process paused, played, then
  reloaded by a daemon restart comes back paused, while its node says it is not.
- killing a parent that came back paused that way does not reach its children: the child runs on.
- ``Expected pending job info future, found in done state``: a CalcJob paused while it waits for its scheduler poll
  leaves a cancelled request in the worker's jobs list, and the next update fails.

The RabbitMQ variants run where a RabbitMQ listens on 127.0.0.1:5672 (``tests/run.sh`` starts one where it can).
"""

from __future__ import annotations

import socket
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiida_profile import AiidaZmqProfile

from aiida_zmq.testing import wait_until

pytestmark = pytest.mark.aiida

RABBITMQ = ('127.0.0.1', 5672)


def _rabbitmq_running() -> bool:
    try:
        with socket.create_connection(RABBITMQ, timeout=1.0):
            return True
    except OSError:
        return False


class RabbitmqProfile(AiidaZmqProfile):
    """The same throwaway profile, switched to ``core.rabbitmq``: its daemon has no broker watcher to wait for."""

    def daemon_start(self, workers: int = 2) -> None:
        self.verdi('daemon', 'start', str(workers))
        wait_until(
            lambda: len(self.worker_pids()) == workers,
            timeout=60,
            interval=0.1,
            what=f'{workers} workers of {self.name} to start',
        )


@pytest.fixture(
    scope='module',
    params=[
        'zmq',
        pytest.param(
            'core.rabbitmq',
            marks=pytest.mark.skipif(
                not _rabbitmq_running(), reason='no RabbitMQ on 127.0.0.1:5672 (tests/run.sh starts one)'
            ),
        ),
    ],
)
def profile(request: pytest.FixtureRequest, aiida_zmq_profile_factory: Callable[..., AiidaZmqProfile]) -> Iterator:
    """A profile with a daemon of one worker, on the broker of the parameter."""
    made = aiida_zmq_profile_factory()
    if request.param == 'core.rabbitmq':
        made.aiida_zmq('configure', made.name, '--to', 'core.rabbitmq', '--force')
        made.__class__ = RabbitmqProfile
    made.daemon_start(1)
    yield made
    assert not made.teardown(), 'processes were left running after `verdi daemon stop`'


def _state(profile: AiidaZmqProfile, pk: int) -> dict[str, t.Any]:
    return profile.driver('states', str(pk))['states'][str(pk)]


def _wait_job_running(profile: AiidaZmqProfile, pk: int) -> None:
    wait_until(
        lambda: _state(profile, pk)['job_state'] == 'running',
        timeout=90,
        interval=0.5,
        what=f'the held job {pk} to run',
    )


def _held_parent(profile: AiidaZmqProfile, hold: Path) -> tuple[int, int]:
    """A work chain waiting for its held job, the job running: (parent, job)."""
    (parent,) = profile.driver('submit-held-parent', '1', str(hold))['pks']
    wait_until(
        lambda: _state(profile, parent)['children'], timeout=90, interval=0.5, what=f'{parent} to submit its job'
    )
    (job,) = _state(profile, parent)['children']
    _wait_job_running(profile, job)
    return parent, job


def _pause_play_restart(profile: AiidaZmqProfile, pk: int) -> None:
    profile.verdi('process', 'pause', str(pk), '--timeout', '30')
    assert _state(profile, pk)['paused'] is True
    profile.verdi('process', 'play', str(pk), '--timeout', '30')
    assert _state(profile, pk)['paused'] is False
    profile.daemon_stop()
    profile.daemon_start(1)


def _live_status(profile: AiidaZmqProfile, pk: int) -> dict[str, t.Any]:
    """What the process itself says (``get_status`` RPC to the worker that runs it), once a worker has loaded it."""
    answer: dict[str, t.Any] = {}

    def loaded() -> bool:
        answer.update(profile.driver('live-status', str(pk)))
        return 'status' in answer

    wait_until(loaded, timeout=90, interval=0.5, what=f'a worker to load {pk} and answer its status')
    return answer['status']


# Each of these restarts a daemon and waits for real jobs: on a loaded machine one took over pytest-timeout's 300 s.
@pytest.mark.timeout(900)
def test_a_played_process_comes_back_paused_after_a_restart(profile: AiidaZmqProfile, tmp_path: Path) -> None:
    """aiida-core #6569: pause, play, restart: the checkpoint still says paused, the node does not."""
    hold = tmp_path / 'hold'
    hold.touch()
    parent, _job = _held_parent(profile, hold)
    _pause_play_restart(profile, parent)

    assert profile.driver('checkpoint-paused', str(parent))['paused'] is True, 'aiida-core saved a checkpoint on play'
    assert _live_status(profile, parent)['paused'] is True, 'the process came back running: #6569 fixed?'
    assert _state(profile, parent)['paused'] is False, '`verdi process list` would show it paused'

    # What docs/troubleshooting.md tells the user to type, and that it is enough.
    profile.verdi('process', 'play', str(parent), '--timeout', '30')
    hold.unlink()
    answer = profile.driver('wait', str(parent), '--timeout', '90')
    assert answer['states'][str(parent)]['ok'] is True, answer


@pytest.mark.timeout(900)
def test_killing_a_parent_that_came_back_paused_leaves_its_child(profile: AiidaZmqProfile, tmp_path: Path) -> None:
    """The parent is killed; its running job is not (whereas a parent that was never reloaded kills its children)."""
    hold = tmp_path / 'hold'
    hold.touch()
    parent, job = _held_parent(profile, hold)
    _pause_play_restart(profile, parent)
    assert _live_status(profile, parent)['paused'] is True

    profile.verdi('process', 'kill', str(parent), '--timeout', '60')
    assert profile.driver('wait', str(parent), '--timeout', '60')['states'][str(parent)]['state'] == 'killed'
    assert _state(profile, job)['state'] == 'waiting', 'the kill reached the child: fixed upstream?'

    # The way out the page gives: kill the child by its own pk.
    profile.verdi('process', 'kill', str(job), '--timeout', '60')
    assert profile.driver('wait', str(job), '--timeout', '60')['states'][str(job)]['state'] == 'killed'
    hold.unlink()


# A race inside aiida-core: the pause must land while the job waits for its scheduler poll, a moment this test does not
# control. It showed the bug in 4 of 4 runs at load average 11-16 and missed it in 2 of 2 at 25-34 (no error within
# 120 s): kept out of the default run until it can wait for that moment.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_paused_while_its_poll_waits_breaks_the_jobs_list(profile: AiidaZmqProfile, tmp_path: Path) -> None:
    """Pausing a CalcJob in its scheduler poll: the worker's log shows the error once the job is played."""
    hold = tmp_path / 'hold'
    hold.touch()
    (job,) = profile.driver('submit-held', '1', str(hold))['pks']
    _wait_job_running(profile, job)
    log = profile.daemon_log()
    seen = log.read_text(errors='replace').count('found in done state') if log.exists() else 0
    profile.verdi('process', 'pause', str(job), '--timeout', '30')
    profile.verdi('process', 'play', str(job), '--timeout', '30')
    wait_until(
        lambda: log.exists() and log.read_text(errors='replace').count('found in done state') > seen,
        timeout=120,
        interval=0.5,
        what="the worker's next job update to fail with 'Expected pending job info future, found in done state'",
    )
    # The job does not move on by itself (a daemon restart and a play did not bring it back within 3 minutes when
    # tried): what docs/troubleshooting.md tells the user to type is a kill, and it is enough.
    profile.verdi('process', 'kill', str(job), '--timeout', '60')
    hold.unlink()
    assert profile.driver('wait', str(job), '--timeout', '60')['states'][str(job)]['state'] == 'killed'
