"""Label subsets given as a list of file names, one per line: the fixed 1 % / 10 % ImageNet
subsets of SimCLR (`imagenet_subsets/1percent.txt`, `10percent.txt` in google-research/simclr),
on which the SimCLR, BYOL and MASSRL papers report semi-supervised results, so that massrl's
figures can be compared with theirs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from massrl.data.folder import FileImageDataset
from massrl.data.subset import base_and_indices


def is_file_list(path: str | Path) -> bool:
    """A text file of names (not the JSON of indices that a run saves)."""
    with open(path, "rb") as f:
        return not f.read(64).lstrip().startswith(b"{")


def split_file_names(ds: Dataset) -> list[str] | None:
    """Each image's path relative to the folder of the dataset it was drawn from (the same
    names wherever a copy of the folder is stored), or None for a split that is no folder."""
    base, indices = base_and_indices(ds)
    if not isinstance(base, FileImageDataset) or not base.paths:
        return None
    paths = [os.fsdecode(p) for p in base.paths]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [os.path.relpath(paths[i], root).replace(os.sep, "/") for i in indices]


def file_list_indices(ds: Dataset, path: str | Path, fraction: float | None = None
                      ) -> list[int]:
    """The positions in the labeled split of the files a list names. A line is a file name
    (`n01440764_10026.JPEG`, unique in the split) or a path relative to the split's folder
    (`n01440764/n01440764_10026.JPEG`), each line either; blank lines are skipped."""
    if fraction is not None:
        raise ValueError(f"subset_file {path} lists its images: leave label_fraction out")
    names = split_file_names(ds)
    if names is None:
        raise ValueError(
            f"subset_file {path} lists file names, but this labeled split is not a folder of "
            "image files: a list applies to data.name=imagenet, imagenet100 or folder")
    wanted = [name for line in Path(path).read_bytes().splitlines()
              if (name := _name(line))]
    if not wanted:
        raise ValueError(f"subset_file {path} lists no file names")
    by_path, by_name = _lookup(names, by_path=True), _lookup(names, by_path=False)
    lookup = {w: (by_path if "/" in w else by_name).get(w, -1) for w in wanted}
    missing = [w for w in wanted if lookup[w] == -1]
    if missing:
        raise ValueError(
            f"subset_file {path}: {len(missing)} of its {len(wanted)} names are not images of "
            f"the labeled split (first: {missing[0]!r}); the list must name files of the "
            "training folder as data.root holds them, and data.subset / eval_subset must keep "
            "them (data.subset=null data.eval_subset=null)")
    ambiguous = [w for w in wanted if lookup[w] is None]
    if ambiguous:
        raise ValueError(
            f"subset_file {path}: the name {ambiguous[0]!r} is the name of more than one image "
            "of the split: write paths relative to the training folder (class/name)")
    return sorted({lookup[w] for w in wanted})  # type: ignore[misc]


def _name(line: bytes) -> str:
    """A list's line as a name of the split: decoded as file names are (names that are not
    UTF-8 match), without a Windows editor's byte-order mark or backslashes."""
    return os.fsdecode(line).strip().lstrip("\ufeff").strip().replace("\\", "/")


def _lookup(names: Sequence[str], *, by_path: bool) -> dict[str, int | None]:
    """name -> position; None where a bare file name is not unique."""
    lookup: dict[str, int | None] = {}
    for i, name in enumerate(names):
        key = name if by_path else name.rsplit("/", 1)[-1]
        lookup[key] = None if key in lookup else i
    return lookup
