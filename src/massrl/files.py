"""Files written whole or not at all.

Each output is written to a temporary file beside it, synced, then renamed over it: a full
disk, a crash or a kill mid-write leaves the previous file (or none), never a truncated one. A
failure is an OSError that names the file, whatever the writer raised (torch.save reports a
full disk as a RuntimeError without a path).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | Path, shared: bool = False) -> Iterator[IO[bytes]]:
    """A binary file to write `path` through; it replaces `path` only once all is written.
    `shared`: other processes may write `path` at the same time (evaluations, feature caches)."""
    path = Path(path)
    if path.is_symlink():  # (write where the link points: the link stays a link)
        path = path.resolve()
    # one name per file where it has one writer (a run's: it holds the run's lock): a save
    # killed midway leaves one stale temporary file at most, which the next save replaces.
    # Writers that share a file each need their own (one's rename took the other's file away)
    tmp = own_sibling(path, ".tmp") if shared else path.with_name(f"{path.name}.tmp")
    recorder = None
    try:
        with open(tmp, "wb") as f:
            recorder = _Recorder(f)
            yield recorder  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):  # a file replaced keeps its permissions
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = recorder.error if recorder is not None and recorder.error else exc
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from exc
        raise


_serial = itertools.count()


def own_sibling(path: Path, suffix: str) -> Path:
    """A name beside `path` that no other writer uses (process id and a serial number)."""
    return path.with_name(f"{path.name}.{os.getpid()}.{next(_serial)}{suffix}")


class _Recorder:
    """The file, keeping the first OSError its writes raised (torch.save turns it into a
    RuntimeError that says neither the reason nor the file)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_text(path: str | Path, text: str, shared: bool = False) -> None:
    """`path` holds `text` (UTF-8), or keeps what it held (`shared`: see atomic_write)."""
    with atomic_write(path, shared) as f:
        f.write(text.encode())


def json_text(obj: Any, **kwargs: Any) -> str:
    """JSON with NaN and infinities written as null: Python's NaN is no JSON (strict parsers,
    JavaScript's and Go's among them, refused a record holding a diverged loss)."""
    def finite(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def picture_path(path: str | Path) -> Path:
    """`path` as a picture file: ``.png`` added to a name without a suffix; a suffix matplotlib
    cannot write is a ValueError now, before the work that makes the picture."""
    path = Path(path)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in kinds:
        raise ValueError(f"cannot write a '{path.suffix}' picture ({path}): name a .png, .jpg, "
                         ".pdf or .svg file (or any of: " + ", ".join(sorted(kinds)) + ")")
    return path


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """A matplotlib figure saved to `path` in the format its suffix names."""
    with atomic_write(path) as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", **kwargs)

