"""Per-image sampling of every strategy's ops and magnitudes, as tensors.

Each strategy turns into a *program*: K op slots per image, an op id and a magnitude per slot
(identity where an op does not fire), so the engine can run slot k for all images at once. All draws
are tensor ops on one device, each image drawing from its own seed (draws.py): no `.item()`, no
Python branch on a drawn value, hence no host-device synchronisation.

Op spaces and magnitudes follow torchvision's transforms v2 definitions (RandAugment, AutoAugment,
TrivialAugmentWide; the AutoAugment sub-policies are read from torchvision itself) and the Fast
AutoAugment policy file, exactly as the per-image backend (massrl.augment.strategies) applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor
from torchvision.transforms import AutoAugment, AutoAugmentPolicy

from massrl import plugins
from massrl.augment.batched.draws import ImageDraws, new_seeds
from massrl.augment.fast_autoaugment import SIGNED_OPS as FAA_SIGNED
from massrl.augment.fast_autoaugment import load_policy, magnitude
from massrl.config import AugmentConfig


class Op(IntEnum):
    """The engine's op vocabulary; magnitudes are in the units ops.py takes."""

    IDENTITY = 0
    SHEAR_X = 1  # shear coefficient, pivot top-left
    SHEAR_Y = 2
    TRANSLATE_X = 3  # pixels
    TRANSLATE_Y = 4
    ROTATE = 5  # degrees, counter-clockwise
    BRIGHTNESS = 6  # factor
    SATURATION = 7  # factor (PIL's "Color")
    CONTRAST = 8  # factor
    SHARPNESS = 9  # factor
    POSTERIZE = 10  # bits kept
    SOLARIZE = 11  # threshold on the 0..255 scale
    AUTOCONTRAST = 12
    EQUALIZE = 13
    INVERT = 14
    HUE = 15  # hue shift, fraction of the circle
    GRAYSCALE = 16
    BLUR = 17  # sigma in pixels
    CUTOUT = 18  # side in pixels; aux = centre (x, y) in pixels


TV_OPS = {
    "Identity": Op.IDENTITY, "ShearX": Op.SHEAR_X, "ShearY": Op.SHEAR_Y,
    "TranslateX": Op.TRANSLATE_X, "TranslateY": Op.TRANSLATE_Y, "Rotate": Op.ROTATE,
    "Brightness": Op.BRIGHTNESS, "Color": Op.SATURATION, "Contrast": Op.CONTRAST,
    "Sharpness": Op.SHARPNESS, "Posterize": Op.POSTERIZE, "Solarize": Op.SOLARIZE,
    "AutoContrast": Op.AUTOCONTRAST, "Equalize": Op.EQUALIZE, "Invert": Op.INVERT,
    "Cutout": Op.CUTOUT,
}
CUTOUT_FILL = (125, 123, 114)
BLUR_SIGMA = (0.1, 2.0)


_CONSTANTS: dict[tuple, Tensor] = {}


def on_device(key: tuple, device: torch.device | str, build) -> Tensor:
    """A constant table, built on the CPU once and copied to `device` once: a host-to-device
    copy synchronises, so it must not happen on every batch."""
    full_key = (*key, str(torch.device(device)))
    if full_key not in _CONSTANTS:
        _CONSTANTS[full_key] = build().to(device)
    return _CONSTANTS[full_key]


@dataclass
class Program:
    """Per-image ops of one view: op [N, K] long, mag [N, K], aux [N, K, 2], flip [N] bool."""

    op: Tensor
    mag: Tensor
    aux: Tensor
    flip: Tensor

    def map(self, fn: Callable[[Tensor], Tensor]) -> Program:
        """fn applied to every per-image tensor (each has the images along dim 0)."""
        return Program(*(fn(t) for t in (self.op, self.mag, self.aux, self.flip)))

    def rows(self, spans: list[tuple[int, int]]) -> Program:
        """The images of the [start, end) spans, in order."""
        return self.map(lambda t: torch.cat([t[a:b] for a, b in spans]))

    def take(self, index: Tensor) -> Program:
        """The images `index` (a tensor on the program's device), in that order."""
        return self.map(lambda t: t.index_select(0, index))

    def to(self, device: torch.device) -> Program:
        return self.map(lambda t: t.to(device, non_blocking=can_copy_async(device)))


def can_copy_async(device: torch.device | str) -> bool:
    """Whether a copy to `device` may run without waiting: towards an accelerator, yes (the
    device's own queue orders it before the ops that read it); back to the CPU, no (the host
    would read the values before they arrive)."""
    return torch.device(device).type != "cpu"


# ------------------------------------------------------------------------------ torchvision spaces

_SPACE_NAMES = ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
           "Contrast", "Sharpness"}


def tv_space(kind: str, bins: int, size: int) -> list[tuple[str, Tensor | None, bool]]:
    """torchvision v2's op space: [(name, magnitude per bin or None, signed)], in its order."""
    wide = kind == "trivialaugment"  # TrivialAugmentWide's stronger ranges
    shear, enhance = (0.99, 0.99) if wide else (0.3, 0.9)
    translate, rotate = (32.0, 135.0) if wide else (150.0 / 331.0 * size, 30.0)
    post_span = 6 if wide else 4
    lin = {
        "ShearX": shear, "ShearY": shear, "TranslateX": translate, "TranslateY": translate,
        "Rotate": rotate, "Brightness": enhance, "Color": enhance, "Contrast": enhance,
        "Sharpness": enhance,
    }
    names = (["Identity"] if kind != "autoaugment" else []) + _SPACE_NAMES
    names += ["Invert"] if kind == "autoaugment" else []
    out: list[tuple[str, Tensor | None, bool]] = []
    for name in names:
        if name in lin:
            mags: Tensor | None = torch.linspace(0.0, lin[name], bins)
        elif name == "Posterize":
            mags = (8 - torch.arange(bins) / ((bins - 1) / post_span)).round()
        elif name == "Solarize":
            mags = torch.linspace(1.0, 0.0, bins)
        else:
            mags = None
        out.append((name, mags, name in _SIGNED))
    return out


def _space_tables(kind: str, bins: int, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """op ids [M], magnitudes [M, bins] (torchvision units), signed [M]."""
    space = tv_space(kind, bins, size)
    ids = torch.tensor([int(TV_OPS[name]) for name, _, _ in space])
    mags = torch.stack([m if m is not None else torch.zeros(bins) for _, m, _ in space])
    signed = torch.tensor([s for _, _, s in space])
    return ids, mags.float(), signed


def tv_to_engine(op: Tensor, mag: Tensor) -> Tensor:
    """torchvision auto-augment magnitudes -> engine units (enhance 1 + m, int pixels / bits,
    solarize threshold 255 m), as torchvision's _apply_image_or_video_transform reads them."""
    enhance = (op == Op.BRIGHTNESS) | (op == Op.SATURATION) | (op == Op.CONTRAST)
    enhance |= op == Op.SHARPNESS
    trunc = (op == Op.TRANSLATE_X) | (op == Op.TRANSLATE_Y) | (op == Op.POSTERIZE)
    out = torch.where(enhance, 1 + mag, mag)
    out = torch.where(trunc, out.trunc(), out)
    return torch.where(op == Op.SOLARIZE, 255 * mag, out)


def _signs(signed: Tensor, draws: ImageDraws, slots: int) -> Tensor:
    flip = signed & (draws.rand(slots) <= 0.5)
    return torch.where(flip, -1.0, 1.0)


# ------------------------------------------------------------------------------ strategies


class _Strategy:
    """A sampler of K-slot programs; `slot_ops` says statically which ops each slot may hold."""

    slots: int
    slot_ops: list[set[int]]

    def sample(self, draws: ImageDraws, size: int,
               odd_view: bool | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """odd_view: whether each image (bool [n] or one bool) is an odd view (asymmetric BYOL)."""
        raise NotImplementedError


class RandAugmentSampler(_Strategy):
    def __init__(self, cfg: AugmentConfig, kind: str = "randaugment") -> None:
        ra = cfg.randaugment
        self.kind = kind
        self.bins = ra.num_magnitude_bins if kind == "randaugment" else 31
        self.slots = ra.num_ops if kind == "randaugment" else 1
        self.magnitude = ra.magnitude
        ids = [int(TV_OPS[name]) for name, _, _ in tv_space(kind, self.bins, 32)]
        self.slot_ops = [set(ids)] * self.slots

    def sample(self, draws, size, odd_view):
        n, device = draws.n, draws.device
        key = (self.kind, self.bins, size)
        ids, table, signed = (
            on_device((*key, i), device, lambda i=i: _space_tables(*key)[i]) for i in range(3)
        )
        idx = draws.randint(len(ids), self.slots)
        if self.kind == "randaugment":  # fixed magnitude M
            mag = table[idx, self.magnitude]
        else:  # TrivialAugmentWide: a uniform bin per image
            mag = table[idx, draws.randint(self.bins, self.slots)]
        mag = mag * _signs(signed[idx], draws, self.slots)
        op = ids[idx]
        return op, tv_to_engine(op, mag), torch.zeros(n, self.slots, 2, device=device)


class AutoAugmentSampler(_Strategy):
    """One of the policy's two-op sub-policies per image; each op fires with its probability."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.policy = cfg.autoaugment_policy
        policies = AutoAugment(AutoAugmentPolicy(self.policy)).policies
        self.names = [[name for name, _, _ in sub] for sub in policies]
        self.prob = torch.tensor([[p for _, p, _ in sub] for sub in policies])
        self.bin = torch.tensor([[b or 0 for _, _, b in sub] for sub in policies])
        self.slots = 2
        self.slot_ops = [{int(TV_OPS[sub[k]]) for sub in self.names} for k in range(2)]

    def sample(self, draws, size, odd_view):
        n, device = draws.n, draws.device

        def tables() -> list[Tensor]:
            ids, table, signed = _space_tables("autoaugment", 10, size)
            row = {int(i): r for r, i in enumerate(ids.tolist())}
            pos = torch.tensor([[row[int(TV_OPS[x])] for x in sub] for sub in self.names])
            return [pos, self.prob, self.bin, ids, table, signed]

        key = ("autoaugment", self.policy, size)
        pos, prob, bins, ids, table, signed = (
            on_device((*key, i), device, lambda i=i: tables()[i]) for i in range(6)
        )
        sub = draws.randint(len(self.names))
        idx = pos[sub]
        fire = draws.rand(2) <= prob[sub]
        mag = table[idx, bins[sub]] * _signs(signed[idx], draws, 2)
        op = torch.where(fire, ids[idx], int(Op.IDENTITY))
        return op, tv_to_engine(op, mag), torch.zeros(n, 2, 2, device=device)


class FastAutoAugmentSampler(_Strategy):
    """Fast AutoAugment: one searched sub-policy per image, the policy file's magnitudes."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.policy = cfg.fastautoaugment_policy
        subs = load_policy(self.policy)
        self.op = torch.tensor([[int(TV_OPS[o]) for o, _, _ in sub] for sub in subs])
        self.prob = torch.tensor([[p for _, p, _ in sub] for sub in subs])
        self.value = torch.tensor([[magnitude(o, lv) for o, _, lv in sub] for sub in subs])
        self.signed = torch.tensor([[o in FAA_SIGNED for o, _, _ in sub] for sub in subs])
        self.slots = self.op.shape[1]
        self.slot_ops = [set(self.op[:, k].tolist()) for k in range(self.slots)]

    def sample(self, draws, size, odd_view):
        k, device = self.slots, draws.device
        sub = draws.randint(len(self.op))
        op, prob, value, signed = (
            on_device(("fastautoaugment", self.policy, name), device, lambda t=t: t)[sub]
            for name, t in (("op", self.op), ("prob", self.prob), ("value", self.value),
                            ("signed", self.signed))
        )
        fire = draws.rand(k) < prob
        value = value * _signs(signed, draws, k)
        translate = (op == Op.TRANSLATE_X) | (op == Op.TRANSLATE_Y)
        # a fraction of the side, rounded as fast_autoaugment.translate_pixels
        mag = torch.where(translate, (value * size - 0.5).ceil(), value)
        mag = torch.where(op == Op.CUTOUT, value * size, mag)
        aux = draws.rand(k, 2) * size  # cutout centre
        return torch.where(fire, op, int(Op.IDENTITY)), mag, aux


class SimCLRSampler(_Strategy):
    """ColorJitter (random order), grayscale, blur, solarize(128), each with cfg.simclr's
    probability: 7 slots."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.asymmetric, self.colour = cfg.asymmetric, cfg.simclr
        self.slots = 7
        jitter = {int(Op.BRIGHTNESS), int(Op.CONTRAST), int(Op.SATURATION), int(Op.HUE)}
        self.slot_ops = [jitter] * 4 + [{int(Op.GRAYSCALE)}, {int(Op.BLUR)}, {int(Op.SOLARIZE)}]

    def probabilities(self, odd_view: Tensor) -> tuple[Tensor, Tensor]:
        """Per image (blur p, solarize p): the second view's where asymmetric and odd."""
        second = odd_view & self.asymmetric
        (blur1, blur2), (sol1, sol2) = self.colour.blur_p, self.colour.solarize_p
        return torch.where(second, blur2, blur1), torch.where(second, sol2, sol1)

    def sample(self, draws, size, odd_view):
        n, device = draws.n, draws.device

        def uniform(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * draws.rand()

        b, c, s, h = self.colour.jitter  # factor ranges as torchvision's: never below 0
        factors = torch.stack([*(uniform(max(0.0, 1 - x), 1 + x) for x in (b, c, s)),
                               uniform(-h, h)], 1)
        kinds = on_device(("simclr", "kinds"), device, lambda: torch.tensor([
            Op.BRIGHTNESS, Op.CONTRAST, Op.SATURATION, Op.HUE, Op.GRAYSCALE, Op.BLUR, Op.SOLARIZE]))
        order = draws.rand(4).argsort(1)  # a random permutation
        jitter = (draws.rand(1) < self.colour.jitter_p).expand(n, 4)
        odd = (odd_view.to(device) if isinstance(odd_view, Tensor)
               else torch.full((n,), bool(odd_view), device=device)).expand(n)
        blur_p, sol_p = (p[:, None] for p in self.probabilities(odd))
        gray = draws.rand(1) < self.colour.grayscale_p
        blur = draws.rand(1) < blur_p
        sol = draws.rand(1) < sol_p
        fire = torch.cat([jitter, gray, blur, sol], 1)
        op = torch.cat([kinds[order], kinds[4:].expand(n, 3)], 1)
        sigma = uniform(*BLUR_SIGMA)[:, None]
        mag = torch.cat([factors.gather(1, order), torch.zeros_like(sigma), sigma,
                         torch.full_like(sigma, 128.0)], 1)
        op = torch.where(fire, op, int(Op.IDENTITY))
        return op, mag, torch.zeros(n, self.slots, 2, device=device)


def build_sampler(name: str, cfg: AugmentConfig) -> _Strategy:
    if name == "simclr":
        return SimCLRSampler(cfg)
    if name in ("randaugment", "trivialaugment"):
        return RandAugmentSampler(cfg, name)
    if name == "autoaugment":
        return AutoAugmentSampler(cfg)
    if name == "fastautoaugment":
        return FastAutoAugmentSampler(cfg)
    if name in plugins.STRATEGIES:
        if (batched := plugins.STRATEGIES[name].batched) is None:
            raise ValueError(f"strategy '{name}' (a plugin's) has no sampler for the batched "
                             "engine: set augment.backend=per_image, or register one "
                             "(docs/extending.md)")
        return batched(cfg)
    raise ValueError(f"unknown strategy '{name}'")


class PolicySampler:
    """Programs for a batch whose images each have a strategy id (an index into cfg.strategies)."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.strategies = [build_sampler(name, cfg) for name in cfg.strategies]
        self.slots = max(s.slots for s in self.strategies)

    def slot_ops(self, present: list[int] | None = None) -> list[set[int]]:
        """Ops each slot may hold (over the strategies `present`, default all): static."""
        chosen = [self.strategies[i] for i in (present or range(len(self.strategies)))]
        out: list[set[int]] = [set() for _ in range(self.slots)]
        for strat in chosen:
            for k, ops in enumerate(strat.slot_ops):
                out[k] |= ops
        return out

    def sample(self, strategy: Tensor, size: int, odd_view: bool | Tensor = False,
               generator: torch.Generator | None = None, seeds: Tensor | None = None) -> Program:
        """Draw every strategy for every image and keep each image's own: no data-dependent
        control flow, and the draws do not depend on how the strategies are mixed.

        seeds: int64 [N], each image's own (draws.py); without them, fresh ones from `generator`
        (on its device). The draws run on the seeds' device."""
        if seeds is None:
            device = generator.device if generator is not None else strategy.device
            seeds = new_seeds((strategy.shape[0],), generator, device)
        draws = ImageDraws(seeds)
        device = draws.device
        sid = strategy.to(device)
        if isinstance(odd_view, Tensor):
            odd_view = odd_view.to(device)
        n, k = sid.shape[0], self.slots
        op = torch.zeros(n, k, dtype=torch.long, device=device)
        mag = torch.zeros(n, k, device=device)
        aux = torch.zeros(n, k, 2, device=device)
        for i, strat in enumerate(self.strategies):
            o, m, a = strat.sample(draws, size, odd_view)
            mine = (sid == i)[:, None]
            op[:, : strat.slots] = torch.where(mine, o, op[:, : strat.slots])
            mag[:, : strat.slots] = torch.where(mine, m, mag[:, : strat.slots])
            aux[:, : strat.slots] = torch.where(mine[..., None], a, aux[:, : strat.slots])
        flip = draws.rand() < 0.5
        return Program(op, mag, aux, flip).to(strategy.device)
