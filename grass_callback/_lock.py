"""One writer per store directory: a lock file naming the run that owns it.

``<store_dir>/grass.lock`` is a small JSON file ``{run_id, host, pid, pid_start, created_unix}``.
It is created atomically (written under a temporary name, then ``os.link``'ed onto the lock name,
which fails if a lock exists), so a lock file is always complete. A second run that finds it:

* same host, and the pid is gone (or is a zombie, or is another process that reused the pid:
  its start time differs): the owner died without releasing it (SIGKILL, power loss). The lock
  is taken over with a warning.
* otherwise: :class:`StoreLockError` naming the other run, its host and pid, and how to go on.

Under DDP only rank 0 takes the lock (every rank writes into rank 0's store directory); the
callback broadcasts rank 0's run id and any failure, so every rank stops together.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from grass_callback.errors import StoreError

__all__ = ["LOCK_FILE", "StoreLock", "StoreLockError", "new_run_id"]

LOCK_FILE = "grass.lock"


class StoreLockError(StoreError):
    """Another live run holds the store directory's lock."""


def new_run_id() -> str:
    """A short unique run id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5); fields[0] is field 3


def _pid_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] if fields else None


def _alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` is a live process, and the same one (same start time, when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    if _pid_state(pid) == "Z":  # killed, not yet reaped
        return False
    now = _pid_start(pid)
    return start is None or now is None or now == start


class StoreLock:
    """The lock of one store directory, held by ``run_id`` (see the module docstring).

    Example::

        lock = StoreLock("runs/grass", run_id=new_run_id())
        lock.acquire()      # StoreLockError if a live run holds it
        ...
        lock.release()
    """

    def __init__(self, directory: str | os.PathLike, run_id: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.run_id = str(run_id)
        self.held = False

    def _record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _pid_start(os.getpid()), "created_unix": time.time()}

    def read(self) -> dict[str, Any] | None:
        """The lock file's record, ``None`` when there is none, ``{}`` when it is unreadable."""
        try:
            text = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return {}
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _link_new(self) -> bool:
        """Create the lock file atomically; ``False`` if one exists."""
        tmp = self.directory / f".{LOCK_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as f:
            json.dump(self._record(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def acquire(self) -> None:
        """Take the lock, taking over a stale one with a warning; raise if a live run holds it.

        Raises:
            StoreLockError: another live run (or one on another host) holds the lock.
            StoreError: the directory cannot be written.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for _ in range(5):
                if self._link_new():
                    self.held = True
                    return
                other = self.read()
                if other is None:
                    continue  # released in between: try again
                if other.get("run_id") == self.run_id and other.get("pid") == os.getpid():
                    self.held = True  # ours already
                    return
                if not self._stale(other):
                    raise StoreLockError(self._held_message(other))
                self._take_over(other)
        except StoreLockError:
            raise
        except OSError as e:
            from grass_callback._store_format import _describe_os_error

            raise StoreError(f"could not lock the store directory {self.directory} ({e}): "
                             f"{_describe_os_error(e)}.") from e
        raise StoreLockError(f"could not take the lock {self.path}: other runs keep replacing it; "
                             "make sure a single run writes into this store_dir.")

    def _stale(self, other: dict[str, Any]) -> bool:
        if not other:  # unreadable: only a writer outside grass_callback could leave that
            return True
        if other.get("host") != socket.gethostname():
            return False  # cannot tell from here
        try:
            pid = int(other.get("pid"))
        except (TypeError, ValueError):
            return True
        return not _alive(pid, other.get("pid_start"))

    def _take_over(self, other: dict[str, Any]) -> None:
        """Move a stale lock aside (checking it is the one we judged stale), warn."""
        aside = self.directory / f".{LOCK_FILE}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else moved it: try again
        try:
            got = json.loads(aside.read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            got = {}
        if other and got != other:  # a live lock was linked in between: put it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            with contextlib.suppress(OSError):
                aside.unlink()
            raise StoreLockError(self._held_message(got))
        with contextlib.suppress(OSError):
            aside.unlink()
        who = (f"run {other.get('run_id')!r} (pid {other.get('pid')} on {other.get('host')})"
               if other else "an unreadable lock file")
        warnings.warn(f"grass_callback: the store directory {self.directory} was locked by {who}, which is "
                      "no longer running (killed?); taking the lock over.", stacklevel=4)

    def _held_message(self, other: dict[str, Any]) -> str:
        return (f"grass_callback: the store directory {self.directory} is in use by run "
                f"{other.get('run_id')!r} (pid {other.get('pid')} on host {other.get('host')}, locked "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(other.get('created_unix', 0))))}). "
                "Two runs writing one store overwrite each other's manifests. Give this run its own "
                f"store_dir, or wait for that run to end; if it is certainly dead, delete {self.path}.")

    def release(self) -> None:
        """Remove the lock file if it is still ours. Idempotent."""
        if not self.held:
            return
        self.held = False
        other = self.read()
        if other and other.get("run_id") == self.run_id and other.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                self.path.unlink()
