"""Watcher and log names: no two profiles, and no name of AiiDA's own, can share one (issue 15, point 2).

AiiDA names its workers' watcher ``aiida-<profile>`` (core.zeromq's broker ``aiida-<profile>-zmq-broker-service``) and
writes ``aiida-<profile>.log`` and ``circus-<profile>.log`` into the daemon log directory that every profile shares.
aiida-zmq 0.1 named its broker ``aiida-zmq-<profile>``: the broker of profile ``presto`` wrote into the log of AiiDA's
workers of profile ``zmq-presto``. The checks below run over tricky names and over any text hypothesis makes up, and
are shown to catch that old scheme.
"""

from __future__ import annotations

import itertools
import sys
import typing as t
from pathlib import Path

import circus.config
import pytest
from circusd_helpers import Arbiter, start_circusd, stop_circusd, wait_until_up
from hypothesis import given, settings
from hypothesis import strategies as st

from aiida_zmq.circus import (
    ROLES,
    LogRotation,
    WatcherSpec,
    attach_watcher,
    broker_watchers,
    legacy_watcher_name,
    log_file_name,
    parse_watcher_name,
    render_ini,
    sibling_watchers,
    watcher_name,
)

TRICKY = [
    'presto',
    'zmq-presto',
    'presto-zmq',
    'zmq',
    'a',
    'a-b',
    'a-b-c',
    'broker',
    'broker-presto',
    'events-presto',
    'presto-events',
    'presto-health',
    'zmq-broker-presto',
    'zmq-events-presto',
    'zmq-health-zmq-broker-presto',
    'aiida',
    'aiida-presto',
    'circus-presto',
    'presto-zmq-broker-service',
    'Presto',
    'PRESTO',
    'Présto',
    'プレスト',
    'my profile',
    'a.b',
    'a:b',
    '-',
    '--',
    'x-',
]

Naming = t.Callable[[str, str], str]


def aiida_names(profile: str) -> dict[str, set[str]]:
    """What aiida-core 2.9 names for a profile: watchers in its arbiter, files in the shared daemon log directory."""
    return {
        'watchers': {f'aiida-{profile}', f'aiida-{profile}-zmq-broker-service'},
        'logs': {f'aiida-{profile}.log', f'circus-{profile}.log'},
    }


def our_names(profile: str, naming: Naming) -> dict[str, set[str]]:
    watchers = {naming(profile, role) for role in ROLES}
    return {'watchers': watchers, 'logs': {name + '.log' for name in watchers}}


def collisions(profiles: t.Iterable[str], naming: Naming) -> list[str]:
    """Every way two names meet: ours of two profiles, ours and AiiDA's, or ours within one arbiter.

    Log files are compared as they are (case-sensitive file systems: AiiDA's own logs of ``A`` and ``a`` would meet
    on others); watcher names in one arbiter (one profile's daemon) without case, as circus compares them.
    """
    profiles = list(profiles)
    found = []
    for profile in profiles:
        ours = our_names(profile, naming)
        if len(ours['watchers']) != len(ROLES) or len({name.lower() for name in ours['watchers']}) != len(ROLES):
            found.append(f'{profile!r}: two roles share a watcher name')
        arbiter = {name.lower() for name in aiida_names(profile)['watchers']}
        if any(name.lower() in arbiter for name in ours['watchers']):
            found.append(f'{profile!r}: a watcher named like AiiDA`s in its own arbiter')
    for profile, other in itertools.product(profiles, repeat=2):
        ours, theirs = our_names(profile, naming), aiida_names(other)
        if ours['logs'] & theirs['logs']:
            found.append(f'log of {profile!r} = AiiDA`s log of {other!r}: {ours["logs"] & theirs["logs"]}')
        if ours['watchers'] & theirs['watchers']:
            found.append(f'watcher of {profile!r} = AiiDA`s watcher of {other!r}')
        if profile != other and ours['logs'] & our_names(other, naming)['logs']:
            found.append(f'log of {profile!r} = our log of {other!r}')
    return found


def old_naming(profile: str, role: str) -> str:
    return legacy_watcher_name(profile, role)


def test_the_old_names_collide() -> None:
    """The check catches what the issue found: the broker of `presto` writes the workers' log of `zmq-presto`."""
    found = collisions(TRICKY, old_naming)
    assert "log of 'presto' = AiiDA`s log of 'zmq-presto': {'aiida-zmq-presto.log'}" in found
    assert "log of 'presto' = our log of 'presto-events'" in found


def test_no_names_collide_over_tricky_profile_names() -> None:
    assert collisions(TRICKY, watcher_name) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=4, unique=True))
def test_no_names_collide_over_any_profile_names(profiles: list[str]) -> None:
    assert collisions(profiles, watcher_name) == []


@pytest.mark.parametrize('profile', TRICKY)
def test_a_name_says_its_role_and_profile(profile: str) -> None:
    """Names decode back to (role, profile): the proof that no two of ours can be equal."""
    for role in ROLES:
        assert parse_watcher_name(watcher_name(profile, role)) == (role, profile)
        assert log_file_name(profile, role) == watcher_name(profile, role) + '.log'
    assert parse_watcher_name(f'aiida-{profile}') is None
    assert sibling_watchers(watcher_name(profile)) == {watcher_name(profile, role).lower() for role in ROLES}


def test_the_presto_profile_name_does_not_read_like_a_watcher_name() -> None:
    """AiiDA's workers of the profile `aiida-zmq presto` creates are `aiida-<name>`: not `aiida-zmq-...` (issue 15)."""
    from aiida_zmq.cli.aiida import PRESTO_PREFIX

    for name in (PRESTO_PREFIX, f'{PRESTO_PREFIX}-1'):
        assert not f'aiida-{name}'.startswith('aiida-zmq')
        assert not name.startswith('zmq')
        assert parse_watcher_name(name) is None


def test_broker_watchers_use_the_names(tmp_path: Path) -> None:
    specs = broker_watchers(
        'zmq-presto', str(tmp_path), controller='ipc:///c.sock', pubsub='ipc:///p.sock', log_dir=str(tmp_path / 'log')
    )
    assert [spec.name for spec in specs] == ['zmq-broker-zmq-presto', 'zmq-events-zmq-presto', 'zmq-health-zmq-presto']
    assert [Path(spec.log_file or '').name for spec in specs] == [spec.name + '.log' for spec in specs]
    assert [spec.replaces for spec in specs] == [
        ['aiida-zmq-zmq-presto'],
        ['aiida-zmq-zmq-presto-events'],
        ['aiida-zmq-zmq-presto-health'],
    ]
    assert 'broker_watcher:zmq-broker-zmq-presto' in specs[2].cmd


def test_rendered_ini_keeps_tricky_names(tmp_path: Path) -> None:
    """circus's own configuration reader gets every watcher back under its name, with its log and rotation."""
    profiles = [name for name in TRICKY if name.strip() == name and not name.endswith(':')]
    specs = [
        spec
        for profile in profiles
        for spec in broker_watchers(
            profile, str(tmp_path / 'data'), controller='ipc:///c.sock', pubsub='ipc:///p.sock', log_dir=str(tmp_path)
        )
    ]
    # circus compares names without case: one arbiter holds only one of `presto`, `Presto`, `PRESTO`.
    unique = {spec.name.lower(): spec for spec in specs}
    ini = tmp_path / 'all.ini'
    ini.write_text(render_ini(list(unique.values()), controller='ipc:///c.sock', pubsub='ipc:///p.sock'))
    watchers = {watcher['name']: watcher for watcher in circus.config.get_config(str(ini))['watchers']}
    assert set(watchers) == {spec.name for spec in unique.values()}
    for spec in unique.values():
        streams = watchers[spec.name]
        assert streams['stderr_stream']['filename'] == streams['stdout_stream']['filename'] == spec.log_file


def test_a_profile_name_circus_cannot_carry_is_refused() -> None:
    with pytest.raises(ValueError, match='rename the profile'):
        broker_watchers('x:', '/data', controller='ipc:///c.sock', pubsub='ipc:///p.sock', log_dir=None)


# A daemon started by aiida-zmq 0.1 ----------------------------------------------------------------------------------

HOLDER = [sys.executable, '-c', 'import time, aiida_zmq; time.sleep(600)']


def test_attach_replaces_the_watchers_of_the_previous_release(arbiter: Arbiter, tmp_path: Path) -> None:
    """Watchers named by 0.1 on the same data directory go; a watcher of that name that is not ours stays."""
    data_dir = str(tmp_path / 'data')
    Path(data_dir).mkdir()
    legacy = WatcherSpec(legacy_watcher_name('p'), HOLDER, working_dir=data_dir)
    foreign = WatcherSpec(legacy_watcher_name('q'), HOLDER, working_dir=str(tmp_path))  # another directory
    for spec in (legacy, foreign):
        assert attach_watcher(arbiter.controller, spec) == 'added'
    arbiter.wait_for(lambda: len(arbiter.pids(legacy.name)) == 1, what='the legacy watcher')

    new = WatcherSpec(watcher_name('p'), HOLDER, working_dir=data_dir, replaces=[legacy.name, foreign.name])
    assert attach_watcher(arbiter.controller, new, timeout=30) == 'added'

    names = set(arbiter.call('list')['watchers'])  # type: ignore[arg-type]
    assert legacy.name not in names
    assert {new.name, foreign.name} <= names
    assert attach_watcher(arbiter.controller, new) == 'exists'  # idempotent once replaced


# Log rotation (issue 14, item 4) ------------------------------------------------------------------------------------

# Fills a rotating log from stderr, then, once circus has written it all, prints a line to stdout.
CHATTY = """\
import os, sys, time
log = sys.argv[1]
for i in range(400):
    print(f"stderr line {i:04d} " + "x" * 80, file=sys.stderr, flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if os.path.exists(log) and "line 0399" in open(log, errors="replace").read():
        break
    time.sleep(0.05)
print("stdout after the rotation", flush=True)
time.sleep(600)
"""
ROTATION = LogRotation(max_bytes=8192, backup_count=2)


def chatty(directory: Path, log: Path) -> WatcherSpec:
    script = directory / 'chatty.py'
    script.write_text(CHATTY)
    return WatcherSpec(
        'zmq-broker-chatty', [sys.executable, str(script), str(log)], log_file=str(log), rotation=ROTATION
    )


def assert_rotated(arbiter: Arbiter, log: Path) -> None:
    """The log rotated, kept two old files, and the other stream writes into the current file after a rotation.

    The watcher prints to stdout once circus wrote its last stderr line to the current file, which by then was
    rotated several times: the stdout stream's own file is long renamed (or deleted), yet the line is in ``log``.
    """
    arbiter.wait_for(
        lambda: log.exists() and 'stdout after the rotation' in log.read_text(), 60, what='the line after the rotation'
    )
    assert Path(f'{log}.1').exists() and Path(f'{log}.2').exists()
    assert not Path(f'{log}.3').exists()  # backup_count 2: the oldest are gone
    for path in (log, Path(f'{log}.1'), Path(f'{log}.2')):
        assert path.stat().st_size <= ROTATION.max_bytes + 200, path  # a file ends at the line that fills it


def test_attached_watcher_log_rotates(arbiter: Arbiter, tmp_path: Path) -> None:
    log = tmp_path / 'attached.log'
    assert attach_watcher(arbiter.controller, chatty(tmp_path, log)) == 'added'
    assert_rotated(arbiter, log)


def test_rendered_watcher_log_rotates(tmp_path: Path) -> None:
    sockets = Path('/tmp') / f'azn-{tmp_path.name[-20:]}'
    sockets.mkdir(mode=0o700)
    controller = f'ipc://{sockets}/c.sock'
    log = tmp_path / 'rendered.log'
    process = start_circusd(
        tmp_path, render_ini([chatty(tmp_path, log)], controller=controller, pubsub=f'ipc://{sockets}/p.sock')
    )
    try:
        wait_until_up(controller, process)
        assert_rotated(Arbiter(process=process, controller=controller, workdir=tmp_path), log)
    finally:
        stop_circusd(process, controller)
        for path in sockets.iterdir():
            path.unlink()
        sockets.rmdir()


def test_the_broker_and_plugin_logs_rotate_on_the_stream_they_log_to(tmp_path: Path) -> None:
    broker, events, health = broker_watchers(
        'p', str(tmp_path), controller='ipc:///c.sock', pubsub='ipc:///p.sock', log_dir=str(tmp_path)
    )
    for spec, logging_stream in ((broker, 'stderr'), (events, 'stdout'), (health, 'stdout')):
        options = spec.options()
        other = 'stdout' if logging_stream == 'stderr' else 'stderr'
        assert options[f'{logging_stream}_stream']['class'] == 'FileStream'
        assert options[f'{logging_stream}_stream']['max_bytes'] == LogRotation().max_bytes > 0
        assert options[f'{logging_stream}_stream']['backup_count'] == LogRotation().backup_count > 0
        assert options[f'{other}_stream']['class'] == 'WatchedFileStream'
