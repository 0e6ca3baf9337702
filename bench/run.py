"""Run the side-by-side benchmarks: ``python -m bench.run [--quick] [--only NAME] [--out FILE]``.

Brokers are measured in one run, interleaved: every repetition runs each workload on every broker before the next
workload, in an order rotated per repetition. Medians over repetitions are reported; a failed run (lost or
unanswered message, timeout) is recorded as failed, never as a number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ''):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import control, e2e, procs, report, scale
from bench.floors import FLOORS
from bench.servers import (
    BROKERS,
    OPT_IN,
    SERVE_OPTIONS,
    AiidaZmqServer,
    BrokerServer,
    CoreZeromqServer,
    RabbitMQ,
    make_spec,
)
from bench.workloads import WORKLOADS, Sizes

ALL = [*WORKLOADS, *FLOORS, 'e2e', 'control', 'scale']
DEFAULT_OUT = Path(__file__).resolve().parent / 'results' / 'latest.json'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m bench.run', description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='smaller workloads, 1 repetition, --scale 100000')
    parser.add_argument('--only', action='append', default=[], metavar='NAME', help=f'repeatable; one of {ALL}')
    parser.add_argument(
        '--brokers', default=None, help=f'comma-separated subset of {list(BROKERS)} (default: all but {sorted(OPT_IN)})'
    )
    parser.add_argument(
        '--baseline',
        type=Path,
        default=None,
        metavar='TREE',
        help='also measure the aiida-zmq of this source tree (e.g. `git worktree add /tmp/base REV`), as '
        'aiida-zmq-baseline: before and after in one run',
    )
    parser.add_argument('--reps', type=int, default=None, help='repetitions (default 3, 1 with --quick)')
    parser.add_argument('--scale', type=int, default=None, metavar='N', help='tasks for the scale workload')
    parser.add_argument('--no-scale', action='store_true', help='skip the scale workload')
    parser.add_argument('--timeout', type=float, default=None, help='bound in seconds for one measurement')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT, help='JSON output; the table goes beside it (.md)')
    parser.add_argument(
        '--plot-dir', type=Path, default=None, help='where the PNG plots go (default: beside --out; needs matplotlib)'
    )
    parser.add_argument('--no-plot', action='store_true', help='no PNG plots')
    parser.add_argument(
        '--merge',
        action='store_true',
        help='add to the results already in --out: their records of the workloads run now are replaced',
    )
    parser.add_argument('--keep-rabbitmq', action='store_true', help='leave a RabbitMQ started here running')
    args = parser.parse_args(argv)
    only = [name for item in args.only for name in item.split(',') if name]
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        parser.error(f'unknown workload(s) {unknown}; choose from {ALL}')
    args.workloads = only or [name for name in ALL if not (name == 'scale' and args.no_scale)]
    if args.brokers is None:
        args.brokers = ','.join(name for name in BROKERS if name not in OPT_IN or args.baseline is not None)
    args.brokers = [b for b in args.brokers.split(',') if b]
    if 'aiida-zmq-baseline' in args.brokers and args.baseline is None:
        parser.error('aiida-zmq-baseline needs --baseline TREE')
    if args.baseline is not None:
        args.baseline = str(args.baseline.resolve())
        if not (Path(args.baseline) / 'aiida_zmq' / '__init__.py').exists():
            parser.error(f'--baseline {args.baseline} is not an aiida-zmq source tree (no aiida_zmq/__init__.py)')
    if set(args.brokers) - set(BROKERS):
        parser.error(f'unknown broker(s) {sorted(set(args.brokers) - set(BROKERS))}; choose from {list(BROKERS)}')
    args.reps = args.reps or (1 if args.quick else 3)
    args.scale = args.scale or (100_000 if args.quick else 1_000_000)
    return args


def measure(workload: str, broker: str, rep: int, fn: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """Run one measurement; a failure becomes a record with ``status='failed'`` and the reason."""
    t0 = time.monotonic()
    rec: dict[str, Any] = {'workload': workload, 'broker': broker, 'rep': rep, 'status': 'ok', 'metrics': {}}
    try:
        rec['metrics'] = fn()
    except procs.BenchError as exc:
        rec.update(status='failed', error=str(exc))
    except Exception as exc:
        rec.update(status='failed', error=f'{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}')
    rec['seconds'] = round(time.monotonic() - t0, 2)
    shown = ', '.join(f'{k}={v:,.1f}' for k, v in rec['metrics'].items()) or f'FAILED: {rec.get("error")}'
    print(f'  [{rep + 1}] {workload:14} {broker:15} {shown}  ({rec["seconds"]} s)', flush=True)
    return rec


def available_brokers(wanted: list[str], rmq: RabbitMQ) -> tuple[list[str], dict[str, str]]:
    """The wanted brokers that can run here, and why the others cannot."""
    skipped: dict[str, str] = {}
    if any(BROKERS[b][0] == 'aiida-zmq' for b in wanted):
        try:
            import aiida_zmq

            aiida_zmq.connect  # noqa: B018
        except (ImportError, AttributeError) as exc:
            skipped.update({b: f'aiida_zmq.connect unavailable: {exc}' for b in wanted if b.startswith('aiida-zmq')})
    if any(BROKERS[b][0] == 'rabbitmq' for b in wanted) and not rmq.ensure():
        skipped.update({b: rmq.skip_reason for b in wanted if BROKERS[b][0] == 'rabbitmq'})
    return [b for b in wanted if b not in skipped], skipped


def source_of(name: str, args: argparse.Namespace) -> str | None:
    """The source tree a broker variant runs from: the baseline's, else the installed one (``None``)."""
    return args.baseline if name == 'aiida-zmq-baseline' else None


def start_servers(
    brokers: list[str], root: Path, args: argparse.Namespace
) -> tuple[dict[str, str], dict[str, str], list[BrokerServer]]:
    """Fresh broker processes for one repetition: endpoints by broker name, start errors, servers to stop."""
    endpoints, errors, servers = {}, {}, []
    by_kind: dict[tuple[str, str | None, tuple[str, ...]], str | Exception] = {}
    for name in brokers:
        kind, source, options = BROKERS[name][0], source_of(name, args), SERVE_OPTIONS.get(name, ())
        if kind == 'rabbitmq':
            endpoints[name] = RabbitMQ().endpoint
            continue
        key = (kind, source, options)
        if key not in by_kind:
            server: BrokerServer = (
                AiidaZmqServer(root, source, options) if kind == 'aiida-zmq' else CoreZeromqServer(root)
            )
            servers.append(server)
            try:
                by_kind[key] = server.start()
            except Exception as exc:
                by_kind[key] = exc
        found = by_kind[key]
        if isinstance(found, Exception):
            errors[name] = f'{kind} did not start: {found}'
        else:
            endpoints[name] = found
    return endpoints, errors, servers


def run_all(args: argparse.Namespace, root: Path, rmq: RabbitMQ, result: dict[str, Any]) -> None:
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.timeout:
        sizes.timeout = args.timeout
    brokers, skipped = available_brokers(args.brokers, rmq)
    result.update(brokers=brokers, skipped=skipped)
    for name, reason in skipped.items():
        print(f'skipping {name}: {reason}', flush=True)
    broker_workloads = [w for w in args.workloads if w in WORKLOADS]
    records = result['records']
    for rep in range(args.reps):
        print(f'repetition {rep + 1} of {args.reps}', flush=True)
        order = brokers[rep % len(brokers) :] + brokers[: rep % len(brokers)] if brokers else []
        endpoints, errors, servers = start_servers(order, root, args) if broker_workloads else ({}, {}, [])
        try:
            for workload in broker_workloads:
                for name in order:
                    if name in errors:
                        records.append(measure(workload, name, rep, _raiser(errors[name])))
                        continue
                    spec = make_spec(name, endpoints[name], source_of(name, args))
                    records.append(measure(workload, name, rep, lambda w=workload, s=spec: WORKLOADS[w](s, sizes)))
        finally:
            for server in servers:
                server.stop()
        for floor in [w for w in args.workloads if w in FLOORS]:
            records.append(measure(floor, 'floor', rep, lambda f=floor: FLOORS[f](sizes)))
        if 'e2e' in args.workloads:
            # One AiiDA profile per broker kind, with the codec AiiDA gives it; its daemon starts its own broker.
            for name in [b for b in order if b in e2e.PROFILES]:
                run_e2e = lambda b=name: e2e.run(b, sizes.e2e_chains, sizes.e2e_parents, sizes.timeout)  # noqa: E731
                records.append(measure('e2e', name, rep, run_e2e))
        if 'control' in args.workloads:
            for name in [b for b in order if b in control.PROFILES]:
                # A bound for a command on many processes, not for one message: generous on a loaded machine.
                sizes_c = (sizes.control_parents, sizes.control_kills, max(sizes.timeout, 300.0))
                records.append(measure('control', name, rep, lambda b=name, c=sizes_c: control.run(b, *c)))
    if 'scale' in args.workloads:
        if 'aiida-zmq' in skipped or not any(b.startswith('aiida-zmq') for b in brokers):
            print('skipping scale: aiida-zmq is not available', flush=True)
        else:
            print(f'scale: {args.scale:,} tasks on aiida-zmq', flush=True)
            result['scale'] = measure('scale', 'aiida-zmq', 0, lambda: scale.run(root, args.scale, sizes.timeout))


def _raiser(message: str) -> Callable[[], dict[str, float]]:
    def fail() -> dict[str, float]:
        raise procs.BenchError(message)

    return fail


def write_outputs(args: argparse.Namespace, result: dict[str, Any]) -> str:
    summary = report.summarize(result['records'])
    result['summary'] = summary
    table = report.markdown(summary, result.get('brokers', []), args.reps)
    table += report.scale_markdown(result.get('scale') or {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + '\n')
    args.out.with_suffix('.md').write_text(table)
    if not args.no_plot:
        plot_dir = args.plot_dir or args.out.parent
        plot_dir.mkdir(parents=True, exist_ok=True)
        for path in report.plot(summary, result.get('brokers', []), plot_dir):
            print(f'wrote {path}')
    return table


def merge_into(previous: dict[str, Any], result: dict[str, Any], workloads: list[str]) -> None:
    """Keep the previous run's records of the workloads not run now (``--merge``); note both runs' settings."""
    kept = [rec for rec in previous.get('records', []) if rec['workload'] not in workloads]
    result['records'] = kept + result['records']
    result['brokers'] = previous.get('brokers') or result.get('brokers')
    if 'scale' not in workloads and previous.get('scale'):
        result['scale'] = previous['scale']
    result['merged_from'] = {'config': previous.get('config'), 'machine': previous.get('machine')}


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f'signal {signum}')


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix='azb-', dir='/tmp' if Path('/tmp').is_dir() else None))
    os.environ['AIIDA_PATH'] = str(root / 'aiida')  # no profile is used; keep AiiDA's config out of ~/.aiida
    signal.signal(signal.SIGTERM, _sigterm)
    rmq = RabbitMQ(keep=args.keep_rabbitmq)
    config = {**vars(args), 'out': str(args.out), 'loadavg_at_start': [round(x, 2) for x in os.getloadavg()]}
    result: dict[str, Any] = {'records': [], 'config': config, 'interrupted': False}
    try:
        run_all(args, root, rmq, result)
    except KeyboardInterrupt:
        result['interrupted'] = True
        print('interrupted: cleaning up and writing what was measured', flush=True)
    finally:
        procs.cleanup()
        result['machine'] = report.machine_facts(rmq.version() if 'rabbitmq' in str(result.get('brokers')) else '')
        rmq.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.merge and args.out.exists():
        merge_into(json.loads(args.out.read_text()), result, args.workloads)
    print()
    print(write_outputs(args, result))
    print(f'wrote {args.out} and {args.out.with_suffix(".md")}')
    return 130 if result['interrupted'] else 0


if __name__ == '__main__':
    sys.exit(main())
