"""One `tracker serve` per database: an exclusive lock on a file beside it.

Two services on one database would each take the other's sends in flight for a crash's
leftovers (runs left ``submitting``), find them not yet at Letta, and send them again; both
would poll, relay and prune the same runs. The lock is ``flock`` on ``<database>.lock``: the
operating system drops it when the process ends, however it ends, so a crash leaves no stale
lock behind. The file holds the pid of the process holding it, for the refusal's message.
CLI commands and callback workers do not take it: they are made to run beside the service.
Where there is no ``flock`` (Windows), there is no lock either.
"""

from __future__ import annotations

import os

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from tracker.errors import Conflict


class ServiceLock:
    """The lock of one database file, held from ``acquire`` to ``release``."""

    def __init__(self, db_path: str) -> None:
        # the file SQLite opens, links resolved as SQLite resolves them: two paths to one
        # database (a symlink) must name one lock
        self.path = os.path.realpath(db_path) + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock, or raise ``Conflict`` naming the process that holds it."""
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Conflict(
                f"another tracker serves this database (pid {holder}, holding {self.path}):"
                " stop it first, or give this one a database of its own (database.url)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (a service on this database)."""
        try:
            self.acquire()
        except Conflict:
            return True
        except OSError:
            return False  # no lock file can be made here (a read-only directory): none held
        self.release()
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays, for the next one
            self._fd = None
