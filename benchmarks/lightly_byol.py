"""The BYOL of `train_throughput.py`'s massrl/lightly comparison, written with lightly's building
blocks (BYOLTransform, heads, NegativeCosineSimilarity, LARS, cosine momentum) in a plain PyTorch
loop, on massrl's backbone and data so that only the training code differs. lightly is installed for
the benchmark only (never a massrl dependency); its modules are imported inside the functions.
"""

from __future__ import annotations

import time
from typing import Any


def train_lightly_byol(cfg: Any, splits: Any) -> tuple[list[float], Any]:
    """Train for cfg.trainer.max_epochs; (images/s of each epoch, the trained backbone)."""
    import torch

    torch.manual_seed(cfg.seed)
    model, loader = lightly_parts(cfg, splits)
    rates = [lightly_epoch(cfg, model, loader, e) for e in range(cfg.trainer.max_epochs)]
    return rates, model["online"]["backbone"]


def lightly_parts(cfg: Any, splits: Any) -> tuple[dict[str, Any], Any]:
    import copy

    import torch
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad
    from lightly.transforms.byol_transform import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
    )
    from lightly.utils.lars import LARS

    from massrl.devices import run_num_workers
    from massrl.models.backbones import build_backbone, feature_dim

    norm = {"mean": list(splits.mean), "std": list(splits.std)}
    size = cfg.data.image_size
    transform = BYOLTransform(BYOLView1Transform(input_size=size, normalize=norm),
                              BYOLView2Transform(input_size=size, normalize=norm))
    backbone, _ = build_backbone(cfg.model.backbone, cfg.model.cifar_stem, cfg.model.width)
    m = cfg.model
    online = torch.nn.ModuleDict({
        "backbone": backbone,
        "projector": BYOLProjectionHead(feature_dim(backbone), m.proj_hidden_dim,
                                        m.proj_output_dim),
        "predictor": BYOLPredictionHead(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim),
    })
    target = torch.nn.ModuleDict({"backbone": copy.deepcopy(online["backbone"]),
                                  "projector": copy.deepcopy(online["projector"])})
    deactivate_requires_grad(target)
    if cfg.trainer.channels_last:
        online, target = (n.to(memory_format=torch.channels_last) for n in (online, target))
    lr = cfg.optimizer.lr * cfg.data.batch_size / 256
    opt = LARS(online.parameters(), lr=lr, momentum=0.9,
               weight_decay=cfg.optimizer.weight_decay)
    workers = run_num_workers(cfg)  # what massrl's loader uses for the same config
    loader = torch.utils.data.DataLoader(
        TwoViews(splits.train, transform), batch_size=cfg.data.batch_size, shuffle=True,
        drop_last=True, num_workers=workers, pin_memory=cfg.data.pin_memory,
        persistent_workers=cfg.data.persistent_workers and workers > 0)
    return {"online": online, "target": target, "opt": opt,
            "loss": NegativeCosineSimilarity()}, loader


def lightly_epoch(cfg: Any, model: dict[str, Any], loader: Any, epoch: int) -> float:
    import torch
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    online, target, opt, loss_fn = model["online"], model["target"], model["opt"], model["loss"]
    steps = len(loader) * cfg.trainer.max_epochs
    bf16 = cfg.trainer.precision.startswith("bf16")
    cl = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    t0, images = time.perf_counter(), 0
    for i, ((x0, x1), _) in enumerate(loader):
        tau = cosine_schedule(epoch * len(loader) + i, steps, cfg.loss.tau_base, 1.0)
        update_momentum(online["backbone"], target["backbone"], tau)
        update_momentum(online["projector"], target["projector"], tau)
        x0, x1 = x0.to(memory_format=cl), x1.to(memory_format=cl)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            p0, p1 = (online["predictor"](online["projector"](online["backbone"](x)))
                      for x in (x0, x1))
            with torch.no_grad():
                z0, z1 = (target["projector"](target["backbone"](x)) for x in (x0, x1))
            loss = 0.5 * (loss_fn(p0, z1.detach()) + loss_fn(p1, z0.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images += x0.shape[0]
    return round(images / (time.perf_counter() - t0), 1)


class TwoViews:
    """(PIL image, label) dataset -> ([view0, view1], label) with a lightly multi-view transform."""

    def __init__(self, base: Any, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[list[Any], int]:
        image, label = self.base[i]
        return self.transform(image), int(label)
