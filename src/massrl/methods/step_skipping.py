"""Steps that change nothing, and the optimizer step that decides it: a batch no image of which
decoded, a NaN/inf loss or gradient (trainer.skip_nonfinite), a step the 16-mixed GradScaler
skipped. A mixin of SSLMethod (it uses the module's cfg, trainer, probe, parameters, buffers,
log, print and all_gather; `_init_step_skipping` sets its state)."""

from __future__ import annotations

from typing import Any

import torch

from massrl.models.heads import restart_linear_head
from massrl.resilience import (
    USUAL_FIXES,
    NonFiniteLossError,
    check_finite_gradient,
    gradients_finite,
)


class StepSkipping:
    def _init_step_skipping(self) -> None:
        self._skipping = False  # the current step is being skipped (see _skip_step)
        self._nonfinite = False  # ... because of a NaN/inf loss (counted in optimizer_step)
        # BN buffers at the start of the accumulation window (skip_nonfinite)
        self._kept: list[torch.Tensor] | None = None
        self.skipped_nonfinite_steps = 0  # (in checkpoints and summary.json)
        self._steps_this_epoch = self._nonfinite_this_epoch = 0
        self._nonfinite_in_a_row = 0  # skipped steps since the last one that trained
        # images of the optimizer step under way: counted in images_seen if it trains
        self._images_of_step = 0
        self._probe_restarted_this_epoch = False

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
        if not skipped:
            # every rank decides alike (DDP's all-reduced gradients are the same on each; a
            # sharded strategy's are each rank's own)
            model_ok, probe_ok = self._gradients_finite()
            # (also under a GradScaler, which would skip every later step for the probe's NaN:
            # the model froze; a probe overflowing the loss scale alone restarts needlessly)
            if model_ok and not probe_ok:
                self._restart_probe(optimizer)
            if scale is None:  # (a GradScaler checks the model's gradient itself)
                skipped = nonfinite = not check_finite_gradient(
                    model_ok, self.global_step, self.current_epoch + 1,
                    self.cfg.trainer.skip_nonfinite)
        if skipped:  # the whole window's, also its micro-batches after a NaN loss
            self._restore_buffers()
        else:  # (images of skipped steps were not trained on)
            self.images_seen += self._images_of_step
        self._kept, self._images_of_step = None, 0  # (the next window keeps its own)
        self._steps_this_epoch += 1
        self._nonfinite_in_a_row = self._nonfinite_in_a_row + 1 if nonfinite else 0
        if nonfinite:  # one count per skipped optimizer step, whichever check found it
            self.skipped_nonfinite_steps += 1
            self._nonfinite_this_epoch += 1
            self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum", on_epoch=True,
                     on_step=False)
        if not skipped:
            optimizer.step(closure=lambda: loss)
            # under 16-mixed, the GradScaler skips a step whose gradients overflowed, and says so
            # only by lowering its scale: the EMA target must not follow that step either
            skipped = scale is not None and self._loss_scale() < scale
        self.after_optimizer_step(skipped)

    def _probe_parameter_ids(self) -> set[int]:
        """The online probe's parameters, by identity (a monitor's: left out of the model's
        gradient checks and clipping)."""
        return {id(p) for p in self.probe.parameters()} if self.probe is not None else set()

    def _gradients_finite(self) -> tuple[bool, bool]:
        """Whether the model's gradients, and the online probe's, are finite (on every rank)."""
        probe = self._probe_parameter_ids()
        grads: tuple[list, list] = ([], [])
        for p in self.parameters():
            if p.grad is not None:
                grads[id(p) in probe].append(p.grad)
        return self._on_every_rank(*gradients_finite(grads))

    def _restart_probe(self, optimizer: Any) -> None:
        """The online probe diverged (its loss or gradient NaN/inf, eval.probe_lr too high): a
        monitor, it restarts from zero and pre-training goes on (its NaN gradient stopped the
        run, blaming optimizer.lr, or trainer.skip_nonfinite skipped every step)."""
        restart_linear_head(self.probe)
        state = getattr(optimizer, "optimizer", optimizer).state
        for p in self.probe.parameters():
            p.grad = None  # (the optimizer leaves it out of this step)
            state.pop(p, None)  # (its momentum holds the NaN too)
        if not self._probe_restarted_this_epoch:
            self._probe_restarted_this_epoch = True
            self.print(f"note: the online probe's gradient became NaN/inf at optimizer step "
                       f"{self.global_step}: the probe restarts from zero and pre-training goes "
                       f"on; a lower eval.probe_lr (now {self.cfg.eval.probe_lr}) keeps it finite")

    def _end_epoch_of_skips(self) -> None:
        """At an epoch's end: how many of its steps were skipped for a NaN/inf loss or gradient
        (said nowhere but metrics.csv: a run that skipped every step ended "successfully"); a
        run that skipped a whole epoch's worth of steps in a row (at least 2: one transient NaN
        in a one-step epoch, or in the last step left to a resumed one, is no divergence) no
        longer learns, and stops."""
        skipped, steps = self._nonfinite_this_epoch, self._steps_this_epoch
        self._steps_this_epoch = self._nonfinite_this_epoch = 0
        self._probe_restarted_this_epoch = False
        if not skipped:
            return
        epoch, in_a_row = self.current_epoch + 1, self._nonfinite_in_a_row
        if in_a_row >= max(2, self.steps_per_epoch()):
            raise NonFiniteLossError(
                f"the last {in_a_row} optimizer steps, to the end of epoch {epoch}, were all "
                "skipped for a NaN/inf loss or gradient (trainer.skip_nonfinite=true): the model "
                "no longer learns. The run stopped; its checkpoints hold the model as it was "
                f"before them. {USUAL_FIXES}.")
        self.print(f"note: {skipped} of {steps} optimizer steps of epoch {epoch} were skipped "
                   "for a NaN/inf loss or gradient (trainer.skip_nonfinite)")

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

    def _on_every_rank(self, *oks: bool) -> Any:
        """Whether `ok` holds on every rank (for several: a tuple, from one collective). DDP
        ranks must all train or all skip a step: a rank that skips its backward (or raises)
        leaves the others waiting in a collective."""
        if self.trainer.world_size > 1:
            flags = torch.tensor([int(ok) for ok in oks], device=self.device)
            oks = tuple(bool(v) for v in self.all_gather(flags).view(-1, len(oks)).amin(0))
        return oks[0] if len(oks) == 1 else oks
