"""What a run changes in its process, put back for the script or notebook that called it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from massrl.memory import ENV as MALLOC_ENV
from massrl.resilience import rng_state, set_rng_state
from massrl.run_dir import RUN_DIR_ENV

# set for the run's own children (its directory; Lightning's worker seeding; glibc's malloc)
_RUN_ENV = (RUN_DIR_ENV, "PL_GLOBAL_SEED", "PL_SEED_WORKERS", *MALLOC_ENV)


@contextlib.contextmanager
def callers_process_kept() -> Iterator[None]:
    """A script or notebook calling pretrain() gets its process back as it was: its random
    streams (the run seeds them, and reseeds them per image without loader workers: afterwards
    every seed drew the same numbers), torch's thread count, and the environment variables the
    run sets for its children (with PL_SEED_WORKERS left set, the caller's own Trainer seeded
    its loader workers; the next run in the process picks its own directory)."""
    threads, rng = torch.get_num_threads(), rng_state()
    env = {key: os.environ.get(key) for key in _RUN_ENV}
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        set_rng_state(rng)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
