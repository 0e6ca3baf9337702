"""The task directory of ``core.zeromq``, aiida-core 2.9's own ZeroMQ broker: read it, and write tasks it will run.

What aiida-core 2.9.4 does (``aiida/brokers/zeromq/``), which is all this module relies on:

* a profile's broker lives in ``<AiiDA config dir>/broker/<profile uuid>-<profile name>/`` (``Config.filepaths``:
  ``broker_service.dir``), with ``broker.pid`` (``aiida-zeromq-broker <pid>``, or a bare pid from older releases),
  ``broker.status``, ``broker.sockets`` and ``broker.log`` while it runs;
* its one task queue is ``storage/tasks/`` there: a task is one JSON file ``<microseconds>_<task id>.json``, written to
  ``<same name>.tmp`` and renamed, in ``pending/`` while it waits and in ``processing/`` (renamed there) from the
  moment it is handed to a worker until the worker acknowledges it, which deletes it. The file holds ``{"id",
  "sender", "sender_identity", "body", "no_reply", "timestamp"}``; ``body`` is the task exactly as AiiDA sent it (no
  codec: JSON, UUIDs as strings), e.g. ``{"task": "continue", "args": {"pid": 5, "nowait": false, "tag": null}}``;
* at start-up the broker renames every file of ``processing/`` back to ``pending/`` (a task that was in processing is
  handed out again) and then serves ``pending/`` in file-name order, i.e. in order of submission. It reads only
  ``*.json`` files of those two directories;
* its broker runs only while the daemon runs (circus starts it as a watcher, ``verdi daemon broker``), and AiiDA takes
  it for running when the pid of ``broker.pid`` exists. Without it, AiiDA cannot submit at all: nothing writes to the
  directory while it is stopped.

So a stopped core.zeromq holds its tasks in ``pending/`` and ``processing/``, both to be run. This module lists and
reads them, retires a moved one by renaming it out of the broker's sight (into ``storage/tasks/moved-to-aiida-zmq/``,
an atomic step that a rerun of an interrupted move can see), and writes new ones the way the broker does. The order of
a move and its bookkeeping are in :mod:`aiida_zmq.core_zeromq_move`. No AiiDA import here: the CLI passes the
directory in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import typing as t
import uuid
from dataclasses import dataclass
from pathlib import Path

from .exceptions import CoreZeromqRunning
from .fsync import write_whole

__all__ = ('CoreZeromqDir', 'CoreZeromqRunning', 'TaskFile', 'encode_task', 'is_core_zeromq_broker')

PID_SENTINEL = 'aiida-zeromq-broker'
PENDING = 'pending'
PROCESSING = 'processing'
# Where a moved task's file goes before it is deleted: out of the broker's sight (it reads pending/ and processing/
# only), in the same file system (a rename), and where a rerun of an interrupted move finds it.
RETIRED = 'moved-to-aiida-zmq'
TASK_SUFFIX = '.json'
# Our own temporary files while writing a task for core.zeromq: dot-prefixed, never ``*.json``, so the broker never
# reads a partial one, and recognisably ours (a rerun removes them).
TEMP_PREFIX = '.aiida-zmq-'
TEMP_SUFFIX = '.tmp'
_NAME = re.compile(r'^(\d+)_(.+)\.json$')


@dataclass(frozen=True)
class TaskFile:
    """One task of core.zeromq: its file, its id (the file name after the timestamp) and where it is."""

    path: Path
    task_id: str
    state: str  # PENDING or PROCESSING

    @property
    def name(self) -> str:
        return self.path.name


def _uuid_as_text(value: t.Any) -> str:
    # What core.zeromq's own encoder does (``protocol._UUIDEncoder``); anything else its senders could not send either.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f'a {type(value).__name__} cannot travel through core.zeromq (JSON only)')


def encode_task(task_id: str, body: t.Any, timestamp: float, sender: str = 'aiida-zmq-migrate') -> bytes:
    """A task file's content as core.zeromq's broker writes it (``ZeromqBrokerServer._handle_task``).

    ``no_reply`` is true: nobody waits for the result of a moved task, and core.zeromq answers its senders when it
    stores a task anyway. :raises TypeError: for a body that is not JSON (core.zeromq carries JSON only).
    """
    task = {
        'id': task_id,
        'sender': sender,
        'sender_identity': sender.encode().hex(),
        'body': body,
        'no_reply': True,
        'timestamp': timestamp,
    }
    return json.dumps(task, default=_uuid_as_text).encode('utf-8')


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def is_core_zeromq_broker(cmdline: list[str]) -> bool:
    """Whether a process's command line is core.zeromq's broker: ``verdi [-p PROFILE] daemon broker`` (the daemon's
    circus watcher) or ``python -m aiida.brokers.zeromq.service`` (what that command runs)."""
    service = ('aiida.brokers.zeromq.service', '/aiida/brokers/zeromq/service.py')
    if any(argument == service[0] or argument.endswith(service[1]) for argument in cmdline):
        return True
    names = [os.path.basename(argument) for argument in cmdline]
    return 'verdi' in names and any(names[i : i + 2] == ['daemon', 'broker'] for i in range(len(names) - 1))


class CoreZeromqDir:
    """The broker directory of one profile on core.zeromq (``broker_service.dir``); see the module docstring."""

    def __init__(self, service_dir: str | os.PathLike[str], *, profile: str | None = None) -> None:
        """``profile``: the name of the AiiDA profile the directory belongs to, for the advice in messages."""
        self.service_dir = Path(service_dir)
        # What stops the daemon, and with it core.zeromq's broker (a watcher of its circus).
        self.stop_daemon = f'verdi -p {profile} daemon stop' if profile else 'verdi daemon stop'
        self.tasks_dir = self.service_dir / 'storage' / 'tasks'
        self.pending_dir = self.tasks_dir / PENDING
        self.processing_dir = self.tasks_dir / PROCESSING
        self.retired_dir = self.tasks_dir / RETIRED
        self.pid_file = self.service_dir / 'broker.pid'

    def __repr__(self) -> str:
        return f'<CoreZeromqDir {self.service_dir}>'

    # --- the broker --------------------------------------------------------------------------------------------------

    def broker_pid(self) -> int | None:
        """The pid of core.zeromq's broker if it runs, else ``None``.

        As AiiDA decides it (the pid of ``broker.pid`` exists and is no zombie), and also: that process is
        core.zeromq's broker (:func:`is_core_zeromq_broker`, from its command line). A broker killed with -9 leaves
        its pid file, and its pid goes to another process, which is not taken for the broker. File times decide
        nothing: a clock step makes a live broker's pid file look hours older than its process (issue 21.6). A process
        that cannot be inspected (another user's) counts as running: better to ask than to move tasks from under a
        live broker.
        """
        try:
            text = self.pid_file.read_text().strip()
        except OSError:
            return None
        try:
            pid = int(text.split()[-1]) if text.startswith(PID_SENTINEL) else int(text)
        except (ValueError, IndexError):
            return None
        import psutil

        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE or not is_core_zeromq_broker(process.cmdline()):
                return None
        except psutil.NoSuchProcess:
            return None
        except psutil.Error:
            return pid
        return pid

    def describe_broker(self, pid: int) -> str:
        """The command line of the broker process, for messages."""
        import psutil

        try:
            return ' '.join(psutil.Process(pid).cmdline()) or '?'
        except psutil.Error:
            return '?'

    def refuse_if_running(self) -> None:
        """:raises CoreZeromqRunning: when core.zeromq's broker runs, with what to do."""
        pid = self.broker_pid()
        if pid is not None:
            raise CoreZeromqRunning(
                f'the core.zeromq broker of {self.service_dir} is running (pid {pid}: {self.describe_broker(pid)}). '
                f'Stop the daemon first (`{self.stop_daemon}`); if the broker runs without it, stop it with '
                f'`kill {pid}`',
                pid,
            )

    # --- reading -----------------------------------------------------------------------------------------------------

    def _files(self, directory: Path, state: str) -> list[TaskFile]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                match = _NAME.match(entry.name)
                if match and entry.is_file(follow_symlinks=False):
                    found.append(TaskFile(Path(entry.path), match.group(2), state))
        return found

    def task_files(self) -> list[TaskFile]:
        """Every task core.zeromq would run: ``processing/`` and ``pending/``, in its order (by file name)."""
        files = self._files(self.processing_dir, PROCESSING) + self._files(self.pending_dir, PENDING)
        return sorted(files, key=lambda task_file: task_file.name)

    def index(self) -> dict[str, TaskFile]:
        """The task files by task id."""
        return {task_file.task_id: task_file for task_file in self.task_files()}

    def foreign_files(self) -> list[Path]:
        """Files in ``pending/`` and ``processing/`` that are no task core.zeromq reads: its own unfinished writes
        (``.tmp``, left by a broker that died while storing a task it never confirmed) and anything else."""
        names = set()
        for directory in (self.pending_dir, self.processing_dir):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(directory):
                    if not _NAME.match(entry.name) and not entry.name.startswith(TEMP_PREFIX):
                        names.add(Path(entry.path))
        return sorted(names)

    @staticmethod
    def read(task_file: TaskFile) -> dict[str, t.Any]:
        """The task's content. :raises ValueError: unreadable JSON or not a task; ``FileNotFoundError`` if gone."""
        data = json.loads(task_file.path.read_bytes())
        if not isinstance(data, dict) or 'body' not in data:
            raise ValueError('not a core.zeromq task (a JSON object with a body)')
        return data

    # --- retiring moved tasks ----------------------------------------------------------------------------------------

    def retire(self, task_file: TaskFile) -> Path:
        """Rename a moved task's file out of the broker's sight; return its new path.

        :raises FileNotFoundError: when the file is no longer there (the broker took it: it runs meanwhile).
        """
        self.retired_dir.mkdir(mode=0o700, exist_ok=True)
        retired = self.retired_dir / task_file.name
        os.rename(task_file.path, retired)
        return retired

    def retired_files(self) -> dict[str, Path]:
        """The retired files by task id (moved, not deleted yet: a move was interrupted between the two)."""
        return {task_file.task_id: task_file.path for task_file in self._files(self.retired_dir, RETIRED)}

    def tidy(self) -> None:
        """Remove the directory of retired files once it is empty (ours: a finished move leaves nothing behind)."""
        with contextlib.suppress(OSError):
            self.retired_dir.rmdir()

    def sync(self) -> None:
        """Make the renames and writes so far durable (the directories' entries)."""
        for directory in (self.pending_dir, self.processing_dir, self.retired_dir):
            if directory.is_dir():
                _fsync_dir(directory)

    # --- writing -----------------------------------------------------------------------------------------------------

    @staticmethod
    def file_name(task_id: str, timestamp: float) -> str:
        return f'{int(timestamp * 1_000_000)}_{task_id}{TASK_SUFFIX}'

    def write_pending(self, task_id: str, body: t.Any, timestamp: float) -> Path:
        """Write a task into ``pending/`` as the broker does: complete (and on disk) before it has its name.

        ``timestamp`` places it in the broker's order. :raises TypeError: for a body that is not JSON.
        """
        content = encode_task(task_id, body, timestamp)
        self.pending_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.processing_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.pending_dir / self.file_name(task_id, timestamp)
        temporary = self.pending_dir / f'{TEMP_PREFIX}{task_id}{TEMP_SUFFIX}'
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_whole(descriptor, content)  # whole, or OSError: a file cut short must never get its name
            os.fsync(descriptor)
        except BaseException:
            os.close(descriptor)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        os.close(descriptor)
        os.rename(temporary, path)  # the directory is synced (sync()) before the task is forgotten elsewhere
        return path

    def remove_temporary_files(self) -> int:
        """Remove our unfinished writes (a move killed while writing one); return how many."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.pending_dir):
                if entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed
