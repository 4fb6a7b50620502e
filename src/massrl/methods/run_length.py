"""How many optimizer steps a run and an epoch take: the lr and tau schedules span them."""

from __future__ import annotations

import math

import lightning as L

from massrl.config import ConfigError


def run_steps(trainer: L.Trainer) -> int:
    """Optimizer steps of the whole run: max_epochs epochs, or the Trainer's max_steps where
    that ends the run sooner (or alone gives its length)."""
    ends = [trainer.max_steps] if (trainer.max_steps or 0) > 0 else []
    if (trainer.max_epochs or 0) > 0:
        ends.append(epoch_steps(trainer) * trainer.max_epochs)
    if not ends:
        raise ConfigError("an endless run (max_epochs=-1 and no max_steps) has no length for "
                          "the lr schedule: give the Trainer max_epochs or max_steps")
    return max(1, min(ends))


def epoch_steps(trainer: L.Trainer) -> int:
    """Optimizer steps per epoch.

    With a massrl datamodule it is computed from the dataset size, not from the train loader:
    Lightning would build that before a checkpoint is restored, and the loader would then miss
    its saved position.
    """
    per_epoch_fn = getattr(trainer.datamodule, "train_batches_per_epoch", None)
    if per_epoch_fn is not None:
        per_epoch = per_epoch_fn(trainer.world_size)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            per_epoch = min(per_epoch, limit)
        elif limit is not None:
            per_epoch = int(per_epoch * limit)
    else:
        trainer.fit_loop.setup_data()  # (what Lightning's estimated_stepping_batches does)
        per_epoch = trainer.num_training_batches
        if not math.isfinite(per_epoch):  # a loader without a length: max_steps rules
            return max(1, trainer.max_steps)
    return max(1, math.ceil(per_epoch / trainer.accumulate_grad_batches))
