"""Where the time goes per task: the ``tasks`` workload on aiida-zmq with py-spy attached to every process.

    python -m bench.profile [--tasks 20000] [--no-reply] [--rate 200] [--out DIR]

Starts a broker, a consumer and a producer (as ``bench.run`` does), samples each with ``py-spy record`` (all threads,
native frames off, idle off, so samples are CPU time) while the producer sends, and prints, per process, the
functions with the most samples (self and inclusive), plus CPU seconds per task of each process. py-spy is not a
dependency: ``pip install py-spy``. Collapsed stacks are kept in ``--out`` (flamegraph.pl or speedscope read them).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import actors, procs
from bench.clients import ClientSpec
from bench.servers import AiidaZmqServer
from bench.workloads import session


def _pyspy() -> str:
    found = shutil.which('py-spy') or str(Path(sys.executable).parent / 'py-spy')
    if not Path(found).exists():
        raise SystemExit('py-spy not found: pip install py-spy')
    return found


def summarize(path: Path, top: int) -> str:
    """Top self and inclusive functions of a collapsed-stack file (``frame;frame;... count`` per line)."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(' ')
        if not stack:
            continue
        count = int(count_text)
        frames = [f for f in stack.split(';') if not f.startswith(('process ', 'thread '))]
        total += count
        if frames:
            self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    lines = [f'  {total} samples']
    lines += ['  self:'] + [f'    {100 * c / total:5.1f}%  {f}' for f, c in self_counts.most_common(top)]
    lines += ['  inclusive:'] + [f'    {100 * c / total:5.1f}%  {f}' for f, c in incl_counts.most_common(top)]
    return '\n'.join(lines)


def _cpu_split(pid: int) -> tuple[float, float, int]:
    import psutil

    times = psutil.Process(pid).cpu_times()
    switches = 0
    for status in Path(f'/proc/{pid}/task').glob('*/status'):  # every thread, libzmq's I/O threads included
        for line in status.read_text().splitlines():
            if line.endswith('ctxt_switches:') or 'ctxt_switches:' in line:
                switches += int(line.split(':')[1])
    return times.user, times.system, switches


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system  # user and kernel: context switches and syscalls are kernel time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bench.profile', description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', type=int, default=20000)
    parser.add_argument('--no-reply', action='store_true')
    parser.add_argument('--codec', default='default', choices=['default', 'aiida', 'json'])
    parser.add_argument('--rate', type=int, default=250, help='py-spy samples per second')
    parser.add_argument('--top', type=int, default=25)
    parser.add_argument('--out', type=Path, default=None, help='keep the collapsed stacks here')
    parser.add_argument('--native', dest='spy_args', action='append_const', const='--native', default=[],
                        help='py-spy --native: C frames too (where inside pyzmq and SQLite)')  # fmt: skip
    parser.add_argument('--no-spy', action='store_true', help='only CPU seconds per process, no sampling')
    args = parser.parse_args(argv)
    pyspy = '' if args.no_spy else _pyspy()
    root = Path(tempfile.mkdtemp(prefix='azp-'))
    out = args.out or root / 'profile'
    out.mkdir(parents=True, exist_ok=True)
    server = AiidaZmqServer(root)
    spies: list[tuple[str, subprocess.Popen[bytes], Path, int]] = []
    try:
        endpoint = server.start()
        spec = ClientSpec(kind='aiida-zmq', endpoint=endpoint, codec=args.codec).with_fresh_queue()
        run, n = uuid.uuid4().hex[:12], args.tasks
        with session() as (inbox, _stop):
            inbox.procs.append(procs.start_actor(actors.task_consumer, spec, inbox.q, _stop, run, n, 600.0))
            inbox.get('ready', 60)
            producer = procs.start_actor(actors.task_producer, spec, inbox.q, _stop, run, n, 1024, args.no_reply, 600.0)
            inbox.procs.append(producer)
            pids = {'broker': server.pid(), 'consumer': inbox.procs[0].pid, 'producer': producer.pid}
            cpu0 = {name: _cpu_seconds(pid) for name, pid in pids.items()}
            split0 = {name: _cpu_split(pid) for name, pid in pids.items()}
            for name, pid in pids.items() if pyspy else ():
                path = out / f'{name}.txt'
                cmd = [pyspy, 'record', '--pid', str(pid), '--format', 'raw', '--rate', str(args.rate), *args.spy_args]
                cmd += ['--output', str(path), '--nonblocking']
                spies.append(
                    (name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path, pid)
                )
            _, t0, _t_sent, t_end, answered, n_errors, errors = inbox.get('sent', 600)
            t_done = inbox.get('done', 600)[1]
            cpu1 = {name: _cpu_seconds(pid) for name, pid in pids.items()}
            split1 = {name: _cpu_split(pid) for name, pid in pids.items()}
            elapsed = max(t_end, t_done) - t0
            for _name, spy, _path, _pid in spies:
                spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            for _name, spy, _path, _pid in spies:
                spy.wait(60)
        print(f'{n} tasks ({"no_reply" if args.no_reply else "with replies"}, codec {args.codec}) in {elapsed:.2f} s: '
              f'{n / elapsed:,.0f} tasks/s; {answered} answered, {n_errors} errors {errors}')  # fmt: skip
        for name in pids:
            cpu = cpu1[name] - cpu0[name]
            user, system, switches = (b - a for a, b in zip(split0[name], split1[name], strict=True))
            print(
                f'\n{name}: {cpu:.2f} CPU s, {1e6 * cpu / n:,.0f} CPU us per task ({1e6 * user / n:,.0f} user, '
                f'{1e6 * system / n:,.0f} kernel), {switches / n:.1f} context switches per task'
            )
            path = out / f'{name}.txt'
            if pyspy and path.exists():
                print(summarize(path, args.top))
            elif pyspy:
                print('  (no py-spy output)')
        print(f'\ncollapsed stacks in {out}')
    finally:
        for _name, spy, _path, _pid in spies:
            if spy.poll() is None:
                spy.kill()
        server.stop()
        procs.cleanup()
        if args.out is None:
            time.sleep(0)
    return 0


if __name__ == '__main__':
    sys.exit(main())
