"""End-to-end AiiDA: a real profile per broker (``core.sqlite_dos`` storage), ``verdi daemon start 2``, then
``N`` work chains, then ``M`` parent work chains that each submit a child and wait for it.

Profiles are created once per harness run in its private ``AIIDA_PATH``: ``aiida-zmq presto`` for aiida-zmq,
``verdi presto --use-zeromq`` for core.zeromq and ``verdi presto`` (which picks the local RabbitMQ) for RabbitMQ.
Each measurement starts the daemon (with it the broker, for the two ZeroMQ brokers), runs the driver
(``bench/e2e_driver.py``) in its own process and stops the daemon. A work chain not finished ok in time fails the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .procs import BenchError, child_env

# harness broker name -> (profile name, command that creates it, broker entry point it must end up with)
PROFILES: dict[str, tuple[str, list[str], str]] = {
    'aiida-zmq': ('bench-aiida-zmq', ['aiida-zmq', 'presto', '--no-computer', '--no-set-default'], 'zmq'),
    'core.zeromq': ('bench-core-zeromq', ['verdi', 'presto', '--use-zeromq'], 'core.zeromq'),
    'rabbitmq-yaml': ('bench-rabbitmq', ['verdi', 'presto'], 'core.rabbitmq'),
}
WORKERS = 2


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def modules_dir() -> Path:
    """A directory with only the driver, to run it from.

    Not the checkout: there ``aiida_zmq`` would be imported from the source tree instead of the installed package,
    which for a non-editable install lacks its ``circus_plugins`` (mapped from another folder at install time).
    """
    path = Path(os.environ.get('AIIDA_PATH') or tempfile.gettempdir()) / 'bench-e2e-modules'
    path.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    shutil.copyfile(here / 'e2e_driver.py', path / 'bench_e2e_driver.py')
    return path


def run_command(args: list[str], timeout: float, what: str) -> str:
    modules = modules_dir()
    # AiiDA's daemon looks for `verdi` on PATH: the venv's, as when it is activated.
    env = child_env()
    env['PATH'] = f'{Path(sys.executable).parent}:{env.get("PATH", "")}'
    try:
        proc = subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=timeout, cwd=modules)
    except subprocess.TimeoutExpired:
        raise BenchError(f'{what}: no answer within {timeout:.0f} s ({" ".join(args)})')
    if proc.returncode != 0:
        raise BenchError(f'{what} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-600:]}')
    return proc.stdout


def ensure_profile(broker: str, profiles: dict[str, tuple[str, list[str], str]] = PROFILES) -> str:
    """Create the profile for ``broker`` (one of ``profiles``) unless it exists; return its name."""
    name, command, entry_point = profiles[broker]
    listed = run_command([script('verdi'), 'profile', 'list'], 120, 'verdi profile list')
    if name not in listed.split():
        run_command([script(command[0]), *command[1:], '--profile-name', name], 300, f'creating profile {name}')
    shown = run_command([script('verdi'), 'profile', 'show', name], 120, f'verdi profile show {name}')
    if entry_point not in shown:
        raise BenchError(f'profile {name} does not use the {entry_point} broker:\n{shown[-400:]}')
    return name


def run(broker: str, n_chains: int, n_parents: int, timeout: float) -> dict[str, float]:
    profile = ensure_profile(broker)
    verdi = script('verdi')
    run_command([verdi, '-p', profile, 'daemon', 'start', str(WORKERS)], 180, f'verdi -p {profile} daemon start')
    try:
        out = run_command(
            [
                sys.executable,
                str(modules_dir() / 'bench_e2e_driver.py'),
                profile,
                str(n_chains),
                str(n_parents),
                str(timeout),
            ],
            2 * timeout + 120,
            'the end-to-end driver',
        )
    finally:
        run_command([verdi, '-p', profile, 'daemon', 'stop'], 180, f'verdi -p {profile} daemon stop')
    lines = [line for line in out.splitlines() if line.startswith('E2E ')]
    if not lines:
        raise BenchError(f'the end-to-end driver printed no result: {out[-400:]}')
    result = json.loads(lines[-1][4:])
    if 'error' in result:
        raise BenchError(f'end-to-end: {result["error"]}')
    metrics = {
        'chains_per_s': n_chains / result['chains_s'],
        'parents_per_s': n_parents / result['parents_s'],
        'chains_s': result['chains_s'],
        'chains_submit_s': result['chains_submit_s'],
        'parents_s': result['parents_s'],
    }
    # Where the time and the CPU went (see e2e_driver._timeline and _cpu_seconds), flattened for the report.
    for group in ('cpu_ms_per_chain', 'cpu_ms_per_parent', 'timeline'):
        for key, value in result.get(group, {}).items():
            metrics[f'{group}.{key}'] = value
    return metrics
