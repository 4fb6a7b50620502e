"""ImageDraws: per-image counter-based random numbers (uniformity, independence, invariance)."""

from __future__ import annotations

import pytest
import torch

from massrl.augment.batched.draws import ImageDraws, mix64, new_seeds


def _seeds(n: int, seed: int = 0) -> torch.Tensor:
    return new_seeds((n,), torch.Generator().manual_seed(seed))


def test_values_match_a_splitmix64_reference():
    """Python's unbounded integers, reduced mod 2^64: the tensor products must wrap the same."""
    mask = (1 << 64) - 1
    gamma = 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    seeds = [0, 1, 12345, (1 << 62) - 1, 0xDEADBEEFCAFE]
    bits = ImageDraws(torch.tensor(seeds)).bits(3)
    for seed, row in zip(seeds, bits.tolist(), strict=True):
        key = mix(seed)
        ref = [mix((key + j * gamma) & mask) for j in (1, 2, 3)]
        assert [b & mask for b in row] == ref
    assert mix64(torch.tensor([5])).item() & mask == mix(5)


def test_uniform_statistics():
    draws = ImageDraws(_seeds(4000))
    u = draws.rand(50)
    assert u.dtype == torch.float32 and u.shape == (4000, 50)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.003 and abs(u.var().item() - 1 / 12) < 0.002
    # 16 equal bins: chi-square with 15 degrees of freedom, far below its 0.1% quantile (37.7)
    counts = torch.bincount((u * 16).long().flatten(), minlength=16).float()
    expected = u.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 37.7
    # no correlation between neighbouring values, successive calls or neighbouring seeds
    v = draws.rand(50)
    for a, b in ((u[:, :-1], u[:, 1:]), (u, v), (u[:-1], u[1:])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(r.item()) < 0.01


def test_draws_follow_the_seed_not_the_position():
    seeds = _seeds(64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    a, b = ImageDraws(seeds), ImageDraws(seeds[perm])
    for shape in ((), (3,), (2, 2)):
        assert torch.equal(a.rand(*shape)[perm], b.rand(*shape))
    # seeds that differ only in their high 32 bits draw differently
    c = ImageDraws(seeds ^ (1 << 40)).rand(8)
    assert not torch.equal(c, ImageDraws(seeds).rand(8))


def test_randint_range_and_frequencies():
    k = ImageDraws(_seeds(20000)).randint(7, 2)
    assert k.dtype == torch.int64 and k.min() == 0 and k.max() == 6
    freq = torch.bincount(k.flatten(), minlength=7).float() / k.numel()
    torch.testing.assert_close(freq, torch.full((7,), 1 / 7), atol=0.006, rtol=0)


def test_values_do_not_depend_on_how_calls_are_split():
    """The j-th value of an image is the same whether drawn in one call or in many (blocks)."""
    seeds = _seeds(5)
    one = ImageDraws(seeds).bits(100)
    many = ImageDraws(seeds)
    parts = [many.bits(k) for k in (1, 3, 30, 2, 40, 24)]
    assert torch.equal(torch.cat(parts, 1), one)


def test_rejects_bad_seeds():
    with pytest.raises(ValueError, match="int64"):
        ImageDraws(torch.zeros(3, dtype=torch.int32))
