"""tests/run.sh stops the RabbitMQ it started, and only that one, however it ends (issue 15, point 5).

The RabbitMQ part lives in tests/rabbitmq.sh, which run.sh sources. Here it runs with stand-ins for
``rabbitmq-server`` and ``rabbitmqctl`` first on ``PATH`` (a TCP listener on a free port, and its stop), so that the
test takes a second and never touches a real RabbitMQ that others on the machine may use.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aiida_zmq.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent
LISTENER = textwrap.dedent(
    """\
    import socket, sys, time
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(('127.0.0.1', int(sys.argv[1])))
    server.listen()
    time.sleep(600)
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(('127.0.0.1', port)) == 0


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    """``rabbitmq-server -detached`` starts a listener in the background; ``rabbitmqctl [-n NODE] stop`` ends it."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (tmp_path / 'listener.py').write_text(LISTENER)
    server = bin_dir / 'rabbitmq-server'
    server.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo "start $*" >> {tmp_path}/calls
            setsid {sys.executable} {tmp_path}/listener.py "$RABBITMQ_NODE_PORT" </dev/null >/dev/null 2>&1 &
            echo $! > {tmp_path}/server.pid
            """
        )
    )
    control = bin_dir / 'rabbitmqctl'
    control.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo "ctl $*" >> {tmp_path}/calls
            kill "$(cat {tmp_path}/server.pid)"
            """
        )
    )
    for path in (server, control):
        path.chmod(0o755)
    return tmp_path


def script(stubs: Path, port: int, body: str, **env: str) -> subprocess.Popen[str]:
    """Run ``body`` after sourcing tests/rabbitmq.sh as run.sh does (its traps included), with the stand-ins."""
    text = (
        'set -euo pipefail\n'
        '. tests/rabbitmq.sh\n'
        'trap rabbitmq_stop EXIT\n'
        "trap 'exit 130' INT\n"
        "trap 'exit 143' TERM\n"
        f'{body}\n'
    )
    environment = {**os.environ, 'PATH': f'{stubs / "bin"}:{os.environ["PATH"]}', 'RABBITMQ_NODE_PORT': str(port)}
    environment.pop('AIIDA_ZMQ_NO_RABBITMQ', None)
    return subprocess.Popen(
        ['bash', '-c', text],
        cwd=ROOT,
        env={**environment, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def calls(stubs: Path) -> list[str]:
    path = stubs / 'calls'
    return path.read_text().splitlines() if path.exists() else []


def test_run_sh_uses_rabbitmq_sh() -> None:
    text = (ROOT / 'tests' / 'run.sh').read_text()
    trap = "trap 'rabbitmq_stop; temproot_remove' EXIT"  # one EXIT trap: a second would replace the first
    assert '. tests/rabbitmq.sh\n' in text and text.count('EXIT') == 1 and trap in text
    assert text.index('. tests/rabbitmq.sh') < text.index(trap) < text.index('rabbitmq_start') < text.index('pytest')


def test_the_rabbitmq_it_started_is_stopped_when_the_tests_fail(stubs: Path) -> None:
    port = free_port()
    process = script(stubs, port, 'rabbitmq_start\nrabbitmq_listening\necho up\nfalse  # the tests fail')
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert 'up' in output and 'stopping the RabbitMQ these tests started' in output
    assert calls(stubs) == ['start -detached', 'ctl stop']
    wait_until(lambda: not listening(port), timeout=10, what='the stand-in RabbitMQ to stop')


def test_the_rabbitmq_it_started_is_stopped_when_the_tests_pass(stubs: Path) -> None:
    port = free_port()
    process = script(stubs, port, 'rabbitmq_start\nrabbitmq_listening', RABBITMQ_NODENAME='second@localhost')
    process.communicate(timeout=120)
    assert process.returncode == 0
    assert calls(stubs) == ['start -detached', 'ctl -n second@localhost stop']
    wait_until(lambda: not listening(port), timeout=10, what='the stand-in RabbitMQ to stop')


def test_the_rabbitmq_it_started_is_stopped_on_sigterm(stubs: Path) -> None:
    port = free_port()
    process = script(stubs, port, 'rabbitmq_start\necho up\nread -r _ || true  # the tests run, until SIGTERM')
    assert process.stdout is not None
    wait_until(lambda: 'up' in process.stdout.readline(), timeout=60, what='the script to start RabbitMQ')
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 143
    assert calls(stubs) == ['start -detached', 'ctl stop']
    wait_until(lambda: not listening(port), timeout=10, what='the stand-in RabbitMQ to stop')


def test_a_rabbitmq_that_was_running_is_left_alone(stubs: Path) -> None:
    port = free_port()
    (stubs / 'listener.py').write_text(LISTENER)
    running = subprocess.Popen([sys.executable, str(stubs / 'listener.py'), str(port)])
    try:
        wait_until(lambda: listening(port), timeout=10, what='the RabbitMQ that runs already')
        process = script(stubs, port, 'rabbitmq_start\nfalse')
        process.communicate(timeout=60)
        assert process.returncode == 1
        assert calls(stubs) == []  # neither started nor stopped
        assert listening(port) and running.poll() is None
    finally:
        running.kill()
        running.wait(10)
