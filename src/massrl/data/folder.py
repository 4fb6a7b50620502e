"""Image folders: discovery of image files, labeled (class sub-folder) vs unlabeled layouts, and
the dataset that decodes files with `load_image`, skipping undecodable ones unless strict.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import statistics
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from massrl.data.images import BadImageError, _open_quietly, check_image_header, load_image
from massrl.data.subset import base_and_indices


class UnusableDataError(ValueError):
    """The dataset is there but cannot be trained on (no image decodes, fewer images than one
    batch, split folders that do not match); the message says what to change."""

    exit_status = 2  # (the command's exit status: cli._failure)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
STRICT_HINT = "set data.strict=false to skip undecodable images with a warning"


class BadImageWarning(UserWarning):
    """An image file was skipped because it could not be decoded."""


def is_image_file(name: str) -> bool:
    """An image by its extension, and not hidden: dot files include macOS's AppleDouble `._x.jpg`
    companions, which are not images, and hidden folders are skipped too."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


# files of folders of pictures that are no pictures, and need no word
_NOT_PICTURES = {"thumbs.db", "desktop.ini"}


def find_images(root: str | os.PathLike, left_out: Counter | None = None) -> list[Path]:
    """Every image file under ``root`` (recursively, symlinks followed, each folder once: a link
    back up the tree would list its images again and again), in sorted order so that indices
    (and therefore subsets and splits) are the same on every machine. `left_out` counts the
    other files by extension."""
    found = []
    top = os.path.realpath(root)
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        # a folder met before, or one that holds the root (a link back up the tree)
        if real in seen or (seen and top.startswith(real.rstrip(os.sep) + os.sep)):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
        if left_out is not None:
            left_out.update(Path(f).suffix.lower() or f for f in filenames
                            if not is_image_file(f) and not f.startswith(".")
                            and f.lower() not in _NOT_PICTURES)
    return sorted(found)


def left_out_note(left_out: Counter) -> str:
    """"; N other files left out (...)" for the data line, naming formats users expect to work
    (an iPhone's HEIC pictures), or ""."""
    if not left_out:
        return ""
    kinds = ", ".join(f"{n} {ext}" for ext, n in left_out.most_common(4))
    more = ", ..." if len(left_out) > 4 else ""
    heic = ("; HEIC/HEIF pictures need converting to JPEG first"
            if left_out.keys() & {".heic", ".heif"} else "")
    return f"; {sum(left_out.values())} other files left out ({kinds}{more}){heic}"


def _entries(folder: Path) -> list[os.DirEntry]:
    """The folder's entries, whose is_dir() / is_file() need no stat call on most filesystems
    (Path.iterdir's did: 400,000 of them for a flat folder of 100k images, before its files
    were even listed; slow on a network disk)."""
    with os.scandir(folder) as entries:
        return list(entries)


def _is(entry: os.DirEntry, kind: str) -> bool:
    """entry.is_dir() / is_file(), False for a symlink loop (a.png -> b.png -> a.png): it raised
    ELOOP there and stopped the run; os.walk lists it with the files, and like any other file
    that is no image it is skipped with a warning when read. (Other errors, a class folder that
    cannot be read, stop the run: passed over, its class would be left out without a word.)"""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return False
        raise


def _subdirs(root: Path) -> list[Path]:
    return sorted(Path(e.path) for e in _entries(root) if not e.name.startswith(".")
                  and _is(e, "dir"))


def _any_image(folder: Path) -> bool:
    """Whether ``folder`` holds an image anywhere below it (stops at the first one)."""
    for _, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(is_image_file(f) for f in filenames):
            return True
    return False


def _has_direct_images(folder: Path) -> bool:
    return any(is_image_file(e.name) and _is(e, "file") for e in _entries(folder))


def is_class_folder_layout(root: Path, min_classes: int = 2) -> bool:
    """True when ``root`` looks like an ImageFolder: no images directly in it, and at least
    ``min_classes`` sub-folders with images, each holding images directly.

    The last rule tells class folders (``cat/1.jpg``) from nested unlabeled collections
    (``2021/05/1.jpg``); one sub-folder is treated as unlabeled, as one class cannot be evaluated
    (a held-out folder may hold one class of the training folder's: ``min_classes=1``).
    """
    if _has_direct_images(root):
        return False
    with_images = [d for d in _subdirs(root) if _any_image(d)]
    return len(with_images) >= min_classes and all(_has_direct_images(d) for d in with_images)


def folders_with_images(root: Path) -> list[Path]:
    """The sub-folders of ``root`` that hold images, at any depth."""
    return [d for d in _subdirs(root) if _any_image(d)]


# held-out folder names beside train/, in the order preferred
HELD_OUT_NAMES = ("val", "test")
_SPLIT_LIKE = {"train", "val", "valid", "validation", "test"}


def split_dirs(root: Path) -> tuple[Path, Path | None, list[Path]]:
    """(``root/train``, its held-out folder ``val/`` or ``test/``, another one left unused) when
    root has a train/ folder, else (``root``, None, [])."""
    names = {d.name for d in _subdirs(root)}  # (as listed: on a case-insensitive disk
    if "train" not in names:                   # Train/ would pass for train/)
        return root, None, []
    held_out = [root / name for name in HELD_OUT_NAMES if name in names]
    return root / "train", (held_out[0] if held_out else None), held_out[1:]


def split_spelling_note(root: Path) -> str | None:
    """A note when root's image folders are all named like splits but not as massrl reads them
    (Train/ and Val/, valid/, validation/): they are not taken for splits (a class may be named
    Train), so say how to make them so."""
    folders = [d.name for d in folders_with_images(root)]  # (as listed, also where the
    other = [n for n in folders if n not in ("train", *HELD_OUT_NAMES)]  # disk ignores case)
    if not other or not all(n.lower() in _SPLIT_LIKE for n in folders):
        return None
    listed = ", ".join(f"{n}/" for n in other)
    used = next((n for n in HELD_OUT_NAMES if n in folders), None) if "train" in folders else None
    if used:
        return f"note: {root}: {listed} not used (the held-out split is {used}/)"
    return (f"note: {root} holds {listed}: split folders are read as train/ with val/ or "
            f"test/, in lower case; rename them to use them so")


def why_unlabeled(folder: Path) -> str:
    """Why a folder with sub-folders was not read as classes (and what that costs)."""
    loose = sorted(e.name for e in _entries(folder)
                   if is_image_file(e.name) and _is(e, "file"))
    with_images = [d for d in _subdirs(folder) if _any_image(d)]
    if loose and with_images:
        lie = "images lie" if len(loose) > 1 else "image lies"
        return (f" (no kNN or probe monitors): {len(loose)} {lie} directly in the folder "
                f"(e.g. {loose[0]}) beside its sub-folders; to use the sub-folders as classes, "
                "keep images only inside them")
    if len(with_images) == 1:
        return (f" (one sub-folder, {with_images[0].name}: a single class cannot be evaluated, "
                "so no kNN or probe monitors)")
    if with_images:  # each holds its images in folders of its own
        return (f" (no kNN or probe monitors): its sub-folders ({with_images[0].name}, ...) hold "
                "their images in folders of their own, as dated collections do; if they are "
                "classes, data.labels=folders")
    return " (no class sub-folders: no kNN or probe monitors)"


NAMED_BAD_FILES = 20  # undecodable files a dataset names per process; the rest are counted


class FileImageDataset(Dataset):
    """Items ``(PIL RGB image, label)`` read from files; label -1 when unlabeled.

    An undecodable file gives ``None`` and a `BadImageWarning` naming it (drop such items with
    `collate_skip_bad`), or raises `BadImageError` when ``strict``.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        targets: Sequence[int] | None = None,
        classes: list[str] | None = None,
        strict: bool = False,
    ) -> None:
        self.paths = list(paths)
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)
        self.classes = classes
        self.strict = strict
        self._named_bad: set[str] = set()  # (this process's: see _say_skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int] | None:
        path = self.paths[index]
        try:
            image = load_image(path)
        except BadImageError as err:
            folder = os.path.dirname(path)
            if not os.path.isdir(folder):  # not one bad file: the data went away mid-run
                raise UnusableDataError(
                    f"the folder {folder} that held {path} is gone (unmounted, moved or "
                    "deleted while the run read it): restore it, then continue with "
                    "resume=auto") from None
            if self.strict:
                raise BadImageError(path, f"{err.reason} ({STRICT_HINT})") from None
            self._say_skipped(str(path), err.reason)
            return None
        return image, self.targets[index]

    def _say_skipped(self, path: str, reason: str) -> None:
        """Name an undecodable file once per process (each epoch named them all again), and at
        most NAMED_BAD_FILES of them (1 % bad files of ImageNet made 25k lines per epoch); each
        loader worker names its own."""
        if path in self._named_bad or len(self._named_bad) >= NAMED_BAD_FILES:
            return
        self._named_bad.add(path)
        more = len(self._named_bad) == NAMED_BAD_FILES  # (the last one named says so)
        warnings.warn(f"skipping image {path}: {reason}" + (
            "; further undecodable files are skipped without a word (the run's summary counts "
            "them: skipped_files; data.strict=true stops at the first)" if more else ""),
            BadImageWarning, stacklevel=3)


def check_headers(dataset: Dataset) -> None:
    """data.strict: the header of every file a (possibly subset) FileImageDataset uses, read
    before training (about a millisecond each), so that a held-out file the first validation
    would stop at stops the run before an epoch of training is spent. Raises BadImageError."""
    files, used = base_and_indices(dataset)  # (the files the split uses)
    paths = [files.paths[i] for i in used] if isinstance(files, FileImageDataset) else []
    for path in paths:
        try:
            check_image_header(path)
        except BadImageError as err:
            raise BadImageError(path, f"{err.reason} ({STRICT_HINT})") from None


def _files_of(dataset: Dataset) -> FileImageDataset | None:
    """The FileImageDataset a dataset wraps (a Subset, a class-balanced SubsetDataset, ...);
    None for one not read from files."""
    base, _ = base_and_indices(dataset)
    return base if isinstance(base, FileImageDataset) else None


def files_fingerprint(dataset: Dataset) -> str | None:
    """A hash of the files behind a (possibly wrapped) FileImageDataset: their paths, sizes,
    modification times and labels; None for datasets not read from files. Cached features keyed
    with it are recomputed when a file is added, replaced, removed or moved to another class."""
    files = _files_of(dataset)
    if files is None:
        return None
    h = hashlib.sha256()
    for path, target in zip(files.paths, files.targets, strict=True):
        try:
            st = os.stat(path)
            tail = f"\t{st.st_size}\t{st.st_mtime_ns}\t{target}\n"
        except OSError:
            tail = f"\tmissing\t{target}\n"
        h.update(os.fsencode(path) + tail.encode())  # (a name need not be valid UTF-8)
    return h.hexdigest()


def file_list_digest(dataset: Dataset) -> dict[str, Any] | None:
    """The number and a hash of the files (and labels) a folder dataset draws from, by their
    paths relative to the folder (a moved folder keeps its digest); None for datasets not read
    from files. A folder without val/ is split into train and held-out from this list, so a
    change of it changes the split."""
    files = _files_of(dataset)
    if files is None:
        return None
    paths = [os.fsencode(p) for p in files.paths]
    if not paths:
        return {"files": 0, "sha256": None}
    # the folder they share: the common prefix of the first and last in sorted order is every
    # path's, cut back to a separator (os.path.commonpath/relpath took 10 s for ImageNet's 1.28 M)
    prefix = os.path.commonprefix([min(paths), max(paths)])
    cut = prefix.rfind(os.sep.encode()) + 1
    h = hashlib.sha256()
    for path, target in zip(paths, files.targets, strict=True):
        h.update(path[cut:] + f"\t{target}\n".encode())
    return {"files": len(paths), "sha256": h.hexdigest()}


def file_list_change(then: dict[str, Any] | None, now: dict[str, Any] | None) -> str | None:
    """How a file list changed between two `file_list_digest`s ("40 then, 41 now"), or None
    when it did not (or either is unknown)."""
    if not then or not now or then["sha256"] == now["sha256"]:
        return None
    a, b = then["files"], now["files"]
    return f"{a} then, {b} now" if a != b else f"{a}, but not the same ones"


def labeled_folder(
    root: Path, strict: bool, classes: list[str] | None = None, left_out: Counter | None = None,
    train_dir: Path | None = None,
) -> FileImageDataset:
    """An ImageFolder: one class per sub-folder (sorted names), images found recursively inside.

    With ``classes`` given (from the train split, read from ``train_dir``), the folders must be
    among them, so that a validation split uses the training split's label numbering.
    """
    per_class = {d.name: find_images(d, left_out) for d in _subdirs(root)}
    found = [name for name, files in per_class.items() if files]
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    empty = [n for n in unknown if train_dir is not None and (train_dir / n).is_dir()]
    if empty:  # (it said the training split lacked them, beside the folders that are there)
        raise UnusableDataError(
            f"{root} has images of classes whose folders in {train_dir} hold none: "
            f"{empty[:10]}; add their training images, or remove them from {root.name}/")
    if unknown:
        raise UnusableDataError(
            f"{root} has class folders that the training split lacks: {unknown[:10]}; "
            "train/ and val/ must use the same class folder names"
        )
    index = {name: i for i, name in enumerate(classes)}
    paths, targets = [], []
    for name in found:
        files = per_class[name]
        paths.extend(files)
        targets.extend([index[name]] * len(files))
    return FileImageDataset(paths, targets, classes, strict)


def unlabeled_folder(root: Path, strict: bool, left_out: Counter | None = None
                     ) -> FileImageDataset:
    return FileImageDataset(find_images(root, left_out), None, None, strict)


def typical_size(paths: Sequence[Path], default: int = 224, sample: int = 64) -> int:
    """Median shorter side of up to `sample` images spread over the folder (headers only): one
    odd file (a 1x1 icon, a banner) does not decide the size the folder is evaluated at."""
    step = max(1, len(paths) // sample)
    sides = [side for path in paths[::step][:sample] if (side := _shorter_side(path))]
    return int(statistics.median_low(sides)) if sides else default


def _shorter_side(path: Path) -> int | None:
    """The shorter side in the file's header; None for a file that is no image, or no regular
    file: opening a named pipe waited forever for a writer, so it is opened without waiting and
    looked at before PIL reads it. (One open and fstat: os.path.isfile would stat every file
    sampled, which listing a folder avoids.) Quietly: PIL's decompression-bomb warning names
    no file; reading the image warns, naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            with _open_quietly(f) as img:
                return min(img.size)
        except Exception:  # noqa: BLE001 - only informational; bad files are reported on use
            return None
