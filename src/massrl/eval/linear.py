"""Offline linear evaluation and semi-supervised fine-tuning.

Linear: a linear head on the frozen backbone (eval mode, so batch-norm keeps the pre-training
statistics), trained with SGD and a cosine schedule, no weight decay by default; either on
augmented images (random resized crop + flip) or, for speed, on cached features of un-augmented
images. Fine-tuning: the whole network trained on a seeded class-balanced fraction of the labels,
its batch-norm statistics measured again on the training images before each evaluation.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from massrl.data.sampler import sample_seed, seed_torch
from massrl.eval.features import on_device, progress, progress_line, unpack
from massrl.eval.knn import topk_accuracy
from massrl.models.heads import FeatureStandardiser, linear_head


@dataclass
class SGDRecipe:
    epochs: int = 100
    lr: float = 0.1
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    backbone_lr: float | None = None  # fine-tuning only; None = lr


@dataclass
class LinearResult:
    """Accuracies are fractions in [0, 1]; `top1`/`top5` are the last epoch's."""

    top1: float
    top5: float
    best_top1: float
    best_top5: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    # undecodable images met (training: in any epoch) and left out; test images scored
    train_left_out: int = 0
    test_left_out: int = 0
    num_test: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Classifier(nn.Module):
    """Backbone + linear head. Frozen: backbone always in eval mode and run without gradients."""

    def __init__(self, backbone: nn.Module, head: nn.Module, finetune: bool,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.finetune = backbone, head, finetune
        self.channels_last = channels_last  # (frozen: see features.on_device)
        if not finetune:
            self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.finetune:
            return self.head(self.backbone(x).flatten(1))
        with torch.no_grad():
            feats = self.backbone(on_device(x, x.device, self.channels_last)).flatten(1)
        return self.head(feats)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()  # frozen batch-norm: never update the running statistics
        return self


class DivergedError(RuntimeError):
    """A linear or fine-tuning training whose loss became NaN/inf: its settings (the lr) made it
    diverge. It is stopped (it had trained on to the last epoch at loss nan and reported its
    best epoch, exit code 0); exit status 1, as pre-training's NaN loss."""

    exit_status = 1


def _lr_names(param_groups: list[dict[str, Any]]) -> str:
    # (initial_lr: the setting, which the scheduler's cosine has begun to lower)
    named = [f"{g['name']} (now {g.get('initial_lr', g['lr']):g})" for g in param_groups
             if "name" in g]
    return " or ".join(named) if named else "lr"


def _fit(
    model: nn.Module, param_groups: list[dict[str, Any]], loader: DataLoader,
    evaluate: Callable[[], Scores], recipe: SGDRecipe, device: torch.device | str, desc: str,
    seed: int,
) -> LinearResult:
    opt = torch.optim.SGD(param_groups, lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    steps = max(1, recipe.epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)  # stepped per batch
    history: list[dict[str, float]] = []
    left_out: set[int] = set()  # (by index: each bad image once, whichever epochs met it)
    # fine-tuning's batch-norm cannot train on a batch of one (a last, odd image); the frozen
    # head's standardiser can (batch_size=1 trained nothing, at loss 0)
    smallest = 2 if getattr(model, "finetune", False) else 1
    with progress() as bar:
        task = bar.add_task(desc, total=steps)
        for epoch in range(1, recipe.epochs + 1):
            start = time.perf_counter()
            model.train()
            total, count = 0.0, 0
            if hasattr(loader.sampler, "set_epoch"):  # a per-image seeded sampler
                loader.sampler.set_epoch(epoch)
            for step, batch in enumerate(loader):
                # stochastic layers (dropout, drop-path) draw from a stream seeded per batch:
                # without workers, the data pipeline reseeds the process's stream per image
                seed_torch(sample_seed(seed ^ 0x5EED, epoch, step), device)  # (not a crop's)
                bar.advance(task)
                left_out.update(batch.get("skipped_index", ()) if isinstance(batch, dict) else ())
                if (xy := unpack(batch)) is None or len(xy[1]) < smallest:
                    continue
                x, y = xy[0].to(device, non_blocking=True), xy[1].to(device)
                loss = F.cross_entropy(model(x), y)
                if not math.isfinite(value := loss.item()):
                    raise DivergedError(f"{desc}: the loss became {value} at epoch {epoch}, step "
                                        f"{step + 1}: the training diverged and was stopped. "
                                        f"Use a lower {_lr_names(opt.param_groups)}.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, count = total + value * len(y), count + len(y)
            scores = evaluate()
            history.append({"epoch": epoch, "loss": total / max(count, 1),
                            "top1": scores.top1, "top5": scores.top5})
            progress_line(f"{desc} epoch {epoch}/{recipe.epochs}",
                          f"loss {history[-1]['loss']:.4f}", f"top1 {scores.top1:.4f}",
                          f"top5 {scores.top5:.4f}", f"{time.perf_counter() - start:.0f} s")
    best = max(history, key=lambda h: h["top1"])  # the first epoch reaching the maximum
    last = history[-1]
    return LinearResult(last["top1"], last["top5"], best["top1"], best["top5"],
                        int(best["epoch"]), history, len(left_out), scores.left_out,
                        scores.scored)


# batches of training images a fine-tuned network's batch-norm statistics are measured on before
# each evaluation: all of a semi-supervised subset; for a large one a bounded cost (Detectron's
# precise BN also takes 200)
BATCH_NORM_BATCHES = 200


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, loader: Iterable[Any], device: torch.device | str,
                         max_batches: int = BATCH_NORM_BATCHES) -> int:
    """Replace the running statistics of `model`'s batch-norm layers by their plain average over
    (up to `max_batches`) training batches, the weights as they are now, and measure a linear
    head's standardiser afresh on them too; returns the images used. Only those layers are in
    training mode meanwhile (dropout and drop-path are off: the test images meet none).

    Fine-tuning on few labels takes few optimizer steps per epoch (one, for 1 % of a small
    dataset), and statistics kept with momentum 0.1 lag weights that move at lr 0.1: the network
    in eval mode saw features its batch-norm never measured and predicted one class for every
    test image (11 % on digits, where the same training measured this way scored 39 %:
    docs/evaluation.md)."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    standardisers = [m for m in model.modules() if isinstance(m, FeatureStandardiser)]
    if not layers and not standardisers:
        return 0
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
        m.train()
    for m in standardisers:  # (its own average: plain over its first 10 batches)
        m.restart()
        m.train()
    images = 0
    try:
        for batch in itertools.islice(loader, max_batches):
            if (xy := unpack(batch)) is None or len(xy[1]) < 2:  # (batch-norm needs 2)
                continue
            model(xy[0].to(device, non_blocking=True))
            images += len(xy[1])
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
    return images


@dataclass
class Scores:
    top1: float
    top5: float
    scored: int  # test images scored
    left_out: int  # and those that could not be decoded


@torch.no_grad()
def _accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Any],
    device: torch.device | str,
) -> Scores:
    scores, labels, left_out = [], [], 0
    for batch in batches:
        left_out += len(batch.get("skipped_index", ())) if isinstance(batch, dict) else 0
        if (xy := unpack(batch)) is None:
            continue
        scores.append(predict(xy[0].to(device)).float().cpu())
        labels.append(xy[1])
    top1, top5 = topk_accuracy(torch.cat(scores), torch.cat(labels), (1, 5))
    return Scores(top1, top5, sum(len(y) for y in labels), left_out)


def train_linear_on_features(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    num_classes: int, recipe: SGDRecipe, seed: int = 0, device: torch.device | str = "cpu",
) -> LinearResult:
    """A linear classifier on fixed features, evaluated on the test features after every epoch."""
    torch.manual_seed(seed)
    head = linear_head(train_x.shape[1], num_classes).to(device)
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=recipe.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(seed))
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=4096)

    def evaluate() -> Scores:
        head.eval()
        return _accuracy(head, test, device)

    return _fit(head, [{"params": head.parameters(), "name": "lr"}], loader, evaluate, recipe,
                device, "linear (cached features)", seed)


def train_on_images(
    backbone: nn.Module, num_classes: int, feature_dim: int, train_loader: DataLoader,
    recipe: SGDRecipe, *, finetune: bool, seed: int = 0, device: torch.device | str = "cpu",
    test_loader: DataLoader | None = None,
    test_features: tuple[torch.Tensor, torch.Tensor] | None = None, channels_last: bool = False,
) -> LinearResult:
    """Linear head on augmented images (frozen backbone) or fine-tuning of the whole network.

    A frozen backbone gives the same test features every epoch, so they may be passed in
    precomputed (`test_features`); fine-tuning needs `test_loader`.
    """
    torch.manual_seed(seed)
    head = linear_head(feature_dim, num_classes)
    if finetune:  # (as SimCLR fine-tunes): a random head's first steps would send the
        nn.init.zeros_(head[-1].weight)  # pre-trained backbone large, meaningless gradients;
        nn.init.zeros_(head[-1].bias)  # a zero one gives it none until the head has learned
    model = Classifier(backbone, head, finetune, channels_last).to(device)
    groups: list[dict[str, Any]] = [{"params": head.parameters(), "name": "lr"}]
    if finetune:  # (names: the settings a divergence's message points at)
        groups.append({"params": backbone.parameters(), "lr": recipe.backbone_lr or recipe.lr,
                       "name": "backbone_lr"})

    def evaluate() -> Scores:
        if finetune:
            recompute_batch_norm(model, train_loader, device)
        model.eval()
        if test_features is not None and not finetune:
            feats = DataLoader(TensorDataset(*test_features), batch_size=4096)
            return _accuracy(head, feats, device)
        if test_loader is None:
            raise ValueError("train_on_images needs test_loader (or test_features when frozen)")
        return _accuracy(model, test_loader, device)

    desc = "fine-tune" if finetune else "linear (augmented)"
    return _fit(model, groups, train_loader, evaluate, recipe, device, desc, seed)
