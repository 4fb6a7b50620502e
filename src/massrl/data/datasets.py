"""Dataset registry: `load_dataset(cfg)` finds a dataset offline (or downloads it when allowed)
and returns its splits as datasets of ``(PIL RGB image, label)`` items, label -1 when unlabeled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from massrl.config import ConfigError, DataConfig
from massrl.data.download_lock import one_download_at_a_time
from massrl.data.folder import UnusableDataError
from massrl.data.folder_splits import folder_splits, imagenet_splits
from massrl.data.idx import FASHION_STEMS, find_idx_folder, idx_file, read_idx_pair
from massrl.data.splits import (
    IMAGENET_STATS,
    DatasetNotFoundError,
    DatasetSplits,
    dataset_root,
    not_found,
)
from massrl.data.subset import balanced_subset, random_subset

__all__ = [  # (DatasetSplits and the errors are imported from here by users and other modules)
    "DatasetNotFoundError", "DatasetSplits", "IMAGENET_STATS", "UnusableDataError",
    "class_balanced", "load_dataset",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


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
        check_covers_the_classes("data.eval_subset", cfg.eval_subset, splits)
        if splits.train_labeled is not None:
            splits.train_labeled = class_balanced(splits.train_labeled, cfg.eval_subset, seed)
        if splits.test is not None:
            splits.test = class_balanced(splits.test, cfg.eval_subset, seed)
    splits.mean = tuple(cfg.mean) if cfg.mean is not None else splits.mean
    splits.std = tuple(cfg.std) if cfg.std is not None else splits.std
    return splits


def check_covers_the_classes(key: str, n: int, splits: DatasetSplits) -> None:
    """ConfigError when a class-balanced subset of the labeled splits of `n` images cannot hold
    every class: the bank and the test split would each draw other classes (by their sizes), and
    kNN and probe scored 0 % on classes the bank lacks, without a word."""
    classes = splits.num_classes
    if classes and splits.train_labeled is not None and n < classes:
        raise ConfigError(f"{key}={n} is fewer images than the {classes} classes: a "
                          "class-balanced draw of them leaves classes out of the labeled "
                          "training images (the kNN bank, a linear head's; the test split's "
                          "draw leaves out other ones), and a test image of a class they lack "
                          f"cannot be recognised. Use {key} >= {classes} (or null)")


def class_balanced(ds: Dataset, n: int, seed: int) -> Dataset:
    """A seeded class-balanced subset of n images of `ds` (all of them when it has no more; a
    uniform one of a dataset of one's own that lists no `targets`)."""
    if n >= len(ds):
        return ds
    labels = getattr(ds, "targets", None)
    return SubsetDataset(ds, balanced_subset(labels, n, seed) if labels is not None
                         else random_subset(len(ds), n, seed))



# ---------------------------------------------------------------- fashion-mnist and digits


def _fashion_mnist(cfg: DataConfig, seed: int) -> DatasetSplits:
    base = dataset_root(cfg)
    # the root itself, torchvision's layout below it, then (without a data.root: a mistyped one
    # trained on the Debian copy, recording a folder it never read) the Debian package
    folders = [base, base / "FashionMNIST" / "raw", base / "fashion-mnist"]
    if not cfg.root:
        folders.append(DEBIAN_FASHION_MNIST)
    folder = find_idx_folder(folders)
    if folder is None and cfg.download:
        folder = _download_fashion_mnist(base, folders)
    if folder is None:
        raise not_found("fashion_mnist", folders, [
            f"restore data.root, or link the Debian package's copy there (ln -s "
            f"{DEBIAN_FASHION_MNIST} {base}): a checkpoint's evaluation or resume then reads "
            f"the same data; a new run may take data.root=null, which reads that copy" if cfg.root
            else
            f"apt-get install dataset-fashion-mnist (installs into {DEBIAN_FASHION_MNIST})",
            "data.download=true with a network connection (torchvision downloads into data.root)",
            "data.root=DIR pointing at a folder with the four *-ubyte(.gz) IDX files",
        ])
    files = [idx_file(folder, stem) for stem in FASHION_STEMS]
    remedy = _fashion_remedy(folder)
    train = ArrayImageDataset(*read_idx_pair(*files[:2], 10, remedy), FASHION_CLASSES)
    test = ArrayImageDataset(*read_idx_pair(*files[2:], 10, remedy), FASHION_CLASSES)
    return DatasetSplits(
        train, train, test, 10, list(FASHION_CLASSES), (0.2860,) * 3, (0.3530,) * 3, 28
    )


def _fashion_remedy(folder: Path) -> str:
    """What to do about a bad file of `folder`: the Debian package's cannot be deleted."""
    if folder == DEBIAN_FASHION_MNIST:
        return "reinstall the package: apt-get install --reinstall dataset-fashion-mnist"
    return ("delete the bad file and download the dataset again (data.download=true), or copy "
            "it again from where it came from")


def _download_fashion_mnist(base: Path, looked: Sequence[Path]) -> Path:
    from torchvision.datasets import FashionMNIST

    # (offline, the Debian package is the other way to get it: the error says so)
    _torchvision_call("fashion_mnist", looked, lambda: FashionMNIST(str(base), download=True),
                      download_into=base, also=[
                          f"apt-get install dataset-fashion-mnist, then data.root=null (reads "
                          f"{DEBIAN_FASHION_MNIST}) or ln -s {DEBIAN_FASHION_MNIST} {base}"])
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
                      download_into: Path | None = None, also: Sequence[str] = ()):
    """Run a torchvision constructor (downloading into `download_into` when given, one process
    at a time); its "not found" and offline download errors become a DatasetNotFoundError that
    says where massrl looked and how to get the data (`also`: other ways)."""
    try:
        with one_download_at_a_time(download_into):
            return make()
    except (RuntimeError, OSError) as exc:  # RuntimeError: not found; OSError/URLError: offline
        err = not_found(name, looked, [
            "data.download=true with a network connection (torchvision downloads into data.root)",
            "data.root=DIR pointing at the folder that holds the torchvision files", *also,
        ])
        raise DatasetNotFoundError(f"{err}\n(torchvision said: {exc})") from exc


def _cifar(cfg: DataConfig, seed: int, hundred: bool) -> DatasetSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, name = (CIFAR100, "cifar100") if hundred else (CIFAR10, "cifar10")
    root = dataset_root(cfg)
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

    root = dataset_root(cfg)
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


_LOADERS: dict[str, Callable[[DataConfig, int], DatasetSplits]] = {
    "fashion_mnist": _fashion_mnist,
    "digits": _digits,
    "cifar10": lambda cfg, seed: _cifar(cfg, seed, hundred=False),
    "cifar100": lambda cfg, seed: _cifar(cfg, seed, hundred=True),
    "stl10": _stl10,
    "folder": folder_splits,
    "imagenet": lambda cfg, seed: imagenet_splits(cfg, seed, "imagenet"),
    "imagenet100": lambda cfg, seed: imagenet_splits(cfg, seed, "imagenet100"),
}

