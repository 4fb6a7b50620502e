"""One download at a time into a data.root, across the processes of a multi-process run."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # (Windows: no lock; start a multi-process run's download once by hand)
    fcntl = None


@contextlib.contextmanager
def one_download_at_a_time(root: Path | None) -> Iterator[None]:
    """With data.download=true, the processes of a multi-process run (torchrun, srun: each loads
    the data before they connect) download into data.root one at a time: the first fetches and
    unpacks, the others then find the files there. An exclusive lock on a file in data.root."""
    if root is None or fcntl is None:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".massrl-download.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"waiting for another process's download into {root}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
