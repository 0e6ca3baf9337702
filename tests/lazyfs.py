"""LazyFS for tests: a FUSE file system that keeps unsynced writes in its own cache and drops them on command, as a
power cut does (../shared/tools/lazyfs/README.md). A kill -9 leaves the kernel's page cache intact; this does not.

Needs root, ``/dev/fuse``, ``fusermount3`` and a LazyFS binary: ``$AIIDA_ZMQ_LAZYFS``, else ``build/lazyfs`` in this
clone (where tests/run.sh builds it), else ``~/.cache/lazyfs`` (the shared build script's default).
:func:`unavailable` says which is missing, for the skip reason.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BUILT = 'src/lazyfs/build/lazyfs'  # where build.sh OUT puts the binary


def binary() -> Path | None:
    candidates = [os.environ.get('AIIDA_ZMQ_LAZYFS', '')]
    candidates += [str(ROOT / 'build' / 'lazyfs' / _BUILT), str(Path.home() / '.cache' / 'lazyfs' / _BUILT)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def unavailable() -> str | None:
    """Why LazyFS cannot run here, or None."""
    if os.geteuid() != 0:
        return 'LazyFS needs root (a FUSE mount with allow_other)'
    if not os.path.exists('/dev/fuse'):
        return 'LazyFS needs /dev/fuse'
    if shutil.which('fusermount3') is None:
        return 'LazyFS needs fusermount3 (apt-get install fuse3)'
    if binary() is None:
        return (
            'no LazyFS binary: set AIIDA_ZMQ_LAZYFS, or build it with ../shared/tools/lazyfs/build.sh build/lazyfs '
            '(tests/run.sh does where it can)'
        )
    return None


class LazyFS:
    """One mounted LazyFS: files written under :attr:`mount` live in :attr:`root` once synced."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mount = base / 'm'
        self.root = base / 'r'
        self.fifo = base / 'faults.fifo'
        self.done_fifo = base / 'done.fifo'
        self.log_path = base / 'lazyfs.log'
        self.process: subprocess.Popen | None = None
        self._done_fd: int | None = None

    def start(self, timeout: float = 30.0) -> LazyFS:
        self.mount.mkdir()
        self.root.mkdir()
        os.mkfifo(self.done_fifo)  # LazyFS writes "finished::clear-cache" here: the event a test waits on
        config = self.base / 'lazyfs.toml'
        config.write_text(
            f'[faults]\nfifo_path="{self.fifo}"\nfifo_path_completed="{self.done_fifo}"\n'
            '[cache]\napply_eviction=false\n[cache.simple]\ncustom_size="512mb"\nblocks_per_page=1\n'
            '[filesystem]\nlog_all_operations=false\nlogfile=""\n'
        )
        # Opened before LazyFS starts: its fault thread opens the FIFO for writing and would block without a reader.
        self._done_fd = os.open(self.done_fifo, os.O_RDONLY | os.O_NONBLOCK)
        # Relative, from LazyFS's working directory: LazyFS ignores a --config-path containing "-o" (any case), and
        # a temporary directory's random name may (azlz-offf8cww did: the mount failed on config/default.toml).
        command = [str(binary()), str(self.mount), '--config-path', config.name, '-o', 'allow_other']
        command += ['-o', 'modules=subdir', '-o', f'subdir={self.root}', '-f']
        with open(self.log_path, 'ab') as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.base)
        deadline = time.monotonic() + timeout
        # A mount has no event to wait on from here: poll, bounded.
        while not (os.path.ismount(self.mount) and self.fifo.exists()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'LazyFS did not mount {self.mount}:\n{self.log()}')
            time.sleep(0.02)
        return self

    def clear_cache(self, timeout: float = 30.0) -> None:
        """The power cut: every byte not synced is gone (returns once LazyFS says it is done)."""
        assert self._done_fd is not None
        with open(self.fifo, 'w') as fifo:
            fifo.write('lazyfs::clear-cache\n')
        answer = b''
        deadline = time.monotonic() + timeout
        while b'finished::clear-cache' not in answer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f'LazyFS did not clear its cache in {timeout}s:\n{self.log()}')
            readable, _, _ = select.select([self._done_fd], [], [], left)
            if readable:
                answer += os.read(self._done_fd, 4096)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors='replace')[-4000:]
        except OSError:
            return ''

    def stop(self) -> None:
        if self.process is not None:
            subprocess.run(['fusermount3', '-u', '-z', str(self.mount)], check=False, capture_output=True)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
            self.process = None
        if self._done_fd is not None:
            os.close(self._done_fd)
            self._done_fd = None


@contextlib.contextmanager
def mounted() -> Iterator[LazyFS]:
    """A LazyFS mounted in a fresh temporary directory with a short path (unix sockets live beside it), all of it
    removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix='azlz-'))
    filesystem = LazyFS(base)
    try:
        yield filesystem.start()
    finally:
        filesystem.stop()
        shutil.rmtree(base, ignore_errors=True)
