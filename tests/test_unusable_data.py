"""Data that cannot be trained on stops the command with one line that says what to change,
instead of a traceback or a run that trains nothing and exits 0."""

import gzip
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from massrl.cli import main
from massrl.commands.common import data_error_message
from massrl.config import DataConfig
from massrl.data import BadImageError, BadImageWarning, UnusableDataError, load_dataset


def _folder(root, good: int, bad: int):
    root.mkdir()
    for i in range(good):
        Image.new("RGB", (20, 20), (i * 6, 100, 200 - i * 4)).save(root / f"{i}.png")
    for i in range(bad):
        (root / f"broken{i}.png").write_bytes(b"not an image")
    return root


def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    return err[-1]


def test_fewer_images_than_one_batch(tmp_path, tiny, capsys):
    root = _folder(tmp_path / "few", good=10, bad=0)
    args = tiny("byol", **{"data.name": "folder", "data.root": str(root), "data.subset": "null",
                           "data.batch_size": "64"})
    assert main(["pretrain", *args]) == 2
    line = _last_error_line(capsys)
    assert line.startswith("massrl pretrain: the training split has 10 images")
    assert "data.batch_size=64" in line and "set data.batch_size=10 or less" in line
    assert "Traceback" not in capsys.readouterr().err


def test_a_folder_of_only_broken_files_stops_after_the_first_epoch(tmp_path, tiny, capsys):
    root = _folder(tmp_path / "broken", good=0, bad=6)
    args = tiny("byol", **{"data.name": "folder", "data.root": str(root), "data.subset": "null",
                           "data.batch_size": "2", "trainer.max_epochs": "3"})
    with pytest.warns(UserWarning, match="broken"):
        assert main(["pretrain", *args]) == 2
    line = _last_error_line(capsys)
    assert "no training image could be decoded in epoch 0" in line
    assert "all 6 were skipped" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_strict_mode_names_the_bad_file_in_one_line(tmp_path, tiny, capsys, workers):
    root = _folder(tmp_path / "strict", good=30, bad=1)
    args = tiny("byol", **{"data.name": "folder", "data.root": str(root), "data.subset": "null",
                           "data.batch_size": "8", "data.strict": "true",
                           "data.num_workers": str(workers), "seed": "1"})
    # the augmentation picture, drawn from the same files first, meets it and stops the run
    # (it had only warned, and the run went on to fail in training)
    code = main(["pretrain", *args])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("massrl pretrain: cannot decode image ") and "broken0.png" in last
    assert "data.strict=false" in last
    assert "Traceback" not in err


def test_every_command_exits_2_for_an_undecodable_image_under_strict(tmp_path, capsys):
    """The same bad input, the same exit status: an evaluation met the file as an OSError and
    exited 1 where pretrain exited 2 (README: 2 = the input was refused)."""
    from test_eval_commands import make_checkpoint

    root = tmp_path / "strict"
    root.mkdir()
    _folder(root / "a", good=12, bad=1), _folder(root / "b", good=12, bad=0)  # two classes
    ckpt = make_checkpoint(tmp_path / "tiny.ckpt")
    data = ["data.name=folder", "data.strict=true", "data.num_workers=0"]
    few = _folder(tmp_path / "few", good=2, bad=1)  # (augviz draws some images: here, all)
    for argv in (["knn", f"ckpt={ckpt}", "device=cpu", f"output_dir={tmp_path / 'knn'}",
                  f"cache_dir={tmp_path / 'cache'}", f"data.root={root}", *data],
                 ["augviz", f"data.root={few}", *data, "--images=3",
                  f"--out={tmp_path / 'a.png'}"]):
        assert main(argv) == 2, argv[0]
        last = _last_error_line(capsys)
        assert last.startswith(f"massrl {argv[0]}: cannot decode image ") and "broken0" in last


def test_data_error_message_keeps_a_worker_error_to_its_last_line():
    worker = BadImageError("Caught BadImageError in DataLoader worker process 0.\n"
                           "Original Traceback (most recent call last):\n  File \"x.py\", ...\n"
                           "massrl.data.images.BadImageError: cannot decode image /d/a.png: bad")
    assert data_error_message(worker) == "cannot decode image /d/a.png: bad"
    plain = BadImageError("/d/a.png", "truncated")
    assert data_error_message(plain) == "cannot decode image /d/a.png: truncated"


def test_bad_files_are_counted_once_however_many_epochs_meet_them(tmp_path, tiny):
    root = _folder(tmp_path / "some_bad", good=30, bad=3)
    args = tiny("byol", **{"data.name": "folder", "data.root": str(root), "data.subset": "null",
                           "data.batch_size": "3", "trainer.max_epochs": "3"})
    with pytest.warns(UserWarning, match="broken"):
        assert main(["pretrain", *args]) == 0
    run_dir = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_files"] == 3  # 33 images / batch 3: every file is met each epoch
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert len(ckpt["massrl"]["bad_images"]) == 3  # kept for a resumed run


def test_augviz_on_a_folder_of_only_broken_files(tmp_path, capsys):
    root = _folder(tmp_path / "broken", good=0, bad=3)
    with pytest.warns(UserWarning, match="broken"):
        code = main(["augviz", "data.name=folder", f"data.root={root}", "--images", "2",
                     "--out", str(tmp_path / "x.png")])
    assert code == 2
    line = _last_error_line(capsys)
    assert line.startswith("massrl augviz: none of the") and "could be decoded" in line
    assert not (tmp_path / "x.png").exists()


def test_skipped_images_are_one_line_warnings_on_the_command_line(tmp_path):
    import subprocess
    import sys

    root = _folder(tmp_path / "imgs", good=6, bad=1)
    out = subprocess.run([sys.executable, "-m", "massrl", "augviz", "data.name=folder",
                          f"data.root={root}", "--images", "7", "--out", str(tmp_path / "a.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "broken0.png" in line]
    assert lines and all(line.startswith("warning: skipping image ") for line in lines)
    assert "BadImageWarning" not in out.stderr and "item = " not in out.stderr


@pytest.mark.parametrize("command", ["pretrain", "augviz"])
def test_train_and_val_folders_that_do_not_match_are_one_line_errors(tmp_path, tiny, capsys,
                                                                      command):
    """val/ with a class that train/ lacks, or with only empty class folders: a message naming
    the folders, not a traceback."""
    extra, empty = tmp_path / "extra", tmp_path / "empty"
    for root in (extra, empty):
        for split, name in (("train", "a"), ("train", "b"), ("val", "a"), ("val", "b")):
            (root / split / name).mkdir(parents=True)
            if root is extra or split == "train":
                Image.new("RGB", (20, 20), (9, 99, 199)).save(root / split / name / "0.png")
    (extra / "val" / "z").mkdir()
    Image.new("RGB", (20, 20)).save(extra / "val" / "z" / "0.png")
    # a class folder of train/ without images (it said train/ lacked the folder)
    unfilled = tmp_path / "unfilled"
    shutil.copytree(extra, unfilled)
    (unfilled / "train" / "z").mkdir()
    expected = {extra: "class folders that the training split lacks: ['z']",
                empty: "has no class sub-folder holding images",
                unfilled: f"images of classes whose folders in {unfilled / 'train'} hold none: "
                          "['z']"}
    for root, message in expected.items():
        args = tiny("byol", **{"data.name": "folder", "data.root": str(root),
                               "data.subset": "null"})
        if command == "augviz":
            args = [a for a in args if a.startswith("data.")] + ["--out", str(tmp_path / "v.png")]
        assert main([command, *args]) == 2
        line = _last_error_line(capsys)
        assert line.startswith(f"massrl {command}: ") and message in line


def test_a_file_name_that_is_not_utf8_is_fingerprinted(tmp_path):
    """Linux file names are bytes: the feature cache's fingerprint must take any of them."""
    from massrl.data.folder import files_fingerprint, labeled_folder

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    odd = os.fsencode(tmp_path / "a") + b"/\xfe_1.png"
    with open(odd, "wb") as f:
        Image.new("RGB", (8, 8), (200, 0, 0)).save(f, format="PNG")
    ds = labeled_folder(tmp_path, strict=False)
    assert len(ds) == 3
    before = files_fingerprint(ds)
    os.utime(odd, ns=(1, 1))
    assert files_fingerprint(ds) != before


def test_pil_warnings_about_a_file_are_one_line_too():
    from PIL import Image as PILImage

    from massrl.cli import _format_warning

    pil_file = PILImage.__file__
    for category in (UserWarning, PILImage.DecompressionBombWarning):
        text = _format_warning("Corrupt EXIF data.", category, pil_file, 1, None)
        assert text == "warning: Corrupt EXIF data.\n"
    other = _format_warning("deprecated", FutureWarning, pytest.__file__, 1, None)
    assert "FutureWarning" in other  # other libraries' warnings: as Python formats them


def test_data_that_goes_away_mid_run_stops_the_run_but_one_deleted_file_is_skipped(tmp_path):
    """A folder that disappears (an unmounted disk) is not a run of bad files to skip."""
    from massrl.data import UnusableDataError
    from massrl.data.folder import labeled_folder

    root = tmp_path / "pics"
    root.mkdir()
    for name in ("a", "b"):
        _folder(root / name, good=2, bad=0)
    ds = labeled_folder(root, strict=False)
    Path(ds.paths[0]).unlink()  # one file deleted: skipped with a warning
    with pytest.warns(UserWarning, match="skipping image"):
        assert ds[0] is None
    root.rename(tmp_path / "elsewhere")
    with pytest.raises(UnusableDataError, match=r"that held .* is gone .* resume=auto"):
        ds[1]


def test_strict_mode_checks_the_held_out_files_before_training(tiny, capsys, split_folders):
    """A held-out file that is no image stops a strict run before training, not after the
    first epoch (at the first validation), which had lost that epoch."""
    root = split_folders("tv", size=20)
    (root / "val" / "b" / "empty.png").write_bytes(b"")
    args = tiny("byol", **{"data.name": "folder", "data.root": str(root), "data.subset": "null",
                           "data.batch_size": "8", "data.strict": "true"})
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "empty.png: empty file (0 bytes)" in err
    out = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    assert not out.exists()  # stopped before training: nothing trained, nothing left


@pytest.mark.parametrize("key", ["data.eval_subset", "eval.knn_bank"])
def test_a_labeled_subset_smaller_than_the_class_count_is_refused(tiny, key, capsys):
    """eval_subset=5 on 10 classes drew classes [1,3,4,5,6] for the bank and [0,1,3,5,9] for
    the test split: kNN and the linear probe scored 0 % without a word."""
    args = tiny("byol", **{key: "5"})
    assert main(["pretrain", "-c", "fashion_mnist/byol", *args]) == 2
    err = capsys.readouterr().err
    assert f"{key}=5 is fewer images than the 10 classes" in err and f"{key} >= 10" in err
    assert not Path(args[-1].split("=", 1)[1]).exists()  # (output_dir: nothing made)


def test_a_checkpoints_own_small_eval_subset_is_named_as_the_checkpoints(tmp_path, capsys):
    from test_eval_commands import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "small.ckpt", data={"eval_subset": 5})
    base = ["knn", f"ckpt={ckpt}", "device=cpu", f"output_dir={tmp_path / 'knn'}",
            f"cache_dir={tmp_path / 'c'}"]
    assert main(base) == 2
    assert "the checkpoint's data.eval_subset=5 is fewer" in capsys.readouterr().err
    assert main([*base, "data.eval_subset=null"]) == 0


def _read_every_item(splits) -> tuple[list[str], str]:
    """The names of the files skipped when every item of the splits is read, and the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [(p.name, ds[i]) for ds in (splits.train, splits.test)
                 for i, p in enumerate(ds.paths)]
    said = " ".join(str(w.message) for w in caught if issubclass(w.category, BadImageWarning))
    return sorted(name for name, item in items if item is None), said


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_among_the_images_is_skipped_not_waited_on(split_folders):
    """A named pipe named like an image made the folder's size sampling wait forever for a
    writer (before any file was checked)."""
    root = split_folders(per_class=3)
    os.mkfifo(root / "train" / "b" / "fifo.png")

    class Waited(BaseException):  # (not an Exception: the sampling passed over those)
        pass

    def waited(*_):
        raise Waited("load_dataset waited 30 s on the named pipe")

    before = signal.signal(signal.SIGALRM, waited)
    signal.alarm(30)
    try:
        splits = load_dataset(DataConfig(name="folder", root=str(root)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    assert splits.native_size == 16
    skipped, said = _read_every_item(splits)
    assert skipped == ["fifo.png"]
    assert "fifo.png: not a regular file (a named pipe, socket or device)" in said


def test_a_symlink_loop_among_the_images_is_skipped(split_folders):
    """A symlink loop (a.png -> b.png -> a.png) stopped the run with "Too many levels of
    symbolic links" where scandir listed it before an image."""
    root = split_folders(per_class=3)
    for where in (root, root / "train", root / "val" / "a"):  # beside and among class folders
        (where / "loopa.png").symlink_to("loopb.png")
        (where / "loopb.png").symlink_to("loopa.png")
    (root / "train" / "loop").symlink_to("loop")
    splits = load_dataset(DataConfig(name="folder", root=str(root)))
    assert splits.classes == ["a", "b"] and splits.native_size == 16
    skipped, said = _read_every_item(splits)
    assert skipped == ["loopa.png", "loopb.png"]
    assert "loopa.png: Too many levels of symbolic links" in said


def test_a_very_large_image_in_a_folder_is_named_in_its_warning(split_folders, monkeypatch):
    """The folder's size sampling opened it with PIL's decompression-bomb warning, which names
    no file; the one massrl gives when the image is read names it."""
    root = split_folders(per_class=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 16 x 16 = 256: large, not refused
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_dataset(DataConfig(name="folder", root=str(root)))
        splits.train[0]
    said = [str(w.message) for w in caught if w.category is Image.DecompressionBombWarning]
    assert said == [f"{splits.train.paths[0]}: a very large image (16 x 16 px) takes much "
                    "memory to decode; downscale it if it is not meant to be this large"]


def _idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">i4").tobytes()
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def _fashion_files(folder: Path, train_labels=None, test_labels=None) -> Path:
    """The four Fashion-MNIST files, of 20 and 10 tiny images."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n, labels in (("train", 20, train_labels), ("t10k", 10, test_labels)):
        _idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 6, 6)))
        _idx(folder / f"{split}-labels-idx1-ubyte.gz",
             np.arange(n) % 10 if labels is None else np.asarray(labels))
    return folder


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "cut":  # a download killed while it wrote
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbled":
        path.write_bytes(data[:12] + b"\xff" * 8 + data[20:])
    elif how == "not gzip":
        path.write_bytes(b"<html>404</html>")
    elif how == "short":  # a whole gzip stream, of fewer values than the header says
        path.write_bytes(gzip.compress(gzip.decompress(data)[:-3]))
    else:  # "no idx": another format's magic
        path.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + gzip.decompress(data)[4:]))


@pytest.mark.parametrize("how", ["cut", "garbled", "not gzip", "short", "no idx"])
def test_a_damaged_fashion_mnist_file_is_named_with_what_to_do(tmp_path, how):
    root = _fashion_files(tmp_path / "fm")
    assert len(load_dataset(DataConfig(name="fashion_mnist", root=str(root))).test) == 10
    bad = root / "t10k-labels-idx1-ubyte.gz"
    _damage(bad, how)
    with pytest.raises(UnusableDataError) as err:
        load_dataset(DataConfig(name="fashion_mnist", root=str(root)))
    assert str(err.value).startswith(str(bad))
    assert str(err.value).endswith(": delete the bad file and download the dataset again "
                                   "(data.download=true), or copy it again from where it came "
                                   "from")


def test_fashion_mnist_labels_that_do_not_fit_the_images_are_refused(tmp_path):
    """A labels file of 5 labels for 20 images trained without a word; a label of 200 stopped
    the first batch with cross_entropy's "Target 200 is out of bounds"."""
    root = _fashion_files(tmp_path / "few", train_labels=[1, 2, 3, 4, 5])
    with pytest.raises(UnusableDataError, match=rf"{root}/train-images-idx3-ubyte.gz holds 20 "
                       rf"images but {root}/train-labels-idx1-ubyte.gz 5 labels"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(root)))
    root = _fashion_files(tmp_path / "beyond", test_labels=[200] + [0] * 9)
    with pytest.raises(UnusableDataError, match=rf"{root}/t10k-labels-idx1-ubyte.gz holds the "
                       r"label 200, beyond the 10 classes \(0 to 9\)"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(root)))


def test_a_damaged_fashion_mnist_file_is_one_line_on_the_command_line(tmp_path, tiny, capsys):
    root = _fashion_files(tmp_path / "fm")
    _damage(root / "t10k-labels-idx1-ubyte.gz", "cut")
    args = tiny(**{"data.name": "fashion_mnist", "data.root": str(root)})
    assert main(["pretrain", *args]) == 2
    assert _last_error_line(capsys).startswith(
        f"massrl pretrain: {root}/t10k-labels-idx1-ubyte.gz is damaged (Compressed file ended "
        "before the end-of-stream marker was reached; a download cut short?)")


def test_only_a_symlink_loop_is_passed_over_not_a_folder_that_cannot_be_read():
    """A class folder whose type cannot be read (permissions, a network disk's EIO) was dropped
    with its class, without a word, once every OSError counted as 'not a folder'."""
    import errno

    from massrl.data.folder import _is

    class Entry:
        def __init__(self, err: int) -> None:
            self.err = err

        def is_dir(self) -> bool:
            raise OSError(self.err, os.strerror(self.err))

        is_file = is_dir

    assert _is(Entry(errno.ELOOP), "dir") is False and _is(Entry(errno.ELOOP), "file") is False
    with pytest.raises(PermissionError):
        _is(Entry(errno.EACCES), "dir")

