"""Advisory file locks that keep two processes off the same stage or evaluation.

One lock file per key under `<cache>/locks/`; `fcntl.flock` is released by the kernel when its
holder dies (even by SIGKILL), so a killed run never leaves a lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from taxon.settings import cache_dir


class FileLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never waits."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_for(kind: str, key: str) -> FileLock:
    """The lock of one stage (`kind="stage"`) or one (model, eval) pair (`kind="eval"`)."""
    return FileLock(cache_dir() / "locks" / f"{kind}-{key}.lock")
