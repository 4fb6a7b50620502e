"""SSLDataModule: multi-view train batches, evaluation loaders, workers and bad files."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, resize

from massrl.config import RunConfig
from massrl.data import SSLDataModule

SIZE, VIEWS = 16, 3


class StandInViews:
    """A tiny stand-in for massrl.augment.MultiViewTransform: V resized copies with ids."""

    def __call__(self, image: Image.Image) -> dict:
        assert image.mode == "RGB"
        view = pil_to_tensor(resize(image, [SIZE, SIZE])).float() / 255
        return {
            "views": [view + k for k in range(VIEWS)],
            "strategy": torch.arange(VIEWS),
            "crop": torch.zeros(VIEWS, dtype=torch.long),
            # which torch thread count and worker the item was made with, for the checks below
            "threads": torch.get_num_threads(),
            "rand": torch.tensor([random.random(), np.random.rand()]),
        }


def _cfg(**data) -> RunConfig:
    base = {"name": "digits", "batch_size": 8, "num_workers": 0, "image_size": SIZE}
    return RunConfig.model_validate({"seed": 0, "data": {**base, **data}})


def _check_train_batch(batch: dict, batch_size: int) -> None:
    assert set(batch) == {"views", "strategy", "crop", "label", "index", "skipped", "threads",
                          "rand"}
    assert batch["index"].shape == (batch_size,) and len(set(batch["index"].tolist())) == batch_size
    assert len(batch["views"]) == VIEWS
    for k, view in enumerate(batch["views"]):
        assert view.shape == (batch_size, 3, SIZE, SIZE) and view.dtype == torch.float32
        assert view.min() >= k  # view order kept
    assert batch["strategy"].shape == (batch_size, VIEWS)
    assert batch["strategy"][0].tolist() == list(range(VIEWS))
    assert batch["crop"].shape == (batch_size, VIEWS) and batch["crop"].dtype == torch.long
    assert batch["label"].shape == (batch_size,) and batch["label"].dtype == torch.long
    assert batch["skipped"] == 0


def test_train_batch_in_process():
    dm = SSLDataModule(_cfg(), StandInViews())
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.drop_last and len(loader) == len(dm.splits.train) // 8
    batch = next(iter(loader))
    _check_train_batch(batch, 8)
    assert dm.has_labels and dm.num_classes == 10
    # the shuffle is seeded: a new module with the same seed sees the same first batch
    again = next(iter(SSLDataModule(_cfg(), StandInViews()).train_dataloader()))
    assert torch.equal(again["label"], batch["label"])
    assert torch.equal(again["views"][0], batch["views"][0])


def test_train_batch_with_a_worker():
    dm = SSLDataModule(_cfg(num_workers=1, subset=64), StandInViews())
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.worker_init_fn is not None
    batch = next(iter(loader))
    _check_train_batch(batch, 8)
    assert batch["threads"].tolist() == [1] * 8  # single-threaded augmentation in workers
    # python/numpy randomness in workers is seeded: the same per run, different per item
    rerun = SSLDataModule(_cfg(num_workers=1, subset=64), StandInViews())
    assert torch.equal(next(iter(rerun.train_dataloader()))["rand"], batch["rand"])
    for column in batch["rand"].T:
        assert len(set(column.tolist())) == 8


def test_no_persistent_workers_without_workers():
    loader = SSLDataModule(_cfg(persistent_workers=True), StandInViews()).train_dataloader()
    assert loader.num_workers == 0 and not loader.persistent_workers


def test_val_loaders():
    dm = SSLDataModule(_cfg(eval_subset=20))
    dm.setup("validate")
    bank, test = dm.val_dataloader()
    for loader, n in ((bank, 20), (test, 20)):
        batches = list(loader)
        assert sum(len(b["label"]) for b in batches) == n  # no drop_last for evaluation
        b = batches[0]
        assert b["image"].shape == (8, 3, SIZE, SIZE) and b["skipped"] == 0
        assert b["label"].dtype == torch.long
        assert b["image"].mean().abs() < 3  # normalised, not 0..255


class FreezeCount(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        import gc

        return {"frozen": gc.get_freeze_count()}


def test_workers_leave_what_they_inherit_out_of_garbage_collections():
    """A full garbage collection in a forked worker touched every object it inherited, copying
    the parent's pages into each worker (the run's training and monitor loaders keep theirs:
    3 x num_workers processes)."""
    import gc

    from massrl.data import make_loader

    before = gc.get_freeze_count()
    batch = next(iter(make_loader(FreezeCount(), 2, num_workers=1)))
    assert batch["frozen"].min() > 0 and gc.get_freeze_count() == before  # (the worker's own)


def test_the_online_knn_bank_can_be_smaller_than_the_labeled_split():
    """eval.knn_bank: the online kNN's bank only (every rank holds its features: ImageNet's
    1.28M ResNet-50 ones are 10 GB), class-balanced; the test split stays whole, and the
    offline evaluations, which default to the checkpoint's data.eval_subset, are not cut."""
    cfg = RunConfig.model_validate({"seed": 0, "eval": {"knn_bank": 50},
                                    "data": {"name": "digits", "batch_size": 64,
                                             "num_workers": 0, "image_size": SIZE}})
    dm = SSLDataModule(cfg)
    dm.setup("validate")
    bank, test = dm.val_dataloader()
    labels = torch.cat([b["label"] for b in bank])
    assert torch.bincount(labels).tolist() == [5] * 10
    assert len(test.dataset) == len(dm.splits.test) == 360
    assert len(dm.splits.train_labeled) == 1437


def test_shipped_configs_keep_the_online_knn_bank_small_enough_for_a_gpu():
    from massrl.config import PACKAGE_CONFIGS, build_config

    labeled_train = {"fashion_mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000,
                     "stl10": 5_000, "imagenet100": 126_689, "imagenet": 1_281_167}
    for path in sorted(PACKAGE_CONFIGS.rglob("*.yaml")):
        cfg = build_config(config_file=path)
        if not cfg.eval.knn_every:
            continue
        bank = min(labeled_train[cfg.data.name], cfg.data.eval_subset or math.inf,
                   cfg.eval.knn_bank or math.inf)
        assert bank * 2048 * 4 <= 2**30, f"{path}: a bank of {bank} is over 1 GiB"


@pytest.mark.parametrize("backend, dtype", [("per_image", torch.float32), ("batched", torch.uint8)])
def test_default_train_transform_follows_the_backend(backend, dtype):
    cfg = RunConfig.model_validate({"data": {"name": "digits", "batch_size": 8, "num_workers": 0,
                                             "image_size": SIZE, "subset": 32},
                                    "augment": {"backend": backend}})
    batch = next(iter(SSLDataModule(cfg).train_dataloader()))
    assert len(batch["views"]) == 2 and batch["views"][0].dtype == dtype
    assert batch["views"][0].shape == (8, 3, SIZE, SIZE)


class _GreyImages(torch.utils.data.Dataset):
    """A dataset of one's own that yields grey PIL images, as torchvision's FashionMNIST does."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(np.full((12, 12), 10 * i, np.uint8), "L"), i % 3


def test_splits_of_ones_own_with_grey_images():
    from massrl.data import DatasetSplits

    ds = _GreyImages()
    splits = DatasetSplits(train=ds, train_labeled=ds, test=ds, num_classes=3,
                           classes=["a", "b", "c"], mean=(0.5,) * 3, std=(0.25,) * 3,
                           native_size=12)
    dm = SSLDataModule(_cfg(), splits=splits)
    assert dm.splits is splits and dm.num_classes == 3
    train = next(iter(dm.train_dataloader()))
    assert train["views"][0].shape == (8, 3, SIZE, SIZE)
    for loader in dm.val_dataloader():
        image = next(iter(loader))["image"]
        assert image.shape == (8, 3, SIZE, SIZE)
        # grey is repeated to three equal channels, normalised with the splits' statistics
        assert torch.equal(image[:, 0], image[:, 2])
        assert image[1, 0, 0, 0].item() == pytest.approx((10 / 255 - 0.5) / 0.25, abs=1e-5)


def _unlabeled_folder(root: Path, n: int = 10) -> Path:
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (20, 24), (10 * i, 0, 0)).save(root / f"{i:02d}.png")
    (root / "05.png").write_bytes(b"")  # one broken file
    return root


def test_unlabeled_folder_skips_bad_files(tmp_path):
    root = _unlabeled_folder(tmp_path / "imgs")
    dm = SSLDataModule(_cfg(name="folder", root=str(root), batch_size=10), StandInViews())
    dm.setup("fit")
    assert not dm.has_labels and dm.val_dataloader() == [] and dm.num_classes is None
    with pytest.warns(UserWarning, match="05.png"):
        batch = next(iter(dm.train_dataloader()))
    assert batch["skipped"] == 1 and batch["views"][0].shape[0] == 9
    assert batch["label"].tolist() == [-1] * 9

    strict = SSLDataModule(
        _cfg(name="folder", root=str(root), batch_size=10, strict=True), StandInViews()
    )
    with pytest.raises(Exception, match="data.strict=false"):
        next(iter(strict.train_dataloader()))


def test_batched_backend_view_seeds_follow_the_image():
    """CropOnlyTransform's per-view seeds (the engine's randomness) are drawn under the
    sampler's per-image seed: the same for an image whatever the batch size or worker count."""
    from massrl.augment.batched import CropOnlyTransform
    from massrl.config import AugmentConfig

    tf = CropOnlyTransform(AugmentConfig(strategies=["simclr", "randaugment"]), SIZE)
    seen: dict[int, list[int]] = {}
    for batch_size, workers in ((8, 0), (4, 0), (4, 1)):
        dm = SSLDataModule(_cfg(batch_size=batch_size, num_workers=workers, subset=64), tf)
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        for _ in range(8 // batch_size):
            batch = next(it)
            assert batch["seed"].shape == (batch_size, 2)
            for index, seeds in zip(batch["index"].tolist(), batch["seed"].tolist(), strict=True):
                assert seen.setdefault(index, seeds) == seeds
    assert len(seen) == 8 and len({s for v in seen.values() for s in v}) == 16


class SizeRecorder(StandInViews):
    """StandInViews that declares the source side it needs and records the sizes it is given."""

    source_side = 100

    def __call__(self, image: Image.Image) -> dict:
        return {**super().__call__(image), "source": torch.tensor(image.size)}


def test_large_jpegs_are_decoded_down_to_what_the_transforms_need(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.new("RGB", (800, 600), (40 * i, 90, 0)).save(tmp_path / cls / f"{i}.jpg")
    cfg = _cfg(name="folder", root=str(tmp_path), batch_size=4, image_size=SIZE)
    dm = SSLDataModule(cfg, SizeRecorder())
    batch = next(iter(dm.train_dataloader()))
    # 600 // 100 = 6 -> the 1/4 scale (150 >= 100), not 1/8 (75)
    assert batch["source"].tolist() == [[200, 150]] * 4

    seen = []
    bank = dm.val_dataloader()[0].dataset  # EvalTransform: resize side 16 -> 1/8 scale
    bank.fn.transform = lambda image: seen.append(image.size) or torch.zeros(3, SIZE, SIZE)
    bank[0]
    assert seen == [(100, 75)]

    own = SSLDataModule(cfg, StandInViews())  # no source_side declared: full size
    own.train_transform = lambda image: {**StandInViews()(image),
                                         "source": torch.tensor(image.size)}
    assert next(iter(own.train_dataloader()))["source"].tolist() == [[800, 600]] * 4


def test_evaluation_items_decode_jpegs_down_to_the_test_resize(tmp_path):
    from massrl.data.eval_transform import EvalTransform
    from massrl.data.folder import FileImageDataset
    from massrl.data.loading import labeled_images

    Image.new("RGB", (800, 600), (200, 90, 0)).save(tmp_path / "p.jpg")
    files = FileImageDataset([tmp_path / "p.jpg"], [0])
    seen = []

    def record(transform):
        return lambda image: seen.append(image.size) or transform(image)

    for size in (64, 224):  # test resize 64 (1/8 -> 100x75) and 256 (1/2 -> 400x300)
        transform = EvalTransform(size, (0.5,), (0.5,))
        item = labeled_images(files, record(transform), transform.source_side)[0]
        assert item["image"].shape == (3, size, size)
    assert seen == [(100, 75), (400, 300)]
    labeled_images(files, record(transform))[0]  # no side: full size
    assert seen[-1] == (800, 600)


def test_the_monitors_see_a_test_image_whole_at_the_datasets_own_size():
    """STL-10-like data evaluated at its own 96 px: the online kNN's test images are not
    centre-cropped (a bright border row survives), as the offline evaluation sees them."""
    from massrl.data import DatasetSplits

    arr = np.zeros((96, 96), np.uint8)
    arr[:2] = 255
    images = [(Image.fromarray(arr), i % 2) for i in range(8)]
    splits = DatasetSplits(train=images, train_labeled=images, test=images, classes=["a", "b"],
                           mean=(0.0,) * 3, std=(1.0,) * 3, native_size=96)
    dm = SSLDataModule(_cfg(image_size=96), StandInViews(), splits=splits)
    dm.setup("fit")
    test = next(iter(dm.val_dataloader()[1]))["image"]
    assert test.shape == (8, 3, 96, 96) and test[:, :, 0].mean() > 0.9


def test_the_sampler_draws_each_images_seed_as_the_loader_asks_for_it(monkeypatch):
    """The epoch's whole (index, seed) list was built before its first batch: 3 s and 161 MiB at
    every ImageNet epoch's start. An iterator keeps the seeds of the epoch it started in."""
    from massrl.data import sampler as sampler_module

    calls = []
    real = sampler_module.sample_seed
    monkeypatch.setattr(sampler_module, "sample_seed", lambda *a: calls.append(a) or real(*a))
    s = sampler_module.ResumableSampler(1000, seed=3, batch_size=10)
    s.set_epoch(2)
    it = iter(s)
    first = [next(it) for _ in range(5)]
    assert len([c for c in calls if c[2] >= 0]) == 5  # (index -1 seeds the shuffle), not 1,000
    s.set_epoch(3)
    rest = list(it)
    pairs = first + rest
    assert sorted(i for i, _ in pairs) == list(range(1000))
    assert all(seed == real(3, 2, i) for i, seed in pairs)


def test_a_run_that_may_download_reads_its_dataset_once(monkeypatch):
    """With data.download=true Lightning's prepare_data loaded the dataset a second time after
    the run's own setup (train.build_datamodule): a whole extra read of the data."""
    from massrl.data import datamodule

    loads = []
    real = datamodule.load_dataset
    monkeypatch.setattr(datamodule, "load_dataset",
                        lambda *a, **k: loads.append(1) or real(*a, **k))
    dm = SSLDataModule(_cfg(name="digits", download=True))
    dm.setup("fit")  # (train.build_datamodule, then Lightning's fit: prepare_data, setup)
    dm.prepare_data()
    dm.setup("fit")
    assert len(loads) == 1 and dm.num_classes == 10
