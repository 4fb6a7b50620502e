"""Outputs are written whole or not at all, and a failed write names its file: a full disk met
by torch.save (which reports it as a RuntimeError), by a text file or by a picture."""

import errno
import json

import pytest
import torch

from massrl.files import atomic_write, save_figure, write_text


class _FillingFile:
    """A real file on a disk that is full once `room` bytes have been written to it."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.fixture
def disk_full_after(monkeypatch):
    """Files that atomic_write opens from now on fill the disk after `room` bytes."""
    import builtins

    from massrl import files

    def limit(room: int) -> None:
        monkeypatch.setattr(files, "open", lambda path, mode: _FillingFile(
            builtins.open(path, mode), room), raising=False)

    return limit


def test_torch_save_on_a_full_disk_keeps_the_old_file_and_names_the_new(tmp_path,
                                                                         disk_full_after):
    path = tmp_path / "w.pt"
    with atomic_write(path) as f:
        torch.save({"w": torch.ones(10)}, f)
    disk_full_after(1000)
    with pytest.raises(OSError) as caught, atomic_write(path) as f:
        torch.save({"w": torch.zeros(100_000)}, f)  # torch raises a RuntimeError here
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert torch.equal(torch.load(path)["w"], torch.ones(10))  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]  # no .tmp left behind


def test_text_and_figures_are_replaced_whole_or_not_at_all(tmp_path, disk_full_after):
    from matplotlib.figure import Figure

    text = tmp_path / "summary.json"
    write_text(text, json.dumps({"knn_top1": 0.5}))
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    picture = tmp_path / "umap.png"
    save_figure(fig, picture)
    assert picture.read_bytes().startswith(b"\x89PNG")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    disk_full_after(3)
    for write in (lambda: write_text(text, "x" * 100), lambda: save_figure(fig, picture)):
        with pytest.raises(OSError, match="No space left on device"):
            write()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_error_that_is_not_the_disk_passes_through(tmp_path):
    with pytest.raises(KeyError), atomic_write(tmp_path / "x.pt"):
        raise KeyError("a bug, not a full disk")
    assert list(tmp_path.iterdir()) == []


def test_a_replaced_file_keeps_its_permissions_and_a_link_stays_a_link(tmp_path):
    import os

    private = tmp_path / "config.yaml"
    private.write_text("old")
    private.chmod(0o600)
    write_text(private, "new")
    assert private.read_text() == "new" and (private.stat().st_mode & 0o777) == 0o600
    target, link = tmp_path / "weights.json", tmp_path / "latest.json"
    target.write_text("old")
    os.symlink(target, link)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
