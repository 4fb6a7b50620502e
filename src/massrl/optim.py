"""Optimizers (LARS from timm, SGD, AdamW), parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from timm.optim import Lars
from torch import nn

from massrl.config import OptimizerConfig


def split_decay_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, exclude_bias_norm: bool
) -> list[dict]:
    """Two groups: weights (decay, LARS-adapted) and biases/norm parameters (neither).

    Biases and norm scales are the 1-D parameters; adapting them with LARS or decaying them
    hurts BYOL/SimCLR (as in the BYOL paper's recipe).
    """
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_norm and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "always_adapt": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "always_adapt": False})
    return groups


def scaled_lr(cfg: OptimizerConfig, global_batch: int) -> float:
    """cfg.lr, the lr of a global batch of 256, scaled to `global_batch` by cfg.scale_lr."""
    if cfg.scale_lr == "sqrt":
        return cfg.lr * math.sqrt(global_batch / 256)
    return cfg.lr * global_batch / 256 if cfg.scale_lr else cfg.lr


def build_optimizer(
    cfg: OptimizerConfig, named_params: Iterable[tuple[str, nn.Parameter]], lr: float
) -> torch.optim.Optimizer:
    groups = split_decay_groups(named_params, cfg.weight_decay, cfg.exclude_bias_norm)
    if cfg.name == "lars":
        return Lars(groups, lr=lr, momentum=cfg.momentum, trust_coeff=cfg.trust_coefficient,
                    trust_clip=cfg.trust_clip)
    for g in groups:  # 'always_adapt' is LARS-only
        g.pop("always_adapt", None)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def take_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any,
                         fresh: torch.optim.Optimizer, fresh_scheduler: Any) -> None:
    """A resumed optimizer and LambdaLR keep their state (momentum, step count) and take the
    hyper-parameters of ones built from the run's config now (`fresh`, same groups), the lr
    where the schedule is at."""
    for group, new in zip(optimizer.param_groups, fresh.param_groups, strict=True):
        group.update({k: v for k, v in new.items() if k != "params"})
    scheduler.base_lrs = list(fresh_scheduler.base_lrs)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at an optimizer step: linear warm-up, then cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_note(warmup_epochs: float, max_epochs: int) -> str | None:
    """A note when the warm-up is not shorter than the run: the lr then only rises, never
    reaching its peak or decaying (a shipped 10-epoch warm-up in a short trial run)."""
    if warmup_epochs <= 0 or max_epochs <= 0 or warmup_epochs < max_epochs:
        return None
    reached = max_epochs / warmup_epochs
    return (f"note: optimizer.warmup_epochs={warmup_epochs:g} is not shorter than "
            f"trainer.max_epochs={max_epochs}: the lr only rises, to {reached:.0%} of its peak "
            f"at the last epoch, with no cosine decay (a shorter warm-up, e.g. "
            f"optimizer.warmup_epochs={max(max_epochs / 10, 0.1):g}, keeps the recipe's shape)")


def cosine_tau(step: int, total_steps: int, tau_base: float, tau_final: float = 1.0) -> float:
    """BYOL's target momentum: tau_base at step 0 rising to tau_final at the last step."""
    progress = min(1.0, step / max(1, total_steps))
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * progress) + 1) / 2
