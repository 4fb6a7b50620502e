"""An evaluation's record (result.json and the like): written whole, and an earlier one in the
same place kept under a number rather than overwritten, also when two evaluations finish into one
folder at once or the filesystem has no hard links."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from massrl.files import own_sibling, write_text


def write_record(path: Path, text: str) -> None:
    """Write `path`, an earlier record there kept as <stem>.N<suffix> (keep_earlier): the
    newest is always `path`. The record is written whole beside it, then takes the name only
    while it is free, so two evaluations finishing into one folder at once keep both."""
    tmp = own_sibling(path, ".new")
    write_text(tmp, text)
    try:
        while True:
            keep_earlier(path)
            try:
                os.link(tmp, path)
                return
            except FileExistsError:  # another evaluation's, written meanwhile: keep it too
                continue
            except OSError:  # no hard links here (FAT, many FUSE and SMB mounts)
                os.replace(tmp, path)
                return
    finally:
        tmp.unlink(missing_ok=True)


def keep_earlier(path: Path) -> None:
    """An earlier evaluation's record in the same place is kept as <stem>.N<suffix> (the
    newest is always `path`), not overwritten. The record is first moved to a name of this
    process's own (a rename moves whatever is there, whole: a record another evaluation wrote
    meanwhile is never the one removed), then given the first free number."""
    held = own_sibling(path, ".kept")
    try:
        path.rename(held)
    except FileNotFoundError:  # none there, or another evaluation moved it first
        return
    try:
        kept = _number(held, path)
    except BaseException:  # (a failed disk, Ctrl-C): the record back under its name
        with contextlib.suppress(OSError):
            held.rename(path)
        raise
    print(f"note: the earlier {path.name} in {path.parent} is kept as {kept.name}")


def _number(held: Path, path: Path) -> Path:
    """`held` renamed to the first free <stem>.N<suffix> of `path`."""
    n = 1
    while True:
        kept = path.with_name(f"{path.stem}.{n}{path.suffix}")
        try:  # claims the name atomically: two evaluations finishing together keep both
            os.link(held, kept)
        except FileExistsError:
            n += 1
            continue
        except OSError:  # no hard links here (FAT, many FUSE and SMB mounts): a rename,
            if kept.exists():  # which two evaluations finishing at once may both choose
                n += 1
                continue
            held.rename(kept)
        held.unlink(missing_ok=True)
        return kept
