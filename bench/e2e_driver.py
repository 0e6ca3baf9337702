"""Driver of the end-to-end workload, run in its own process with a profile: ``python bench_e2e_driver.py PROFILE
N_CHAINS N_PARENTS TIMEOUT`` (a copy beside ``bench_e2e_workchains.py``, made by ``bench/e2e.py``). Prints one JSON
line: times, or the failure (a work chain not finished ok in time)."""

from __future__ import annotations

import json
import sys
import time

WORKERS = 2
WORKER_SETTLE_S = 5.0  # an AiiDA worker imports and connects within ~3 s of its start on this kind of machine


def _wait(pks: list[int], timeout: float) -> tuple[float, list[str]]:
    """Wait until every node is terminated; return the time it took and what did not finish ok."""
    from aiida import orm

    t0 = time.perf_counter()
    pending = set(pks)
    while pending:
        if time.perf_counter() - t0 > timeout:
            return time.perf_counter() - t0, [f'{len(pending)} of {len(pks)} not terminated after {timeout:.0f} s']
        query = orm.QueryBuilder().append(
            orm.ProcessNode, filters={'id': {'in': list(pending)}}, project=['id', 'attributes.process_state']
        )
        rows = query.all()
        pending -= {pk for pk, state in rows if state in ('finished', 'excepted', 'killed')}
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


def main(profile: str, n_chains: int, n_parents: int, timeout: float) -> dict:
    from aiida import load_profile, orm
    from aiida.engine import submit

    # Copied beside this file as bench_e2e_workchains.py (see bench/e2e.py): the daemon workers import it from there.
    from bench_e2e_workchains import BenchChain, BenchParentChain

    load_profile(profile)
    _wait_for_workers(profile, WORKERS, WORKER_SETTLE_S, timeout)
    out: dict = {}
    # Warm-up: `verdi daemon start` returns before its workers listen; time only a running daemon.
    _, failed = _wait([submit(BenchChain, x=orm.Int(-1), y=orm.Int(1)).pk for _ in range(2 * WORKERS)], timeout)
    if failed:
        return {'error': f'warm-up work chains: {failed[:5]}'}
    t0 = time.perf_counter()
    pks = [submit(BenchChain, x=orm.Int(i), y=orm.Int(1)).pk for i in range(n_chains)]
    t_submitted = time.perf_counter()
    _, failed = _wait(pks, timeout)
    if failed:
        return {'error': f'work chains: {failed[:5]}'}
    out['chains_submit_s'] = t_submitted - t0
    out['chains_s'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    parents = [submit(BenchParentChain, x=orm.Int(i)).pk for i in range(n_parents)]
    _, failed = _wait(parents, timeout)
    if failed:
        return {'error': f'parent work chains: {failed[:5]}'}
    out['parents_s'] = time.perf_counter() - t0
    return out


if __name__ == '__main__':
    try:
        result = main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    except Exception as exception:  # reported to the harness as a failed run
        import traceback

        result = {'error': f'{type(exception).__name__}: {exception}\n{traceback.format_exc(limit=5)}'}
    print('E2E ' + json.dumps(result), flush=True)
