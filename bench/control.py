"""Control of many processes: ``verdi process pause``/``play`` of many, and a kill of many parents, timed from the
command to its effect, on a real daemon per broker (see ``bench/control_driver.py`` for what is measured).

Profiles as in :mod:`bench.e2e`, but with the ``localhost`` computer that the held jobs run on.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from . import e2e
from .procs import BenchError

# harness broker name -> (profile name, command that creates it, broker entry point it must end up with)
PROFILES: dict[str, tuple[str, list[str], str]] = {
    'aiida-zmq': ('bench-control-aiida-zmq', ['aiida-zmq', 'presto', '--no-set-default'], 'zmq'),
    'core.zeromq': ('bench-control-core-zeromq', ['verdi', 'presto', '--use-zeromq'], 'core.zeromq'),
    'rabbitmq-yaml': ('bench-control-rabbitmq', ['verdi', 'presto'], 'core.rabbitmq'),
}


def run(broker: str, n_parents: int, n_kills: int, timeout: float) -> dict[str, float]:
    profile = e2e.ensure_profile(broker, PROFILES)
    modules = e2e.modules_dir()
    shutil.copyfile(Path(__file__).resolve().parent / 'control_driver.py', modules / 'bench_control_driver.py')
    verdi = e2e.script('verdi')
    e2e.run_command(
        [verdi, '-p', profile, 'daemon', 'start', str(e2e.WORKERS)], 180, f'verdi -p {profile} daemon start'
    )
    try:
        args = [sys.executable, str(modules / 'bench_control_driver.py'), profile, str(n_parents), str(n_kills)]
        out = e2e.run_command([*args, str(timeout)], 8 * timeout + 120, 'the control driver')
    finally:
        e2e.run_command(
            [verdi, '-p', profile, 'daemon', 'stop', '--timeout', '60'], 180, f'verdi -p {profile} daemon stop'
        )
    lines = [line for line in out.splitlines() if line.startswith('CONTROL ')]
    if not lines:
        raise BenchError(f'the control driver printed no result: {out[-400:]}')
    result = json.loads(lines[-1][len('CONTROL ') :])
    if 'error' in result:
        raise BenchError(f'control: {result["error"]}')
    metrics = {
        'processes': result['processes'],
        'live_s': result['live_s'],
        'rest_finished_s': result['rest_finished_s'],
    }
    for command in ('pause_all', 'play_all', 'kill'):
        for key, value in result[command].items():
            metrics[f'{command}.{key}'] = value
    return metrics
