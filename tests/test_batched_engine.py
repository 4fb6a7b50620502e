"""BatchedAugmenter and CropOnlyTransform: shapes, ranges, diversity, determinism, devices."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings

import pytest
import torch
from PIL import Image

from massrl.augment.batched import (
    BatchedAugmenter,
    CropOnlyTransform,
    Op,
    Plan,
    PolicySampler,
    Program,
    augment_batch,
    count_strategies,
    plan_batch,
)
from massrl.config import AugmentConfig

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
ALL = ["simclr", "randaugment", "autoaugment", "fastautoaugment", "trivialaugment"]


def _picture(size: int = 40) -> Image.Image:
    """A colourful, textured picture so that every op changes it."""
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2]) * 200 + torch.rand(3, size, size, generator=g) * 55
    return Image.fromarray(img.byte().permute(1, 2, 0).numpy())


def _batch(cfg: AugmentConfig, n: int, size: int = 16) -> dict:
    tf = CropOnlyTransform(cfg, size)
    torch.manual_seed(0)
    items = [tf(_picture()) for _ in range(n)]
    return torch.utils.data.default_collate(items)


def test_crop_only_transform_view_modes():
    img = _picture()
    cfg = AugmentConfig(strategies=ALL[:4], view_mode="crops_x_strategies", num_crops=2)
    out = CropOnlyTransform(cfg, 16)(img)
    # only the 2 shared crops travel; strategy / crop ids describe all 8 views
    assert len(out["views"]) == 2 and out["views"][0].dtype == torch.uint8
    assert out["views"][0].shape == (3, 16, 16)
    assert not torch.equal(out["views"][0], out["views"][1])
    assert out["strategy"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert out["crop"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    out = CropOnlyTransform(cfg.model_copy(update={"view_mode": "per_strategy"}), 16)(img)
    assert out["strategy"].tolist() == [0, 1, 2, 3] == out["crop"].tolist()
    cfg = cfg.model_copy(update={"view_mode": "random", "num_views": 3})
    ids = torch.stack([CropOnlyTransform(cfg, 16)(img)["strategy"] for _ in range(50)])
    assert ids.shape == (50, 3) and len(ids.unique()) == 4  # drawn per view
    grey = Image.new("L", (20, 20), 128)
    assert CropOnlyTransform(cfg, 8)(grey)["views"][0].shape == (3, 8, 8)


def test_shapes_dtypes_ranges():
    cfg = AugmentConfig(strategies=ALL, view_mode="random", num_views=3)
    batch = _batch(cfg, 24)
    out = augment_batch(batch, BatchedAugmenter(cfg, MEAN, STD))
    assert set(out) == set(batch) and out["strategy"] is batch["strategy"]
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    for v in out["views"]:
        assert v.shape == (24, 3, 16, 16) and v.dtype == torch.float32
        per_channel = v.transpose(0, 1).reshape(3, -1)
        assert (per_channel.amin(1) >= lo - 1e-5).all() and (per_channel.amax(1) <= hi + 1e-5).all()
    # float views (the per-image backend) pass through untouched
    assert augment_batch(out, BatchedAugmenter(cfg, MEAN, STD)) is out
    skipped = {"skipped": 3}  # the datamodule's batch when every image failed to decode
    assert augment_batch(skipped, BatchedAugmenter(cfg, MEAN, STD)) is skipped


def test_per_image_diversity():
    """256 copies of one image: most outputs differ, and strategy ids vary."""
    cfg = AugmentConfig(strategies=ALL[:4], view_mode="random", num_views=2)
    one = CropOnlyTransform(cfg, 16)(_picture())
    views = [one["views"][0].expand(256, 3, 16, 16).contiguous()] * 2
    strategy = torch.randint(4, (256, 2), generator=torch.Generator().manual_seed(0))
    out = BatchedAugmenter(cfg, MEAN, STD)(views, strategy, torch.Generator().manual_seed(0))
    distinct = len({tuple(x.flatten().round(decimals=3).tolist()) for x in out[0]})
    assert distinct >= 150, distinct  # (auto)augment images whose ops all miss only flip
    assert len(strategy[:, 0].unique()) == 4
    # every strategy produces several distinct outputs, not one per batch
    for s in range(4):
        rows = out[0][strategy[:, 0] == s]
        assert len({tuple(x.flatten().round(decimals=3).tolist()) for x in rows}) > len(rows) // 3


def test_determinism_under_a_seed():
    cfg = AugmentConfig(strategies=ALL, view_mode="random")
    batch = _batch(cfg, 16)
    aug = BatchedAugmenter(cfg, MEAN, STD)
    a = aug(batch["views"], batch["strategy"], torch.Generator().manual_seed(7))
    b = aug(batch["views"], batch["strategy"], torch.Generator().manual_seed(7))
    c = aug(batch["views"], batch["strategy"], torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("view_mode, counted", [("random", False), ("random", True),
                                                ("crops_x_strategies", False),
                                                ("per_strategy", False)])
def test_grouped_and_full_modes_agree(view_mode, counted):
    """The sync-free whole-batch path (GPU default) equals the grouped path (CPU default): every
    op family is an exact identity for the images that drew another op; in the view modes that
    fix each view's strategy, or given the host's strategy counts, full mode runs each
    strategy's views on their own."""
    cfg = AugmentConfig(strategies=ALL, view_mode=view_mode, num_views=2)
    batch = _batch(cfg, 32)
    if counted:
        batch = count_strategies(batch, BatchedAugmenter(cfg, MEAN, STD))
        assert sum(batch["strategy_counts"]) == 64 and len(batch["strategy_counts"]) == 5
    grouped = BatchedAugmenter(cfg, MEAN, STD, grouped=True, chunk_bytes=5 * 3 * 16 * 16 * 4)
    full = BatchedAugmenter(cfg, MEAN, STD, grouped=False)
    a = grouped(batch["views"], batch["strategy"], torch.Generator().manual_seed(2))
    b = full(batch["views"], batch["strategy"], torch.Generator().manual_seed(2),
             counts=batch.get("strategy_counts"))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def _compiled_vs_eager(monkeypatch, **compile_kwargs) -> tuple[list, list]:
    """Full mode of every strategy with the torch ops (what compile traces), eager and with
    augment.compile (torch.compile given `compile_kwargs`), on the same batch and seed."""
    cfg = AugmentConfig(strategies=ALL, view_mode="random", cpu_kernels="torch")
    batch = _batch(cfg, 16)
    eager = BatchedAugmenter(cfg, MEAN, STD, grouped=False)
    compiled = BatchedAugmenter(cfg.model_copy(update={"compile": True}), MEAN, STD,
                                grouped=False)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **kw, **compile_kwargs))
    torch._dynamo.reset()
    ref = eager(batch["views"], batch["strategy"], torch.Generator().manual_seed(4))
    out = compiled(batch["views"], batch["strategy"], torch.Generator().manual_seed(4))
    assert compiled._compiled is not None  # the compiled path ran
    return ref, out


def test_full_mode_traces_as_one_graph(monkeypatch):
    """No value read on the host and no graph break in full mode: torch.compile captures every
    op family of every strategy as one graph (fullgraph=True raises at any break) and, traced
    without code generation, gives the eager output."""
    ref, out = _compiled_vs_eager(monkeypatch, backend="aot_eager", fullgraph=True)
    for x, y in zip(out, ref, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile's CPU code generation needs a C++ compiler")
def test_compiled_engine_matches_eager(monkeypatch):
    """augment.compile with torch.compile's default backend (inductor's C++ on the CPU, Triton
    on GPUs): the fused code gives the eager images to float rounding."""
    ref, out = _compiled_vs_eager(monkeypatch)
    for x, y in zip(out, ref, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_compile_on_the_cpu_warns_once():
    cfg = AugmentConfig(strategies=["simclr"], compile=True)
    batch = _batch(cfg, 4)
    aug = BatchedAugmenter(cfg, MEAN, STD)  # the CPU's grouped mode
    with pytest.warns(UserWarning, match="augment.compile applies to the whole-batch mode"):
        aug(batch["views"], batch["strategy"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug(batch["views"], batch["strategy"])


def test_full_mode_runs_each_strategy_s_families_on_its_views_only():
    """crops_x_strategies: view v has strategy v % 4, so hue (SimCLR's alone among these) runs
    on the 2 SimCLR views of each image, once per slot SimCLR may hold it; random mode cannot
    know which views are SimCLR's and runs it on all of them."""
    seen: list[int] = []

    def spy(fn):
        def wrapper(x, *args):
            seen.append(x.shape[0])
            return fn(x, *args)
        return wrapper

    for mode, counted in (("crops_x_strategies", False), ("random", False), ("random", True)):
        cfg = AugmentConfig(strategies=ALL[:4], view_mode=mode, num_crops=2, num_views=8)
        batch = _batch(cfg, 5)
        aug = BatchedAugmenter(cfg, MEAN, STD, grouped=False)
        aug._families[False] = [(m, spy(fn) if fn.__name__ == "hue" else fn)
                                for m, fn in aug._families[False]]
        counts = count_strategies(batch, aug)["strategy_counts"] if counted else None
        seen.clear()
        aug(batch["views"], batch["strategy"], torch.Generator().manual_seed(0), counts=counts)
        simclr_views = int((batch["strategy"] == ALL.index("simclr")).sum())
        images = 5 * 8 if mode == "random" and not counted else simclr_views
        assert mode == "random" or simclr_views == 5 * 2
        simclr = aug.sampler.slot_ops([ALL.index("simclr")])
        assert seen == [images] * sum(int(Op.HUE) in ops for ops in simclr)
    with pytest.raises(ValueError, match="expects view v to have strategy"):
        cfg = AugmentConfig(strategies=ALL[:4], view_mode="per_strategy")
        batch = _batch(cfg, 3)
        BatchedAugmenter(cfg, MEAN, STD, grouped=False)(batch["views"],
                                                        batch["strategy"].flip(1))


@pytest.mark.parametrize("mode", ["per_strategy", "crops_x_strategies"])
def test_ids_off_the_view_modes_layout_are_refused_in_every_mode_and_plan(mode):
    """Full mode (the GPU's default) runs a view with its layout strategy's families only: ids
    off the layout lost ops there, unchecked on the GPU, while the CPU's grouped mode took them.
    On the CPU every mode and the host plan refuse them; random mode takes any ids."""
    cfg = AugmentConfig(strategies=ALL[:4], view_mode=mode, num_crops=2)
    batch = _batch(cfg, 3)
    wrong = batch["strategy"].flip(1)
    seeds = torch.arange(wrong.numel()).view_as(wrong)
    for grouped in (True, False, None):
        with pytest.raises(ValueError, match="expects view v to have strategy"):
            BatchedAugmenter(cfg, MEAN, STD, grouped=grouped)(batch["views"], wrong, seeds=seeds)
    aug = BatchedAugmenter(cfg, MEAN, STD)
    with pytest.raises(ValueError, match="view_mode=random takes ids"):
        aug.plan(wrong, seeds, batch["views"][0].shape[-1])
    assert len(aug(batch["views"], batch["strategy"], seeds=seeds)) == wrong.shape[1]
    random = AugmentConfig(strategies=ALL[:4], view_mode="random", num_views=wrong.shape[1])
    views = aug.expand(batch["views"], wrong.shape[1])  # (one batch per view)
    assert len(BatchedAugmenter(random, MEAN, STD)(views, wrong, seeds=seeds)) == wrong.shape[1]


@pytest.mark.parametrize("view_mode, size", [("random", 16), ("crops_x_strategies", 16),
                                             ("random", 80)])
def test_planned_grouped_mode_matches_grouped_mode(view_mode, size):
    """The host's plan (programs from the views' seeds, grouped by family) run where reading is
    not free: the images of grouped mode on the CPU, from the same seeds (at 80 px the CPU
    flips before the ops and scatters run by run; the planned path does neither)."""
    cfg = AugmentConfig(strategies=ALL, view_mode=view_mode, cpu_kernels="torch")
    batch = _batch(cfg, 12, size)
    grouped = BatchedAugmenter(cfg, MEAN, STD, grouped=True)
    device_like = BatchedAugmenter(cfg, MEAN, STD, grouped=False)
    planned = plan_batch(batch, device_like, torch.device("meta"))  # any device but the CPU
    assert isinstance(planned["plan"], Plan) and "plan" not in plan_batch(batch, grouped, "cpu")
    ref = grouped(batch["views"], batch["strategy"], seeds=batch["seed"])
    out = device_like(batch["views"], batch["strategy"], plan=planned["plan"])
    for x, y in zip(out, ref, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    half = [v[:6] for v in batch["views"]]
    with pytest.raises(ValueError, match=r"the plan is for (\d+) views, the batch has \d+"):
        device_like(half, batch["strategy"][:6], plan=planned["plan"])
    small = [v[..., :8, :8] for v in batch["views"]]
    with pytest.raises(ValueError, match=rf"drawn for {size} px views, these are 8 px"):
        device_like(small, batch["strategy"], plan=planned["plan"])
    with pytest.raises(ValueError, match="a plan needs the views' seeds"):
        device_like.plan(batch["strategy"], None, size)
    # a plan given without its seeds brings them: the CPU's grouped mode, which draws the
    # programs again, gives the same views
    again = grouped(batch["views"], batch["strategy"], plan=planned["plan"])
    assert all(torch.equal(x, y) for x, y in zip(again, ref, strict=True))
    # with the seeds it was drawn from the call agrees; with others it is refused (on the CPU)
    same = device_like(batch["views"], batch["strategy"], seeds=batch["seed"],
                       plan=planned["plan"])
    assert all(torch.equal(x, y) for x, y in zip(same, out, strict=True))
    for strategy, seeds in ((batch["strategy"], batch["seed"] + 1),
                            ((batch["strategy"] + 1) % len(ALL), batch["seed"])):
        with pytest.raises(ValueError, match="drawn from other strategy ids or seeds"):
            device_like(batch["views"], strategy, seeds=seeds, plan=planned["plan"])


def test_planned_mode_reads_nothing_on_the_host(monkeypatch):
    """Every read of a tensor value happens in the plan, on the host; the planned call itself
    reads none (on a GPU each would synchronise)."""
    from massrl.augment.batched import ops

    cfg = AugmentConfig(strategies=ALL, view_mode="random", cpu_kernels="torch")
    batch = _batch(cfg, 8)
    aug = BatchedAugmenter(cfg, MEAN, STD, grouped=False)
    plan = plan_batch(batch, aug, torch.device("meta"))["plan"]
    aug(batch["views"], batch["strategy"], plan=plan)  # warm-up: constant tables, once
    monkeypatch.setattr(ops, "_reads_free", lambda x: False)  # the CPU's shortcuts read values

    def read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, read)
    out = aug(batch["views"], batch["strategy"], plan=plan)
    monkeypatch.undo()
    assert len(out) == 2 and torch.isfinite(out[0]).all()
    with pytest.raises(AssertionError, match="read on the host"):  # the check itself works
        monkeypatch.setattr(torch.Tensor, "tolist", read)
        aug(batch["views"], batch["strategy"], seeds=batch["seed"], counts=[4, 4, 4, 2, 2])


def test_no_plan_is_drawn_for_a_compiled_engine():
    """augment.compile draws the programs on the device: a plan drawn, pinned and copied for
    every batch was thrown away."""
    cfg = AugmentConfig(strategies=ALL, view_mode="random", compile=True)
    batch = _batch(cfg, 4)
    planned = plan_batch(batch, BatchedAugmenter(cfg, MEAN, STD), torch.device("meta"))
    assert "plan" not in planned and sum(planned["strategy_counts"]) == 8
    eager = plan_batch(batch, BatchedAugmenter(cfg.model_copy(update={"compile": False}),
                                               MEAN, STD), torch.device("meta"))
    assert "plan" in eager


def test_consecutive_runs():
    from massrl.augment.batched.plan import consecutive_runs

    # (position in the list, first image, length): grouped mode scatters large images run by run
    assert consecutive_runs([3, 4, 5, 9, 1, 2]) == [(0, 3, 3), (3, 9, 1), (4, 1, 2)]
    assert consecutive_runs([]) == []


def test_strategy_counts_are_checked():
    cfg = AugmentConfig(strategies=ALL[:4], view_mode="random", num_views=2)
    batch = _batch(cfg, 6)
    aug = BatchedAugmenter(cfg, MEAN, STD, grouped=False)
    counts = count_strategies(batch, aug)["strategy_counts"]
    with pytest.raises(ValueError, match="number of views of each of the 4 strategies, 12 in"):
        aug(batch["views"], batch["strategy"], counts=counts[:3])
    wrong = [counts[0] + 1, counts[1] - 1, *counts[2:]] if counts[1] else [*counts[1:], 0]
    with pytest.raises(ValueError, match="do not match strategy"):
        aug(batch["views"], batch["strategy"], counts=wrong)


def test_count_strategies_leaves_other_batches_alone():
    aug = BatchedAugmenter(AugmentConfig(strategies=ALL[:2]), MEAN, STD)
    floats = {"views": [torch.zeros(2, 3, 4, 4)], "strategy": torch.zeros(2, 1, dtype=torch.long)}
    assert count_strategies(floats, aug) is floats  # the per-image backend's views
    evaluation = {"image": torch.zeros(2)}
    assert count_strategies(evaluation, aug) is evaluation
    u8 = {"views": [torch.zeros(2, 3, 4, 4, dtype=torch.uint8)] * 2,
          "strategy": torch.tensor([[1, 1], [0, 1]])}
    assert count_strategies(u8, aug)["strategy_counts"] == [1, 3]


@pytest.mark.parametrize("mean, std", [(MEAN, STD), ((0.5, 0.0, 0.2), (1.0, 0.5, 1.0005))])
def test_identity_program_is_normalisation_only(mean, std):
    # (std 1: the normalisation's lerp has no finite end point, so it takes two passes)
    cfg = AugmentConfig(strategies=["simclr"])
    aug = BatchedAugmenter(cfg, mean, std)
    u8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    k = PolicySampler(cfg).slots
    prog = Program(torch.zeros(4, k, dtype=torch.long), torch.zeros(4, k), torch.zeros(4, k, 2),
                   torch.tensor([False, True, False, False]))
    out = aug.apply(u8, prog)
    ref = (u8.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    ref[1] = ref[1].flip(-1)
    torch.testing.assert_close(out, ref)


def test_bf16_autocast():
    cfg = AugmentConfig(strategies=ALL, view_mode="random")
    batch = _batch(cfg, 8)
    aug = BatchedAugmenter(cfg, MEAN, STD)
    ref = aug(batch["views"], batch["strategy"], torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(batch["views"], batch["strategy"], torch.Generator().manual_seed(0))
    for x, y in zip(out, ref, strict=True):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, y)


def test_crops_x_strategies_expands_shared_crops():
    """The engine makes all C x S views from the C crops, every strategy on each crop."""
    cfg = AugmentConfig(strategies=ALL[:4], view_mode="crops_x_strategies", num_crops=2)
    batch = _batch(cfg, 6)
    assert len(batch["views"]) == 2 and batch["strategy"].shape == (6, 8)
    out = augment_batch(batch, BatchedAugmenter(cfg, MEAN, STD), torch.Generator().manual_seed(0))
    assert len(out["views"]) == 8 and out["views"][0].shape == (6, 3, 16, 16)
    # same as handing over the 8 views themselves
    eight = [batch["views"][c] for c in batch["crop"][0].tolist()]
    ref = BatchedAugmenter(cfg, MEAN, STD)(eight, batch["strategy"], seeds=batch["seed"])
    for x, y in zip(out["views"], ref, strict=True):
        assert torch.equal(x, y)


def test_views_augment_the_same_in_any_batch():
    """Each view draws from its own seed: 1 x 2B images (one device) gives what 2 x B (two
    ranks) give, and shuffling the batch shuffles the outputs."""
    cfg = AugmentConfig(strategies=ALL, view_mode="random", num_views=2)
    batch = _batch(cfg, 12, size=24)
    assert batch["seed"].shape == (12, 2) and batch["seed"].unique().numel() == 24
    aug = BatchedAugmenter(cfg, MEAN, STD)
    whole = aug(batch["views"], batch["strategy"], seeds=batch["seed"])

    def part(rows):
        return aug([v[rows] for v in batch["views"]], batch["strategy"][rows],
                   seeds=batch["seed"][rows])

    halves = [part(slice(0, 6)), part(slice(6, 12))]
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = part(perm)
    for v in range(2):
        # hue's identity and blurs over group sizes may move a float by an ulp, no more
        torch.testing.assert_close(torch.cat([halves[0][v], halves[1][v]]), whole[v],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(shuffled[v], whole[v][perm], atol=1e-5, rtol=0)
    # other seeds, other augmentations
    other = aug(batch["views"], batch["strategy"], seeds=batch["seed"] + 1)
    assert not torch.allclose(other[0], whole[0])


def test_grouped_and_full_mode_agree():
    """The CPU's grouped execution (families on gathered images, whole chunks when most images
    drew one, translations as shifts) gives what full mode gives (every family on every image
    with identity parameters). Slot 0: 9 shears and 1 translation, so the warp family runs on the
    whole chunk and must leave the translated image to the shift family."""
    from massrl.augment.batched.policies import Op

    cfg = AugmentConfig(strategies=ALL, view_mode="random", num_views=2)
    batch = _batch(cfg, 10, size=24)
    u8 = batch["views"][0]
    prog = PolicySampler(cfg).sample(batch["strategy"][:, 0], 24,
                                     generator=torch.Generator().manual_seed(0))
    prog.op[:, 0] = int(Op.SHEAR_X)
    prog.op[3, 0] = int(Op.TRANSLATE_X)
    prog.mag[:, 0] = 0.2
    prog.mag[3, 0] = 5.0
    out = {g: BatchedAugmenter(cfg, MEAN, STD, grouped=g).apply(u8, prog) for g in (True, False)}
    close = ((out[True] - out[False]).abs() < 1e-4).float().mean()
    assert close > 0.995, close  # nearest warps may round a few boundary pixels apart


@pytest.mark.parametrize("size", [24, 80])
def test_flip_before_the_ops_gives_the_flip_after_them(size):
    """On the CPU, images of 64 KB and more are flipped as uint8 before the ops where that is
    exact (mirroring shear x, rotations and translations x), after them for shear y and cutout
    (smaller images: always after): every flipped image must equal the unflipped program's
    output, flipped."""
    from massrl.augment.batched.policies import Op

    cfg = AugmentConfig(strategies=ALL, view_mode="random", num_views=2)
    batch = _batch(cfg, 9, size=size)
    u8 = batch["views"][0]
    prog = PolicySampler(cfg).sample(batch["strategy"][:, 0], size,
                                     generator=torch.Generator().manual_seed(0))
    # (shear 0.23, not 0.2: nearest sampling rounds exact ties, as 0.2 * 2.5 px, to even)
    cases = [(Op.SHEAR_X, 0.23), (Op.ROTATE, 17.0), (Op.TRANSLATE_X, 5.0), (Op.SHEAR_Y, 0.23),
             (Op.CUTOUT, 8.0), (Op.EQUALIZE, 0.0), (Op.BLUR, 1.5), (Op.HUE, 0.2),
             (Op.SHARPNESS, 1.8)]
    prog.op[:, 1:] = int(Op.IDENTITY)
    for i, (op, mag) in enumerate(cases):
        prog.op[i, 0], prog.mag[i, 0] = int(op), mag
    prog.aux[:, 0] = torch.tensor([7.0, 15.0])  # cutout centre, off the vertical axis
    aug = BatchedAugmenter(cfg, MEAN, STD)
    flipped = aug.apply(u8, Program(prog.op, prog.mag, prog.aux, torch.ones(9, dtype=torch.bool)))
    plain = aug.apply(u8, Program(prog.op, prog.mag, prog.aux, torch.zeros(9, dtype=torch.bool)))
    for i, (op, _) in enumerate(cases):
        close = ((flipped[i] - plain[i].flip(-1)).abs() < 1e-4).float().mean()
        assert close > 0.99, (op.name, close)  # nearest warps may round a few pixels apart


def test_output_buffers_are_reused_only_when_free():
    """Large CPU outputs come from a pool; one still held keeps its data across calls."""
    from massrl.augment.batched.buffers import MIN_BYTES, BufferPool

    pool = BufferPool(capacity=2)
    side = 1024
    shape = (MIN_BYTES // (3 * side * side * 4) + 1, 3, side, side)
    a = pool.empty(shape, torch.float32).fill_(1.0)
    ptr = a.data_ptr()
    held = pool.empty(shape, torch.float32)
    assert held.data_ptr() != ptr  # `a` is alive: a second map
    del a
    b = pool.empty(shape, torch.float32).fill_(2.0)
    assert b.data_ptr() == ptr  # `a` was freed: its memory is reused
    held.fill_(3.0)
    part = b[1:2]  # a view keeps `b`'s memory in use
    del b
    c = pool.empty(shape, torch.float32)
    assert c.data_ptr() not in (ptr, held.data_ptr()) and pool.nbytes == 2 * 4 * math.prod(shape)
    c.fill_(4.0)
    assert (part == 2.0).all() and (held == 3.0).all()
    small = pool.empty((2, 3), torch.float32)
    assert small.shape == (2, 3) and pool.nbytes == 2 * 4 * math.prod(shape)


def test_rejects_bad_inputs():
    cfg = AugmentConfig(strategies=["simclr"])
    aug = BatchedAugmenter(cfg, MEAN, STD)
    with pytest.raises(ValueError, match="strategy must be"):
        aug([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="2 views per image but 1 view batches"):
        aug([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="seeds must be"):
        aug([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], torch.zeros(2, 1, dtype=torch.long),
            seeds=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="uint8"):
        aug([torch.zeros(2, 3, 8, 8)], torch.zeros(2, 1, dtype=torch.long))


@contextlib.contextmanager
def _no_host_sync():
    """Any operation inside that synchronises the host with the GPU raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("view_mode, host", [("random", None), ("random", "counts"),
                                             ("random", "plan"), ("crops_x_strategies", None),
                                             ("crops_x_strategies", "plan"),
                                             ("per_strategy", "plan")])
def test_the_device_path_reads_no_value_on_the_host(view_mode, host, monkeypatch):
    """The engine's GPU modes, run on 'meta' tensors (shapes without values): an op that reads
    a value on the host, which on a GPU waits for the device, fails there. Equalize's bincount
    did (a CUDA bincount reads the min and max: two synchronisations per call)."""
    real_autocast = torch.autocast  # (no autocast on the meta device)
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: contextlib.nullcontext()
                        if device_type == "meta" else real_autocast(device_type, **kw))
    cfg = AugmentConfig(strategies=ALL, view_mode=view_mode)
    batch = _batch(cfg, 16, size=32)
    aug = BatchedAugmenter(cfg, MEAN, STD)
    planned = plan_batch(batch, aug, torch.device("cuda"))  # as for a GPU, on the host
    meta = torch.device("meta")
    kwargs = {"counts": planned["strategy_counts"]} if host == "counts" else {}
    if host == "plan":
        kwargs["plan"] = planned["plan"].to(meta)
    out = aug([v.to(meta) for v in batch["views"]], batch["strategy"].to(meta),
              seeds=batch["seed"].to(meta), **kwargs)
    assert len(out) == batch["strategy"].shape[1]  # one per view the ids describe
    assert out[0].shape == (16, 3, 32, 32) and out[0].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("view_mode, host", [("random", None), ("random", "counts"),
                                             ("random", "plan"), ("crops_x_strategies", None),
                                             ("crops_x_strategies", "plan")])
def test_cuda_matches_cpu_without_host_sync(view_mode, host):
    """Full mode (without or with the host's strategy counts) and the host-planned grouped
    mode, as the training loop hands them over (plan_batch, then Lightning's transfer)."""
    from lightning.pytorch.utilities import move_data_to_device

    cfg = AugmentConfig(strategies=ALL, view_mode=view_mode)
    batch = _batch(cfg, 64, size=32)
    aug = BatchedAugmenter(cfg, MEAN, STD)
    planned = plan_batch(batch, aug, torch.device("cuda"))
    kwargs = {}
    if host == "counts":
        kwargs["counts"] = planned["strategy_counts"]
    if host == "plan":
        assert planned["plan"].prog.op.is_pinned()  # so that the transfer need not wait
        kwargs["plan"] = move_data_to_device(planned["plan"], torch.device("cuda"))
    views = [v.cuda() for v in batch["views"]]
    strategy = batch["strategy"].cuda()
    gen = torch.Generator("cuda").manual_seed(0)
    aug(views, strategy, gen, **kwargs)  # warm-up: lazy CUDA initialisation may synchronise
    gen = torch.Generator("cuda").manual_seed(0)
    with _no_host_sync():
        out = aug(views, strategy, gen, **kwargs)
    assert out[0].is_cuda and out[0].dtype == torch.float32 and torch.isfinite(out[0]).all()
    # same programs on both devices (drawn on the CPU; the plan's from the views' seeds) give
    # the same images
    cpu_gen, cuda_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    seeds = batch["seed"] if host == "plan" else None
    a = aug(batch["views"], batch["strategy"], cpu_gen, seeds)
    b = aug(views, strategy, cuda_gen, **kwargs)
    for x, y in zip(a, b, strict=True):
        close = ((x - y.cpu()).abs() < 1e-3).float().mean()
        assert close > 0.99  # nearest-neighbour warps may round a few boundary pixels apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_matches_eager_without_host_sync():
    """augment.compile on a GPU (Triton code): the eager images, and no synchronisation once
    compiled."""
    cfg = AugmentConfig(strategies=ALL, view_mode="random")
    batch = _batch(cfg, 64, size=32)
    views = [v.cuda() for v in batch["views"]]
    strategy = batch["strategy"].cuda()
    eager = BatchedAugmenter(cfg, MEAN, STD)
    compiled = BatchedAugmenter(cfg.model_copy(update={"compile": True}), MEAN, STD)
    ref = eager(views, strategy, torch.Generator("cuda").manual_seed(0))
    compiled(views, strategy, torch.Generator("cuda").manual_seed(0))  # compiles
    gen = torch.Generator("cuda").manual_seed(0)
    with _no_host_sync():
        out = compiled(views, strategy, gen)
    for x, y in zip(out, ref, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_rrc_box_matches_torchvision_distribution():
    from torchvision.transforms import RandomResizedCrop

    from massrl.augment.batched.transform import rrc_box

    torch.manual_seed(0)
    img = Image.new("RGB", (60, 40))
    mine = torch.tensor([rrc_box(60, 40, (0.08, 1.0)) for _ in range(4000)], dtype=torch.float)
    ref = torch.tensor([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(4000)], dtype=torch.float)  # (top, left, h, w)
    ref = torch.stack([ref[:, 1], ref[:, 0], ref[:, 1] + ref[:, 3], ref[:, 0] + ref[:, 2]], 1)
    assert (mine[:, 2] <= 60).all() and (mine[:, 3] <= 40).all() and (mine[:, :2] >= 0).all()
    # box corners: means within ~4 standard errors
    torch.testing.assert_close(mine.mean(0), ref.mean(0), atol=1.0, rtol=0)


@pytest.mark.parametrize("size", [16, 72])
def test_crop_pixels_match_torchvision_resized_crop(size):
    """Below 64 px the crop is PIL's, pixel for pixel; from 64 px torch's uint8 antialiased
    resize, which rounds some levels the other way (never by more than 1)."""
    from torchvision.transforms.v2 import functional as TF

    cfg = AugmentConfig(crop="uniform")
    tf = CropOnlyTransform(cfg, size)
    img = _picture(2 * size + 9)
    for seed in range(4):
        torch.manual_seed(seed)
        mine = tf(img)["views"][0]
        torch.manual_seed(seed)
        top, left, side = tf.crop.params(img.height, img.width)
        ref = TF.pil_to_tensor(TF.resized_crop(img, top, left, side, side, [size, size]))
        diff = (mine.int() - ref.int()).abs()
        assert mine.shape == ref.shape == (3, size, size) and mine.dtype == torch.uint8
        if size < 64:
            assert torch.equal(mine, ref)
        else:
            assert diff.max() <= 1 and diff.float().mean() < 0.05, (diff.max(), diff.mean())


@pytest.mark.parametrize("bad, message", [
    ("grey", r"uint8 \[B, 3, S, S\] \(RGB; repeat a grey channel 3 times\), got torch.uint8 "
             r"\[4, 1, 8, 8\]"),
    ("rgba", r"got torch.uint8 \[4, 4, 8, 8\]"),
    ("float", r"got torch.float32"),
    ("one tensor", "views must be a list"),
    ("batch sizes", "every view batch must have one shape"),
    ("strategy rows", r"strategy must be \[B, V\] for batches of B = 4"),
    ("strategy ids", r"strategy ids must be in 0..1 .*got 0..2"),
    ("float ids", r"strategy ids must be an integer tensor, got torch.float32"),
    ("not square", r"views must be square .* got 8x6: crop them square"),
    ("int32 seeds", r"seeds must be int64 \[B, V\] like strategy \[4, 2\], got torch.int32 "
                    r"\[4, 2\]"),
    ("devices", r"must be on one device, got views on cpu, strategy on meta, seeds on cpu: "
                r"move them with .to\(device\)"),
])
def test_wrong_inputs_are_refused_before_any_kernel(bad, message):
    """The numba kernels index 3 channels and the strategy ids unchecked: a grey batch wrote out
    of bounds (IndexError, segfaults, heap corruption), other strategies got no augmentation."""
    aug = BatchedAugmenter(AugmentConfig(strategies=["simclr", "randaugment"]), MEAN, STD)
    views = [torch.zeros(4, 3, 8, 8, dtype=torch.uint8) for _ in range(2)]
    strategy = torch.zeros(4, 2, dtype=torch.long)
    if bad == "grey":
        views = [v[:, :1].contiguous() for v in views]
    elif bad == "rgba":
        views = [torch.cat([v, v[:, :1]], 1) for v in views]
    elif bad == "float":
        views = [v.float() for v in views]
    elif bad == "one tensor":
        views = torch.stack(views)
    elif bad == "batch sizes":
        views[1] = views[1][:3]
    elif bad == "strategy rows":
        strategy = strategy[:3]
    elif bad == "float ids":  # 0.7 would truncate to no strategy: an un-augmented view
        strategy = strategy.float() + 0.7
    elif bad == "not square":  # the magnitudes and cutouts follow one side S
        views = [v[..., :6] for v in views]
    elif bad == "devices":  # an op deep inside failed, naming none of them
        strategy = strategy.to("meta")
    elif bad != "int32 seeds":
        strategy[1, 1] = 2
    seeds = torch.zeros(strategy.shape, dtype=torch.int32 if bad == "int32 seeds" else torch.long)
    with pytest.raises(ValueError, match=message):
        aug(views, strategy, seeds=seeds)


def test_normalisation_statistics_are_checked_and_one_value_serves_three_channels():
    cfg = AugmentConfig(strategies=["simclr"])
    u8 = [torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)] * 2
    ids = torch.zeros(2, 2, dtype=torch.long)
    grey = BatchedAugmenter(cfg, [0.5], [0.25])(u8, ids, seeds=torch.zeros_like(ids))
    rgb = BatchedAugmenter(cfg, [0.5] * 3, [0.25] * 3)(u8, ids, seeds=torch.zeros_like(ids))
    for x, y in zip(grey, rgb, strict=True):
        torch.testing.assert_close(x, y)
    for mean, std, message in (([0.5] * 3, [0.2, 0.0, 0.2], "std must be positive"),
                               ([0.5] * 4, [0.2] * 3, "mean needs 1 or 3 values")):
        with pytest.raises(ValueError, match=message):
            BatchedAugmenter(cfg, mean, std)
    # (a warning: the checkpoints of runs made before hold such values and must evaluate)
    with pytest.warns(UserWarning, match="looks like 0-255 values"):
        BatchedAugmenter(cfg, [124, 116, 104], [58, 57, 57])


def test_an_empty_batch_gives_empty_views():
    aug = BatchedAugmenter(AugmentConfig(strategies=["simclr", "randaugment"]), MEAN, STD)
    empty = [torch.zeros(0, 3, 8, 8, dtype=torch.uint8)] * 2
    out = aug(empty, torch.zeros(0, 2, dtype=torch.long))
    assert [tuple(v.shape) for v in out] == [(0, 3, 8, 8)] * 2
    assert all(v.dtype == torch.float32 for v in out)


def test_batched_preview_draws_the_engines_views_of_one_image(tmp_path):
    from massrl.augment.batched.preview import BatchedPreview
    from massrl.cli import main

    cfg = AugmentConfig(strategies=ALL[:4], view_mode="crops_x_strategies")
    torch.manual_seed(0)
    views = BatchedPreview(cfg, 24, MEAN, STD).sample(_picture())
    assert [(v.strategy_name, v.crop) for v in views] == [
        (name, c) for c in range(2) for name in ALL[:4]]
    assert all(v.image.size == (24, 24) and v.tensor.shape == (3, 24, 24) for v in views)
    # the picture is the view itself, de-normalised
    first = torch.tensor(list(views[0].image.getdata()), dtype=torch.float32).T.reshape(3, 24, 24)
    back = views[0].tensor * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert (first / 255 - back.clamp(0, 1)).abs().max() < 1 / 255
    grey = BatchedPreview(cfg, 24, (0.5,), (0.25,)).sample(_picture())[0]  # one-value stats
    level = torch.tensor(list(grey.image.getdata()), dtype=torch.float32).T.reshape(3, 24, 24)
    assert (level / 255 - (grey.tensor * 0.25 + 0.5).clamp(0, 1)).abs().max() < 1 / 255
    out = tmp_path / "batched.png"
    assert main(["augviz", "data.name=digits", "augment.backend=batched", "--images", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).width > 400


def test_an_engine_can_be_sent_to_a_spawned_worker():
    """Pickled (a spawned DataLoader worker's collate_fn holding it): its op families are
    closures, and pickling failed; the copy gives the same views."""
    import pickle

    cfg = AugmentConfig(strategies=ALL[:4])
    batch = _batch(cfg, 4)
    aug = BatchedAugmenter(cfg, MEAN, STD)
    ref = aug(batch["views"], batch["strategy"], seeds=batch["seed"])
    copy = pickle.loads(pickle.dumps(aug))
    out = copy(batch["views"], batch["strategy"], seeds=batch["seed"])
    assert all(torch.equal(x, y) for x, y in zip(out, ref, strict=True))


def test_per_strategys_one_simclr_view_takes_the_first_pipeline_as_per_image():
    """The engine gave a simclr view not first in augment.strategies BYOL's second pipeline."""
    for order in (["simclr", "randaugment"], ["randaugment", "simclr"]):
        cfg = AugmentConfig(strategies=order, view_mode="per_strategy")
        aug = BatchedAugmenter(cfg, MEAN, STD)
        strategy = torch.tensor([[0, 1]] * 64)
        prog = aug._sample(strategy, 16, None, torch.arange(128).view(64, 2))
        rows = prog.op[64 * order.index("simclr"):][:64]  # view-major: that view's images
        assert (rows == int(Op.BLUR)).any(dim=1).all(), order  # first pipeline: blur p=1
        assert not (rows == int(Op.SOLARIZE)).any(), order
