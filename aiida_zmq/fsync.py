"""Making a file's content and name survive a power cut, not only a crash (one home for the rule).

A crash of a process leaves what it wrote in the kernel's page cache; a power cut loses whatever was not synced: a file
written then renamed into place may come back empty, a new file's name may be gone. So a file that must outlast a
power cut is written in full to a temporary file, synced, renamed into place, and its directory synced.
"""

from __future__ import annotations

import os

__all__ = ('sync_directory', 'write_synced', 'write_whole')


def sync_directory(path: str | os.PathLike[str]) -> None:
    """Sync a directory, so that the names made, renamed or removed in it survive a power cut."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_whole(descriptor: int, data: bytes) -> None:
    """Write all of ``data``: ``os.write`` may write less than it was given, without an error (a full disk does,
    before the next write raises ``ENOSPC``).

    :raises OSError: when it cannot be written whole.
    """
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def write_synced(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a power cut leaves the old content or the new one, never a mix or an
    empty file.

    :raises OSError: when it cannot be written whole (a full disk: ``ENOSPC``); the old file is then left as it was.
    """
    path = os.fspath(path)
    tmp = f'{path}.tmp'
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, 'O_CLOEXEC', 0), mode)
    try:
        write_whole(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(tmp, path)
    sync_directory(os.path.dirname(path) or '.')
