"""The labeled images a semi-supervised evaluation trains on: a seeded class-balanced label
fraction, saved with the identity of the split it indexes so that another run can reuse it
(`label_subset`, `split_identity`); or a list of file names, one per line, such as SimCLR's fixed
1 % / 10 % ImageNet subsets (`imagenet_subsets/1percent.txt`, `10percent.txt` in
google-research/simclr), on which the SimCLR, BYOL and MASSRL papers report semi-supervised
results (`file_list_indices`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from massrl.data.folder import FileImageDataset
from massrl.data.subset import base_and_indices
from massrl.files import write_text


def is_file_list(path: str | Path) -> bool:
    """A text file of names (not the JSON of indices that a run saves). The first reader of
    subset_file: a missing one is a ValueError naming the key."""
    if not Path(path).is_file():
        raise ValueError(f"subset_file={path}: no such file (the label_subset_*.json an "
                         "earlier run wrote, or for a folder a text file of image names)")
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


def split_identity(ds: Dataset) -> str:
    """A hash of which images a labeled split holds, in order, with their labels: by position
    in the dataset, or for files by name relative to their folder, so that the same images
    have the same identity wherever they are stored (a copy on a node's scratch disk) and
    however the split was drawn (another checkpoint's seed), and other images another."""
    base, indices = base_and_indices(ds)
    names: list[Any] = split_file_names(ds) or indices
    targets = getattr(base, "targets", None)
    labels = [int(targets[i]) for i in indices] if targets is not None else None
    return hashlib.sha256(json.dumps([names, labels]).encode()).hexdigest()[:16]


def label_subset(
    labels: Sequence[int], fraction: float | None, seed: int, *, dataset: str,
    subset_file: str | Path | None = None, save_dir: str | Path | None = None,
    source: dict[str, Any] | None = None,
) -> tuple[list[int], Path | None, float]:
    """Indices of a seeded class-balanced label fraction, the JSON file that records them, and
    the fraction.

    The indices point into the labeled split as the run sees it; `source` identifies that
    split (which images it holds: split_identity) and is recorded with
    them. With
    `subset_file` the indices of an earlier run are reused, checked against this dataset and
    source (the same indices of another split would be other images); `fraction` may then be
    None (the file's), and must otherwise be the file's.
    """
    from massrl.data import fraction_subset

    if subset_file is not None:
        saved = _read_saved(subset_file)
        if saved.get("dataset") != dataset or saved.get("num_samples") != len(labels):
            raise ValueError(
                f"subset_file {subset_file} was made for {saved.get('dataset')} with "
                f"{saved.get('num_samples')} training images, not {dataset} with {len(labels)}"
            )
        was = saved.get("source") or {}
        changed = [f"{k}: {was[k]!r} then, {v!r} now" for k, v in (source or {}).items()
                   if k in was and was[k] != v]
        if changed:
            raise ValueError(
                f"subset_file {subset_file} indexes another labeled split than this run's (its "
                f"indices would name other images): {'; '.join(changed)}. Evaluate on the "
                "images the file was made for, or draw a new subset (label_fraction)")
        if fraction is not None and fraction != saved.get("label_fraction"):
            raise ValueError(
                f"subset_file {subset_file} holds a label_fraction of "
                f"{saved.get('label_fraction')}, not {fraction}: leave label_fraction out (the "
                "file decides) or drop subset_file")
        indices = _saved_indices(subset_file, saved.get("indices"), len(labels))
        return indices, Path(subset_file), saved.get("label_fraction")
    if fraction is None:
        raise ValueError("label_subset needs a fraction or a subset_file")
    indices = fraction_subset(labels, fraction, seed)
    path = None
    if save_dir is not None:
        path = Path(save_dir) / f"label_subset_{dataset}_{fraction:g}_seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({
            "dataset": dataset, "split": "train_labeled", "num_samples": len(labels),
            "label_fraction": fraction, "seed": seed, "source": source or {}, "indices": indices,
        }))
    return indices, path, fraction


def _read_saved(path: str | Path) -> dict[str, Any]:
    """The JSON object a run saved (`label_subset`'s file), or a ValueError naming the file."""
    try:
        saved = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"subset_file {path} is not the JSON a run saves ({exc}): pass the "
                         "label_subset_*.json an earlier run wrote, unedited") from None
    if not isinstance(saved, dict):
        raise ValueError(f"subset_file {path} holds a JSON {type(saved).__name__}, not the "
                         "object a run saves (with dataset, num_samples and indices)")
    return saved


def _saved_indices(path: str | Path, indices: Any, n: int) -> list[int]:
    """A saved file's indices, checked: positions in a split of `n` images, each once. An edited
    or damaged file trained on the wrong images without a word (a negative index names an image
    from the end, a repeated one weighs it twice, an empty list trains on nothing)."""
    if not isinstance(indices, list) or not indices:
        what = "no indices" if indices is None else f"indices that are {indices!r:.40}"
        raise ValueError(f"subset_file {path} holds {what}, not a non-empty list of image "
                         "positions: pass the label_subset_*.json an earlier run wrote, unedited, "
                         "or draw a new subset (label_fraction)")
    bad = next((i for i in indices if type(i) is not int or not 0 <= i < n), None)
    if bad is not None or len(set(indices)) != len(indices):
        problem = (f"{bad!r} is not a position in the split's {n} images (0 to {n - 1})"
                   if bad is not None else "it names an image more than once")
        raise ValueError(f"subset_file {path}: its indices are not the ones a run saves: "
                         f"{problem}. Pass the label_subset_*.json an earlier run wrote, "
                         "unedited, or draw a new subset (label_fraction)")
    return indices
