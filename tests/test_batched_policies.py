"""Statistics of the batched samplers against each policy's definition, on many draws.

Frequencies are checked to within 5 binomial standard deviations (plus a small slack), which a
correct sampler fails with probability < 1e-5 per check; magnitudes are checked exactly.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torchvision.transforms import v2

from massrl.augment.batched.policies import TV_OPS, Op, PolicySampler, tv_space, tv_to_engine
from massrl.augment.fast_autoaugment import load_policy, magnitude
from massrl.config import AugmentConfig

N = 20000
SIZE = 32


def _draw(strategies: list[str], odd: bool = False, seed: int = 0, **kw):
    cfg = AugmentConfig(strategies=strategies, **kw)
    g = torch.Generator().manual_seed(seed)
    return PolicySampler(cfg).sample(torch.zeros(N, dtype=torch.long), SIZE, odd, g)


def _check_freq(counts: Counter, expected: dict[int, float], n: int) -> None:
    for op in set(counts) | set(expected):
        p = expected.get(op, 0.0)
        tol = 5 * math.sqrt(p * (1 - p) / n) + 2e-3
        assert abs(counts.get(op, 0) / n - p) <= tol, (Op(op).name, counts.get(op, 0) / n, p)


@pytest.mark.parametrize("kind,bins", [("randaugment", 11), ("randaugment", 31),
                                       ("autoaugment", 10), ("trivialaugment", 31)])
def test_spaces_match_torchvision(kind, bins):
    tv = {"randaugment": v2.RandAugment, "autoaugment": v2.AutoAugment,
          "trivialaugment": v2.TrivialAugmentWide}[kind]._AUGMENTATION_SPACE
    mine = tv_space(kind, bins, SIZE)
    assert [name for name, _, _ in mine] == list(tv)
    for name, mags, signed in mine:
        fn, tv_signed = tv[name]
        ref = fn(bins, SIZE, SIZE)
        assert signed == tv_signed
        assert (mags is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(mags.float(), ref.float())


def test_randaugment_uniform_ops_fixed_magnitude():
    prog = _draw(["randaugment"])
    space = tv_space("randaugment", 11, SIZE)
    for k in range(2):
        counts = Counter(prog.op[:, k].tolist())
        _check_freq(counts, {int(TV_OPS[name]): 1 / len(space) for name, _, _ in space}, N)
    # M = 9 of 11 bins: e.g. Rotate +-27 degrees, Brightness factor 1 +- 0.81, posterize 4 bits
    rot = prog.mag[prog.op == Op.ROTATE]
    assert torch.allclose(rot.abs(), torch.tensor(27.0))
    assert abs((rot > 0).float().mean().item() - 0.5) < 0.05
    bright = prog.mag[prog.op == Op.BRIGHTNESS]
    assert torch.allclose((bright - 1).abs(), torch.tensor(0.81))
    assert set(prog.mag[prog.op == Op.POSTERIZE].tolist()) == {4.0}
    assert set(prog.mag[prog.op == Op.TRANSLATE_X].abs().tolist()) == {int(150 / 331 * SIZE * 0.9)}


def test_trivialaugment_uniform_bins():
    prog = _draw(["trivialaugment"])
    assert (prog.op[:, 1:] == Op.IDENTITY).all()
    counts = Counter(prog.op[:, 0].tolist())
    space = tv_space("trivialaugment", 31, 1)
    _check_freq(counts, {int(TV_OPS[n]): 1 / 14 for n, _, _ in space}, N)
    rot = prog.mag[prog.op == Op.ROTATE].abs()
    assert rot.max() == 135.0 and rot.min() == 0.0
    assert len(set(rot.tolist())) == 31


def _expected_policy(subs: list, slot: int, to_op) -> dict[int, float]:
    exp: dict[int, float] = {}
    for sub in subs:
        op, p = to_op(sub[slot][0]), sub[slot][1]
        exp[op] = exp.get(op, 0.0) + p / len(subs)
        exp[int(Op.IDENTITY)] = exp.get(int(Op.IDENTITY), 0.0) + (1 - p) / len(subs)
    return exp


@pytest.mark.parametrize("policy", ["imagenet", "cifar10", "svhn"])
def test_autoaugment_op_frequencies(policy):
    prog = _draw(["autoaugment"], autoaugment_policy=policy)
    subs = v2.AutoAugment(v2.AutoAugmentPolicy(policy))._policies
    for k in range(2):
        exp = _expected_policy(subs, k, lambda name: int(TV_OPS[name]))
        _check_freq(Counter(prog.op[:, k].tolist()), exp, N)
    # magnitudes come from the 10-bin space: every drawn solarize threshold is 255 * linspace(1,0)
    allowed = set((255 * torch.linspace(1.0, 0.0, 10)).round(decimals=3).tolist())
    assert set(prog.mag[prog.op == Op.SOLARIZE].round(decimals=3).tolist()) <= allowed


@pytest.mark.parametrize("policy", ["imagenet", "cifar10"])
def test_fastautoaugment_op_frequencies_and_magnitudes(policy):
    prog = _draw(["fastautoaugment"], fastautoaugment_policy=policy)
    subs = load_policy(policy)
    for k in range(2):
        exp = _expected_policy(subs, k, lambda name: int(TV_OPS[name]))
        _check_freq(Counter(prog.op[:, k].tolist()), exp, N)
    # every drawn rotation is +- one of the file's magnitudes; cutout is a fraction of the side
    rot = torch.tensor([abs(magnitude(o, lv)) for sub in subs for o, _, lv in sub if o == "Rotate"])
    drawn = prog.mag[prog.op == Op.ROTATE].abs()
    assert (drawn[:, None] - rot[None]).abs().amin(1).max() < 1e-4
    # every drawn cutout side is one of the file's, in pixels (a bound alone let half of them by)
    sides = torch.tensor([magnitude(o, lv) * SIZE for sub in subs for o, _, lv in sub
                          if o == "Cutout"])
    cut = prog.mag[prog.op == Op.CUTOUT]
    assert len(cut) and (cut[:, None] - sides[None]).abs().amin(1).max() < 1e-4
    assert ((prog.aux >= 0) & (prog.aux <= SIZE)).all()


@pytest.mark.parametrize("odd,asym,blur_p,sol_p", [(False, True, 1.0, 0.0), (True, True, 0.1, 0.2),
                                                   (True, False, 1.0, 0.0)])
def test_simclr_probabilities(odd, asym, blur_p, sol_p):
    prog = _draw(["simclr"], odd=odd, asymmetric=asym)
    jitter = prog.op[:, :4]
    assert abs((jitter != Op.IDENTITY).all(1).float().mean().item() - 0.8) < 0.02
    fired = jitter[(jitter != Op.IDENTITY).all(1)]
    assert (fired.sort(1).values == torch.tensor([6, 8, 7, 15]).sort().values).all()
    # random order: each jitter op lands in each slot a quarter of the time
    for k in range(4):
        _check_freq(Counter(fired[:, k].tolist()), {o: 0.25 for o in (6, 7, 8, 15)}, len(fired))
    assert abs((prog.op[:, 4] == Op.GRAYSCALE).float().mean().item() - 0.2) < 0.02
    assert abs((prog.op[:, 5] == Op.BLUR).float().mean().item() - blur_p) < 0.02
    assert abs((prog.op[:, 6] == Op.SOLARIZE).float().mean().item() - sol_p) < 0.02
    sigma = prog.mag[:, 5][prog.op[:, 5] == Op.BLUR]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    hue = prog.mag[:, :4][prog.op[:, :4] == Op.HUE]
    assert hue.abs().max() <= 0.1 and hue.std() > 0.05
    assert abs(prog.flip.float().mean().item() - 0.5) < 0.02


def test_simclr_colour_settings():
    colour = {"jitter": (0.8, 0.8, 0.8, 0.2), "jitter_p": 0.5, "grayscale_p": 0.0,
              "blur_p": (0.5, 0.0), "solarize_p": (0.0, 1.0)}
    for odd, blur_p, sol_p in ((False, 0.5, 0.0), (True, 0.0, 1.0)):
        prog = _draw(["simclr"], odd=odd, simclr=colour)
        _check_freq(Counter((prog.op[:, 5] == Op.BLUR).tolist()), {1: blur_p, 0: 1 - blur_p}, N)
        _check_freq(Counter((prog.op[:, 6] == Op.SOLARIZE).tolist()), {1: sol_p, 0: 1 - sol_p}, N)
        assert not (prog.op[:, 4] == Op.GRAYSCALE).any()
        fired = (prog.op[:, :4] != Op.IDENTITY).all(1)
        _check_freq(Counter(fired.tolist()), {1: 0.5, 0: 0.5}, N)
    hue = prog.mag[:, :4][prog.op[:, :4] == Op.HUE]
    assert 0.19 < hue.abs().max() <= 0.2
    bright = prog.mag[:, :4][prog.op[:, :4] == Op.BRIGHTNESS]
    assert 0.2 <= bright.min() < 0.21 and 1.79 < bright.max() <= 1.8
    strong = _draw(["simclr"], simclr={"jitter": (1.5, 0.0, 0.0, 0.0), "jitter_p": 1.0})
    assert strong.mag[:, :4][strong.op[:, :4] == Op.BRIGHTNESS].min() >= 0  # as torchvision


def test_mixed_strategies_keep_each_images_own_program():
    cfg = AugmentConfig(strategies=["simclr", "trivialaugment"])
    sid = torch.arange(N) % 2
    prog = PolicySampler(cfg).sample(sid, SIZE, False, torch.Generator().manual_seed(1))
    simclr_ops = {0, 6, 7, 8, 15, 16, 17}
    assert set(prog.op[sid == 0].unique().tolist()) <= simclr_ops
    assert (prog.op[sid == 1][:, 1:] == 0).all()  # trivialaugment has one slot


def test_tv_to_engine_units():
    op = torch.tensor([Op.BRIGHTNESS, Op.TRANSLATE_X, Op.POSTERIZE, Op.SOLARIZE, Op.ROTATE])
    mag = torch.tensor([-0.3, -7.9, 6.0, 0.5, -12.5])
    out = tv_to_engine(op, mag)
    torch.testing.assert_close(out, torch.tensor([0.7, -7.0, 6.0, 127.5, -12.5]))


def test_simclr_blur_sigma_spans_its_range():
    from massrl.augment.batched.policies import Op, PolicySampler
    from massrl.config import AugmentConfig
    prog = PolicySampler(AugmentConfig(strategies=["simclr"])).sample(
        torch.zeros(20000, dtype=torch.long), 32, False, torch.Generator().manual_seed(0))
    sigma = prog.mag[:, 5][prog.op[:, 5] == Op.BLUR]
    assert sigma.min() < 0.15 and sigma.max() > 1.95
