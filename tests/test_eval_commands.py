"""End to end: `massrl knn|linear|umap|export` on a tiny fake checkpoint with the digits dataset."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from massrl.cli import main
from massrl.config import RunConfig
from massrl.eval.checkpoint import CheckpointError, load_pretrained
from massrl.models import build_backbone


def make_checkpoint(path, **overrides):
    tree = {"data": {"name": "digits", "image_size": 16, "num_workers": 0},
            "model": {"backbone": "resnet18", "cifar_stem": True, "width": 8}}
    for section, values in overrides.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    cfg = RunConfig.model_validate(tree)
    torch.manual_seed(0)
    backbone, _ = build_backbone(cfg.model.backbone, cfg.model.cifar_stem, cfg.model.width,
                                 cfg.data.image_size, cfg.model.kwargs)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["projector.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state, "hyper_parameters": {"config": cfg.model_dump(mode="json")},
                "massrl": {"version": "0.1.0"}}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def _run(tmp_path, command, *args, flags=()):
    out = tmp_path / command
    argv = [command, *args, f"output_dir={out}", "device=cpu"]
    if command != "export":
        argv.append(f"cache_dir={tmp_path / 'cache'}")
    argv += list(flags)  # argparse takes options before or after the KEY=VALUE list
    code = main(argv)
    result = out / "result.json"
    return code, (json.loads(result.read_text()) if result.is_file() else None)


class _Payload:
    """What a malicious checkpoint carries: unpickled, it creates its marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path, ckpt, capsys):
    """Every ckpt= and resume= path unpickled the whole file: a downloaded checkpoint ran its
    own code (and the command then went on as if nothing happened)."""
    from massrl.methods import SSLMethod

    marker = tmp_path / "ran"
    evil = torch.load(ckpt, weights_only=True)
    evil["payload"] = _Payload(marker)
    torch.save(evil, tmp_path / "evil.ckpt")
    for command in ("knn", "export"):
        code, _ = _run(tmp_path, command, f"ckpt={tmp_path / 'evil.ckpt'}")
        assert code == 2 and "does not unpickle" in capsys.readouterr().err
    assert main(["pretrain", "data.name=digits", f"output_dir={tmp_path / 'run'}",
                 f"resume={tmp_path / 'evil.ckpt'}"]) == 2
    assert "does not unpickle" in capsys.readouterr().err
    with open(tmp_path / "evil.ckpt", "rb") as f, pytest.raises(CheckpointError,
                                                                 match="does not unpickle"):
        SSLMethod.load_from_checkpoint(f)
    assert not marker.exists()
    assert load_pretrained(ckpt)[0] is not None  # a true one loads


def test_the_result_line_is_the_last_one_whole_and_absolute(tmp_path, ckpt, capsys,
                                                           monkeypatch):
    """A script takes it with `| tail -1`: rich wrapped a long path at 80 columns (and printed
    a relative one without output_dir)."""
    deep = tmp_path / "a_rather_long_directory_name_for_a_sweep" / "lr_0.5_wd_1e-6_seed_3"
    code, _ = _run(deep, "knn", f"ckpt={ckpt}", "k=[1]")
    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"result: {deep / 'knn' / 'result.json'}"
    monkeypatch.chdir(tmp_path)
    assert main(["knn", f"ckpt={ckpt}", "k=[1]", "device=cpu", "output_dir=rel",
                 f"cache_dir={deep / 'cache'}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"result: {tmp_path / 'rel/result.json'}"


def test_knn_records_protocol_and_reuses_cached_features(tmp_path, ckpt, capsys):
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}")
    assert code == 0
    # stdout is not a terminal here (a batch job's log): each feature pass says it ran
    out = capsys.readouterr().out
    assert re.search(r"^features \(train\): 1437 images  \d+ s$", out, re.M), out
    assert re.search(r"^features \(test\): 360 images  \d+ s$", out, re.M), out
    # the checkpoint's model is width 8: channels-last turned off on the CPU, as in its run
    assert res["protocol"]["features"] == {"precision": "float32", "backbone_mode": "eval",
                                           "channels_last": False}
    assert set(res["results"]) >= {"k=20", "k=200"}
    proto = res["protocol"]
    assert proto["checkpoint"]["sha256"] == load_pretrained(ckpt)[3]
    assert proto["config"]["temperature"] == 0.07 and proto["config"]["distance"] == "cosine"
    assert proto["dataset"]["sizes"] == {"train": 1437, "test": 360}
    assert not proto["dataset"]["transfer"]
    # what the numbers were made with: the resolved worker count, not `auto`; the packages
    from massrl.devices import resolve_num_workers

    assert proto["runtime"] == {"num_workers": resolve_num_workers("auto", on_cpu=True),
                                "cpu_threads": torch.get_num_threads()}
    versions = proto["versions"]
    assert versions["lightning"] and torch.__version__.startswith(versions["torch"])
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 2
    code, again = _run(tmp_path, "knn", f"ckpt={ckpt}", "k=[1]", "distance=euclidean")
    assert code == 0 and sorted((tmp_path / "cache").iterdir()) == cached
    # another evaluation seed on the checkpoint's data draws the same images: no new entries
    assert _run(tmp_path, "knn", f"ckpt={ckpt}", "k=[1]", "seed=5")[0] == 0
    assert sorted((tmp_path / "cache").iterdir()) == cached
    assert set(again["results"]) == {"k=1", "num_train", "num_test"}
    # the first evaluation's record in that folder is kept, not overwritten
    earlier = json.loads((tmp_path / "knn" / "result.1.json").read_text())
    assert earlier["results"] == res["results"]
    assert "is kept as result.1.json" in capsys.readouterr().out



def test_result_tables_line_up_figures_and_leave_paths_readable():
    """Figures are right-aligned (their digits line up); a table holding a path is
    left-aligned throughout (a right-aligned path scattered the export table's values)."""
    from rich.console import Console

    from massrl.eval.session import result_table

    def rendered(rows):
        console = Console(width=120, record=True, file=open(os.devnull, "w"))
        console.print(result_table(rows))
        return console.export_text()

    figures = rendered([("k=20 top-1", "25.78 %"), ("images", "128")])
    assert "│ 25.78 % │" in figures and "│     128 │" in figures, figures
    paths = rendered([("weights", "/a/long/folder/name/backbone.pt"), ("feature dim", "64")])
    assert re.search(r"│ 64 {20,}│", paths), paths
    assert "│ /a/long/folder/name/backbone.pt │" in paths, paths
    assert "metric" not in figures + paths  # no header row


def test_two_evaluations_finishing_into_one_folder_at_once_keep_both_records(tmp_path,
                                                                           monkeypatch):
    """One evaluation kept the earlier record aside, another wrote result.json meanwhile, and
    the first then wrote over it: a record lost (and both wrote through one temporary file)."""
    from massrl.eval import records

    path = tmp_path / "result.json"
    path.write_text("earlier")
    real_link = os.link
    interleaved = []

    def the_other_finishes_first(src, dst):
        if Path(dst) == path and not interleaved:  # between A's keep_earlier and its claim
            interleaved.append(True)
            records.write_record(path, "B")
        return real_link(src, dst)

    monkeypatch.setattr(records.os, "link", the_other_finishes_first)
    records.write_record(path, "A")
    texts = sorted(p.read_text() for p in tmp_path.glob("result*.json"))
    assert interleaved and texts == ["A", "B", "earlier"]
    assert path.read_text() == "A"  # the newest is result.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.1.json", "result.2.json",
                                                          "result.json"]  # no leftovers


def test_an_earlier_record_stays_under_its_name_when_keeping_it_fails(tmp_path, monkeypatch):
    """A failure after the record was moved aside left it under an internal name."""
    from massrl.eval import records

    def fails(held, path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(records, "_number", fails)
    (tmp_path / "result.json").write_text("earlier")
    with pytest.raises(OSError):
        records.keep_earlier(tmp_path / "result.json")
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert (tmp_path / "result.json").read_text() == "earlier"


def test_writers_of_one_shared_file_do_not_share_a_temporary_file(tmp_path):
    """Two evaluations caching the same features wrote through one `<file>.tmp`: the first
    rename took the second's file away mid-write."""
    from massrl.files import atomic_write

    path = tmp_path / "features.pt"
    with atomic_write(path, shared=True) as a, atomic_write(path, shared=True) as b:
        a.write(b"A" * 10)
        b.write(b"B" * 20)
    # (b finished first; a, finishing last, replaced it whole)
    assert path.read_bytes() == b"A" * 10 and list(tmp_path.iterdir()) == [path]


def test_an_earlier_record_is_kept_where_the_filesystem_has_no_hard_links(tmp_path,
                                                                         monkeypatch):
    """FAT, many FUSE and SMB mounts refuse os.link: the record is kept by a rename instead
    (it raised after the evaluation's work, and its result was lost)."""
    from massrl.eval import records

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(records.os, "link", no_links)
    (tmp_path / "result.json").write_text("first")
    (tmp_path / "result.1.json").write_text("older")
    records.keep_earlier(tmp_path / "result.json")
    assert not (tmp_path / "result.json").exists()
    assert (tmp_path / "result.2.json").read_text() == "first"
    assert (tmp_path / "result.1.json").read_text() == "older"


@pytest.mark.parametrize(("width", "trained_channels_last", "expected"), [
    (16, "true", True), (16, "false", False), (8, "true", False)])
def test_features_are_computed_in_the_layout_the_run_trained_in(tmp_path, width,
                                                                  trained_channels_last, expected):
    """Channels-last batches are faster on the CPU, and the features depend on the batches'
    layout in the last digits: an evaluation takes the run's, so that its kNN is the online
    monitor's on float32 features (a width-8 ResNet's run turned channels-last off)."""
    ckpt = make_checkpoint(tmp_path / "c.ckpt", model={"width": width},
                           trainer={"channels_last": trained_channels_last})
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "data.eval_subset=64", "k=[5]")
    assert code == 0 and res["protocol"]["features"]["channels_last"] is expected


def test_linear_cached_augmented_and_semi_supervised(tmp_path, ckpt):
    code, res = _run(tmp_path, "linear", f"ckpt={ckpt}", "features_cached=true", "epochs=3",
                     "lr=2", "batch_size=64")
    assert code == 0 and res["results"]["mode"] == "cached"
    # Random-init features of 10 digit classes: well above chance (0.1), far from perfect.
    assert res["results"]["best_top1"] > 0.25 and len(res["results"]["history"]) == 3
    code, res = _run(tmp_path, "linear", f"ckpt={ckpt}", "epochs=1", "data.batch_size=512")
    assert code == 0 and res["results"]["mode"] == "augmented"
    code, res = _run(tmp_path, "linear", f"ckpt={ckpt}", "epochs=1", "finetune=true",
                     "label_fraction=0.1", "batch_size=32")
    assert code == 0 and res["results"]["mode"] == "finetune"
    subset = json.loads(open(res["results"]["subset_file"]).read())
    assert res["results"]["num_train"] == len(subset["indices"]) < 200
    code, again = _run(tmp_path, "linear", f"ckpt={ckpt}", "epochs=1", "features_cached=true",
                       f"subset_file={res['results']['subset_file']}")
    assert code == 0 and again["results"]["subset_sha256"] == res["results"]["subset_sha256"]


@pytest.mark.parametrize("mode", [[], ["finetune=true"]],
                         ids=["linear", "finetune"])
def test_augmented_epochs_do_not_depend_on_the_worker_count(tmp_path, ckpt, mode):
    """Each image's crop is seeded by (seed, epoch, image), as in pre-training: 0 and 2 workers
    train the same classifier (each worker drew from its own stream before)."""
    histories = []
    for workers in (0, 2):
        code, res = _run(tmp_path / str(workers), "linear", f"ckpt={ckpt}", "epochs=2",
                         "batch_size=64", "label_fraction=0.2", f"data.num_workers={workers}",
                         *mode)
        assert code == 0 and res["protocol"]["runtime"]["num_workers"] == workers
        histories.append(res["results"]["history"])
    assert histories[0] == histories[1]
    assert histories[0][0]["loss"] != histories[0][1]["loss"]


def test_fine_tuning_trains_on_every_labeled_image_each_epoch(tmp_path, ckpt, monkeypatch):
    """A last partial batch is trained on, not dropped (at 1 % of CIFAR-10 and batch 256 that
    was 244 of 500 images each epoch)."""
    import massrl.commands.linear_run as linear_run
    from massrl.eval.features import unpack
    from massrl.eval.linear import LinearResult

    seen, loaders = [], []

    def count_images(backbone, num_classes, feature_dim, loader, recipe, **kwargs):
        seen.append(sum(len(xy[1]) for batch in loader if (xy := unpack(batch)) is not None))
        loaders.extend([loader, kwargs["test_loader"]])
        return LinearResult(0.0, 0.0, 0.0, 0.0, 1)

    monkeypatch.setattr(linear_run, "train_on_images", count_images)
    code, res = _run(tmp_path, "linear", f"ckpt={ckpt}", "epochs=1", "finetune=true",
                     "label_fraction=0.1", "batch_size=32", "data.num_workers=1")
    assert code == 0 and res["results"]["num_train"] % 32  # (a last, partial batch)
    assert seen == [res["results"]["num_train"]]
    # loaders read every epoch keep their workers (data.persistent_workers, on by default)
    assert [(ld.num_workers, ld.persistent_workers) for ld in loaders] == [(1, True)] * 2
    loaders.clear()
    _run(tmp_path, "linear", f"ckpt={ckpt}", "epochs=1", "finetune=true", "label_fraction=0.1",
         "data.num_workers=1", "data.persistent_workers=false")
    assert [ld.persistent_workers for ld in loaders] == [False, False]


def test_an_inherited_eval_subset_is_said_to_apply(tmp_path, capsys):
    """The checkpoint's data.eval_subset (set for its monitors) is the evaluation's default: it
    says so, and how to take the whole splits, which it does when asked."""
    small = make_checkpoint(tmp_path / "small.ckpt", data={"eval_subset": 40})
    code, res = _run(tmp_path, "knn", f"ckpt={small}", "k=5")
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and res["results"]["num_test"] == 40
    assert re.search(r"data.eval_subset=40 \(the checkpoint's, for pre-training and its "
                     r"monitors\): evaluating with 40 of 1437 labeled training images and 40 "
                     r"of 360 test images \(class-balanced\); data.eval_subset=null takes the "
                     r"whole splits", out)
    code, res = _run(tmp_path, "knn", f"ckpt={small}", "k=5", "data.eval_subset=null")
    assert code == 0 and res["results"]["num_test"] > 40
    assert "data.eval_subset=" not in capsys.readouterr().out
    # a pre-training subset is the labeled split's too (digits pre-trains on its labeled split)
    both = make_checkpoint(tmp_path / "both.ckpt", data={"subset": 500, "eval_subset": 40})
    code, res = _run(tmp_path, "knn", f"ckpt={both}", "k=5")
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and res["protocol"]["dataset"]["sizes"]["train"] == 40
    assert re.search(r"data.subset=500 data.eval_subset=40 \(the checkpoint's, for pre-training "
                     r"and its monitors\): evaluating with 40 of 1437 labeled training images "
                     r"and 40 of 360 test images \(class-balanced\); data.subset=null "
                     r"data.eval_subset=null takes the whole splits", out)


def test_umap_and_export(tmp_path, ckpt, monkeypatch, capsys):
    """Given --out, they claim no runs/eval/ folder (which a read-only working directory
    refused: "Permission denied: runs")."""
    pytest.importorskip("umap")
    from massrl.eval import session

    def read_only(command):
        raise PermissionError(13, "Permission denied", "runs")

    monkeypatch.setattr(session, "default_output_dir", read_only)
    png = tmp_path / "pic.png"
    code, res = _run(tmp_path, "umap", f"ckpt={ckpt}", "n_epochs=10", "max_points=120",
                     "split=test", flags=["--out", str(png)])
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG" and res["results"]["num_points"] == 120
    code, res = _run(tmp_path, "export", f"ckpt={ckpt}", flags=["--out", str(tmp_path / "bb.pt")])
    assert code == 0
    meta = json.loads((tmp_path / "bb.json").read_text())
    assert meta["cifar_stem"] and meta["input_size"] == 16 and meta["mean"] is not None
    assert set(torch.load(tmp_path / "bb.pt")) == set(load_pretrained(ckpt)[0].state_dict())
    # a path without a suffix: the PNG written is the one recorded; 3 points are enough
    code, res = _run(tmp_path, "umap", f"ckpt={ckpt}", "n_epochs=10", "max_points=3",
                     flags=["--out", str(tmp_path / "noext")])
    assert code == 0 and res["results"]["png"] == str(tmp_path / "noext.png")
    assert (tmp_path / "noext.png").read_bytes()[:4] == b"\x89PNG"
    # given --out and no output_dir, the record goes beside the file
    for command, out in (("export", "elsewhere/bb.pt"), ("umap", "elsewhere/u.png")):
        extra = ["n_epochs=10", "max_points=3"] if command == "umap" else []
        assert main([command, f"ckpt={ckpt}", "device=cpu", *extra, "--out",
                     str(tmp_path / out)]) == 0
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == [
        "bb.json", "bb.pt", "bb.result.json", "u.png", "u.result.json"]
    # without --out the default folder is needed: a read-only one says what to do
    capsys.readouterr()
    assert main(["export", f"ckpt={ckpt}"]) == 1
    assert capsys.readouterr().err.strip() == ("massrl export: Permission denied: runs (write "
                                               "elsewhere: output_dir=DIR, --out)")


def test_umap_without_umap_learn_says_so_before_computing_features(tmp_path, ckpt, capsys,
                                                                   monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "umap" else real(name, *a))
    code, res = _run(tmp_path, "umap", f"ckpt={ckpt}")
    assert code == 2 and res is None
    assert "massrl umap needs the umap-learn package: pip install umap-learn (or pip install " \
        "'massrl[umap]')" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    assert main(["umap", f"ckpt={ckpt}", "--print-config"]) == 0  # (needs no umap-learn)
    assert "n_neighbors" in capsys.readouterr().out


def test_a_folder_named_like_an_extra_is_not_the_package(tmp_path, monkeypatch):
    """A run's umap/ folder in the working directory is found as a namespace package: not
    umap-learn, so the check still says what to install."""
    from massrl import extras
    from massrl.config import ConfigError

    monkeypatch.setitem(extras.EXTRAS, "no_such_extra", ("no-such-package", "extra"))
    (tmp_path / "no_such_extra").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="needs the no-such-package package"):
        extras.require("no_such_extra", "this")


def test_cached_features_follow_the_files_of_a_folder(tmp_path, ckpt):
    """The same file names, one file's content replaced: the features are recomputed (the cache
    was keyed by the folder's path and image count only), and reused while nothing changes."""
    root = tmp_path / "pics"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (20 * i, 200 * c, 90)).save(root / name / f"{i}.png")
    folder = ["data.name=folder", f"data.root={root}", "data.image_size=16", "k=[3]"]

    def cached() -> int:
        assert _run(tmp_path, "knn", f"ckpt={ckpt}", *folder)[0] == 0
        return len(list((tmp_path / "cache").iterdir()))

    assert cached() == 2
    Image.effect_noise((16, 16), 60).convert("RGB").save(root / "a" / "0.png")
    os.utime(root / "a" / "0.png", ns=(1, 1))  # a modification time unlike the first one's
    assert cached() == 3  # the file is in the bank or the test split: that one is recomputed
    assert cached() == 3


def test_out_paths_folders_suffixes_and_unwritable_places(tmp_path, ckpt, capsys):
    into = tmp_path / "exports"
    into.mkdir()
    assert _run(tmp_path, "export", f"ckpt={ckpt}", flags=["--out", str(into)])[0] == 0
    assert sorted(p.name for p in into.iterdir()) == ["backbone.json", "backbone.pt"]
    assert _run(tmp_path, "export", f"ckpt={ckpt}", flags=["--out", str(into / "b.pth")])[0] == 0
    assert (into / "b.pth").is_file() and (into / "b.json").is_file()
    # a folder named with a trailing slash is made, and the file goes inside it
    assert _run(tmp_path, "export", f"ckpt={ckpt}", flags=["--out", f"{into / 'new'}/"])[0] == 0
    assert sorted(p.name for p in (into / "new").iterdir()) == ["backbone.json", "backbone.pt"]

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    capsys.readouterr()
    for command, name in (("export", "b.pt"), ("umap", "u.png")):
        code, _ = _run(tmp_path, command, f"ckpt={ckpt}", flags=["--out", str(blocker / name)])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith(f"massrl {command}: Not a directory: ")
        assert str(blocker) in err and "Traceback" not in err
    code, _ = _run(tmp_path, "umap", f"ckpt={ckpt}", flags=["--out", str(tmp_path / "u.xyz")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "cannot write a '.xyz' picture" in err and "name a .png" in err
    assert not (tmp_path / "cache").exists()  # umap stopped before computing any feature


def test_export_never_replaces_its_checkpoint_or_an_unrelated_json(tmp_path, capsys):
    """A checkpoint named model.pt exported with --out model.pt was replaced by the export
    (rc 0); --out exp/report.safetensors replaced the user's exp/report.json with the manifest.
    An earlier export's manifest is replaced, as before."""
    ckpt = make_checkpoint(tmp_path / "model.pt")
    (tmp_path / "link.pt").symlink_to(ckpt)
    before = ckpt.read_bytes()
    for out in (ckpt, tmp_path / "model", tmp_path / "link.pt"):
        capsys.readouterr()
        assert main(["export", f"ckpt={ckpt}", "device=cpu", "--out", str(out)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"which is the checkpoint being exported (ckpt={ckpt}), replacing it: give " \
            "another --out, e.g. --out" in err, err
        assert ckpt.read_bytes() == before and not (tmp_path / "model.json").exists()
    report = tmp_path / "exp" / "report.json"
    report.parent.mkdir()
    report.write_text('{"accuracy": 0.9}')
    out = str(tmp_path / "exp" / "report.safetensors")
    assert main(["export", f"ckpt={ckpt}", "device=cpu", "--out", out]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"writes its manifest beside the weights as {report}, which exists and is not a " \
        "massrl export manifest" in err and "e.g. --out " in err, err
    assert report.read_text() == '{"accuracy": 0.9}'
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.json"]
    out = str(tmp_path / "exp" / "bb.pt")
    for _ in range(2):  # exporting again over an export
        assert main(["export", f"ckpt={ckpt}", "device=cpu", "--out", out]) == 0
    assert json.loads((tmp_path / "exp" / "bb.json").read_text())["weights"] == "bb.pt"


def test_an_output_path_that_is_a_fifo_is_refused_at_once(tmp_path, ckpt, capsys):
    """The writability check opened it and waited for a reader forever."""
    import signal

    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)

    def hung(*args):
        raise AssertionError("export waited for a reader of the FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        code = main(["export", f"ckpt={ckpt}", "device=cpu", "--out", str(fifo)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"massrl export: {fifo} exists and is a FIFO (named pipe), not a file: name a file or "
        "a folder to write the output to")
    # the manifest beside the weights: checked before it is read (review: export hung there)
    os.mkfifo(tmp_path / "m.json")
    signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        code = main(["export", f"ckpt={ckpt}", "device=cpu", "--out", str(tmp_path / "m.pt")])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert code == 2 and f"{tmp_path / 'm.json'} exists and is not a file" in \
        capsys.readouterr().err


def test_augviz_checks_its_picture_name_first_and_writes_into_a_folder(tmp_path, capsys):
    from massrl.cli import main

    assert main(["augviz", "data.name=digits", "--images", "1", "--out",
                 str(tmp_path / "v.xyz")]) == 2
    assert "cannot write a '.xyz' picture" in capsys.readouterr().err
    assert main(["augviz", "data.name=digits", "--images", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "augmentations.png").read_bytes()[:4] == b"\x89PNG"
    # --print-config needs no picture; without it, --out is asked for
    assert main(["augviz", "data.name=digits", "--print-config"]) == 0
    assert "name: digits" in capsys.readouterr().out
    assert main(["augviz", "data.name=digits"]) == 2
    assert "--out FILE.png is required" in capsys.readouterr().err


def test_a_runs_picture_shows_the_views_of_the_backend_it_trains_with(monkeypatch, tmp_path):
    """The batched engine gives other pixels for the same draws: a batched run's
    augmentations.png is drawn by the engine, and its title says so."""
    import massrl.augviz
    from massrl.config import build_config
    from massrl.data import load_dataset

    drawn = []
    monkeypatch.setattr(massrl.augviz, "augmentation_grid", lambda data, transform, path, **kw:
                        drawn.append((type(transform).__name__, kw["title"])))
    for backend in ("per_image", "batched"):
        cfg = build_config(overrides=["data.name=digits", "data.image_size=16",
                                      f"augment.backend={backend}"])
        massrl.augviz.save_augmentation_picture(cfg, tmp_path / "a.png",
                                                load_dataset(cfg.data, seed=0))
    assert drawn == [("MultiViewTransform", "massrl views on digits"),
                     ("BatchedPreview", "massrl views on digits (batched engine)")]


def test_augviz_labels_its_views_unless_the_engine_is_asked_for(tmp_path, monkeypatch):
    """augment.backend=auto trains with the engine on the CPU, but `massrl augviz` then draws
    the per-image views, whose labels name each op (the engine's carry none)."""
    import massrl.augviz

    drawn = []
    monkeypatch.setattr(massrl.augviz, "augmentation_grid", lambda data, transform, path, **kw:
                        drawn.append(type(transform).__name__) or path)
    for backend in ("auto", "per_image", "batched"):
        assert main(["augviz", "data.name=digits", f"augment.backend={backend}",
                     "trainer.accelerator=cpu", "--images", "1",
                     "--out", str(tmp_path / "a.png")]) == 0
    assert drawn == ["MultiViewTransform", "MultiViewTransform", "BatchedPreview"]


@pytest.mark.parametrize("backend", ["per_image", "batched"])
def test_a_runs_picture_leaves_the_random_streams_as_they_were(tmp_path, backend, monkeypatch):
    """The model is built after the picture: its initial weights must not depend on how the
    picture was drawn (the batched engine's preview draws other numbers than the per-image
    pipeline) or on whether it failed."""
    import random

    import numpy as np

    import massrl.augviz
    from massrl.config import build_config
    from massrl.data import load_dataset

    cfg = build_config(overrides=["data.name=digits", "data.image_size=16",
                                  f"augment.backend={backend}"])
    splits = load_dataset(cfg.data, seed=0)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    massrl.augviz.save_augmentation_picture(cfg, tmp_path / "a.png", splits)
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    assert (tmp_path / "a.png").is_file()
    assert torch.equal(after[0], torch.rand(3)) and after[1:] == (random.random(), np.random.rand())

    # also when the picture fails after drawing (a picture never stops a run)
    def fails(*args, **kwargs):
        torch.rand(100)
        raise OSError("disk full")

    monkeypatch.setattr(massrl.augviz, "augmentation_grid", fails)
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="could not draw the augmentation picture: disk full"):
        massrl.augviz.save_augmentation_picture(cfg, tmp_path / "b.png", splits)
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))


def test_weights_of_another_backbone_are_named_in_one_short_line(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    saved["state_dict"] = {"backbone.stem.weight": torch.zeros(1), "projector.0.weight": 1}
    torch.save(saved, ckpt)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(ckpt)
    message = str(err.value)
    assert "do not match model.backbone=resnet18" in message and len(message) < 400
    assert re.search(r'Missing key\(s\) in state_dict: "conv1.weight", "bn1.weight", '
                     r'"bn1.bias" and \d+ more$', message)


def test_transfer_uses_the_eval_dataset_size_and_warns(tmp_path):
    ckpt = make_checkpoint(tmp_path / "fm.ckpt", data={"name": "fashion_mnist", "image_size": 32,
                                                       "root": "/nowhere"})
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "data.name=digits", "k=[5]")
    assert code == 0
    assert res["protocol"]["dataset"]["transfer"] and res["protocol"]["dataset"]["image_size"] == 8
    assert res["protocol"]["config"]["data"]["image_size"] == 8  # what ran, not the checkpoint's
    assert res["protocol"]["config"]["data"]["root"] is None
    assert any("pre-trained at 32 px" in w for w in res["warnings"])


def test_a_checkpoint_with_settings_a_new_run_refuses_still_evaluates(tmp_path):
    """Checks a new run makes (umap_every a multiple of knn_every, 8 px or more) were schema
    rules for a while: a checkpoint written before them failed to load, evaluate or export."""
    ckpt = make_checkpoint(tmp_path / "old.ckpt", data={"image_size": 6},
                           eval={"knn_every": 2, "umap_every": 3})
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "k=[3]")
    assert code == 0 and res["protocol"]["dataset"]["image_size"] == 6


def test_a_folder_of_large_photos_is_evaluated_at_a_bounded_size(tmp_path):
    """Transfer to a folder of phone pictures ran at their own side, 3,000 px (20 GB for 100
    images): a folder is seen at no more than 224 px (or the pre-training size if larger)."""
    from conftest import class_folder

    ckpt = make_checkpoint(tmp_path / "d.ckpt")  # digits, 16 px
    photos = class_folder(tmp_path / "photos", per_class=6, size=300)
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "data.name=folder",
                     f"data.root={photos}", "k=[3]")
    assert code == 0 and res["protocol"]["dataset"]["image_size"] == 224
    small = class_folder(tmp_path / "small", per_class=6, size=40)  # own size, when smaller
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "data.name=folder",
                     f"data.root={small}", "k=[3]")
    assert code == 0 and res["protocol"]["dataset"]["image_size"] == 40


def test_clear_errors(tmp_path, ckpt, capsys):
    plain = tmp_path / "plain.pt"
    torch.save(load_pretrained(ckpt)[0].state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a massrl pre-training checkpoint"):
        load_pretrained(plain)
    assert _run(tmp_path, "knn", f"ckpt={plain}")[0] == 2
    assert _run(tmp_path, "knn", f"ckpt={tmp_path / 'missing.ckpt'}")[0] == 2
    assert _run(tmp_path, "knn")[0] == 2
    assert _run(tmp_path, "knn", "ckpt=")[0] == 2  # (YAML reads the empty value as null)
    assert _run(tmp_path, "linear", f"ckpt={ckpt}", "label_fraction=1.5")[0] == 2
    err = capsys.readouterr().err
    assert "not a massrl pre-training checkpoint" in err and "not found" in err
    assert err.count("ckpt=PATH is required") == 2 and "label_fraction" in err
    missing = tmp_path / "nope.json"
    assert _run(tmp_path, "linear", f"ckpt={ckpt}", f"subset_file={missing}")[0] == 2
    assert f"subset_file={missing}: no such file" in capsys.readouterr().err
    # A folder of images without class sub-folders has no labels.
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    folder = ["data.name=folder", f"data.root={tmp_path}"]
    assert _run(tmp_path, "knn", f"ckpt={ckpt}", *folder)[0] == 2
    assert "has no labels" in capsys.readouterr().err
    # A command that fails after its checks leaves no empty output folder behind.
    for command in ("knn", "umap", "linear"):
        deep = tmp_path / "out" / command / "run"
        code = main([command, f"ckpt={ckpt}", *folder, f"output_dir={deep}", "device=cpu"])
        assert code == 2 and not (tmp_path / "out").exists()


def test_a_pretraining_config_given_to_an_evaluation_is_one_line(ckpt, capsys):
    assert main(["knn", "-c", "fashion_mnist/massrl", f"ckpt={ckpt}"]) == 2
    err = capsys.readouterr().err
    assert "method, augment, model, loss, optimizer, trainer, eval: keys of `massrl pretrain`, " \
        "not of this command (a pre-training config?)" in err
    assert "unknown key" not in err  # (one line per section before)
    assert main(["knn", f"ckpt={ckpt}", "kk=3"]) == 2
    assert "unknown key 'kk'. Did you mean 'k'?" in capsys.readouterr().err


def test_eval_config_forms_and_rules(ckpt, capsys, tmp_path):
    assert main(["knn", f"ckpt={ckpt}", "k=5", "--print-config"]) == 0
    assert "k:\n- 5\n" in capsys.readouterr().out  # one k needs no list
    for form in ("k=20,200", "k=[20,200,20]"):  # a comma list; each k once
        assert main(["knn", f"ckpt={ckpt}", form, "--print-config"]) == 0
        assert "k:\n- 20\n- 200\n" in capsys.readouterr().out
    assert main(["knn", f"ckpt={ckpt}", "k=5.5"]) == 2  # one k that is no integer
    assert "k.0: Input should be a valid integer" in capsys.readouterr().err
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(ckpt.read_bytes())
    assert main(["knn", f"ckpt={last.parent}"]) == 2  # the checkpoints folder itself
    assert f"Did you mean {last}?" in capsys.readouterr().err
    assert main(["linear", f"ckpt={ckpt}", "backbone_lr=0.1"]) == 2
    assert "backbone_lr applies to finetune=true only" in capsys.readouterr().err
    assert main(["linear", f"ckpt={ckpt}", "finetune=true", "features_cached=true"]) == 2
    err = capsys.readouterr().err
    assert "\n  finetune=true trains the backbone, so features_cached must be false\n" in err
    assert "Value error" not in err


def test_backbone_size_mismatch_is_an_error(tmp_path, capsys):
    # a ViT built for its 32 px only (massrl's are built with dynamic_img_size unless told)
    ckpt = make_checkpoint(tmp_path / "vit.ckpt", data={"image_size": 32},
                           model={"backbone": "vit_tiny_patch16_224", "cifar_stem": False,
                                  "width": 64, "kwargs": {"dynamic_img_size": False,
                                                          "depth": 1}})
    assert _run(tmp_path, "knn", f"ckpt={ckpt}", "data.image_size=48")[0] == 2
    err = capsys.readouterr().err
    assert "cannot take 48 px images" in err and "Set data.image_size=32." in err


def test_pretraining_data_is_split_as_in_pretraining_however_named(tmp_path, monkeypatch):
    """The checkpoint's folder, spelled relative and with a trailing slash, is the pre-training
    data (not a transfer); another seed draws other heads, never another held-out split (that
    would put pre-training images in the test split)."""
    root = tmp_path / "pics"
    for c, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (20, 20), (20 * i, 90 * c, 90)).save(root / name / f"{i}.png")
    ckpt = make_checkpoint(tmp_path / "f.ckpt", data={"name": "folder", "root": str(root),
                                                      "image_size": 16}, seed=3)
    runs = []
    for extra in ([], [f"data.root={root}/"], ["seed=7"]):
        code, res = _run(tmp_path / str(len(runs)), "knn", f"ckpt={ckpt}", "k=[3]", *extra)
        assert code == 0
        runs.append(res)
    monkeypatch.chdir(tmp_path)
    code, res = _run(tmp_path / "rel", "knn", f"ckpt={ckpt}", "k=[3]", "data.root=pics")
    runs.append(res)
    for res in runs:
        dataset = res["protocol"]["dataset"]
        assert not dataset["transfer"] and dataset["image_size"] == 16
        assert dataset["split_seed"] == 3
    assert len({json.dumps(r["results"]) for r in runs}) == 1


def test_a_damaged_or_unwritable_feature_cache_is_only_a_miss(tmp_path, ckpt, capsys):
    code, first = _run(tmp_path, "knn", f"ckpt={ckpt}", "k=[5]")
    entries = sorted((tmp_path / "cache").iterdir())
    assert code == 0 and len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated
    capsys.readouterr()
    code, again = _run(tmp_path, "knn", f"ckpt={ckpt}", "k=[5]")
    err = capsys.readouterr().err
    assert code == 0 and "ignoring the unreadable cached features" in err
    assert again["results"] == first["results"]
    assert (tmp_path / "cache" / entries[0].name).stat().st_size > 100  # written anew
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["knn", f"ckpt={ckpt}", "k=[5]", f"output_dir={tmp_path / 'k2'}", "device=cpu",
                 f"cache_dir={blocker}"])
    err = capsys.readouterr().err
    assert code == 0 and f"could not cache the features in {blocker}" in err
    assert json.loads((tmp_path / "k2" / "result.json").read_text())["results"] == \
        first["results"]


def test_a_held_out_folder_may_hold_one_class(tmp_path, ckpt):
    for split, classes in (("train", ("a", "b", "c")), ("val", ("b",))):
        for c, name in enumerate(classes):
            (tmp_path / "pics" / split / name).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (16, 16), (30 * i, 80 * c, 90)).save(
                    tmp_path / "pics" / split / name / f"{i}.png")
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "data.name=folder",
                     f"data.root={tmp_path / 'pics'}", "k=[3]")
    assert code == 0
    assert res["protocol"]["dataset"]["sizes"] == {"train": 18, "test": 6}


def test_default_output_places(tmp_path, ckpt, monkeypatch):
    """export --out writes its result.json beside the weights (nothing under ./runs); two
    evaluations in one second get two folders."""
    monkeypatch.chdir(tmp_path)
    for name in ("bb", "cc"):  # two exports into one folder keep their records apart
        assert main(["export", f"ckpt={ckpt}", "--out", str(tmp_path / "exp" / f"{name}.pt")]) == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [
        "bb.json", "bb.pt", "bb.result.json", "cc.json", "cc.pt", "cc.result.json"]
    if importlib.util.find_spec("umap") is not None:
        assert main(["umap", f"ckpt={ckpt}", "n_epochs=5", "max_points=20",
                     "--out", str(tmp_path / "pics" / "u.png")]) == 0
        assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["u.png",
                                                                        "u.result.json"]
    assert not (tmp_path / "runs").exists()
    from massrl.eval import config as eval_config

    monkeypatch.setattr(eval_config.time, "strftime", lambda fmt: "20261129-010203")
    # each run in the same second claims its folder at once (runs started together each get
    # their own), and one that stays empty goes again with the folders made for it
    first = eval_config.default_output_dir("knn")
    second = eval_config.default_output_dir("knn")
    assert (first, second) == (Path("runs/eval/knn/20261129-010203"),
                               Path("runs/eval/knn/20261129-010203-2"))
    assert first.is_dir() and second.is_dir()
    (first / "result.json").write_text("{}")
    eval_config.release_output_dirs()
    assert [p.name for p in (tmp_path / "runs" / "eval" / "knn").iterdir()] == [first.name]
    (first / "result.json").unlink()
    eval_config.default_output_dir("knn")
    eval_config.release_output_dirs()
    assert (tmp_path / "runs").is_dir()  # (made by the first claim: not this one's to remove)


def test_images_left_out_are_recorded_in_the_result(tmp_path, ckpt):
    root = tmp_path / "pics"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (20 * i, 200 * c, 90)).save(root / name / f"{i}.png")
        (root / name / "broken.png").write_bytes(b"not an image")
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "data.name=folder", f"data.root={root}",
                     "data.image_size=16", "k=[3]")
    assert code == 0
    sizes = res["protocol"]["dataset"]["sizes"]
    assert sizes["train"] + sizes["test"] == 22
    left_out = [w for w in res["warnings"] if "could not be decoded and were left out" in w]
    assert len(left_out) == 2 - (res["results"]["num_train"] == sizes["train"]) - \
        (res["results"]["num_test"] == sizes["test"])
    assert res["results"]["num_train"] + res["results"]["num_test"] == 20


def test_a_dataset_default_folder_given_explicitly_is_the_same_data():
    """data.root spelled out as the dataset's default folder reads the pre-training data."""
    from massrl.config import DataConfig, root_path
    from massrl.eval.config import same_data

    pre = DataConfig(name="fashion_mnist")
    assert same_data("fashion_mnist", "~/.cache/massrl/", pre)
    assert not same_data("fashion_mnist", "/elsewhere", pre)
    assert not same_data("digits", None, pre)
    assert root_path(None, "imagenet") == Path("~/.cache/massrl/imagenet").expanduser().resolve()
    assert root_path(None, "folder") is None and root_path(None) is None


@pytest.mark.parametrize("mode", [["features_cached=true"], ["features_cached=false"],
                                  ["finetune=true"],
                                  ["features_cached=true", "label_fraction=1.0"]])
def test_linear_counts_and_reports_the_images_it_left_out(tmp_path, ckpt, mode, split_folders):
    """Undecodable files are left out of training and testing; whichever path met them (the
    feature extraction or an image loader), result.json counts what was used and says why."""
    root = split_folders(broken=True)
    code, res = _run(tmp_path, "linear", f"ckpt={ckpt}", "data.name=folder",
                     f"data.root={root}", "data.image_size=16", "epochs=1", "batch_size=6", *mode)
    assert code == 0
    assert res["results"]["num_train"] == res["results"]["num_test"] == 16
    left_out = [w for w in res["warnings"] if "could not be decoded and were left out" in w]
    assert len(left_out) == 2 and all(w.startswith("2 of the 18 images of the ")
                                      for w in left_out), left_out


def test_a_list_of_file_names_picks_the_labeled_images(tmp_path, ckpt, capsys):
    """SimCLR's 1 % / 10 % ImageNet lists name files (`n01440764_10026.JPEG`): such a list
    selects exactly those images of the training folder; names it cannot find, a bare name two
    classes share, or a label_fraction beside it are refused with what to do."""
    root = tmp_path / "pics"
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (16, 16), (20 * i, 200 * c, 90)).save(
                    root / split / name / f"{name}_{i}.png")
    folder = ["data.name=folder", f"data.root={root}", "data.image_size=16",
              "features_cached=true", "epochs=1"]
    names = tmp_path / "1percent.txt"
    names.write_text("cat_1.png\n\ndog_4.png\ndog_5.png\n")
    code, res = _run(tmp_path, "linear", f"ckpt={ckpt}", *folder, f"subset_file={names}")
    assert code == 0 and res["results"]["num_train"] == 3
    assert res["results"]["label_fraction"] == pytest.approx(3 / 12)
    # the same three as class/name paths, mixed with a bare name, written by a Windows editor
    # (byte-order mark, CRLF, backslashes): the same images
    paths = tmp_path / "paths.txt"
    paths.write_bytes("\ufeffcat\\cat_1.png\r\ndog/dog_4.png\r\ndog_5.png\r\n".encode())
    code, again = _run(tmp_path, "linear", f"ckpt={ckpt}", *folder, f"subset_file={paths}")
    assert code == 0 and again["results"]["subset_sha256"] == res["results"]["subset_sha256"]
    # a file name that is not UTF-8 is matched by its bytes
    odd = os.fsdecode(b"caf\xe9.png")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "train" / "cat" / odd)
    (tmp_path / "odd.txt").write_bytes(b"caf\xe9.png\n")
    code, res = _run(tmp_path, "linear", f"ckpt={ckpt}", *folder,
                     f"subset_file={tmp_path / 'odd.txt'}")
    assert code == 0 and res["results"]["num_train"] == 1
    capsys.readouterr()

    def refused(text: str, *extra: str) -> str:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        assert main(["linear", f"ckpt={ckpt}", *folder, f"subset_file={bad}", *extra,
                     f"output_dir={tmp_path / 'no'}", "device=cpu"]) == 2
        return " ".join(capsys.readouterr().err.split())

    assert "1 of its 2 names are not images of the labeled split (first: 'lion_1.png')" in \
        refused("cat_1.png\nlion_1.png\n")
    assert "lists its images: leave label_fraction out" in \
        refused("cat_1.png\n", "label_fraction=0.5")
    assert "not a folder of image files" in refused(  # digits: no files to name
        "cat_1.png\n", "data.name=digits", "data.root=null")
    assert main(["linear", f"ckpt={ckpt}", *folder, f"subset_file={tmp_path / 'none.txt'}",
                 f"output_dir={tmp_path / 'no'}", "device=cpu"]) == 2  # (a config error)
    assert "none.txt" in capsys.readouterr().err
    (root / "train" / "dog" / "cat_1.png").write_bytes(
        (root / "train" / "cat" / "cat_1.png").read_bytes())
    assert "'cat_1.png' is the name of more than one image of the split: write paths " \
        "relative to the training folder (class/name)" in refused("cat_1.png\n")


def test_an_evaluation_warns_when_the_pretraining_folder_changed(tmp_path, tiny):
    from conftest import class_folder

    from massrl.cli import main

    root = class_folder(tmp_path / "pics")
    folder = ["data.name=folder", f"data.root={root}", "data.subset=null",
              "data.eval_subset=null"]
    assert main(["pretrain", *tiny("byol"), *folder, "data.batch_size=16"]) == 0
    ckpt = tmp_path / "run_byol" / "checkpoints" / "last.ckpt"
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "k=[5]")
    assert code == 0 and not any("changed since pre-training" in w for w in res["warnings"])
    Image.new("RGB", (16, 16)).save(root / "b" / "new.png")
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "k=[5]")
    assert code == 0
    assert any("the test split's files changed since pre-training (8 then, 9 now)" in w
               for w in res["warnings"]), res["warnings"]
    # beside a val/ folder, training images added leak none into the test split: no warning
    split = tmp_path / "split"
    class_folder(split / "train"), class_folder(split / "val", per_class=5)
    assert main(["pretrain", *tiny("val"), "data.name=folder", f"data.root={split}",
                 "data.subset=null", "data.eval_subset=null", "data.batch_size=16"]) == 0
    Image.new("RGB", (16, 16)).save(split / "train" / "b" / "new.png")
    code, res = _run(tmp_path, "knn", f"ckpt={tmp_path / 'run_val/checkpoints/last.ckpt'}",
                     "k=[5]")
    assert code == 0 and not any("changed since" in w for w in res["warnings"])


@pytest.mark.parametrize("command", ["knn", "linear", "umap", "export"])
@pytest.mark.parametrize("launcher", ["WORLD_SIZE", "SLURM_STEP_NUM_TASKS"])
def test_an_evaluation_under_torchrun_is_refused(command, launcher, monkeypatch, capsys):
    """Each process would run the whole evaluation and write the same result.json."""
    monkeypatch.setenv(launcher, "2")
    assert main([command, "ckpt=none.ckpt"]) == 2
    assert f"massrl {command} runs in one process" in capsys.readouterr().err


def test_cached_features_are_not_reused_across_torch_versions(tmp_path, ckpt, monkeypatch):
    """Another torch (or device) computes features that differ in their last digits, while
    result.json names the version and device of the run that reads them."""
    assert _run(tmp_path, "knn", f"ckpt={ckpt}", "k=[5]")[0] == 0
    first = sorted((tmp_path / "cache").iterdir())
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert _run(tmp_path, "knn", f"ckpt={ckpt}", "k=[5]")[0] == 0
    assert len(sorted((tmp_path / "cache").iterdir())) == 2 * len(first)


def test_massrl_knn_gives_the_online_monitors_number_on_the_same_features(tiny, tmp_path):
    """An EfficientNet after one epoch: its features share a large common part, so cosine
    similarities crowd near 1 and float rounding decides votes. `massrl knn` normalised the
    features before weighted_knn normalised them again (in one run 30.6 % against the
    monitor's 26.4 % on the same float32 features). Now both run the same arithmetic."""
    args = tiny("massrl", **{"model.backbone": "efficientnet_b0", "model.cifar_stem": "false",
                             "model.width": "64", "data.image_size": "32", "data.subset": "256",
                             "trainer.channels_last": "false", "eval.knn_k": "200",
                             "output_dir": str(tmp_path / "effnet")})
    assert main(["pretrain", *args]) == 0
    online = json.loads((tmp_path / "effnet" / "summary.json").read_text())["knn_top1"]
    code, res = _run(tmp_path, "knn", f"ckpt={tmp_path / 'effnet/checkpoints/last.ckpt'}",
                     "k=[200]")
    assert code == 0
    assert res["results"]["k=200"]["top1"] == pytest.approx(online, abs=1e-6)


def test_the_batched_picture_does_not_warn_about_augment_compile():
    """The picture's views come one image at a time from the CPU; augment.compile is the GPU
    whole-batch mode's, so a GPU run with it got a warning that it does not apply."""
    import warnings

    from massrl.augviz import view_maker
    from massrl.config import build_config
    from massrl.data import load_dataset

    cfg = build_config(overrides=["data.name=digits", "data.image_size=16",
                                  "augment.backend=batched", "augment.compile=true"])
    splits = load_dataset(cfg.data, seed=0)
    transform, _ = view_maker(cfg, splits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        views = transform.sample(splits.train[0][0])
    assert len(views) == cfg.augment.num_views and cfg.augment.compile  # (the run's is kept)


def test_a_mean_typed_on_the_0_255_scale_is_refused(ckpt, capsys):
    """Evaluated so, every input came out near -2 and the score fell without a word (the
    checkpoint's own normalisation is used as trained, whatever it holds)."""
    assert main(["knn", f"ckpt={ckpt}", "data.mean=[125,123,114]", "data.std=[63,62,66]"]) == 2
    assert capsys.readouterr().err.strip() == (
        "massrl knn: data.mean=[125, 123, 114] looks like 0-255 values: give mean and std on "
        "the [0, 1] scale (divide by 255)")


def test_loading_a_checkpoint_leaves_the_callers_random_stream(ckpt):
    """Building the backbone drew its initial weights (replaced by the checkpoint's) from the
    caller's torch stream: a notebook's seeded draws changed with a load in between."""
    torch.manual_seed(3)
    load_pretrained(ckpt)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))


def test_results_say_how_far_the_checkpoint_had_trained(tmp_path, capsys):
    """A run resumed in place replaces last.ckpt: a result.json naming only the path (and a
    sha256 to compare by hand) could not say which state of the run it measured."""
    ckpt = make_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(ckpt, weights_only=False)
    state.update(epoch=3, global_step=20)
    state["massrl"]["images_seen"] = 1280
    torch.save(state, ckpt)
    code, res = _run(tmp_path, "knn", f"ckpt={ckpt}", "k=5")
    assert code == 0
    trained = {"epoch": 3, "global_step": 20, "images_seen": 1280}
    assert trained.items() <= res["protocol"]["checkpoint"].items()
    title = " ".join(capsys.readouterr().out.split())  # (rich wraps it at 80 columns)
    assert "last.ckpt on digits (epoch index 3, step 20)" in title
    code, res = _run(tmp_path, "export", f"ckpt={ckpt}", flags=["--out", str(tmp_path / "b.pt")])
    assert code == 0
    assert trained.items() <= json.loads((tmp_path / "b.json").read_text())["source"].items()


def test_export_to_another_format_s_name_is_refused(tmp_path, ckpt, capsys):
    """`--out b.onnx` exited 0 having written b.onnx.pt, b.onnx.json and b.result.json."""
    assert main(["export", f"ckpt={ckpt}", "--out", str(tmp_path / "b.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not .onnx" in err and f"--out {tmp_path / 'b.pt'}" in err
    assert not list(tmp_path.iterdir())
    for name in ("bb", "run.e10"):  # (no suffix; a dotted name: .pt added to the whole name)
        assert main(["export", f"ckpt={ckpt}", "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / f"{name}.pt").is_file()


def test_records_name_their_files_by_absolute_paths(tmp_path, ckpt, monkeypatch):
    """A relative --out was recorded as typed (`"png": "u.png"`), relative to a working
    directory the record does not name, unlike every other path in it."""
    pytest.importorskip("umap")
    monkeypatch.chdir(tmp_path)
    assert main(["umap", f"ckpt={ckpt}", "device=cpu", "n_epochs=10", "max_points=3",
                 "output_dir=u", "--out", "u.png"]) == 0
    assert json.loads(Path("u/result.json").read_text())["results"]["png"] == \
        str(tmp_path / "u.png")
    assert main(["export", f"ckpt={os.path.relpath(ckpt)}", "output_dir=e", "--out", "b.pt"]) == 0
    record = json.loads(Path("e/result.json").read_text())["results"]
    assert record["weights_path"] == str(tmp_path / "b.pt")
    assert record["source"]["checkpoint"] == str(ckpt)
