"""Process helpers: spawned actors and broker subprocesses, every wait bounded, everything cleaned up."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import queue
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

CTX = multiprocessing.get_context('spawn')

_actors: list[multiprocessing.context.SpawnProcess] = []
_popens: list[subprocess.Popen[bytes]] = []


class BenchError(RuntimeError):
    """A measurement could not be completed (timeout, lost message, dead actor)."""


def start_actor(target: Callable[..., Any], *args: Any) -> multiprocessing.context.SpawnProcess:
    """Start ``target(*args)`` in a fresh spawned process and register it for cleanup."""
    proc = CTX.Process(target=target, args=args, daemon=True)
    proc.start()
    _actors.append(proc)
    return proc


def stop_actor(proc: multiprocessing.context.SpawnProcess, timeout: float = 5.0) -> None:
    """Join ``proc``; terminate, then kill it if it does not exit in time."""
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(2.0)
    if proc.is_alive():
        proc.kill()
        proc.join(2.0)
    if proc in _actors:
        _actors.remove(proc)


def popen(
    args: Sequence[str], log_path: str, env: dict[str, str] | None = None, cwd: str | None = None
) -> subprocess.Popen[bytes]:
    """Start a subprocess (its output to ``log_path``) and register it for cleanup."""
    with open(log_path, 'ab') as log:
        proc = subprocess.Popen(
            list(args), stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL, cwd=cwd
        )
    _popens.append(proc)
    return proc


def stop_popen(proc: subprocess.Popen[bytes], timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
    """Send ``sig``, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
    if proc in _popens:
        _popens.remove(proc)
    return proc.returncode


def cleanup() -> None:
    """Stop every actor and subprocess still registered (called on exit, error or interrupt)."""
    for proc in list(_actors):
        stop_actor(proc, timeout=0.5)
    for popen_ in list(_popens):
        stop_popen(popen_, timeout=5.0)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise :class:`BenchError` after ``timeout``."""
    # Imported here: an actor process may have a baseline tree first on sys.path, without this module.
    from aiida_zmq.waiting import wait_until as poll

    try:
        return poll(predicate, timeout, interval, what)
    except TimeoutError as exception:
        raise BenchError(str(exception)) from None


class Inbox:
    """Messages ``(kind, ...)`` from actors, read by kind with a bound; other kinds are kept for later.

    Actors report failures as ``('error', text)``, which raises :class:`BenchError`, as does a watched actor
    that died.
    """

    def __init__(self, q: Any, procs: Sequence[multiprocessing.context.SpawnProcess] = ()) -> None:
        self.q = q
        self.procs = list(procs)
        self._kept: list[tuple] = []

    def get(self, kind: str, timeout: float) -> tuple:
        """Return the next message of ``kind`` within ``timeout`` seconds."""
        for i, msg in enumerate(self._kept):
            if msg[0] == kind:
                return self._kept.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.q.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead and self.q.empty():
                    raise BenchError(f'actor died (exit code {dead[0].exitcode}) while waiting for {kind!r}')
                if time.monotonic() > deadline:
                    raise BenchError(f'timed out after {timeout:.0f} s waiting for {kind!r}')
                continue
            if msg[0] == 'error':
                raise BenchError(f'actor failed: {msg[1]}')
            if msg[0] == kind:
                return msg
            self._kept.append(msg)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for broker subprocesses: ours plus ``extra``."""
    env = dict(os.environ)
    env.update(extra)
    return env
