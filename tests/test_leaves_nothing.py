"""A test run leaves nothing outside the clone (issue 22, item 3).

Two checks. The tests that made short private directories with ``mkdtemp`` (the public fixture
``zmq_broker_factory``, the in-process ``LiveBroker``, the fuzzing rig and its fake broker) run in a pytest of their
own whose TMPDIR and HOME are empty directories of this test: both must be empty again when it ends (pytest's own
basetemp is put elsewhere). And ``tests/temproot.sh``, which ``tests/run.sh`` sources to give the whole run one
temporary root, finds what a run left (in that root, and new in ``$HOME``) and fails on it; then removes the root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# One test each of what made private temporary directories (their fixtures' teardown must remove them).
LEAKERS = [
    'tests/test_rpc.py::test_rpc_identifier_is_unique_across_clients',  # zmq_broker_factory (aiida_zmq.testing)
    'tests/test_hostile_clients.py::test_a_command_with_extra_frames_is_answered_malformed',  # LiveBroker
    'tests/test_fuzz.py::test_frames_past_zeromq_limit_drop_only_that_connection',  # the fuzzing rig
    'tests/test_fuzz.py::test_communicator_survives_garbage_from_its_broker',  # the fake broker
    'tests/test_kiwipy_conformance.py::TestZmqCommunicator::test_rpc_send_receive',  # its class broker
]


def _entries(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.iterdir())


def test_tests_that_make_private_temporary_directories_remove_them(tmp_path: Path) -> None:
    # Not in tmp_path (under xdist too deep for the unix sockets the brokers bind in there, ~100 bytes at most).
    short = Path(tempfile.mkdtemp(prefix='azln-'))
    try:
        _run_leakers(short / 't', short / 'h', tmp_path)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _run_leakers(temp: Path, home: Path, tmp_path: Path) -> None:
    temp.mkdir()
    home.mkdir()
    env = {**os.environ, 'TMPDIR': str(temp), 'HOME': str(home)}
    command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist']
    command += ['--basetemp', str(tmp_path / 'basetemp'), *LEAKERS]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f'{len(LEAKERS)} passed' in result.stdout, result.stdout[-3000:]
    assert _entries(temp) == [], f'left in TMPDIR: {_entries(temp)}'
    assert _entries(home) == [], f'left in HOME: {_entries(home)}'


def _temproot(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    home = tmp_path / 'home'
    home.mkdir(exist_ok=True)
    (home / 'already-there').touch()
    script = f'set -eu\n. tests/temproot.sh\ntemproot_start\n{body}\n'
    env = {**os.environ, 'HOME': str(home), 'TMPDIR': str(tmp_path)}
    return subprocess.run(
        ['bash', '-c', script], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )


def test_the_run_root_check_passes_on_a_clean_run_and_removes_the_root(tmp_path: Path) -> None:
    result = _temproot(
        tmp_path,
        'mkdir -p "$TMPDIR/pytest-of-$(id -un)/pytest-0" "$IPYTHONDIR" "$TMPDIR/aiida-zmq-$(id -u)"; root=$TMPDIR\n'
        # aiida-core's DaemonClient leaves these (circus sockets only): not the tests'
        'mkdir "$TMPDIR/tmpab12cd34"; touch "$TMPDIR/tmpab12cd34/circus.c.sock" "$TMPDIR/tmpab12cd34/circus.p.sock"\n'
        'temproot_check; temproot_remove; test ! -e "$root" && echo removed',
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'left behind: nothing' in result.stdout and 'removed' in result.stdout, result.stdout


def test_the_run_root_check_names_what_a_run_left_and_fails(tmp_path: Path) -> None:
    result = _temproot(
        tmp_path,
        'mkdir "$TMPDIR/azmq-x1" "$TMPDIR/tmpzz" "$TMPDIR/aiida-zmq-$(id -u)"; touch "$HOME/.ipython-like"\n'
        'touch "$TMPDIR/tmpzz/circus.c.sock" "$TMPDIR/tmpzz/calc.out" "$TMPDIR/aiida-zmq-$(id -u)/b.sock"\n'
        'root=$TMPDIR\n'
        'if temproot_check; then echo passed; else echo failed; fi; temproot_remove; test ! -e "$root"',
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'failed' in result.stdout, result.stdout
    assert 'in $TMPDIR:' in result.stderr and 'azmq-x1' in result.stderr, result.stderr
    assert 'tmpzz' in result.stderr and 'aiida-zmq-' in result.stderr, result.stderr
    assert 'in $HOME: .ipython-like' in result.stderr and 'already-there' not in result.stderr, result.stderr
