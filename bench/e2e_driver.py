"""Driver of the end-to-end workload, run in its own process with a profile: ``python bench_e2e_driver.py PROFILE
N_CHAINS N_PARENTS TIMEOUT`` (a copy made by ``bench/e2e.py``, see there). Prints one JSON
line: times, or the failure (a work chain not finished ok in time)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

WORKERS = 2
WORKER_SETTLE_S = 5.0  # an AiiDA worker imports and connects within ~3 s of its start on this kind of machine


def _wait(pks: list[int], timeout: float) -> tuple[float, list[str]]:
    """Wait until every node is terminated; return the time it took and what did not finish ok."""
    from aiida import orm

    from aiida_zmq.aiida.queries import terminated

    t0 = time.perf_counter()
    pending = set(pks)
    while pending:
        if time.perf_counter() - t0 > timeout:
            return time.perf_counter() - t0, [f'{len(pending)} of {len(pks)} not terminated after {timeout:.0f} s']
        pending -= terminated(pending)
        if pending:
            time.sleep(0.05)
    nodes = [orm.load_node(pk) for pk in pks]
    failed = [f'{node.pk}: {node.process_state} {node.exit_status}' for node in nodes if not node.is_finished_ok]
    return time.perf_counter() - t0, failed


def _wait_for_workers(profile: str, workers: int, settle: float, timeout: float) -> None:
    """Wait until ``workers`` daemon workers of ``profile`` run and have had ``settle`` seconds to connect: a worker
    that connects late would leave the first one with every task (both get up to 200 at once)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        found = []
        for process in psutil.process_iter(['cmdline', 'create_time']):
            cmdline = process.info['cmdline'] or []
            if 'worker' in cmdline and 'daemon' in cmdline and profile in cmdline:
                found.append(process.info['create_time'])
        if len(found) >= workers and time.time() - max(found) > settle:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f'{len(found)} of {workers} daemon workers of {profile} running after {timeout:.0f} s')
        time.sleep(0.2)


def _daemon_processes(profile: str) -> dict[int, str]:
    """The daemon's processes, pid -> role: circusd and everything under it (workers, broker, plugins)."""
    import psutil

    roles: dict[int, str] = {}
    for process in psutil.process_iter(['cmdline']):
        cmdline = process.info['cmdline'] or []
        if 'start-circus' in cmdline and profile in cmdline:
            roles[process.pid] = 'circusd'
            for child in process.children(recursive=True):
                try:
                    text = ' '.join(child.cmdline())
                except psutil.Error:
                    continue
                if 'worker' in text and 'daemon' in text:
                    roles[child.pid] = f'worker{sum(role.startswith("worker") for role in roles.values()) + 1}'
                elif 'plugin' in text:
                    roles[child.pid] = 'plugins'
                elif 'circus import stats' in text or 'circusd-stats' in text:
                    roles[child.pid] = 'circusd'  # the arbiter's statistics process, started by AiiDA's daemon
                else:
                    roles[child.pid] = 'broker'
    return roles


def _cpu_seconds(roles: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role, and by this process as ``submitter``."""
    import psutil

    used: dict[str, float] = {'submitter': sum(psutil.Process().cpu_times()[:2])}
    for pid, role in roles.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        used[role] = used.get(role, 0.0) + times.user + times.system
    return used


def _cpu_delta(before: dict[str, float], after: dict[str, float], per: int) -> dict[str, float]:
    """CPU milliseconds per work chain, by role, with the workers' sum and the busiest worker's share of it (0.5 when
    the broker spreads the work evenly)."""
    used = {role: 1000 * (after.get(role, 0.0) - before.get(role, 0.0)) / per for role in after}
    workers = [value for role, value in used.items() if role.startswith('worker')]
    used['workers'] = sum(workers)
    used['busiest_worker_share'] = max(workers) / used['workers'] if used['workers'] else float('nan')
    return {role: round(value, 3 if role == 'busiest_worker_share' else 1) for role, value in used.items()}


def _median_ms(values: list[float]) -> float:
    import statistics

    return round(1000 * statistics.median(values), 1) if values else float('nan')


def _timeline(chains: list[int], parents: list[int]) -> dict[str, float]:
    """Medians (ms) of where a work chain's time goes, from the nodes' own times: submitted (ctime), its step ran
    (the calcfunction's ctime), finished (mtime, the last write); for a parent, also its child's."""
    from aiida import orm

    def step_time(chain: orm.WorkChainNode) -> float:
        (called,) = [node for node in chain.called if isinstance(node, orm.CalcFunctionNode)]
        return called.ctime.timestamp()

    out: dict[str, list[float]] = {'chain_queued': [], 'chain_step_to_end': []}
    for pk in chains:
        node = orm.load_node(pk)
        step = step_time(node)
        out['chain_queued'].append(step - node.ctime.timestamp())
        out['chain_step_to_end'].append(node.mtime.timestamp() - step)
    for key in ('parent_queued', 'child_queued', 'child_step_to_end', 'child_end_to_parent_end'):
        out[key] = []
    for pk in parents:
        parent = orm.load_node(pk)
        (child,) = [node for node in parent.called if isinstance(node, orm.WorkChainNode)]
        out['parent_queued'].append(child.ctime.timestamp() - parent.ctime.timestamp())
        step = step_time(child)
        out['child_queued'].append(step - child.ctime.timestamp())
        out['child_step_to_end'].append(child.mtime.timestamp() - step)
        out['child_end_to_parent_end'].append(parent.mtime.timestamp() - child.mtime.timestamp())
    return {f'{key}_ms': _median_ms(values) for key, values in out.items()}


def _start_spies(roles: dict[int, str]) -> list[subprocess.Popen]:
    """With ``AZMQ_E2E_SPY=DIR`` (set by ``bench/profile_e2e.py``), sample every worker with py-spy into ``DIR``."""
    out = os.environ.get('AZMQ_E2E_SPY')
    if not out:
        return []
    pyspy = os.environ.get('AZMQ_PYSPY', 'py-spy')
    workers = [(pid, role) for pid, role in roles.items() if role.startswith('worker')]
    return [
        subprocess.Popen(
            [pyspy, 'record', '--pid', str(pid), '--format', 'raw', '--rate', '200', '--output', f'{out}/{role}.txt'],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid, role in workers
    ]


def _stop_spies(spies: list[subprocess.Popen]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
    for spy in spies:
        spy.wait(60)


def main(profile: str, n_chains: int, n_parents: int, timeout: float) -> dict:
    from aiida import load_profile, orm
    from aiida.engine import submit

    # The demo's work chains: installed with aiida-zmq, so every broker's daemon workers import them.
    from aiida_zmq.aiida.demo_workflows import AddWorkChain, ParentWorkChain

    load_profile(profile)
    _wait_for_workers(profile, WORKERS, WORKER_SETTLE_S, timeout)
    out: dict = {}
    # Warm-up: `verdi daemon start` returns before its workers listen; time only a running daemon.
    _, failed = _wait([submit(AddWorkChain, x=orm.Int(-1), y=orm.Int(1)).pk for _ in range(2 * WORKERS)], timeout)
    if failed:
        return {'error': f'warm-up work chains: {failed[:5]}'}
    roles = _daemon_processes(profile)
    cpu_start = _cpu_seconds(roles)
    t0 = time.perf_counter()
    pks = [submit(AddWorkChain, x=orm.Int(i), y=orm.Int(1)).pk for i in range(n_chains)]
    t_submitted = time.perf_counter()
    _, failed = _wait(pks, timeout)
    if failed:
        return {'error': f'work chains: {failed[:5]}'}
    out['chains_submit_s'] = t_submitted - t0
    out['chains_s'] = time.perf_counter() - t0
    cpu_chains = _cpu_seconds(roles)
    out['cpu_ms_per_chain'] = _cpu_delta(cpu_start, cpu_chains, n_chains)
    spies = _start_spies(roles)
    t0 = time.perf_counter()
    parents = [submit(ParentWorkChain, x=orm.Int(i), y=orm.Int(1)).pk for i in range(n_parents)]
    _, failed = _wait(parents, timeout)
    _stop_spies(spies)
    if failed:
        return {'error': f'parent work chains: {failed[:5]}'}
    out['parents_s'] = time.perf_counter() - t0
    out['cpu_ms_per_parent'] = _cpu_delta(cpu_chains, _cpu_seconds(roles), n_parents)
    out['timeline'] = _timeline(pks, parents)
    return out


def run_and_report(main, tag: str) -> None:
    """Run a driver's ``main(PROFILE, int, int, float)`` from the command line; print ``TAG {json}`` for the harness,
    with the failure (and where it was) as ``error`` when it raised."""
    try:
        result = main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    except Exception as exception:  # reported to the harness as a failed run
        import traceback

        result = {'error': f'{type(exception).__name__}: {exception}\n{traceback.format_exc(limit=5)}'}
    print(f'{tag} ' + json.dumps(result), flush=True)


if __name__ == '__main__':
    run_and_report(main, 'E2E')
