"""Fashion-MNIST's files: the IDX format (MNIST's), gzipped or not, and where they are."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from massrl.data.folder import UnusableDataError


def read_idx(path: Path, remedy: str = "replace it") -> np.ndarray:
    """An IDX file (the MNIST format: magic, big-endian dimensions, uint8 data), gzipped or not.
    A damaged or cut-short one (a download killed while it wrote) is an UnusableDataError that
    names it and says `remedy`."""
    try:
        data = _contents(path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UnusableDataError(f"{path} is damaged ({exc}; a download cut short?): "
                                f"{remedy}") from None
    except OSError as exc:
        raise UnusableDataError(f"cannot read {path}: {exc.strerror or exc}") from None
    ndim = data[3] if len(data) >= 4 else 0
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or not ndim:
        raise UnusableDataError(f"{path} is not an uint8 IDX file (a damaged or cut-short "
                                f"one?): {remedy}")
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if (dims < 0).any() or arr.size != int(np.prod(dims.astype(np.int64))):
        raise UnusableDataError(f"{path} holds {arr.size} values, but its header says "
                                f"{' x '.join(map(str, dims.tolist()))} (cut short?): {remedy}")
    return arr.reshape(dims)


def _contents(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx_pair(images: Path, labels: Path, num_classes: int, remedy: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A split's images [N, H, W] and labels [N], checked against each other: a labels file
    of another length trained on without a word (on the first labels' images), and a label
    past the classes stopped the first batch with cross_entropy's "Target 200 is out of
    bounds"."""
    x, y = read_idx(images, remedy), read_idx(labels, remedy)
    if x.ndim != 3 or y.ndim != 1:
        raise UnusableDataError(f"{images} and {labels} are not an images file [N, H, W] and a "
                                f"labels file [N] (they hold {list(x.shape)} and "
                                f"{list(y.shape)}): {remedy}")
    if len(x) != len(y):
        raise UnusableDataError(f"{images} holds {len(x)} images but {labels} {len(y)} labels: "
                                f"they are not a pair, one of them is bad; {remedy}")
    if y.size and int(y.max()) >= num_classes:
        raise UnusableDataError(f"{labels} holds the label {int(y.max())}, beyond the "
                                f"{num_classes} classes (0 to {num_classes - 1}) of {images}: "
                                f"{remedy}")
    return x, y


def find_idx_folder(folders: Sequence[Path]) -> Path | None:
    for folder in folders:
        if all(idx_file(folder, stem) for stem in FASHION_STEMS):
            return folder
    return None


FASHION_STEMS = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None
