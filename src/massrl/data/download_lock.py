"""One download at a time into a data.root, across the processes of a multi-process run."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # (Windows: no lock; start a multi-process run's download once by hand)
    fcntl = None


@contextlib.contextmanager
def one_download_at_a_time(root: Path | None) -> Iterator[None]:
    """With data.download=true, the processes of a multi-process run (torchrun, srun: each loads
    the data before they connect) download into data.root one at a time: the first fetches and
    unpacks, the others then find the files there. An exclusive lock on a file in data.root,
    where one can be taken: a read-only root (data already there) or a file system without locks
    goes on without it."""
    lock = _open_lock(root) if fcntl is not None and root is not None else None
    if lock is None:
        yield
        return
    with lock:
        locked = _lock(lock, root)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _open_lock(root: Path) -> Any:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return open(root / ".massrl-download.lock", "a")  # noqa: SIM115 - closed by the caller
    except OSError:
        return None


def _lock(lock: Any, root: Path) -> bool:
    """Take the lock, waiting for a process that holds it; False where locks do not work."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        print(f"waiting for another process's download into {root}", file=sys.stderr)
    except OSError:  # (NFS mounted nolock, some FUSE file systems)
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return True
    except OSError:
        return False
