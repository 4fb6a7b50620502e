"""`massrl pretrain` and `massrl augviz` end to end, on scikit-learn's digits (seconds each)."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_python
from PIL import Image

from massrl.cli import main


def _run_dir(args: list[str]) -> Path:
    return Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])


@pytest.mark.parametrize("method", ["massrl", "byol", "simclr"])
def test_pretrain_writes_a_complete_run_directory(method, tiny, capsys):
    # fp16 AMP does not exist on the CPU: Lightning runs bf16, and the summary says so
    precision = "16-mixed" if method == "simclr" else "32-true"
    args = tiny(method, **{"trainer.precision": precision})
    assert main(["pretrain", "-c", f"fashion_mnist/{method}", *args]) == 0
    out = capsys.readouterr().out
    run_dir = _run_dir(args)
    assert out.strip().splitlines()[-1] == f"run directory: {run_dir}"
    assert "augment.backend=auto: batched (training on the CPU)" in out
    for name in ("config.yaml", "metrics.csv", "summary.json", "augmentations.png",
                 "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "checkpoints").glob("best-knn-*.ckpt"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == method and summary["dataset"] == "digits"
    # what a sweep compares runs by, and when this session ran
    assert summary["name"] == f"{method}_digits" and summary["seed"] == 0
    assert summary["started"] <= summary["finished"] and summary["resumed_from"] is None
    assert 0.0 <= summary["knn_top1"] <= 1.0
    assert summary["epochs"] == summary["knn_after_epochs"] == 1
    assert summary["images_seen"] == 128  # subset of 128, batch 32, drop_last
    assert summary["images_per_s"] > 0
    from massrl.provenance import package_versions, source_commit

    assert summary["runtime"] == {
        # augment.backend=auto on the CPU: the batched engine with its numba kernels
        "device": "cpu", "world_size": 1, "num_workers": 0, "augment_backend": "batched",
        "compile": False,
        "precision": "bf16-mixed" if method == "simclr" else "32-true",
        "channels_last": False,  # turned off for a width-8 ResNet on the CPU (devices.py)
        "cpu_threads": torch.get_num_threads(), "cpu_kernels": "numba",
        "torch_version": torch.__version__, "versions": package_versions(),
        "massrl_commit": source_commit()}
    assert torch.__version__.startswith(summary["runtime"]["versions"]["torch"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"] == method and saved["data"]["subset"] == 128
    # the knobs a sweep's runs differ in, as config.yaml has them
    m, d, a = saved["model"], saved["data"], saved["augment"]
    assert summary["setup"] == {
        "backbone": m["backbone"], "width": m["width"], "image_size": d["image_size"],
        "batch_size": d["batch_size"], "subset": d["subset"], "max_epochs": 1,
        "optimizer": saved["optimizer"]["name"], "lr": saved["optimizer"]["lr"],
        "strategies": a["strategies"],
        "view_mode": a["view_mode"], "views_per_image": 2}
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["method"] == method


def test_pretrain_view_modes_and_cross_strategy_pairs(tiny, monkeypatch):
    """The view modes reach training: 4 strategies give 4 views (per_strategy) or 2 crops x 4
    (crops_x_strategies), and cross_strategy pairs only views of different strategies. With the
    per-image backend (auto's choice on a GPU; the batched one: test_pretrain_with_the_batched_
    backend)."""
    from massrl.methods import MASSRL

    seen = []
    real = MASSRL.pair_mask

    def spy(self, batch):
        mask = real(self, batch)
        strategy = batch["strategy"]  # [B, V]
        same = strategy[:, :, None] == strategy[:, None, :]
        seen.append((len(batch["views"]), bool(mask[same].any()), bool(mask.any())))
        return mask

    monkeypatch.setattr(MASSRL, "pair_mask", spy)
    for mode, views in (("per_strategy", 4), ("crops_x_strategies", 8)):
        seen.clear()
        args = tiny("massrl", **{"augment.view_mode": mode, "augment.pairs": "cross_strategy",
                                 "augment.backend": "per_image",
                                 "output_dir": f"{_run_dir(tiny())}_{mode}"})
        assert main(["pretrain", *args]) == 0
        assert seen and all(s == (views, False, True) for s in seen), seen[:2]


def test_pretrain_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(["pretrain", "data.name=cifar10", f"data.root={tmp_path / 'none'}",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar10" in err.lower() and "data.download=true" in err


def test_simclr_without_negatives_is_refused(tiny, capsys):
    assert main(["pretrain", "method=simclr", *tiny("simclr", **{"data.batch_size": "1"})]) == 2
    assert "method=simclr needs at least 2 images in the global batch" in capsys.readouterr().err


def test_pretrain_on_a_folder_with_bad_files(tmp_path, tiny):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(40):
        Image.new("RGB", (20, 20), (i * 6, 100, 200 - i * 4)).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "empty.jpg").write_bytes(b"")
    args = tiny("byol", **{"data.name": "folder", "data.root": str(root), "data.subset": "null",
                           "data.batch_size": "8"})
    with pytest.warns(UserWarning, match="broken.png|empty.jpg"):
        assert main(["pretrain", *args]) == 0
    run_dir = _run_dir(args)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["knn_top1"] is None  # unlabeled folder: no monitors
    assert summary["skipped_files"] == 2


def test_augviz_writes_a_png(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid.png"
    assert main(["augviz", "data.name=digits", "augment.view_mode=per_strategy",
                 "--images", "3", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 400 and img.height > 300
    assert str(out) in capsys.readouterr().out
    # a name without a suffix: the PNG matplotlib writes is the file reported
    assert main(["augviz", "data.name=digits", "--images", "1", "--out",
                 str(tmp_path / "noext")]) == 0
    assert f"wrote {tmp_path / 'noext.png'}" in capsys.readouterr().out
    assert Image.open(tmp_path / "noext.png").format == "PNG"
    # a relative name: the last line is the absolute path, as every command's (README)
    monkeypatch.chdir(tmp_path)
    assert main(["augviz", "data.name=digits", "--images", "1", "--out", "rel.png"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'rel.png'}"


def test_augviz_on_a_folder_of_user_images(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    for i in range(4):
        Image.new("RGBA", (50, 40), (i * 50, 20, 90, 255)).save(root / f"p{i}.png")
    out = tmp_path / "mine.png"
    assert main(["augviz", "data.name=folder", f"data.root={root}", "data.image_size=32",
                 "--images", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


@pytest.mark.parametrize("backend", ["per_image", "batched"])
def test_the_picture_decodes_large_photos_as_training_does(tmp_path, monkeypatch, backend):
    """The augmentation picture decoded each original at full size (12 MP phone pictures: 0.8
    GB and seconds at every run's start) and drew it so: now decoded as far down as training
    decodes it, and drawn as a thumbnail."""
    import matplotlib.axes

    from massrl.augviz import augmentation_grid, view_maker
    from massrl.config import build_config
    from massrl.data import load_dataset

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(2):
        Image.new("RGB", (2400, 1800), (i * 90, 20, 90)).save(root / f"p{i}.jpg")
    cfg = build_config(overrides=["data.name=folder", f"data.root={root}",
                                  "data.image_size=32", f"augment.backend={backend}"])
    splits = load_dataset(cfg.data, cfg.seed)
    maker, _ = view_maker(cfg, splits)
    seen, drawn = [], []
    sample = maker.sample
    monkeypatch.setattr(maker, "sample", lambda img: seen.append(img.size) or sample(img))
    imshow = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda ax, x, **k: drawn.append(getattr(x, "size", None)) or
                        imshow(ax, x, **k))
    augmentation_grid(splits.train, maker, tmp_path / "aug.png", num_images=2)
    assert seen and all(max(side) <= 600 for side in seen), seen  # 1/4 scale (or less)
    assert max(drawn[0]) <= 256  # the original's thumbnail


def test_the_augmentation_picture_leaves_the_callers_matplotlib_backend(tmp_path):
    """Importing it switched the process to Agg: after a pretrain() in a notebook, plt.show()
    drew nothing. (A process of its own: the import happens once per process.)"""
    code = "\n".join([
        "import matplotlib", "matplotlib.use('svg')",
        "from PIL import Image",
        "from massrl.augment import MultiViewTransform",
        "from massrl.augviz import augmentation_grid",
        "from massrl.config import build_config",
        "cfg = build_config(overrides=['data.image_size=16'])",
        "images = [(Image.new('RGB', (20, 20), (i * 60, 9, 9)), 0) for i in range(3)]",
        "maker = MultiViewTransform(cfg.augment, 16, [0.5] * 3, [0.25] * 3)",
        f"augmentation_grid(images, maker, {str(tmp_path / 'a.png')!r}, num_images=2)",
        "print(matplotlib.get_backend())"])
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "svg" and (tmp_path / "a.png").stat().st_size > 0


def test_chain_pretrain_knn_linear_export(tiny, tmp_path):
    """pretrain -> knn -> linear -> export on one tiny run; the offline kNN on the same split and
    checkpoint reproduces the online monitor's number."""
    args = tiny("massrl", **{"data.eval_subset": "null", "eval.knn_k": "20",
                             "eval.umap_every": "1"})
    assert main(["pretrain", *args]) == 0
    run_dir = _run_dir(args)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "umap" / "epoch_0001.png").is_file()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    common = [f"ckpt={ckpt}", "device=cpu", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["knn", *common, "k=[20]", f"output_dir={tmp_path / 'knn'}"]) == 0
    knn = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert knn["results"]["k=20"]["top1"] == pytest.approx(summary["knn_top1"], abs=1e-3)
    # (the cached-features protocol: the augmented one is tested in test_eval_commands.py)
    linear = ["linear", *common, "epochs=10", "features_cached=true", "data.subset=null",
              f"output_dir={tmp_path / 'lin'}"]
    assert main(linear) == 0
    lin = json.loads((tmp_path / "lin" / "result.json").read_text())
    assert 0.15 < lin["results"]["best_top1"] <= 1.0  # 10 classes: chance is 0.1
    out = tmp_path / "backbone.pt"
    assert main(["export", f"ckpt={ckpt}", "--out", str(out)]) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["mean"] == pytest.approx(list(summary_mean(ckpt)))


def summary_mean(ckpt: Path) -> list[float]:
    return torch.load(ckpt, weights_only=False)["massrl"]["data"]["mean"]


@pytest.mark.parametrize("mode", ["random", "crops_x_strategies"])
def test_pretrain_with_the_batched_backend(tiny, mode, monkeypatch):
    from massrl.augment.batched import BatchedAugmenter

    calls = []
    real = BatchedAugmenter.__call__

    def spy(self, views, strategy, generator=None, seeds=None, counts=None, plan=None):
        if len(strategy) > 1:  # (augmentations.png's views come one image at a time)
            calls.append((strategy.clone(), counts, plan))
        return real(self, views, strategy, generator, seeds, counts, plan)

    monkeypatch.setattr(BatchedAugmenter, "__call__", spy)
    args = tiny("massrl", **{"augment.backend": "batched", "augment.view_mode": mode,
                             "augment.strategies": "[simclr,randaugment,autoaugment,"
                                                   "fastautoaugment,trivialaugment]",
                             "output_dir": f"{_run_dir(tiny())}_batched_{mode}"})
    assert main(["pretrain", *args]) == 0
    # the training loop counts each batch's strategies on the host, before the transfer; the
    # CPU's grouped mode plans for itself
    assert calls and all(c == torch.bincount(s.flatten(), minlength=5).tolist() and p is None
                         for s, c, p in calls)
    summary = json.loads((_run_dir(args) / "summary.json").read_text())
    assert summary["images_seen"] == 128 and 0 <= summary["knn_top1"] <= 1


def test_summary_table_formats_by_kind(capsys):
    from massrl.commands.pretrain import print_summary

    print_summary({"method": "byol", "dataset": "folder", "knn_top1": None, "final_loss": 0.51234,
                   "images_per_s": 7.1, "train_seconds": 9.01, "epochs": 1, "run_dir": "r"})
    out = capsys.readouterr().out
    assert "0.5123" in out and "7.1 " in out and "9.0 " in out and "7.1000" not in out
    # the final model's kNN may come from a validation after training and beat the best
    # checkpoint's: each says what it was measured on
    print_summary({"method": "byol", "dataset": "digits", "knn_top1": 0.39, "best_knn_top1": 0.33,
                   "knn_after_epochs": 3, "best_checkpoint": "/r/checkpoints/best-knn-1.ckpt",
                   "run_dir": "r"})
    out = capsys.readouterr().out
    assert re.search(r"knn_top1 +│ 39.00 % │ final model, after 3 epoch\(s\)", out), out
    assert re.search(r"best_knn_top1 +│ 33.00 % │ checkpoint best-knn-1.ckpt", out), out


def test_default_run_directories_and_processes_started_apart(tmp_path, monkeypatch):
    from massrl.config import ConfigError, build_config
    from massrl.run_dir import RUN_DIR_ENV, make_run_dir

    monkeypatch.chdir(tmp_path)
    # (make_run_dir sets it in os.environ: this records its absence, restored at the end)
    monkeypatch.setenv(RUN_DIR_ENV, "")
    cfg = build_config(overrides=["data.name=digits"])
    for n in range(2):
        monkeypatch.delenv(RUN_DIR_ENV, raising=False)
        run_dir = Path("runs/massrl_digits") / f"version_{n}"
        made = Path("runs") if n == 0 else run_dir  # (the outermost folder made for it)
        assert make_run_dir(cfg) == (run_dir, made.resolve())
    # two runs started at once: the second finds version_2 free when it looks, but the first
    # makes it before the second does, and the second takes version_3
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    real_mkdir = Path.mkdir

    def first_run_wins(self, *args, **kwargs):
        if self.name == "version_2" and not self.exists():
            real_mkdir(self)
        return real_mkdir(self, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(Path, "mkdir", first_run_wins)
        assert make_run_dir(cfg)[0] == Path("runs/massrl_digits/version_3")
    # ranks started by torchrun or srun would each pick their own: output_dir is required
    for variable in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(RUN_DIR_ENV, raising=False)
        monkeypatch.setenv(variable, "2")
        with pytest.raises(ConfigError, match="needs output_dir=DIR"):
            make_run_dir(cfg)
        monkeypatch.setenv(variable, "1")
    # one command per machine, as Lightning's own multi-machine launch has it
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    with pytest.raises(ConfigError, match="needs output_dir=DIR"):
        make_run_dir(cfg)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)


def test_the_first_process_of_another_machine_is_not_rank_zero(monkeypatch):
    """Before the Trainer exists Lightning reads rank 0 on every machine of a NODE_RANK launch;
    that process would take the run's lock and write its files as rank 0."""
    from massrl.run_dir import another_machines_first_process

    for name in ("NODE_RANK", "RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert not another_machines_first_process()
    monkeypatch.setenv("NODE_RANK", "0")
    assert not another_machines_first_process()
    monkeypatch.setenv("NODE_RANK", "2")
    assert another_machines_first_process()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning started: its rank is known
    assert not another_machines_first_process()


def test_a_run_that_cannot_start_leaves_no_folder_of_its_own(tmp_path, monkeypatch, capsys):
    """A missing dataset (or any other stop before training) does not leave a run directory
    holding only config.yaml, which the next try would step past to version_1; a folder the
    user made stays."""
    from massrl.run_dir import RUN_DIR_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    missing = ["data.name=cifar10", f"data.root={tmp_path / 'nothing'}"]
    assert main(["pretrain", *missing]) == 2
    assert "cifar10" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["pretrain", *missing, f"output_dir={tmp_path / 'new' / 'run'}"]) == 2
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert main(["pretrain", *missing, f"output_dir={tmp_path / 'mine'}"]) == 2
    assert (tmp_path / "mine").is_dir()
    assert main(["pretrain", "data.name=digits", "resume=/nonexistent/last.ckpt"]) == 2
    assert not (tmp_path / "runs").exists()  # (a resume refused: as early a stop)


def test_removing_a_new_run_directory_keeps_what_others_put_beside_it(tmp_path):
    from massrl.run_dir import remove_new_run_dir

    run = tmp_path / "new" / "a" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("")
    (tmp_path / "new" / "b").mkdir()  # another run, started beside it in the meantime
    remove_new_run_dir(run, tmp_path / "new")
    assert not (tmp_path / "new" / "a").exists() and (tmp_path / "new" / "b").is_dir()
    remove_new_run_dir(tmp_path / "new" / "b", None)  # a folder it did not make: kept
    assert (tmp_path / "new" / "b").is_dir()


def test_lightnings_slurm_requeue_is_off_but_torchrun_inside_slurm_keeps_its_ranks(monkeypatch):
    """Under SLURM, Lightning's own SIGUSR1 requeue (hpc_ckpt files restored without massrl's
    resume checks) is switched off by giving its SLURM environment; under torchrun inside a
    SLURM job that environment would override torchrun's, and every rank would read rank 0."""
    from massrl.train import _slurm_without_auto_requeue

    for name in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
                 "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert _slurm_without_auto_requeue() == []
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    [env] = _slurm_without_auto_requeue()
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "42")  # what torchrun sets
    assert _slurm_without_auto_requeue() == []


def test_devices_that_do_not_match_the_launch_are_one_line_errors(tiny, tmp_path, monkeypatch,
                                                                  capsys):
    """sbatch with one task per node and trainer.devices=2: Lightning refused when training
    started, with a traceback, leaving the run directory behind."""
    for name, value in (("SLURM_NTASKS", "1"), ("SLURM_NTASKS_PER_NODE", "1"),
                        ("SLURM_JOB_NAME", "train"), ("SLURM_NODELIST", "localhost"),
                        ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0"), ("SLURM_NODEID", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    out = tmp_path / "mismatch"
    args = [a for a in tiny("byol") if not a.startswith("output_dir=")]
    assert main(["pretrain", *args, "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.strategy=ddp", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "trainer.devices=2 trainer.num_nodes=1 do not match how the processes were started" \
        in err and "--ntasks-per-node=1" in err and "Traceback" not in err
    assert not out.exists()


def test_checkpoints_kept_every_n_epochs(tiny):
    """trainer.keep_every_n_epochs: one checkpoint per N epochs beside last.ckpt, to evaluate a
    run across its training (only last.ckpt and one best-knn were kept)."""
    import torch

    args = tiny("byol", **{"trainer.max_epochs": "4", "trainer.keep_every_n_epochs": "2",
                           "data.subset": "64"})
    assert main(["pretrain", "-c", "fashion_mnist/byol", *args]) == 0
    folder = _run_dir(args) / "checkpoints"
    kept = sorted(p.name for p in folder.glob("epoch-*.ckpt"))
    assert kept == ["epoch-1.ckpt", "epoch-3.ckpt"]  # (after epochs 2 and 4, counted from 0)
    steps = [torch.load(folder / k, weights_only=False)["global_step"] for k in kept]
    assert steps == [4, 8]  # 64 images, batch 32: 2 steps an epoch
