"""The linear and semi-supervised protocol: schedule, shuffling, train mode, learning rates, label
fractions, the feature cache's keys.

Found by mutation testing: each test fails under a small plausible bug the suite missed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image


def _separable(n: int, seed: int, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, classes, generator=torch.Generator().manual_seed(99))
    return x, (x @ w).argmax(1)


def test_the_linear_lr_follows_a_cosine_over_every_step(monkeypatch):
    """'SGD and a cosine schedule' (module docstring), stepped per batch:
    the lr starts at recipe.lr and falls to near zero at the last step. A bug (the
    scheduler never stepped) trains at a constant lr."""
    from massrl.eval.linear import SGDRecipe, train_linear_on_features

    lrs = []
    real = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    (tx, ty), (vx, vy) = _separable(256, 0), _separable(64, 1)
    train_linear_on_features(tx, ty, vx, vy, 4, SGDRecipe(epochs=3, lr=0.4, batch_size=64))
    assert len(lrs) == 12 and lrs[0] == pytest.approx(0.4)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] < 0.02


def test_cached_features_are_seen_in_a_new_shuffled_order_each_epoch(monkeypatch):
    """features come label-sorted from a folder (class by class): the head
    must see them shuffled, another order each epoch. A bug (shuffle=False) feeds batches of
    one class at a time."""
    import torch.nn.functional as F

    from massrl.eval.linear import SGDRecipe, train_linear_on_features

    seen = []
    real = F.cross_entropy

    def spy(logits, y, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(y.clone())
        return real(logits, y, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    (tx, ty), (vx, vy) = _separable(256, 0), _separable(64, 1)
    order = ty.argsort(stable=True)
    tx, ty = tx[order], ty[order]  # class-sorted, as a folder's files are
    train_linear_on_features(tx, ty, vx, vy, 4, SGDRecipe(epochs=2, batch_size=64))
    epoch1, epoch2 = torch.cat(seen[:4]), torch.cat(seen[4:])
    assert not torch.equal(epoch1, ty) and not torch.equal(epoch1, epoch2)
    assert all(len(b.unique()) > 1 for b in seen)  # no batch of a single class


def test_fine_tuning_trains_every_epoch_in_train_mode():
    """each epoch's evaluation puts the model in eval mode; the next epoch
    must train in train mode again (batch-norm statistics, dropout). A bug (model.train() not
    called per epoch) fine-tunes every epoch after the first in eval mode."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from massrl.eval.linear import SGDRecipe, train_on_images

    modes = []

    class Spy(nn.Module):
        def forward(self, x):
            modes.append(self.training)
            return x

    backbone = nn.Sequential(nn.Linear(16, 8), Spy())
    (x, y), (vx, vy) = _separable(64, 0), _separable(50, 1)
    train_on_images(backbone, 4, 8, DataLoader(TensorDataset(x, y), batch_size=32),
                    SGDRecipe(epochs=3, lr=0.1), finetune=True,
                    test_loader=DataLoader(TensorDataset(vx, vy), batch_size=50))
    # per epoch: two training batches, the two of the statistics' measurement (the spy, no
    # statistics layer, stays in eval mode there), the test batch
    assert modes == [True, True, False, False, False] * 3


def test_fine_tuning_trains_the_backbone_at_backbone_lr():
    """backbone_lr (SimCLR fine-tunes the backbone slower than the head).
    At a vanishing backbone_lr the backbone stays put while the head learns. A bug (every
    group at lr) moves it at the head's lr."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from massrl.eval.linear import SGDRecipe, train_on_images

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
    start = [p.detach().clone() for p in backbone.parameters()]
    (x, y), (vx, vy) = _separable(128, 0), _separable(32, 1)
    res = train_on_images(backbone, 4, 8, DataLoader(TensorDataset(x, y), batch_size=32),
                          SGDRecipe(epochs=2, lr=0.5, backbone_lr=1e-4), finetune=True,
                          test_loader=DataLoader(TensorDataset(vx, vy), batch_size=32))
    moved = max((p - s).abs().max().item()
                for p, s in zip(backbone.parameters(), start, strict=True))
    assert 0 < moved < 1e-3 and res.best_top1 > 0.25


def test_the_best_epoch_is_the_first_reaching_the_best_accuracy():
    """LinearResult's best_epoch is 'the first epoch reaching the maximum'
    (_fit): on features every epoch classifies perfectly, epoch 1. A bug (the last of ties)
    says the last epoch."""
    from massrl.eval.linear import SGDRecipe, train_linear_on_features

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 8, generator=g) * 0.1 + y[:, None] * 10.0  # far apart
    res = train_linear_on_features(x[:150], y[:150], x[150:], y[150:], 2,
                                   SGDRecipe(epochs=3, lr=0.5, batch_size=32))
    assert [h["top1"] for h in res.history] == [1.0, 1.0, 1.0]
    assert res.best_epoch == 1


def test_a_frozen_head_trains_on_batches_of_one():
    """the frozen head's standardiser takes a batch of one (_fit's comment:
    'batch_size=1 trained nothing, at loss 0'); only fine-tuning's batch-norm skips it. A bug
    (smallest batch 2 always) trains nothing at batch_size=1."""
    from massrl.eval.linear import SGDRecipe, train_linear_on_features

    (tx, ty), (vx, vy) = _separable(60, 0), _separable(60, 1)
    res = train_linear_on_features(tx, ty, vx, vy, 4, SGDRecipe(epochs=2, lr=0.05, batch_size=1))
    assert res.history[0]["loss"] > 0 and res.best_top1 > 0.5


def test_the_augmented_linear_crop_takes_crop_scale():
    """(test_eval_linear.py / test_eval_commands.py) linear's crop_scale setting reaches the
    RandomResizedCrop of the augmented mode. A bug (the default scale always) ignores it."""
    from torchvision import transforms as T

    from massrl.eval.features import train_transform

    t = train_transform(32, (0.5,), (0.25,), (0.6, 1.0))
    crop = next(op for op in t.transforms if isinstance(op, T.RandomResizedCrop))
    assert tuple(crop.scale) == (0.6, 1.0)

def _pictures(root: Path, per_class: int = 10) -> Path:
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (20 * i, 200 * c, 90)).save(root / name / f"{name}_{i}.png")
    return root


def _fake_run(tmp_path: Path, train, labeled, **cfg):
    from types import SimpleNamespace

    from massrl.data import DatasetSplits

    config = SimpleNamespace(**{"label_fraction": None, "subset_file": None, "seed": 0,
                                "data": SimpleNamespace(name="folder")} | cfg)
    splits = DatasetSplits(train, labeled, labeled, classes=["cat", "dog"])
    return SimpleNamespace(cfg=config, splits=splits, output_dir=tmp_path / "out")


def test_the_label_fraction_is_drawn_from_the_labeled_split_the_run_evaluates_on(tmp_path):
    """label_fraction / subset_file index the labeled training split
    (train_labeled: STL-10's 5k labeled images, or the eval_subset draw), not the pre-training
    split. A bug (Subset(splits.train, ...)) takes those positions in the pre-training
    split: other images, other labels; the bug computes a file list's fraction over it."""
    from massrl.commands.linear_run import _train_set
    from massrl.data.datasets import SubsetDataset
    from massrl.data.folder import labeled_folder

    train = labeled_folder(_pictures(tmp_path / "pics"), strict=False)
    labeled = SubsetDataset(train, list(range(5, 15)))  # 5 cats and 5 dogs, as eval_subset draws
    r = _fake_run(tmp_path, train, labeled, label_fraction=0.4)
    chosen, info = _train_set(r)
    assert chosen.dataset is labeled and info["num_train"] == 4
    assert Counter(labeled.targets[i] for i in chosen.indices) == {0: 2, 1: 2}
    names = tmp_path / "names.txt"
    names.write_text("cat_6.png\ndog_2.png\n")
    chosen, info = _train_set(_fake_run(tmp_path, train, labeled, subset_file=str(names)))
    assert chosen.dataset is labeled and [chosen[k][1] for k in range(2)] == [0, 1]
    assert info["label_fraction"] == pytest.approx(2 / 10)


def test_cached_features_of_two_label_subsets_of_one_size_are_not_confused(tmp_path, monkeypatch):
    """the train-subset feature cache is keyed by the subset's indices:
    two file lists naming as many images (the SimCLR 1 % list, then one's own) must each train
    on their own images. A bug (subset_sha256 left out of the key) reuses the first list's
    features for the second."""
    from test_eval_commands import make_checkpoint

    import massrl.commands.linear_run as linear_run
    from massrl.cli import main

    ckpt = make_checkpoint(tmp_path / "tiny.ckpt")
    root = tmp_path / "pics"
    for split in ("train", "val"):
        _pictures(root / split, per_class=4)
    labels = []
    real = linear_run.train_linear_on_features

    def spy(train_x, train_y, *args, **kwargs):
        labels.append(sorted(train_y.tolist()))
        return real(train_x, train_y, *args, **kwargs)

    monkeypatch.setattr(linear_run, "train_linear_on_features", spy)
    for name, text in (("cats.txt", "cat_0.png\ncat_1.png\n"),
                       ("dogs.txt", "dog_0.png\ndog_1.png\n")):
        (tmp_path / name).write_text(text)
        assert main(["linear", f"ckpt={ckpt}", "data.name=folder", f"data.root={root}",
                     "data.image_size=16", "features_cached=true", "epochs=1", "device=cpu",
                     f"subset_file={tmp_path / name}", f"cache_dir={tmp_path / 'cache'}",
                     f"output_dir={tmp_path / name}.out"]) == 0
    assert labels == [[0, 0], [1, 1]]


def test_augmented_linear_epochs_are_shuffled(tmp_path, monkeypatch):
    """the augmented (and fine-tuning) loader shuffles: a folder's images
    come class by class, and SGD on unshuffled batches of one class is not the linear protocol.
    a bug (ResumableSampler(shuffle=False)) feeds them in file order."""
    from test_eval_commands import make_checkpoint

    import massrl.commands.linear_run as linear_run
    from massrl.cli import main
    from massrl.eval.linear import LinearResult

    ckpt = make_checkpoint(tmp_path / "tiny.ckpt")
    loaders = []

    def capture(backbone, num_classes, feature_dim, loader, recipe, **kwargs):
        loaders.append(loader)
        return LinearResult(0.0, 0.0, 0.0, 0.0, 1)

    monkeypatch.setattr(linear_run, "train_on_images", capture)
    assert main(["linear", f"ckpt={ckpt}", "epochs=1", "label_fraction=0.2", "batch_size=32",
                 "device=cpu", f"cache_dir={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'out'}"]) == 0
    loader = loaders[0]

    def order(epoch: int) -> list[int]:
        loader.sampler.set_epoch(epoch)
        return [i for batch in loader for i in batch["index"].tolist()]

    first = order(1)
    assert first != sorted(first) and order(2) != first and sorted(order(2)) == sorted(first)


def test_another_seed_draws_another_label_fraction(tmp_path):
    """docs/evaluation.md: 'another seed changes only the evaluation's
    own draws (head initialisation, label fractions, ...)'. A bug (the label fraction
    drawn with a fixed seed) gives every seed the same labeled images."""
    from massrl.commands.linear_run import _train_set
    from massrl.data.folder import labeled_folder

    train = labeled_folder(_pictures(tmp_path / "pics"), strict=False)
    draws = [_train_set(_fake_run(tmp_path / str(s), train, train, label_fraction=0.3, seed=s))
             for s in (0, 1, 0)]
    indices = [sorted(chosen.indices) for chosen, _ in draws]
    assert indices[0] == indices[2] and indices[0] != indices[1]
