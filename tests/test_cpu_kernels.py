"""The fused CPU kernels (numba) against the torch ops they replace, and in the engine.

tests/test_batched_ops.py checks both implementations against torchvision on small images; here:
larger images (the vectorised loops' remainders, blur radius 6), images left exactly alone where
their parameter is the identity, thread-count independence, input checks, and whole programs
with augment.cpu_kernels=numba vs torch.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_python

from massrl.augment.batched import BatchedAugmenter, cpu_kernels, families, ops
from massrl.config import AugmentConfig

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")

N, S = 7, 67  # odd side: no vector width divides a row
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 256, (N, 3, S, S), generator=g)
    levels[4] = levels[4] // 2 + 40  # low contrast: autocontrast changes it
    img = levels.float().div(255)
    img[0, :, :10] = 0.5  # gray rows: zero chroma for hue
    img[1, 0] = img[1, 1]  # red = green: the sector tie-break
    return img


def _params(name: str) -> tuple:
    """Per-image parameters with the identity at image 2 (and equalize's disabled image 3)."""
    if name == "hue":
        h = torch.linspace(-0.5, 0.45, N)
        h[2] = 0.0
        return (h,)
    if name == "gray_blend":
        f = torch.linspace(0.0, 1.9, N)
        f[2] = 1.0
        gray_w = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
        return f, gray_w, 1 - gray_w
    if name in ("equalize", "autocontrast"):
        return (torch.tensor([True, True, False, False, True, True, True]),)
    if name in ("brightness", "sharpness"):
        f = torch.linspace(0.1, 1.9, N)
        f[2] = 1.0
        return (f,)
    if name == "posterize":
        return (torch.tensor([1.0, 3.0, 8.0, 4.0, 5.0, 7.0, 2.0]),)
    if name == "solarize":
        return (torch.tensor([0.0, 64.0, 256.0, 128.0, 100.5, 255.0, 200.0]),)
    if name == "cutout":
        side = torch.tensor([10.0, 30.0, 0.0, 5.5, 66.9, 20.0, 1.0])
        centre = torch.tensor([[5.0, 5.0], [60.0, 2.0], [30.0, 30.0], [33.3, 12.7], [0.0, 66.0],
                               [66.9, 66.9], [10.0, 50.0]])
        return side, centre, torch.tensor([125.0, 123.0, 114.0]) / 255
    sigma = torch.linspace(0.1, 2.0, N)
    sigma[2] = 1e-4
    return sigma, 6


CASES = {"hue": "adjust_hue_", "gray_blend": "gray_blend_", "equalize": "equalize_",
         "blur": "gaussian_blur_", "brightness": "brightness_", "sharpness": "sharpness_",
         "posterize": "posterize_", "solarize": "solarize_", "autocontrast": "autocontrast_",
         "cutout": "cutout_"}
EXACT = {"posterize", "solarize", "cutout"}  # IEEE float32 as the torch ops: equal values


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_ops_and_leaves_identity_images_alone(x, name):
    fn = CASES[name]
    args = _params(name)
    mine = getattr(cpu_kernels, fn)(x.clone(), *args)
    ref = getattr(ops, fn)(x.clone(), *args)
    assert (mine - ref).abs().max().item() <= (0 if name in EXACT else 2e-6)
    assert torch.equal(mine[2], x[2])  # exactly, not just within rounding
    assert not torch.equal(mine[4], x[4])  # and the others did change


def test_blur_uses_each_images_own_reach(x):
    """A small sigma next to a large one: its own few taps, the same result within rounding."""
    sigma = torch.tensor([0.3, 2.0, 0.3, 0.1, 1.0, 0.5, 2.0])
    alone = torch.cat([ops.gaussian_blur_(x[i : i + 1].clone(), sigma[i : i + 1], 6)
                       for i in range(N)])
    assert (cpu_kernels.gaussian_blur_(x.clone(), sigma, 6) - alone).abs().max() <= 2e-6


@pytest.mark.parametrize("name", list(CASES))
def test_same_result_on_one_and_two_threads(x, name):
    fn = getattr(cpu_kernels, CASES[name])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn(x.clone(), *_params(name))
        torch.set_num_threads(2)
        two = fn(x.clone(), *_params(name))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("side", [16, 31, 96])
def test_nearest_warp_equals_grid_sample_pixel_for_pixel(side):
    """Same source pixel for every output pixel as ops.affine_warp (grid_sample), exact ties
    included (shears of 0.2, 0.25, 0.5 put rows half-way between pixels)."""
    g = torch.Generator().manual_seed(side)
    n = 48
    img = torch.randint(0, 256, (n, 3, side, side), generator=g).float().div(255)
    kind = torch.randint(0, 6, (n,), generator=g)
    mag = torch.rand(n, generator=g) * 0.6 - 0.3
    mag = torch.where(kind == 5, mag * 200, mag)  # rotations up to 60 degrees
    mag = torch.where((kind == 3) | (kind == 4), (mag * 30).round(), mag)  # whole pixels
    mag[:6] = torch.tensor([0.2, -0.2, 0.25, -0.5, 0.125, 0.0])
    theta = ops.warp_theta(kind, mag, side, side)
    ref = ops.affine_warp(img.clone(), theta, "nearest")
    mine = cpu_kernels.warp_nearest_(img.clone(), theta, kind != 0)
    assert torch.equal(mine, ref)
    assert not torch.equal(mine[kind != 0], img[kind != 0])


def test_empty_batch_and_bad_input(x):
    empty = x[:0].clone()
    assert cpu_kernels.adjust_hue_(empty, torch.zeros(0)).shape == (0, 3, S, S)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        cpu_kernels.adjust_hue_(x.double(), torch.zeros(N))
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        cpu_kernels.equalize_(x.transpose(-1, -2), torch.ones(N, dtype=torch.bool))


def _run(kernels: str, u8: torch.Tensor, strategy: torch.Tensor) -> list[torch.Tensor]:
    cfg = AugmentConfig(strategies=["simclr", "randaugment", "autoaugment", "fastautoaugment"],
                        view_mode="random", num_views=2, cpu_kernels=kernels)
    aug = BatchedAugmenter(cfg, MEAN, STD)
    assert aug.fused == (kernels == "numba")
    return aug([u8, u8.flip(-1)], strategy, seeds=torch.arange(strategy.numel()).view_as(strategy))


def test_engine_numba_vs_torch_kernels():
    """Whole programs of every strategy: the same images within float rounding. A level can
    land on the other side of a discrete op's step (posterize, solarize, equalize), so a few
    values may differ by a level; nearly all are equal within 1e-4 (normalised units)."""
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (64, 3, 40, 40), dtype=torch.uint8, generator=g)
    strategy = torch.randint(0, 4, (64, 2), generator=g)
    fused, plain = _run("numba", u8, strategy), _run("torch", u8, strategy)
    for a, b in zip(fused, plain, strict=True):
        close = (a - b).abs() <= 1e-4
        assert close.float().mean().item() >= 0.999
        assert (a - b).abs().max().item() < 0.2  # at most a few levels, never another image


def test_kernels_compile_where_no_cache_can_be_written():
    """A read-only install and home: numba refuses to cache at decoration time; the kernels
    are then compiled without a disk cache instead of failing the import."""
    import numba

    from massrl.augment.batched.cpu_kernels import base

    namespace: dict = {}
    source = "def add_one(x):\n    return x + 1\n"
    exec(compile(source, "/nonexistent-read-only-dir/module.py", "exec"), namespace)
    with pytest.raises(RuntimeError, match="cannot cache"):
        numba.njit(namespace["add_one"], cache=True)  # what numba itself does there
    assert base.jit(namespace["add_one"])(41) == 42


def test_numba_required_but_missing(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    cfg = AugmentConfig(cpu_kernels="numba")
    from massrl.config import ConfigError

    with pytest.raises(ConfigError, match="pip install numba"):
        BatchedAugmenter(cfg, MEAN, STD)
    # auto falls back to the torch ops
    assert not BatchedAugmenter(AugmentConfig(), MEAN, STD).fused
    assert families.use_cpu_kernels("auto") is False


def test_kernels_keep_torchs_thread_count():
    """Starting numba's OpenMP pool resets the OpenMP thread count that torch shares with it; the
    kernels put torch's back (in a fresh process: the pool starts once per process)."""

    code = (
        "import torch, numba\n"
        "torch.set_num_threads(1)\n"
        "from massrl.augment.batched import cpu_kernels\n"
        "x = torch.rand(2, 3, 8, 8)\n"
        "cpu_kernels.adjust_hue_(x, torch.tensor([0.1, 0.2]))\n"
        "cpu_kernels.adjust_hue_(x, torch.tensor([0.1, 0.2]))\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    # (without the suite's OMP_NUM_THREADS=1, both pools start at the machine's core count)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                             "NUMBA_NUM_THREADS")}
    out = run_python(code, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


@pytest.mark.parametrize("first", ["engine", "other_numba_code"])
def test_a_process_forked_after_the_kernels_ran_uses_the_torch_ops(first):
    """GNU OpenMP is not fork-safe: numba terminated a forked child (a DataLoader worker whose
    collate_fn calls an engine the parent had tried, or after a UMAP) at its first parallel
    call. The child runs the torch ops instead, says so, and gives the parent's views within
    float rounding."""

    code = (
        "import multiprocessing as mp, numba, torch\n"
        "from massrl.augment.batched import BatchedAugmenter\n"
        "from massrl.config import AugmentConfig\n"
        "aug = BatchedAugmenter(AugmentConfig(), (0.5,) * 3, (0.25,) * 3)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "u8 = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8, generator=g)\n"
        "strategy, seeds = torch.arange(32).view(16, 2) % 4, torch.arange(32).view(16, 2)\n"
        "if FIRST == 'other_numba_code':  # (as a UMAP does: numba's threads, not the engine's)\n"
        "    @numba.njit(parallel=True)\n"
        "    def total(x):\n"
        "        s = 0.0\n"
        "        for i in numba.prange(x.shape[0]):\n"
        "            s += x[i]\n"
        "        return s\n"
        "    total(torch.ones(1000).numpy())\n"
        "    ref = BatchedAugmenter(AugmentConfig(cpu_kernels='torch'), (0.5,) * 3, (0.25,) * 3)\n"
        "    parent = ref([u8, u8], strategy, seeds=seeds)\n"
        "else:\n"
        "    parent = aug([u8, u8], strategy, seeds=seeds)\n"
        "def child(q):\n"
        "    torch.set_num_threads(1)  # (as a DataLoader worker: torch's OpenMP after a fork)\n"
        "    out = aug([u8, u8], strategy, seeds=seeds)\n"
        "    q.put(max((a - b).abs().max().item() for a, b in zip(out, parent)))\n"
        "ctx = mp.get_context('fork')\n"
        "q = ctx.Queue()\n"
        "p = ctx.Process(target=child, args=(q,))\n"
        "p.start()\n"
        "p.join(100)\n"
        "print(numba.threading_layer(), p.exitcode, q.get(timeout=5) if p.exitcode == 0 else '-')\n"
    )
    out = run_python(f"FIRST = {first!r}\n" + code, timeout=200)
    assert out.returncode == 0, out.stderr
    layer, exitcode, largest = out.stdout.split()
    assert exitcode == "0", out.stderr  # (-15: numba's "Terminating: fork() called from ...")
    assert float(largest) < 0.2  # a level across a discrete op's step at most
    if layer == "omp":
        assert "torch ops run instead" in out.stderr
