"""The output folder's lock: `OUT/.xai.lock`, held with flock(2) for a whole run (explain or
evaluate). The kernel releases it when the process dies, even on SIGKILL, so a stale lock cannot
block the next run; the file records the holder's pid for the message.

Layer 0: imports only the standard library and errors.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import LockedError, StateError

LOCK_NAME = ".xai.lock"
# ----------------------------------------------------------------------------------------------
_HELD_LOCK_FDS: set[int] = set()


def close_inherited_locks() -> None:
    """In a forked child (DataLoader worker): close the inherited lock descriptors."""
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


class OutputLock:
    def __init__(self, out: Path, wait: bool = False, on_wait=None):
        self.path = out / LOCK_NAME
        self.wait = wait
        self.on_wait = on_wait
        self._f = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if (self.path.exists() or self.path.is_symlink()) and not self.path.is_file():
            raise StateError(
                f"{self.path}: damaged state file (not a regular file); remove it, or run `xai explain` "
                "again with --repair"
            )
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            if not self.wait:
                f.close()
                raise LockedError(
                    f"{self.path.parent} is in use by another xai run ({holder}); "
                    "use --wait to wait for it, or another --out"
                ) from None
            if self.on_wait:
                self.on_wait(holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._f = f
        _HELD_LOCK_FDS.add(f.fileno())
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            _HELD_LOCK_FDS.discard(self._f.fileno())
            self._f.seek(0)
            self._f.truncate()
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None
