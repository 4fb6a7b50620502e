"""The training sampler across epochs and a loader state saved at an epoch's end.

Found by mutation testing: each test fails under a small plausible bug the suite missed."""

from __future__ import annotations

import torch


def test_the_sampler_reshuffles_every_epoch_the_same_way_on_every_run():
    """Each epoch is its own permutation, drawn from (seed, epoch): the same
    after a restart, another in the next epoch (SimCLR's negatives, BYOL's batch statistics).
    a bug (the shuffle seeded without the epoch) repeats epoch 0's order forever."""
    from massrl.data.sampler import ResumableSampler

    def order(epoch: int, seed: int = 3) -> list[int]:
        s = ResumableSampler(200, seed=seed, batch_size=10)
        s.set_epoch(epoch)
        return [i for i, _ in s]

    assert order(0) == order(0) and sorted(order(0)) == list(range(200))
    assert order(0) != order(1) != order(2)
    assert order(0) != order(0, seed=4)


def test_a_loader_state_saved_at_an_epochs_end_continues_with_the_next_epoch():
    """ResumableLoader.load_state_dict of a state whose batch count is the
    whole epoch (saved after its last batch) goes on with the next epoch's first batch. A bug
    (`>`: the whole epoch is skipped, an empty epoch) and another (the epoch not advanced: epoch 0
    replayed) fail here."""
    from massrl.data.sampler import ResumableLoader, ResumableSampler

    def loader() -> ResumableLoader:
        class Pairs(torch.utils.data.Dataset):  # yields the sampler's (index, seed)
            def __len__(self):
                return 40

            def __getitem__(self, key):
                return key

        return ResumableLoader(Pairs(), batch_size=8, drop_last=True,
                               sampler=ResumableSampler(40, seed=1, batch_size=8),
                               collate_fn=lambda items: [i for i, _ in items])

    fresh = loader()
    fresh.sampler.set_epoch(1)
    expected = list(fresh)
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "batches": 5})  # 40 images / 8: the whole epoch 0
    assert resumed.sampler.epoch == 1 and list(resumed) == expected
    # mid-epoch: the batches not yet trained on
    mid = loader()
    mid.load_state_dict({"epoch": 1, "batches": 2})
    assert list(mid) == expected[2:]
