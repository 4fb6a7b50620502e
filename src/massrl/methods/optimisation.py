"""The pre-training optimizer, its lr schedule and gradient clipping, for SSLMethod.

The online probe sits in the same optimizer in a group of its own: a fixed lr, no weight decay,
never scheduled, and out of the clipped norm (it is a monitor of the backbone, not part of it).
"""

from __future__ import annotations

from typing import Any

import torch

from massrl.methods.run_length import epoch_steps, run_steps
from massrl.optim import build_optimizer, scaled_lr, warmup_cosine


class Optimisation:
    """Mixin of SSLMethod: needs self.cfg, self.trainer, self.probe, self.named_parameters and
    self._probe_parameter_ids (step_skipping.py)."""

    def global_batch_size(self) -> int:
        t = self.trainer
        return self.cfg.data.batch_size * t.world_size * t.accumulate_grad_batches

    def configure_optimizers(self) -> Any:
        ocfg = self.cfg.optimizer
        lr = scaled_lr(ocfg, self.global_batch_size())
        params = [(n, p) for n, p in self.named_parameters() if not n.startswith("probe.")]
        optimizer = build_optimizer(ocfg, params, lr)
        if self.probe is not None:  # the probe learns on its own fixed lr, never decayed
            optimizer.add_param_group({"params": list(self.probe.parameters()),
                                       "lr": self.cfg.eval.probe_lr, "weight_decay": 0.0,
                                       "always_adapt": False})
        total = self.total_steps()
        warmup = int(ocfg.warmup_epochs * self.steps_per_epoch())
        n_ssl_groups = len(optimizer.param_groups) - (self.probe is not None)

        def factor(step: int) -> float:
            return warmup_cosine(step, warmup, total, ocfg.min_lr_ratio)

        lambdas = [factor] * n_ssl_groups + [lambda _: 1.0] * (self.probe is not None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, over the pre-training parameters only: the online probe is a
        monitor, and its gradient in the clipped norm would shrink the backbone's steps."""
        if not gradient_clip_val:
            return
        # (by identity: a checkpoint from before the groups were marked restores unmarked ones)
        probe = self._probe_parameter_ids()
        params = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in probe]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (for the lr and tau schedules)."""
        return run_steps(self.trainer)

    def steps_per_epoch(self) -> int:
        return epoch_steps(self.trainer)
