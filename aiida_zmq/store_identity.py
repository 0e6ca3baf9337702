"""Is the store the one the broker left? An identity and a high-water mark kept beside it.

SQLite opens a store truncated to 0 bytes as an empty store, and a store whose ``-wal`` file was deleted after a
kill -9 as the store of the last checkpoint: both start without a word, the tasks they lost are gone. So the broker
gives its store a random identity (a row inside the file) and keeps, beside the file, a record of that identity and
of the highest task id it committed (``tasks.sqlite3.identity``)::

    aiida-zmq store 1 <identity: 32 hex digits> <high-water mark: 20 digits>

The record is written whole once per start (a new file, synced, renamed into place, its directory synced: a power cut
leaves the old record or the new one, never an empty one), then rewritten in place (one ``pwrite``, fixed length) after
a commit that stored new tasks, before their confirms go out: a commit of acks or deliveries costs nothing, a batch of
new tasks one system call. The broker does not sync those updates: its commits are synced (unless ``--no-fsync``), so a
record that a power cut sets back only lags. Offline writers (``submit_offline``, the stopped store of the admin
commands and moves) sync it after every commit: each of them commits once or a few times. At start the broker refuses a
store whose identity is missing or different, or whose highest task id is below the mark: some confirmed tasks are not
in it. What to do is in the message: restore the file, or accept it as it is with ``aiida-zmq accept-store --data-dir
DIR``.

The record can lag behind the file (a kill -9 between the commit and the write), never run ahead of it: a lagging
record only makes the check weaker for that one batch. Moving ``tasks.sqlite3*`` aside (the documented way to start
from an empty store) moves the record with it. This module imports nothing from AiiDA.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import typing as t
from collections.abc import Callable
from pathlib import Path

from .exceptions import StoreError, StoreReplaced
from .fsync import write_synced
from .ratelimit import RateLimitedLog

__all__ = ('IDENTITY_FILENAME', 'STORE_FILENAME', 'IdentifiedStore', 'StoreIdentity')

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)

STORE_FILENAME = 'tasks.sqlite3'  # the broker's task store (:class:`aiida_zmq.store.TaskStore`) in its data directory
IDENTITY_FILENAME = STORE_FILENAME + '.identity'
_FORMAT = 'aiida-zmq store 1 {identity} {high_water:020d}\n'
_PATTERN = re.compile(r'aiida-zmq store 1 ([0-9a-f]{32}) (\d{20})\n')


class IdentifiedStore(t.Protocol):
    """What the record needs of the store (:class:`aiida_zmq.store.TaskStore`, which builds on this module)."""

    high_water: int
    after_commit: Callable[[t.Any], None] | None

    def identity(self) -> str | None: ...

    def set_identity(self, identity: str) -> None: ...

    def sequence(self) -> int: ...


class StoreIdentity:
    """The identity record of the store in ``data_dir``, kept up to date by the broker that holds the store."""

    def __init__(self, data_dir: str | os.PathLike[str], *, sync: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / IDENTITY_FILENAME
        self.identity: str | None = None
        self.high_water = 0
        # Offline writers (a few commits each): every update synced, no descriptor kept open. The broker's updates
        # are not synced (its commits are), and it keeps the record open. The whole record is always synced.
        self.sync = sync
        self._fd: int | None = None

    def read(self) -> bool:
        """Load the record; ``False`` when there is none (a store the broker never served, or an older release).

        :raises StoreReplaced: when the record is there but unreadable.
        """
        try:
            text = self.path.read_text(encoding='ascii', errors='replace')
        except FileNotFoundError:
            return False
        except OSError as exception:
            raise StoreError(f'cannot read {self.path}: {exception}') from exception
        match = _PATTERN.fullmatch(text)
        if match is None:
            raise StoreReplaced(
                f'{self.path} is damaged, so whether {self.data_dir / STORE_FILENAME} is the store the broker left '
                f'cannot be told. {self._accept_hint()}'
            )
        self.identity, self.high_water = match.group(1), int(match.group(2))
        return True

    def check_before_open(self) -> None:
        """Refuse when the record exists but the store file does not (opening would create an empty one)."""
        if self.read() and not (self.data_dir / STORE_FILENAME).exists():
            raise StoreReplaced(
                f'{self.data_dir / STORE_FILENAME} is missing, but {self.path} says the broker left a store there '
                f'with tasks up to id {self.high_water}. Put the file back, or, to start with an empty store, '
                f'{self._accept_hint(lower=True)}'
            )

    def verify_and_adopt(self, store: IdentifiedStore) -> None:
        """Refuse ``store`` if it is not the one the record describes; otherwise hold the record and keep it up to
        date after every commit of ``store`` (:attr:`TaskStore.after_commit`).

        :raises StoreReplaced: with what happened and how to accept the store as it is.
        """
        found = store.identity()
        sequence = store.sequence()
        store_path = self.data_dir / STORE_FILENAME
        if self.identity is not None:
            if found is None:
                size = store_path.stat().st_size
                raise StoreReplaced(
                    f'{store_path} is not the store the broker left: it has no identity ({size} bytes now; was it '
                    f'emptied or truncated, or replaced by a new file?), and the broker had stored tasks up to id '
                    f'{self.high_water} in it. Restore it from a copy if you have one. {self._accept_hint()}'
                )
            if found != self.identity:
                raise StoreReplaced(
                    f'{store_path} is another store than the one the broker left (identity {found}, expected '
                    f'{self.identity}): a file copied over it? Put the right file back. {self._accept_hint()}'
                )
            if sequence < self.high_water:
                raise StoreReplaced(
                    f'{store_path} ends at task id {sequence}, but the broker had confirmed tasks up to id '
                    f'{self.high_water}: its last transactions are missing (its -wal file deleted or damaged after a '
                    f'crash, an older copy put back, or a power loss without --fsync?), and with them up to '
                    f'{self.high_water - sequence} confirmed task(s). Restore the -wal file if you still can. '
                    f'{self._accept_hint()}'
                )
        elif found is not None:
            LOGGER.info('%s has no identity record (deleted?): writing it again for store %s', store_path, found)
        if found is None:
            found = secrets.token_hex(16)
            store.set_identity(found)
        self.identity = found
        self.high_water = max(sequence, store.high_water)
        self._open_record()
        store.after_commit = self.committed

    def committed(self, store: IdentifiedStore) -> None:
        """After a commit: record a higher high-water mark, in place (the record has a fixed length)."""
        if store.high_water <= self.high_water or self.identity is None:
            return
        self.high_water = store.high_water
        try:
            if self._fd is not None:
                os.pwrite(self._fd, self._record(), 0)
            else:  # an offline writer keeps no descriptor open (nothing to close), and syncs the update
                fd = os.open(self.path, os.O_WRONLY | getattr(os, 'O_CLOEXEC', 0))
                try:
                    os.pwrite(fd, self._record(), 0)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except OSError as exception:
            # The store committed; only the check at the next start is weaker. Say so, without repeating it.
            LIMITED.error('cannot update %s: %s', self.path, exception, key=('identity-write', str(self.path)))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _record(self) -> bytes:
        assert self.identity is not None
        return _FORMAT.format(identity=self.identity, high_water=self.high_water).encode('ascii')

    def _open_record(self) -> None:
        """Write the record whole (a new file, synced, renamed into place, the directory synced), then keep it open
        for the updates in place (the broker). Unsynced, a power cut would leave an empty record: "damaged", a false
        alarm."""
        self.close()
        try:
            write_synced(self.path, self._record())
        except OSError as exception:
            raise StoreError(f'cannot write {self.path}: {exception}') from exception
        if not self.sync:
            self._fd = os.open(self.path, os.O_WRONLY | getattr(os, 'O_CLOEXEC', 0))

    def _accept_hint(self, lower: bool = False) -> str:
        text = (
            f'To accept the store as it is (what is lost stays lost), run `aiida-zmq accept-store --data-dir '
            f'{self.data_dir}`, then start the broker again'
        )
        return text[0].lower() + text[1:] if lower else text
