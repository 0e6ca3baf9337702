"""Driver of the control workload, run in its own process with a profile (a copy made by ``bench/control.py``):
``python bench_control_driver.py PROFILE PARENTS KILLS TIMEOUT``. Prints one JSON line ``CONTROL {...}``.

Many live processes (``PARENTS`` work chains, each waiting for a job that waits for a hold file), then what a user
types to control them, each timed from the command being sent to its effect in the database: ``verdi process pause``
and ``play`` of every parent in one command, and a kill of ``KILLS`` parents in one command (a parent's kill reaches
its job through the worker that runs the job, which kills it through the computer's transport). Then the rest is
released and finishes. For each command: how long ``verdi`` took (its answers), and when the processes showed the
effect (their nodes paused, played, killed): the median and the last, so that a long tail shows where it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

from bench_e2e_driver import WORKERS, _wait, _wait_for_workers, run_and_report

POLL = 0.05


def _rows(pks: list[int]) -> dict[int, tuple[bool, str | None, str | None]]:
    """pk -> (paused, process state, scheduler state) for every node, in one query."""
    from aiida import orm

    query = orm.QueryBuilder().append(
        orm.ProcessNode,
        filters={'id': {'in': pks}},
        project=['id', 'attributes.paused', 'attributes.process_state', 'attributes.scheduler_state'],
    )
    return {pk: (bool(paused), state, scheduler) for pk, paused, state, scheduler in query.all()}


def _effect_times(pks: list[int], effect, t0: float, timeout: float) -> list[float]:
    """Seconds from ``t0`` until each node showed ``effect(row)``; raise when some did not within ``timeout``."""
    seen: dict[int, float] = {}
    while len(seen) < len(pks):
        rows = _rows([pk for pk in pks if pk not in seen])
        now = time.perf_counter() - t0
        seen.update({pk: now for pk, row in rows.items() if effect(row)})
        if len(seen) < len(pks):
            if now > timeout:
                raise TimeoutError(
                    f'{len(pks) - len(seen)} of {len(pks)} processes without the effect after {now:.0f} s'
                )
            time.sleep(POLL)
    return sorted(seen.values())


def _timed(profile: str, args: list[str], pks: list[int], effect, timeout: float) -> dict[str, float]:
    """Send ``verdi -p PROFILE ARGS`` (as a user types it) and watch the nodes while it runs: from its start until it
    returned (its answers), until half of the processes showed ``effect``, and until the last one did."""
    verdi = str(Path(sys.executable).parent / 'verdi')
    ended: dict[str, t.Any] = {}
    t0 = time.perf_counter()
    command = subprocess.Popen(
        [verdi, '-p', profile, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def wait_for_the_command() -> None:
        ended['output'] = command.communicate()[0]
        ended['at'] = time.perf_counter() - t0

    waiter = threading.Thread(target=wait_for_the_command, daemon=True)
    waiter.start()
    try:
        times = _effect_times(pks, effect, t0, timeout)
        waiter.join(timeout)
    finally:
        command.kill()
    if command.returncode != 0 or 'at' not in ended:
        raise RuntimeError(f'verdi {" ".join(args)} failed ({command.returncode}): {ended.get("output", "")[-400:]}')
    return {
        'command_s': round(ended['at'], 3),
        'effect_p50_s': round(times[len(times) // 2], 3),
        'effect_last_s': round(times[-1], 3),
    }


def main(profile: str, n_parents: int, n_kills: int, timeout: float) -> dict:
    from aiida import load_profile, orm
    from aiida.engine import submit

    from aiida_zmq.aiida.demo_workflows import JobParentWorkChain, held_code

    load_profile(profile)
    _wait_for_workers(profile, WORKERS, 5.0, timeout)
    # Inside the harness's AIIDA_PATH, which it removes at the end.
    hold = Path(tempfile.mkdtemp(prefix='bench-control-', dir=os.environ.get('AIIDA_PATH'))) / 'hold'
    hold.touch()
    code = held_code(str(hold))
    parents = [submit(JobParentWorkChain, code=code, x=orm.Int(i), y=orm.Int(1)).pk for i in range(n_parents)]

    def jobs_of(pks: list[int]) -> list[int]:
        return [child.pk for pk in pks for child in orm.load_node(pk).called]

    t0 = time.perf_counter()
    _effect_times(parents, lambda row: True, t0, timeout)  # stored (they are: submit returned)
    while len(jobs := jobs_of(parents)) < n_parents:
        if time.perf_counter() - t0 > timeout:
            return {'error': f'{len(jobs)} of {n_parents} jobs submitted after {timeout:.0f} s'}
        time.sleep(0.2)
    _effect_times(jobs, lambda row: row[2] == 'running', t0, timeout)
    out: dict = {'processes': len(parents) + len(jobs), 'live_s': round(time.perf_counter() - t0, 3)}
    # The parents, not their jobs: aiida-core 2.9 breaks a CalcJob paused in its scheduler poll (``Expected pending job
    # info future, found in done state``, tests/aiida/test_aiida_core_bugs.py), on every broker, and some never resume.
    listed = list(map(str, parents))
    out['pause_all'] = _timed(
        profile, ['process', 'pause', *listed, '--timeout', str(timeout)], parents, lambda row: row[0], timeout
    )
    out['play_all'] = _timed(
        profile, ['process', 'play', *listed, '--timeout', str(timeout)], parents, lambda row: not row[0], timeout
    )
    victims = parents[:n_kills]
    doomed = victims + jobs_of(victims)
    out['kill'] = _timed(
        profile,
        ['process', 'kill', *map(str, victims), '--timeout', str(timeout)],
        doomed,
        lambda row: row[1] == 'killed',
        timeout,
    )
    hold.unlink()
    rest = parents[n_kills:]
    t0 = time.perf_counter()
    _, failed = _wait(rest, timeout)
    if failed:
        return {'error': f'after the kills, the rest did not finish ok: {failed[:5]}'}
    out['rest_finished_s'] = round(time.perf_counter() - t0, 3)
    return out


if __name__ == '__main__':
    run_and_report(main, 'CONTROL')
