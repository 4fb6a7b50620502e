"""Dataset registry: `load_dataset(cfg)` finds a dataset offline (or downloads it when allowed)
and returns its splits as datasets of ``(PIL RGB image, label)`` items, label -1 when unlabeled.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from massrl.config import DataConfig, default_root
from massrl.data.download_lock import one_download_at_a_time
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
from massrl.data.idx import FASHION_STEMS, find_idx_folder, idx_file, read_idx
from massrl.data.subset import balanced_subset, random_subset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not where massrl looked; the message lists the places and how to get it."""


@dataclass
class DatasetSplits:
    """The datasets of a run; each item is ``(PIL image, label)``, label -1 when unlabeled.

    Datasets of one's own go to ``SSLDataModule(cfg, splits=DatasetSplits(train=...))`` and are
    used as given: the config's data selection (``data.name``, ``root``, ``subset``,
    ``eval_subset``, ``mean``, ``std``) applies to the datasets massrl loads, not to these.
    Only ``train`` is needed; the online kNN monitor and probe run when ``train_labeled`` and
    ``test`` are given, with ``num_classes`` (or ``classes``, which gives it).
    """

    train: Dataset  # pre-training images
    train_labeled: Dataset | None = None  # kNN bank / linear-probe training; may be `train`
    test: Dataset | None = None
    num_classes: int | None = None
    classes: list[str] | None = None
    mean: tuple[float, float, float] = IMAGENET_STATS[0]  # the input normalisation
    std: tuple[float, float, float] = IMAGENET_STATS[1]
    native_size: int | None = None  # the images' typical side (evaluation transfer uses it)

    def __post_init__(self) -> None:
        if self.num_classes is None and self.classes is not None:
            self.num_classes = len(self.classes)
        labeled = self.train_labeled is not None and self.test is not None
        if labeled and self.num_classes is None:
            raise ValueError("DatasetSplits with train_labeled and test needs num_classes (or "
                             "classes) for the kNN monitor and probe; leave train_labeled=None "
                             "to pre-train without them")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3 or (name == "std" and min(values) <= 0):
                raise ValueError(f"DatasetSplits.{name} must be 3 channel values"
                                 + (", all > 0" if name == "std" else "") + f": got {values}")
            if max(abs(v) for v in values) > 1:  # images are scaled to [0, 1] before
                raise ValueError(f"DatasetSplits.{name}={values} looks like 0-255 values: "
                                 "give them on the [0, 1] scale (divide by 255)")
            setattr(self, name, values)


class ArrayImageDataset(Dataset):
    """In-memory uint8 images ``[N, H, W]`` (grey, repeated to RGB) or ``[N, H, W, 3]``."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: list[str]) -> None:
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]).convert("RGB"), self.targets[index]


class SubsetDataset(Subset):
    """torch's Subset that keeps ``targets`` and ``classes`` (class-balanced subsets need them)."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        super().__init__(base, list(indices))
        self.targets = [base.targets[i] for i in self.indices]
        self.classes = getattr(base, "classes", None)

    @property
    def base(self) -> Dataset:
        """The dataset drawn from (torch's name for it: `dataset`)."""
        return self.dataset


class TorchvisionDataset(Dataset):
    """A torchvision dataset with RGB images, int labels and a ``targets`` list."""

    def __init__(self, base: Dataset, targets: Sequence[int], classes: list[str] | None) -> None:
        self.base, self.targets, self.classes = base, [int(t) for t in targets], classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.base[index]
        return image.convert("RGB") if image.mode != "RGB" else image, int(label)


def load_dataset(cfg: DataConfig, seed: int = 0) -> DatasetSplits:
    """The splits of ``cfg.name``, with ``cfg.subset`` / ``cfg.eval_subset`` and ``cfg.mean`` /
    ``cfg.std`` applied. Raises DatasetNotFoundError (saying where it looked) when it is missing."""
    splits = _LOADERS[cfg.name](cfg, seed)
    return _apply_config(splits, cfg, seed)


def _apply_config(splits: DatasetSplits, cfg: DataConfig, seed: int) -> DatasetSplits:
    if cfg.subset is not None:
        same = splits.train_labeled is splits.train
        splits.train = class_balanced(splits.train, cfg.subset, seed)
        if same:
            splits.train_labeled = splits.train
    if cfg.eval_subset is not None:
        if splits.train_labeled is not None:
            splits.train_labeled = class_balanced(splits.train_labeled, cfg.eval_subset, seed)
        if splits.test is not None:
            splits.test = class_balanced(splits.test, cfg.eval_subset, seed)
    splits.mean = tuple(cfg.mean) if cfg.mean is not None else splits.mean
    splits.std = tuple(cfg.std) if cfg.std is not None else splits.std
    return splits


def class_balanced(ds: Dataset, n: int, seed: int) -> Dataset:
    """A seeded class-balanced subset of n images of `ds` (all of them when it has no more; a
    uniform one of a dataset of one's own that lists no `targets`)."""
    if n >= len(ds):
        return ds
    labels = getattr(ds, "targets", None)
    return SubsetDataset(ds, balanced_subset(labels, n, seed) if labels is not None
                         else random_subset(len(ds), n, seed))


def _not_found(name: str, looked: Sequence[str | Path], how: Sequence[str]) -> DatasetNotFoundError:
    lines = [f"dataset '{name}' not found. Looked in:"]
    lines += [f"  - {p}" for p in looked]
    lines.append("To get it:")
    lines += [f"  - {h}" for h in how]
    return DatasetNotFoundError("\n".join(lines))


# ---------------------------------------------------------------- fashion-mnist and digits


def _root(cfg: DataConfig) -> Path:
    """data.root, or the dataset's default folder."""
    return Path(cfg.root).expanduser() if cfg.root else default_root(cfg.name)


def _fashion_mnist(cfg: DataConfig, seed: int) -> DatasetSplits:
    base = _root(cfg)
    # the root itself, torchvision's layout below it, then the Debian package
    folders = [base, base / "FashionMNIST" / "raw", base / "fashion-mnist", DEBIAN_FASHION_MNIST]
    folder = find_idx_folder(folders)
    if folder is None and cfg.download:
        folder = _download_fashion_mnist(base, folders)
    if folder is None:
        raise _not_found("fashion_mnist", folders, [
            f"apt-get install dataset-fashion-mnist (installs into {DEBIAN_FASHION_MNIST})",
            "data.download=true with a network connection (torchvision downloads into data.root)",
            "data.root=DIR pointing at a folder with the four *-ubyte(.gz) IDX files",
        ])
    arrays = {stem: read_idx(idx_file(folder, stem)) for stem in FASHION_STEMS}
    train = ArrayImageDataset(arrays[FASHION_STEMS[0]], arrays[FASHION_STEMS[1]], FASHION_CLASSES)
    test = ArrayImageDataset(arrays[FASHION_STEMS[2]], arrays[FASHION_STEMS[3]], FASHION_CLASSES)
    return DatasetSplits(
        train, train, test, 10, list(FASHION_CLASSES), (0.2860,) * 3, (0.3530,) * 3, 28
    )


def _download_fashion_mnist(base: Path, looked: Sequence[Path]) -> Path:
    from torchvision.datasets import FashionMNIST

    _torchvision_call("fashion_mnist", looked, lambda: FashionMNIST(str(base), download=True),
                      download_into=base)
    return base / "FashionMNIST" / "raw"


def _digits(cfg: DataConfig, seed: int) -> DatasetSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    classes = [str(i) for i in range(10)]
    tr, te = train_test_split(
        np.arange(len(images)), test_size=0.2, random_state=seed, stratify=digits.target
    )
    tr, te = np.sort(tr), np.sort(te)
    train = ArrayImageDataset(images[tr], digits.target[tr], classes)
    test = ArrayImageDataset(images[te], digits.target[te], classes)
    return DatasetSplits(train, train, test, 10, classes, (0.3053,) * 3, (0.3759,) * 3, 8)


# ---------------------------------------------------------------- torchvision datasets


def _torchvision_call(name: str, looked: Sequence[str | Path], make: Callable[[], Dataset],
                      download_into: Path | None = None):
    """Run a torchvision constructor (downloading into `download_into` when given, one process
    at a time); its "not found" and offline download errors become a DatasetNotFoundError that
    says where massrl looked and how to get the data."""
    try:
        with one_download_at_a_time(download_into):
            return make()
    except (RuntimeError, OSError) as exc:  # RuntimeError: not found; OSError/URLError: offline
        err = _not_found(name, looked, [
            "data.download=true with a network connection (torchvision downloads into data.root)",
            "data.root=DIR pointing at the folder that holds the torchvision files",
        ])
        raise DatasetNotFoundError(f"{err}\n(torchvision said: {exc})") from exc


def _cifar(cfg: DataConfig, seed: int, hundred: bool) -> DatasetSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, name = (CIFAR100, "cifar100") if hundred else (CIFAR10, "cifar10")
    root = _root(cfg)
    looked = [root / cls.base_folder]

    def make(train: bool) -> TorchvisionDataset:
        ds = _torchvision_call(name, looked, lambda: cls(str(root), train, download=cfg.download),
                               download_into=root if cfg.download else None)
        return TorchvisionDataset(ds, ds.targets, list(ds.classes))

    train, test = make(True), make(False)
    if hundred:
        stats = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    else:
        stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    return DatasetSplits(train, train, test, len(train.classes), train.classes, *stats, 32)


def _stl10(cfg: DataConfig, seed: int) -> DatasetSplits:
    from torchvision.datasets import STL10

    root = _root(cfg)
    looked = [root / STL10.base_folder]

    def make(split: str) -> TorchvisionDataset:
        ds = _torchvision_call(
            "stl10", looked, lambda: STL10(str(root), split=split, download=cfg.download),
            download_into=root if cfg.download else None)
        return TorchvisionDataset(ds, ds.labels, list(ds.classes))

    # train+unlabeled for pre-training (torchvision labels the unlabeled part -1)
    train, labeled, test = make("train+unlabeled"), make("train"), make("test")
    stats = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))
    return DatasetSplits(train, labeled, test, 10, labeled.classes, *stats, 96)


# ---------------------------------------------------------------- image folders


def _folder(cfg: DataConfig, seed: int) -> DatasetSplits:
    if not cfg.root:
        raise _not_found("folder", ["(data.root is not set)"], [
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
            raise _not_found("folder", [train_dir], how)
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
    splits = _labeled_splits("folder", train_dir, test_dir, cfg, seed, left_out)
    names = ", ".join(splits.classes[:5]) + (", ..." if len(splits.classes) > 5 else "")
    held_out = f"{test_dir}" if test_dir is not None else "a seeded 80/20 split"
    print(f"data: {train_dir}: {splits.num_classes} classes ({names}); {len(splits.train)} "
          f"images to train on, {len(splits.test)} held out ({held_out})"
          f"{left_out_note(left_out)}")
    return splits


def _imagenet(cfg: DataConfig, seed: int, name: str) -> DatasetSplits:
    root = _root(cfg)
    looked = [root / "train", root / "val"]
    how = [f"data.root=DIR where DIR/train and DIR/val hold one sub-folder per class ({name} "
           "must be obtained from image-net.org; torchvision cannot download it)"]
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise _not_found(name, looked, how)
    if not is_class_folder_layout(root / "val", min_classes=1):
        raise DatasetNotFoundError(
            f"{root / 'val'} has no class sub-folders; sort the validation images into one "
            "folder per class (as in train/)"
        )
    return _labeled_splits(name, root / "train", root / "val", cfg, seed)


def _labeled_splits(
    name: str, train_dir: Path, test_dir: Path | None, cfg: DataConfig, seed: int,
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
        test = labeled_folder(test_dir, cfg.strict, classes, left_out)
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
        raise _not_found(name, [root], [
            "data.root=DIR pointing at an existing folder of images (an ImageFolder with class "
            "sub-folders, or any folder of images for unlabeled pre-training)"
        ])


_EXTS = "jpg, jpeg, png, bmp, gif, tif, tiff, webp"
_LOADERS: dict[str, Callable[[DataConfig, int], DatasetSplits]] = {
    "fashion_mnist": _fashion_mnist,
    "digits": _digits,
    "cifar10": lambda cfg, seed: _cifar(cfg, seed, hundred=False),
    "cifar100": lambda cfg, seed: _cifar(cfg, seed, hundred=True),
    "stl10": _stl10,
    "folder": _folder,
    "imagenet": lambda cfg, seed: _imagenet(cfg, seed, "imagenet"),
    "imagenet100": lambda cfg, seed: _imagenet(cfg, seed, "imagenet100"),
}

