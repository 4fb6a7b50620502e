"""massrl used from Python rather than through its command: a Trainer of one's own, datasets of
one's own, checkpoints loaded back, configs and losses built by hand."""

import json
import os
import random

import lightning as L
import numpy as np
import pytest
import torch
from conftest import run_python
from PIL import Image
from torch.utils.data import Dataset

from massrl.config import ConfigError, build_config
from massrl.data import DatasetSplits, SSLDataModule, UnusableDataError
from massrl.losses import byol_pair_loss, nt_xent
from massrl.methods import MASSRL, build_method

TINY = ["data.batch_size=8", "data.num_workers=0", "model.width=8",
        "model.proj_hidden_dim=32", "model.proj_output_dim=16", "model.pred_hidden_dim=32",
        "trainer.max_epochs=1", "trainer.precision=32-true", "optimizer.warmup_epochs=0"]


class Squares(Dataset):
    """Grey images of a bright square whose place is the label."""

    def __init__(self, n: int = 32, size: int = 16) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        label = i % 2
        pixels = np.full((self.size, self.size), 30 + i, np.uint8)
        half = self.size // 2
        pixels[:half, label * half:(label + 1) * half] = 220
        return Image.fromarray(pixels, "L"), label


def _splits(n: int = 32, size: int = 16, mean: float = 0.5, std: float = 0.25) -> DatasetSplits:
    data = Squares(n, size)
    return DatasetSplits(train=data, train_labeled=data, test=data, classes=["left", "right"],
                         mean=(mean,) * 3, std=(std,) * 3)


def _fit(cfg, splits: DatasetSplits, **trainer: object) -> tuple[MASSRL, L.Trainer]:
    dm = SSLDataModule(cfg, splits=splits)
    model = build_method(cfg, num_classes=dm.num_classes)
    fit = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, **trainer)
    fit.fit(model, datamodule=dm)
    return model, fit


def test_a_trainer_of_ones_own_gets_the_channels_last_guard(capsys):
    """A width-8 ResNet's channels-last backward crashes oneDNN at 64 px (devices.py): the
    model itself turns channels-last off on the CPU, not only `massrl pretrain`."""
    cfg = build_config(overrides=[*TINY, "data.image_size=64"])
    assert cfg.trainer.channels_last
    model, fit = _fit(cfg, _splits(16, 64), limit_train_batches=1, limit_val_batches=1)
    assert fit.global_step == 1 and model.channels_last is False
    assert "trainer.channels_last: off" in capsys.readouterr().out


def test_a_trainer_of_ones_own_refuses_data_smaller_than_a_batch():
    cfg = build_config(overrides=[*TINY, "data.batch_size=64", "data.image_size=16"])
    with pytest.raises(UnusableDataError, match="32 images, fewer than one batch of "
                                                "data.batch_size=64"):
        _fit(cfg, _splits(32))


def test_a_loaded_checkpoint_keeps_its_normalisation_and_the_callers_random_state(tmp_path):
    cfg = build_config(overrides=[*TINY, "data.image_size=16"])
    model, fit = _fit(cfg, _splits(16), limit_train_batches=1, limit_val_batches=1)
    fit.save_checkpoint(tmp_path / "m.ckpt")

    def draws(seed: int, load: bool) -> list:
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        loaded = MASSRL.load_from_checkpoint(tmp_path / "m.ckpt") if load else None
        return [torch.rand(3).tolist(), random.random(), float(np.random.rand()), loaded]

    # (building the model draws its initial weights from torch's stream, which was then left
    # at another place than the caller had seeded it to)
    *seeded, _ = draws(7, load=False)
    *after_load, loaded = draws(7, load=True)
    *other_seed, _ = draws(8, load=True)
    assert after_load == seeded and other_seed[0] != after_load[0]
    assert loaded.normalization == model.normalization
    assert loaded.normalization["mean"] == [0.5] * 3 and loaded.normalization["image_size"] == 16
    # another method's class refuses the checkpoint in one line (BYOL's: a long list of
    # missing keys; MASSRL's of a BYOL run built a MASSRL that said byol)
    from massrl.config import ConfigError
    from massrl.methods import BYOL

    with pytest.raises(ConfigError, match="a BYOL cannot take a massrl config or checkpoint: use "
                                          "MASSRL"):
        BYOL.load_from_checkpoint(tmp_path / "m.ckpt")
    # the base class builds the checkpoint's own method (it failed on the heads' keys)
    from massrl.methods import SSLMethod

    generic = SSLMethod.load_from_checkpoint(str(tmp_path / "m.ckpt"))
    assert type(generic) is MASSRL and generic.normalization == model.normalization
    with open(tmp_path / "m.ckpt", "rb") as f:  # (a file object too)
        assert type(SSLMethod.load_from_checkpoint(f)) is MASSRL


@pytest.mark.parametrize("backend", ["auto", "per_image", "batched"])
def test_a_loaded_checkpoint_trains_on_with_a_trainer_of_ones_own(tmp_path, backend):
    """Fine-tuning a checkpoint from Python on massrl's datamodule: with the batched engine
    (auto's choice on the CPU) the loaded model had no augmenter and refused the uint8 crops.
    Its engine normalises as the new data's transforms do (the per-image views' statistics)."""
    cfg = build_config(overrides=[*TINY, "data.image_size=16", f"augment.backend={backend}"])
    _, fit = _fit(cfg, _splits(16), limit_train_batches=1, limit_val_batches=1)
    fit.save_checkpoint(tmp_path / "m.ckpt")
    loaded = MASSRL.load_from_checkpoint(tmp_path / "m.ckpt")
    on = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, limit_val_batches=1,
                   limit_train_batches=2, enable_progress_bar=False, enable_model_summary=False)
    other = _splits(16, mean=0.1, std=0.9)  # other images, of other statistics
    on.fit(loaded, datamodule=SSLDataModule(loaded.cfg, splits=other))
    assert on.global_step == 2
    assert (loaded.augmenter is not None) == (backend != "per_image")  # (the CPU: auto batched)
    if loaded.augmenter is not None:
        assert loaded.augmenter.normaliser.mean == (0.1,) * 3
        assert loaded.augmenter.normaliser.std == (0.9,) * 3
    assert loaded.normalization["mean"] == [0.5] * 3  # (the checkpoint's own, for evaluation)


def test_a_model_and_datamodule_of_different_backends_are_told_apart(tmp_path):
    """A per-image model (an old checkpoint's config) fitted on a datamodule whose config runs
    the engine: the crops reach a model without one, and the message names the mismatch."""
    model = build_method(build_config(overrides=[*TINY, "data.image_size=16",
                                                 "augment.backend=per_image"]), num_classes=2)
    dm_cfg = build_config(overrides=[*TINY, "data.image_size=16", "augment.backend=batched"])
    fit = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                    limit_train_batches=1, limit_val_batches=0, enable_progress_bar=False,
                    enable_model_summary=False)
    with pytest.raises(RuntimeError, match=r"no augmenter: its config's backend resolves to "
                                           r"per_image: build the datamodule from the model's"):
        fit.fit(model, datamodule=SSLDataModule(dm_cfg, splits=_splits(16)))


def test_checkpoints_hold_weights_in_the_standard_layout(tmp_path):
    """A channels-last run's checkpoint held strided weights: safetensors (and other tools fed
    a checkpoint's state_dict) refused them."""
    cfg = build_config(overrides=[*TINY, "data.image_size=16"])
    model, fit = _fit(cfg, _splits(16), limit_train_batches=1, limit_val_batches=1)
    model.to(memory_format=torch.channels_last)
    assert not all(t.is_contiguous() for t in model.state_dict().values())
    fit.save_checkpoint(tmp_path / "m.ckpt")
    weights = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    assert all(t.is_contiguous() for t in weights.values())
    assert not all(t.is_contiguous() for t in model.state_dict().values())  # (model unchanged)


def test_dataset_splits_need_only_the_training_set_and_check_what_they_are_given():
    data = Squares(8)
    plain = DatasetSplits(train=data)
    assert plain.train_labeled is None and plain.num_classes is None
    assert plain.mean == (0.485, 0.456, 0.406)
    assert DatasetSplits(train=data, classes=["a", "b"]).num_classes == 2
    with pytest.raises(ValueError, match="needs num_classes"):
        DatasetSplits(train=data, train_labeled=data, test=data)
    with pytest.raises(ValueError, match="0-255 values: give them on the \\[0, 1\\] scale"):
        DatasetSplits(train=data, mean=(125.3, 123.0, 113.9))
    with pytest.raises(ValueError, match="std must be 3 channel values, all > 0"):
        DatasetSplits(train=data, std=(0.2, 0.0, 0.2))


def test_a_dataset_that_does_not_yield_pairs_is_explained():
    class ImagesOnly(Squares):
        def __getitem__(self, i):
            return super().__getitem__(i)[0]

    cfg = build_config(overrides=[*TINY, "data.image_size=16"])
    dm = SSLDataModule(cfg, splits=DatasetSplits(train=ImagesOnly(16)))
    with pytest.raises(TypeError, match="item 0 of the dataset is a Image: massrl's datasets "
                                        "yield \\(PIL image, label\\) pairs"):
        dm.train_dataloader().dataset[0]


def test_pretrain_takes_datasets_of_ones_own(tmp_path):
    from massrl.train import pretrain

    cfg = build_config(overrides=[*TINY, "data.image_size=16", "trainer.progress_bar=false",
                                  "trainer.cpu_threads=1", f"output_dir={tmp_path / 'run'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    env = dict(os.environ)
    try:
        torch.manual_seed(5), random.seed(5), np.random.seed(5)
        summary = pretrain(cfg, splits=_splits(32))
        assert torch.get_num_threads() == 3  # the run's thread count was its own
        # the caller's random streams go on from its own seed (every seed drew the same numbers
        # after a run), and the variables set for the run's children are gone (PL_SEED_WORKERS
        # made the caller's own Trainer seed its loader workers)
        after = [torch.rand(2).tolist(), random.random(), float(np.random.rand())]
        torch.manual_seed(5), random.seed(5), np.random.seed(5)
        assert after == [torch.rand(2).tolist(), random.random(), float(np.random.rand())]
        assert dict(os.environ) == env
    finally:
        torch.set_num_threads(threads)
    assert summary["images_seen"] == 32 and summary["knn_top1"] is not None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["images_seen"] == 32
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_a_run_on_ones_own_splits_is_not_taken_for_its_configs_dataset(tmp_path, capsys):
    """Its config names data.name=fashion_mnist: summary.json said so, `massrl knn` scored the
    checkpoint on Fashion-MNIST as its own data, and the printed resume command trained on on
    Fashion-MNIST, each without a word."""
    from massrl.cli import main
    from massrl.train import pretrain

    run = tmp_path / "run"
    cfg = build_config(overrides=[*TINY, "data.image_size=16", "trainer.progress_bar=false",
                                  f"output_dir={run}"])
    assert pretrain(cfg, splits=_splits(32))["dataset"] == "own splits"
    ckpt = run / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["knn", f"ckpt={ckpt}", "device=cpu", f"output_dir={tmp_path / 'knn'}"]) == 2
    assert "pre-trained on datasets given to pretrain(cfg, splits=...)" in capsys.readouterr().err
    assert main(["knn", f"ckpt={ckpt}", "device=cpu", "data.name=digits", "data.eval_subset=50",
                 f"output_dir={tmp_path / 'knn'}", f"cache_dir={tmp_path / 'c'}"]) == 0
    assert json.loads((tmp_path / "knn" / "result.json").read_text())["protocol"]["dataset"][
        "transfer"]
    assert main(["pretrain", "-c", str(run / "config.yaml"), "resume=auto",
                 "trainer.max_epochs=2"]) == 2
    assert "Continue it from Python with the same splits" in capsys.readouterr().err
    assert pretrain(cfg.model_copy(update={"resume": "auto", "trainer": cfg.trainer.model_copy(
        update={"max_epochs": 2})}), splits=_splits(32))["epochs"] == 2


def test_config_overrides_given_as_a_mapping_keep_the_sections_other_keys():
    file_only = build_config(config_file="fashion_mnist/massrl")
    nested = build_config(config_file="fashion_mnist/massrl", overrides={"optimizer": {"lr": 0.5}})
    as_text = build_config(config_file="fashion_mnist/massrl", overrides=["optimizer={lr: 0.5}"])
    expected = file_only.optimizer.model_copy(update={"lr": 0.5})
    assert nested.optimizer == as_text.optimizer == expected
    assert build_config(overrides={"model": {"kwargs": {}}}).model.kwargs == {}
    with pytest.raises(ConfigError, match="unknown key 'optimizer.lrr'"):
        build_config(overrides={"optimizer": {"lrr": 0.5}})
    with pytest.raises(ConfigError, match="config_file='fashion_mnist/massrl'"):
        build_config("fashion_mnist/massrl")


def test_loss_functions_check_their_mask_and_take_keyword_arguments():
    p, z = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    mask = ~torch.eye(2, dtype=torch.bool).expand(4, 2, 2)
    with pytest.raises(ValueError, match="bool tensor of shape \\[4, 2, 2\\].*torch.int64"):
        byol_pair_loss(p, z, mask.long())
    with pytest.raises(ValueError, match="shape \\[4, 2, 2\\].*\\[2, 2\\]"):
        byol_pair_loss(p, z, mask[0])
    assert nt_xent(z=z, mask=mask, temperature=0.2) == nt_xent(z, mask, 0.2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent(z, mask, 0.0)



def test_a_plain_import_reaches_the_subpackages_and_stays_light():
    code = ("import sys, massrl\n"
            "light = not {'torch', 'lightning'} & set(sys.modules)\n"
            "cfg = massrl.config.build_config(overrides={'method': 'byol'})\n"
            "print(light, cfg.method, callable(massrl.train.pretrain))")
    out = run_python(code)
    assert out.stdout.split() == ["True", "byol", "True"], out.stderr[-2000:]


def test_a_script_that_leaves_a_training_iterator_alive_still_exits():
    """The pre-training loaders' workers ignore SIGTERM, which is how multiprocessing ends the
    workers left at exit: a script that took one batch (or raised inside its loop) hung."""
    script = (
        "from massrl.config import build_config\n"
        "from massrl.data import SSLDataModule\n"
        "cfg = build_config(overrides=['data.name=digits', 'data.num_workers=1',\n"
        "                              'data.batch_size=8', 'data.image_size=16'])\n"
        "dm = SSLDataModule(cfg)\n"
        "dm.setup('fit')\n"
        "batches = iter(dm.train_dataloader())  # (kept: alive at exit)\n"
        "batch = next(batches)\n"
        "print('got a batch', flush=True)\n")
    done = run_python(script, timeout=120)
    assert done.returncode == 0 and "got a batch" in done.stdout, done.stderr[-2000:]
