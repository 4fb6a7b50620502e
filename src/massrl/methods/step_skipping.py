"""Steps that change nothing, and the optimizer step that decides it: a batch no image of which
decoded, a NaN/inf loss or gradient (trainer.skip_nonfinite), a step the 16-mixed GradScaler
skipped. A mixin of SSLMethod (it uses the module's cfg, trainer, parameters, buffers, log and
all_gather, and the state SSLMethod.__init__ sets: _skipping, _nonfinite, _kept)."""

from __future__ import annotations

from typing import Any

import torch

from massrl.resilience import check_finite_gradient, gradient_is_finite


class StepSkipping:
    def _skip_step(self) -> torch.Tensor:
        """A step that changes nothing, taken the same way on every rank.

        Returning None would skip the step on one process only, which DDP cannot do (the other
        ranks wait in the gradient all-reduce). Instead every parameter gets a zero gradient and
        optimizer_step leaves the optimizer out: weights, optimizer state (momentum) and EMA
        target stay as they were.
        """
        self._skipping = True
        return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Any = None) -> None:
        # the closure runs the step's forward and backward, which decide whether it is skipped;
        # a skipped step does not reach the optimizer (at lr 0, LARS's momentum still moved)
        loss = optimizer_closure() if optimizer_closure is not None else None
        skipped, self._skipping = self._skipping, False
        nonfinite, self._nonfinite = self._nonfinite, False
        scale = self._loss_scale()
        if not skipped and scale is None:  # (a GradScaler checks the gradient itself)
            # every rank decides alike (DDP's all-reduced gradients are the same on each; a
            # sharded strategy's are each rank's own)
            finite = self._on_every_rank(gradient_is_finite(
                [p.grad for p in self.parameters() if p.grad is not None]))
            skipped = nonfinite = not check_finite_gradient(
                finite, self.global_step, self.current_epoch + 1, self.cfg.trainer.skip_nonfinite)
        if skipped:  # the whole window's, also its micro-batches after a NaN loss
            self._restore_buffers()
        self._kept = None  # (the next window keeps its own)
        if nonfinite:  # one count per skipped optimizer step, whichever check found it
            self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum", on_epoch=True,
                     on_step=False)
        if not skipped:
            optimizer.step(closure=lambda: loss)
            # under 16-mixed, the GradScaler skips a step whose gradients overflowed, and says so
            # only by lowering its scale: the EMA target must not follow that step either
            skipped = scale is not None and self._loss_scale() < scale
        self.after_optimizer_step(skipped)

    def _restore_buffers(self) -> None:
        """Batch-norm statistics as at the start of the skipped step's accumulation window
        (skip_nonfinite)."""
        if self._kept is not None:
            with torch.no_grad():
                torch._foreach_copy_(list(self.buffers()), self._kept)

    def _loss_scale(self) -> float | None:
        """The GradScaler's loss scale (16-mixed), None without one. (A host sync, but the
        scaler syncs every step anyway to decide whether to step.)"""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None

    def after_optimizer_step(self, skipped: bool) -> None:
        """Called after each optimizer step (after the weights changed, before checkpoints)."""

    def _on_every_rank(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank. DDP ranks must all train or all skip a step: a rank
        that skips its backward (or raises) leaves the others waiting in a collective."""
        if self.trainer.world_size == 1:
            return ok
        return bool(self.all_gather(torch.tensor([int(ok)], device=self.device)).min())
