"""The image-folder loaders: `data.name=folder` (class sub-folders, unlabeled folders, train/ and
val/ splits) and ImageNet's layout."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from massrl.config import DataConfig
from massrl.data.folder import (
    FileImageDataset,
    UnusableDataError,
    folders_with_images,
    is_class_folder_layout,
    labeled_folder,
    left_out_note,
    split_dirs,
    split_spelling_note,
    typical_size,
    unlabeled_folder,
    why_unlabeled,
)
from massrl.data.splits import (
    IMAGENET_STATS,
    DatasetNotFoundError,
    DatasetSplits,
    dataset_root,
    not_found,
)


def folder_splits(cfg: DataConfig, seed: int) -> DatasetSplits:
    if not cfg.root:
        raise not_found("folder", ["(data.root is not set)"], [
            "data.root=DIR pointing at a folder of images: class sub-folders (labeled), any "
            "layout (unlabeled), or train/ and val/ sub-folders"
        ])
    root = Path(cfg.root).expanduser()
    _require_folder("folder", root)
    train_dir, test_dir, unused = split_dirs(root)
    for folder in unused:
        print(f"data: {folder} is not used (held out: {test_dir.name})")
    if spelling := split_spelling_note(root):
        print(spelling)
    labeled = {"auto": is_class_folder_layout(train_dir), "folders": True, "none": False}
    left_out: Counter = Counter()  # (files that are no images, by extension)
    if not labeled[cfg.labels]:
        train = unlabeled_folder(train_dir, cfg.strict, left_out)
        if not train.paths:
            how = [f"put image files ({_EXTS}) under {train_dir}{left_out_note(left_out)}"]
            raise not_found("folder", [train_dir], how)
        ignored = f"; {test_dir} is not used" if test_dir is not None else ""
        why = (" (data.labels=none)" if cfg.labels == "none" else
               " (no kNN or probe monitors)" if spelling else why_unlabeled(train_dir))
        print(f"data: {train_dir}: {len(train)} unlabeled images{why}{ignored}"
              f"{left_out_note(left_out)}")
        mean, std = IMAGENET_STATS
        return DatasetSplits(train, None, None, None, None, mean, std, typical_size(train.paths))
    if len(classes := folders_with_images(train_dir)) < 2:  # (data.labels=folders)
        raise UnusableDataError(f"data.labels=folders: {train_dir} has {len(classes)} sub-folder"
                                "(s) holding images, and classes need 2 or more; data.labels="
                                "auto or none reads it unlabeled")
    splits = _labeled_splits(train_dir, test_dir, cfg, seed, left_out)
    names = ", ".join(splits.classes[:5]) + (", ..." if len(splits.classes) > 5 else "")
    held_out = f"{test_dir}" if test_dir is not None else "a seeded 80/20 split"
    print(f"data: {train_dir}: {splits.num_classes} classes ({names}); {len(splits.train)} "
          f"images to train on, {len(splits.test)} held out ({held_out})"
          f"{left_out_note(left_out)}")
    return splits


def imagenet_splits(cfg: DataConfig, seed: int, name: str) -> DatasetSplits:
    root = dataset_root(cfg)
    looked = [root / "train", root / "val"]
    how = [f"data.root=DIR where DIR/train and DIR/val hold one sub-folder per class ({name} "
           "must be obtained from image-net.org; torchvision cannot download it)"]
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise not_found(name, looked, how)
    if not is_class_folder_layout(root / "val", min_classes=1):
        raise DatasetNotFoundError(
            f"{root / 'val'} has no class sub-folders; sort the validation images into one "
            "folder per class (as in train/)"
        )
    return _labeled_splits(root / "train", root / "val", cfg, seed)


def _labeled_splits(
    train_dir: Path, test_dir: Path | None, cfg: DataConfig, seed: int,
    left_out: Counter | None = None,
) -> DatasetSplits:
    train = labeled_folder(train_dir, cfg.strict, left_out=left_out)
    classes = train.classes
    if test_dir is not None:
        if not is_class_folder_layout(test_dir, min_classes=1):
            raise UnusableDataError(
                f"{train_dir} has class sub-folders but {test_dir} has no class sub-folder "
                "holding images; sort the held-out images into the same class folders (or "
                "remove the folder to split train 80/20)"
            )
        test = labeled_folder(test_dir, cfg.strict, classes, left_out, train_dir)
    else:  # no held-out folder: a seeded, stratified 80/20 split, as for digits
        train, test = _stratified_split(train, seed)
    mean, std = IMAGENET_STATS
    size = typical_size(train.paths)
    return DatasetSplits(train, train, test, len(classes), classes, mean, std, size)


def _stratified_split(
    ds: FileImageDataset, seed: int, test_fraction: float = 0.2
) -> tuple[FileImageDataset, FileImageDataset]:
    from sklearn.model_selection import train_test_split

    targets = np.asarray(ds.targets)
    counts = np.bincount(targets)
    # sklearn stratifies classes of 2 images or more: a class of one goes to the training split
    # whole (dropping the stratification for every class left whole classes out of the test)
    single = np.flatnonzero(counts[targets] < 2)
    idx = np.flatnonzero(counts[targets] >= 2)
    try:
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                  stratify=targets[idx])
    except ValueError:  # fewer test images than classes: a plain split of what there is
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed)
    if len(single):
        names = [ds.classes[c] if ds.classes else str(c) for c in np.flatnonzero(counts == 1)]
        warnings.warn(f"classes with a single image have no test image: {names[:10]}; the "
                      "held-out split scores the other classes only", stacklevel=2)
    return _select(ds, np.sort(np.concatenate([tr, single]))), _select(ds, np.sort(te))


def _select(ds: FileImageDataset, indices: Sequence[int]) -> FileImageDataset:
    return FileImageDataset(
        [ds.paths[i] for i in indices], [ds.targets[i] for i in indices], ds.classes, ds.strict
    )


def _require_folder(name: str, root: Path) -> None:
    if not root.is_dir():
        raise not_found(name, [root], [
            "data.root=DIR pointing at an existing folder of images (an ImageFolder with class "
            "sub-folders, or any folder of images for unlabeled pre-training)"
        ])


_EXTS = "jpg, jpeg, png, bmp, gif, tif, tiff, webp"
