"""Dataset registry, image folders, bad-file handling and subsets."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from massrl.config import DataConfig
from massrl.data import (
    BadImageError,
    BadImageWarning,
    DatasetNotFoundError,
    UnusableDataError,
    balanced_subset,
    collate_skip_bad,
    fraction_subset,
    load_dataset,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _img(path: Path, value: int = 100, size: tuple[int, int] = (12, 10), mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)
    return path


def _class_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4) -> Path:
    for ci, name in enumerate(classes):
        for i in range(per_class):
            _img(root / name / f"{i}.png", value=40 * ci + i)
    return root


# ---------------------------------------------------------------- folders


def test_a_class_of_one_image_keeps_the_others_stratified(tmp_path):
    root = tmp_path / "data"
    for ci, (name, n) in enumerate((("big", 20), ("small", 5), ("one", 1))):
        for i in range(n):
            _img(root / name / f"{i}.png", value=40 * ci + i)
    for seed in range(3):
        with pytest.warns(UserWarning, match=r"single image have no test image: \['one'\]"):
            splits = load_dataset(DataConfig(name="folder", root=str(root)), seed)
        assert splits.classes == ["big", "one", "small"]
        # 20 % of each class of 2 images or more; the class of one in training
        assert sorted(splits.test.targets) == [0] * 4 + [2]
        assert splits.train.targets.count(1) == 1


def test_class_folders_are_labeled(tmp_path):
    root = _class_folder(tmp_path / "data")
    _img(root / "dog" / "UPPER.JPG")  # extensions are case-insensitive
    (root / "dog" / "readme.txt").write_text("not an image")
    splits = load_dataset(DataConfig(name="folder", root=str(root)))
    assert splits.classes == ["cat", "dog", "eel"] and splits.num_classes == 3
    assert splits.train_labeled is splits.train
    # no val/ folder: a seeded stratified 80/20 split of the 13 images
    assert len(splits.train) + len(splits.test) == 13
    assert set(splits.test.targets) == {0, 1, 2}
    image, label = splits.train[0]
    assert image.mode == "RGB" and label == 0
    assert splits.mean == pytest.approx((0.485, 0.456, 0.406)) and splits.native_size == 10


def test_native_size_is_the_typical_image_not_the_first(tmp_path):
    root = _class_folder(tmp_path / "data", classes=("a", "b"), per_class=5)  # 12 x 10 images
    _img(root / "a" / "000_icon.png", size=(1, 1))  # sorts first
    _img(root / "b" / "000_banner.png", size=(2000, 20))
    assert load_dataset(DataConfig(name="folder", root=str(root))).native_size == 10


def test_folder_reading_says_what_it_found_and_why(tmp_path, capsys):
    root = _class_folder(tmp_path / "data", classes=("cat", "dog"), per_class=5)
    load_dataset(DataConfig(name="folder", root=str(root)))
    assert capsys.readouterr().out == (f"data: {root}: 2 classes (cat, dog); 8 images to train "
                                       "on, 2 held out (a seeded 80/20 split)\n")
    _img(root / "preview.jpg")  # one stray picture beside the class folders
    assert load_dataset(DataConfig(name="folder", root=str(root))).num_classes is None
    out = capsys.readouterr().out
    assert "11 unlabeled images" in out and "1 image lies directly in the folder" in out
    assert "preview.jpg" in out

    single = _class_folder(tmp_path / "one", classes=("cat",), per_class=3)
    load_dataset(DataConfig(name="folder", root=str(single)))
    assert "one sub-folder, cat: a single class cannot be evaluated" in capsys.readouterr().out

    # images loose in train/ beside a labeled val/: train/ is unlabeled, and val/ unused
    split = tmp_path / "split"
    _class_folder(split / "val", classes=("cat", "dog"), per_class=2)
    for i in range(3):
        _img(split / "train" / f"{i}.png")
    load_dataset(DataConfig(name="folder", root=str(split)))
    out = capsys.readouterr().out
    assert "3 unlabeled images" in out and f"; {split / 'val'} is not used" in out


def test_folder_skips_hidden_files_and_symlink_loops(tmp_path):
    root = _class_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3)
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    _img(root / "dog" / ".hidden.png")
    (root / "cat" / "loop").symlink_to("..")  # back up to the root
    splits = load_dataset(DataConfig(name="folder", root=str(root)))
    paths = [p.name for p in splits.train.paths + splits.test.paths]
    assert sorted(paths) == sorted(["0.png", "1.png", "2.png"] * 2)


def test_train_val_folders_share_class_numbering(tmp_path):
    _class_folder(tmp_path / "train")
    _class_folder(tmp_path / "val", classes=("dog", "eel"), per_class=2)
    splits = load_dataset(DataConfig(name="folder", root=str(tmp_path)))
    assert len(splits.train) == 12 and len(splits.test) == 4
    assert sorted(set(splits.test.targets)) == [1, 2]  # dog, eel as numbered in train/


def test_the_files_behind_a_subset_are_fingerprinted_and_checked(tmp_path):
    """data.subset / eval_subset wrap a folder in a class-balanced subset: its files still key
    the feature cache (a replaced file is new features) and data.strict still reads every
    held-out header (both saw no files behind such a subset)."""
    from massrl.data.folder import check_headers, files_fingerprint

    _class_folder(tmp_path / "train")
    _class_folder(tmp_path / "val", per_class=4)
    splits = load_dataset(DataConfig(name="folder", root=str(tmp_path), subset=6,
                                     eval_subset=3))
    assert len(splits.train) == 6 and len(splits.train_labeled) == len(splits.test) == 3
    before = files_fingerprint(splits.test)
    assert before is not None
    _img(tmp_path / "val" / "dog" / "1.png", value=250)
    assert files_fingerprint(splits.test) != before
    used = [splits.test.dataset.paths[i] for i in splits.test.indices]
    unused = sorted(set(splits.test.dataset.paths) - set(used))
    unused[0].write_bytes(b"")  # a file the split does not use is not its problem
    check_headers(splits.test)
    used[-1].write_bytes(b"")
    with pytest.raises(BadImageError, match=used[-1].name):
        check_headers(splits.test)


def test_flat_and_nested_unlabeled(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        _img(flat / f"{i}.jpg")
    splits = load_dataset(DataConfig(name="folder", root=str(flat)))
    assert len(splits.train) == 3 and splits.train[1][1] == -1
    assert splits.train_labeled is None and splits.test is None and splits.num_classes is None

    nested = tmp_path / "nested"  # year/month folders are not classes
    for y in ("2020", "2021"):
        for m in ("01", "02"):
            _img(nested / y / m / "x.webp")
    splits = load_dataset(DataConfig(name="folder", root=str(nested)))
    assert len(splits.train) == 4 and splits.train_labeled is None
    paths = [str(p) for p in splits.train.paths]
    assert paths == sorted(paths)


@pytest.mark.parametrize("labels", ["auto", "none"])
def test_reading_a_flat_folder_stats_no_file(tmp_path, monkeypatch, labels):
    """The layout checks stat'ed every entry (Path.is_dir / is_file): 400,000 calls for a flat
    folder of 100k images before its files were listed (seconds; minutes on a network disk)."""
    import os

    flat = tmp_path / "flat"
    for i in range(40):
        _img(flat / f"{i}.png")
    calls = []
    stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a[0]) or stat(*a, **k))
    splits = load_dataset(DataConfig(name="folder", root=str(flat), labels=labels))
    assert len(splits.train) == 40
    assert len([c for c in calls if str(c).endswith(".png")]) <= 1, calls[:5]


def test_data_labels_decides_what_a_folders_sub_folders_are(tmp_path, capsys):
    """Photos sorted into event folders were read as classes (a fifth held out of pre-training,
    kNN on meaningless labels), and classes holding their images one level deeper were read
    unlabeled, "no class sub-folders" said: data.labels=none / folders decide."""
    events = tmp_path / "events"
    for name in ("2023-xmas", "2024-beach"):
        for i in range(5):
            _img(events / name / f"{i}.jpg", value=20 * i)
    splits = load_dataset(DataConfig(name="folder", root=str(events), labels="none"))
    assert len(splits.train) == 10 and splits.num_classes is None
    assert "10 unlabeled images (data.labels=none)" in capsys.readouterr().out

    nested = tmp_path / "nested"
    for ci, name in enumerate(("a", "b")):
        for i in range(5):
            _img(nested / name / "sub" / f"{i}.png", value=40 * ci + i)
    load_dataset(DataConfig(name="folder", root=str(nested)))
    assert "hold their images in folders of their own" in capsys.readouterr().out
    splits = load_dataset(DataConfig(name="folder", root=str(nested), labels="folders"))
    assert splits.num_classes == 2 and len(splits.train) + len(splits.test) == 10
    with pytest.raises(UnusableDataError, match="classes need 2 or more"):
        load_dataset(DataConfig(name="folder", root=str(events / "2023-xmas"), labels="folders"))
    with pytest.raises(ValueError, match="labels=none applies to name=folder"):
        DataConfig(name="digits", labels="none")


def test_split_folders_spelt_otherwise_are_named_and_an_unused_one_said(tmp_path, capsys):
    """Train/ + Val/ or train/ + valid/ were read without a word (the held-out images trained
    on, or ignored), and test/ beside val/ silently. They are not taken for splits (a class
    may be named Train, and earlier runs' splits must stay as they were): a note says how."""
    _class_folder(tmp_path / "three" / "train", classes=("a", "b"))
    for held_out in ("val", "test"):
        _class_folder(tmp_path / "three" / held_out, classes=("a", "b"), per_class=2)
    splits = load_dataset(DataConfig(name="folder", root=str(tmp_path / "three")))
    assert (len(splits.train), len(splits.test)) == (8, 4)
    assert f"data: {tmp_path / 'three' / 'test'} is not used (held out: val)" in \
        capsys.readouterr().out
    for split in ("Train", "Val"):
        _class_folder(tmp_path / "caps" / split, classes=("a", "b"))
    load_dataset(DataConfig(name="folder", root=str(tmp_path / "caps")))
    out = capsys.readouterr().out
    assert "holds Train/, Val/: split folders are read as train/ with val/ or test/, in lower " \
           "case" in out
    assert "data.labels=folders" not in out  # (that would label the images Train and Val)
    _class_folder(tmp_path / "mixed" / "train", classes=("a", "b"))
    _class_folder(tmp_path / "mixed" / "Val", classes=("a", "b"))
    load_dataset(DataConfig(name="folder", root=str(tmp_path / "mixed")))
    assert "holds Val/: split folders are read as train/" in capsys.readouterr().out
    _class_folder(tmp_path / "three" / "validation", classes=("a", "b"))
    load_dataset(DataConfig(name="folder", root=str(tmp_path / "three")))
    assert "validation/ not used (the held-out split is val/)" in capsys.readouterr().out
    _class_folder(tmp_path / "vehicles", classes=("Bus", "Car", "Train"))
    splits = load_dataset(DataConfig(name="folder", root=str(tmp_path / "vehicles")))
    assert splits.num_classes == 3 and "note" not in capsys.readouterr().out  # a class Train


def test_files_that_are_no_images_are_counted_not_passed_over_silently(tmp_path, capsys):
    """An iPhone folder's HEIC pictures (or any other format) were left out without a word:
    the run trained on part of the photos."""
    _class_folder(tmp_path / "mix", classes=("a", "b"))
    (tmp_path / "mix" / "a" / "IMG_1.HEIC").write_bytes(b"x")
    (tmp_path / "mix" / "a" / "notes.txt").write_text("x")
    (tmp_path / "mix" / "b" / "Thumbs.db").write_text("x")  # (no word for these)
    load_dataset(DataConfig(name="folder", root=str(tmp_path / "mix")))
    assert capsys.readouterr().out.rstrip().endswith(
        "; 2 other files left out (1 .heic, 1 .txt); HEIC/HEIF pictures need converting to "
        "JPEG first")
    only_heic = tmp_path / "phone"
    only_heic.mkdir()
    (only_heic / "IMG_2.heic").write_bytes(b"x")
    with pytest.raises(DatasetNotFoundError, match=r"1 other files left out \(1 .heic\)"):
        load_dataset(DataConfig(name="folder", root=str(only_heic)))


def test_bad_files_skipped_with_warning_or_strict(tmp_path):
    root = tmp_path / "odd"
    _img(root / "grey.png", mode="L")
    _img(root / "rgba.png", mode="RGBA")
    _img(root / "cmyk.jpg", mode="CMYK")
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("hello")
    good = Path(_img(root / "full.jpg", size=(64, 64))).read_bytes()
    (root / "trunc.jpg").write_bytes(good[: len(good) // 2])
    ds = load_dataset(DataConfig(name="folder", root=str(root))).train
    assert len(ds) == 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    named = " ".join(str(w.message) for w in caught if issubclass(w.category, BadImageWarning))
    bad = [p.name for p, item in zip(ds.paths, items, strict=True) if item is None]
    assert sorted(bad) == ["text.png", "trunc.jpg", "zero.jpg"]
    assert all(name in named for name in bad)
    assert all(item[0].mode == "RGB" for item in items if item is not None)

    strict = load_dataset(DataConfig(name="folder", root=str(root), strict=True)).train
    with pytest.raises(BadImageError, match="data.strict=false"):
        [strict[i] for i in range(len(strict))]


def test_collate_skip_bad():
    import torch

    batch = [{"x": torch.ones(2), "label": 1}, None, {"x": torch.zeros(2), "label": 0}]
    out = collate_skip_bad(batch)
    assert out["x"].shape == (2, 2) and out["label"].tolist() == [1, 0] and out["skipped"] == 1
    assert collate_skip_bad([None, None]) == {"skipped": 2}
    from massrl.data.loading import BadItem

    out = collate_skip_bad([BadItem(7), {"x": torch.ones(2)}, BadItem(3)])
    assert out["skipped"] == 2 and out["skipped_index"] == [7, 3] and out["x"].shape == (1, 2)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        load_dataset(DataConfig(name="folder", root=str(tmp_path / "nowhere")))
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        load_dataset(DataConfig(name="folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError):
        load_dataset(DataConfig(name="folder", root=str(tmp_path / "empty")))


def test_imagenet_layout(tmp_path):
    _class_folder(tmp_path / "train", per_class=2)
    with pytest.raises(DatasetNotFoundError, match="val"):
        load_dataset(DataConfig(name="imagenet100", root=str(tmp_path)))
    _class_folder(tmp_path / "val", per_class=1)
    splits = load_dataset(DataConfig(name="imagenet", root=str(tmp_path)))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (6, 3, 3)


# ---------------------------------------------------------------- built-in datasets


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_offline(tmp_path):
    # no data.root: the Debian folder, never a download
    splits = load_dataset(DataConfig(name="fashion_mnist"))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (60000, 10000, 10)
    image, label = splits.train[0]
    assert image.mode == "RGB" and image.size == (28, 28) and 0 <= label < 10
    arr = np.asarray(image)
    assert (arr[..., 0] == arr[..., 2]).all() and arr.max() > 0
    assert Counter(splits.test.targets) == {c: 1000 for c in range(10)}


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_a_data_root_without_fashion_mnist_is_not_replaced_by_the_debian_copy(tmp_path):
    """A mistyped data.root trained on the Debian copy without a word, and the run recorded the
    folder it never read."""
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "fmnist_noisy")))
    assert "fmnist_noisy" in str(err.value)
    # (data.root=null evaluates a checkpoint as a transfer, another protocol: a link keeps it)
    assert f"link the Debian package's copy there (ln -s {FASHION} {tmp_path / 'fmnist_noisy'})" \
        in str(err.value) and "a new run may take data.root=null" in str(err.value)


def test_digits_and_subsets():
    cfg = DataConfig(name="digits", subset=100, eval_subset=50, mean=(0.5, 0.5, 0.5))
    splits = load_dataset(cfg, seed=3)
    assert len(splits.train) == 100 and splits.mean == (0.5, 0.5, 0.5)
    # eval_subset is drawn from the (already subset) labeled train split, and from test
    assert len(splits.train_labeled) == 50 and splits.train_labeled.dataset is splits.train
    assert len(splits.test) == 50
    only_subset = load_dataset(DataConfig(name="digits", subset=100), seed=3)
    assert only_subset.train_labeled is only_subset.train
    counts = Counter(splits.train.targets)
    assert max(counts.values()) - min(counts.values()) <= 1
    image, _ = splits.train[0]
    assert image.size == (8, 8) and np.asarray(image).max() > 200  # 0..16 scaled to 0..255
    full = load_dataset(DataConfig(name="digits"))
    assert len(full.train) + len(full.test) == 1797


def test_cifar10_missing_root_no_download(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "c")))
    assert str(tmp_path / "c") in str(info.value) and "data.download=true" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_an_offline_fashion_mnist_download_names_the_debian_package(tmp_path, monkeypatch):
    """data.download=true into an empty data.root, offline: the error listed the download and
    data.root only, not the package that gives the data without a network."""
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "f"), download=True))
    text = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in text and "name resolution" in text
    assert f"ln -s {FASHION} {tmp_path / 'f'}" in text


# ---------------------------------------------------------------- subsets


def test_balanced_subset_counts_and_seeds():
    labels = [0] * 50 + [1] * 30 + [2] * 3
    idx = balanced_subset(labels, 20, seed=0)
    assert idx == sorted(idx) and len(set(idx)) == 20
    counts = Counter(labels[i] for i in idx)
    assert counts[2] == 3 and abs(counts[0] - counts[1]) <= 1  # small class gives its shortfall
    assert balanced_subset(labels, 20, seed=0) == idx
    assert balanced_subset(labels, 20, seed=1) != idx
    assert balanced_subset(labels, 500, seed=0) == list(range(len(labels)))
    unlabeled = balanced_subset([-1] * 40, 10, seed=0)
    assert len(unlabeled) == 10 and unlabeled != balanced_subset([-1] * 40, 10, seed=1)


def test_fraction_subset_bounds():
    labels = [0] * 100 + [1] * 10 + [-1] * 5
    idx = fraction_subset(labels, 0.1, seed=0)
    counts = Counter(labels[i] for i in idx)
    assert counts == {0: 10, 1: 1}  # at least one per class, unlabeled never chosen
    assert fraction_subset(labels, 0.1, seed=0) == idx
    assert len(fraction_subset(labels, 1.0, seed=0)) == 110
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            fraction_subset(labels, bad, seed=0)


def test_file_list_digest_follows_names_and_labels_not_the_folders_place():
    from massrl.data.folder import FileImageDataset, file_list_digest

    paths = [f"/data/pics/{c}/{i}.png" for c in ("a", "b") for i in range(3)]
    labels = [0, 0, 0, 1, 1, 1]
    digest = file_list_digest(FileImageDataset(paths, labels))
    assert digest["files"] == 6
    moved = [p.replace("/data/pics", "/mnt/disk2/photos") for p in paths]
    assert file_list_digest(FileImageDataset(moved, labels)) == digest
    assert file_list_digest(FileImageDataset(paths[:-1], labels[:-1]))["sha256"] != \
        digest["sha256"]
    assert file_list_digest(FileImageDataset(paths, [0, 0, 1, 1, 1, 1]))["sha256"] != \
        digest["sha256"]


def test_downloads_into_one_root_take_turns(tmp_path, capsys):
    """The processes of a torchrun/srun run each load the data before they connect: with
    data.download=true the second waits for the first's download instead of writing the same
    archive at the same time."""
    import fcntl
    import threading

    from massrl.data.download_lock import one_download_at_a_time

    done = []

    def second() -> None:
        with one_download_at_a_time(tmp_path / "data"):
            done.append(True)

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / ".massrl-download.lock", "a") as first:
        fcntl.flock(first, fcntl.LOCK_EX)  # the first process, downloading
        waiting = threading.Thread(target=second)
        waiting.start()
        waiting.join(timeout=0.5)
        assert not done  # it waits for the lock
        fcntl.flock(first, fcntl.LOCK_UN)
    waiting.join(timeout=10)
    assert done
    assert "waiting for another process's download into" in capsys.readouterr().err


def test_a_root_where_no_lock_can_be_taken_still_loads(tmp_path, monkeypatch):
    """A read-only shared dataset folder, or one on a file system without locks: the data is
    there and no download happens, so the lock is not needed (it failed the run before)."""
    import fcntl

    from massrl.data import download_lock

    ran = []

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # (tests may run as root: simulated)

    monkeypatch.setattr(download_lock, "open", read_only, raising=False)
    with download_lock.one_download_at_a_time(tmp_path / "readonly"):
        ran.append("read-only")
    monkeypatch.undo()

    def no_locks(*args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with download_lock.one_download_at_a_time(tmp_path / "nolock"):
        ran.append("no locks")
    assert ran == ["read-only", "no locks"]


def test_undecodable_files_are_named_once_and_only_so_many(tmp_path):
    """Every epoch named every bad file again, in every loader: 1 % bad files of ImageNet
    printed 25k lines per epoch."""
    from massrl.data.folder import NAMED_BAD_FILES

    root = tmp_path / "bad"
    for i in range(NAMED_BAD_FILES + 5):
        (root / f"{i:02d}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{i:02d}.jpg").write_bytes(b"not a jpeg")
    _img(root / "ok.png")
    ds = load_dataset(DataConfig(name="folder", root=str(root))).train
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):  # two epochs
            assert sum(ds[i] is None for i in range(len(ds))) == NAMED_BAD_FILES + 5
    said = [str(w.message) for w in seen if issubclass(w.category, BadImageWarning)]
    assert len(said) == NAMED_BAD_FILES == len(set(said))
    assert "further undecodable files are skipped without a word" in said[-1]
