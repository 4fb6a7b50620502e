"""Fast AutoAugment (Lim et al. 2019): the searched policies and an executor for their 15 ops.

No pip library ships these policies, so the data live in `policies/fast_autoaugment_policies.json`
and the executor is here. Each op is delegated to torchvision (the same op implementations that
torchvision's AutoAugment uses), with Fast AutoAugment's own magnitude conventions translated on the
way in; only Cutout, which torchvision's auto-augment ops lack, is written here.

`apply_tv_op` is shared with `strategies.py`, which runs torchvision's RandAugment / AutoAugment /
TrivialAugmentWide op spaces through it so that every view can be labelled with its exact ops.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode, RandAugment
from torchvision.transforms.v2 import functional as F

OpDraw = tuple[str, float]  # (op name, magnitude actually used; 0.0 for ops without one)
SubPolicy = list[tuple[str, float, float]]  # [(op name, probability, level in [0, 1])]

POLICY_FILE = "fast_autoaugment_policies.json"
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
UNARY_OPS = frozenset({"AutoContrast", "Invert", "Equalize"})  # magnitude is ignored
ENHANCE_OPS = frozenset({"Contrast", "Color", "Brightness", "Sharpness"})
CUTOUT_FILL = (125, 123, 114)

# torchvision's auto-augment op dispatcher (affine/rotate/enhance/posterize/... via v2.functional).
# It is a method of the auto-augment base class; one instance serves every call (it is stateless).
_TV = RandAugment()


@cache
def _data() -> dict:
    text = resources.files("massrl.augment").joinpath("policies").joinpath(POLICY_FILE).read_text()
    data = json.loads(text)
    missing = {"format", "op_ranges", "notes", "policies"} - set(data)
    if missing:  # a truncated or hand-edited file must fail loudly, not train on garbage
        raise ValueError(f"{POLICY_FILE} lacks keys {sorted(missing)}")
    return data


def op_ranges() -> dict[str, tuple[float, float]]:
    """Magnitude range (low, high) of each op, as stored in the policy file."""
    return {op: (float(lo), float(hi)) for op, (lo, hi) in _data()["op_ranges"].items()}


def load_policy(name: str = "imagenet") -> list[SubPolicy]:
    """The searched sub-policies of one dataset search (imagenet, cifar10 or svhn)."""
    policies = _data()["policies"]
    if name not in policies:
        raise ValueError(f"unknown Fast AutoAugment policy '{name}'; choose from {list(policies)}")
    ranges = op_ranges()
    out = []
    for sub in policies[name]:
        for op, _, _ in sub:
            if op not in ranges:
                raise ValueError(f"policy '{name}' uses op '{op}' that has no range in the file")
        out.append([(str(op), float(p), float(level)) for op, p, level in sub])
    return out


def magnitude(op: str, level: float) -> float:
    """The file's mapping: magnitude = low + level * (high - low); Posterize bits are int()."""
    low, high = op_ranges()[op]
    value = low + level * (high - low)
    return float(int(value)) if op == "Posterize" else value


def draw_ops(
    subpolicies: list[SubPolicy], generator: torch.Generator | None = None
) -> list[OpDraw]:
    """Pick one sub-policy and decide which of its ops fire and with which signed magnitude."""
    sub = subpolicies[int(torch.randint(len(subpolicies), (), generator=generator))]
    drawn = []
    for op, prob, level in sub:
        if float(torch.rand((), generator=generator)) >= prob:
            continue
        value = 0.0 if op in UNARY_OPS else magnitude(op, level)
        if op in SIGNED_OPS and float(torch.rand((), generator=generator)) < 0.5:
            value = -value
        drawn.append((op, value))
    return drawn


def apply_tv_op(img: Image.Image, op: str, value: float) -> Image.Image:
    """Apply one op with torchvision's auto-augment conventions (enhance factor = 1 + value,
    translate in pixels, Solarize threshold = 255 * value, Posterize bits = int(value))."""
    return _TV._apply_image_or_video_transform(
        img, op, value, interpolation=InterpolationMode.NEAREST, fill=_TV._fill
    )


def cutout(img: Image.Image, side: float, generator: torch.Generator | None = None) -> Image.Image:
    """A grey square of `side` pixels centred at a uniform random point, clipped to the image.
    As Fast AutoAugment's code, whose PIL rectangle holds its far edge too: columns x0 ..
    floor(x0 + side) (a 6.4 px side at 32 px covers 7; ours covered 6, and 42 % less area)."""
    if side <= 0:
        return img
    w, h = img.size
    cx, cy = (torch.rand(2, generator=generator) * torch.tensor([w, h])).tolist()
    x0, y0 = int(max(0.0, cx - side / 2)), int(max(0.0, cy - side / 2))
    x1, y1 = min(w, math.floor(x0 + side) + 1), min(h, math.floor(y0 + side) + 1)
    out = img.copy()
    out.paste(CUTOUT_FILL if out.mode == "RGB" else CUTOUT_FILL[0], (x0, y0, x1, y1))
    return out


def apply_op(
    img: Image.Image, op: str, value: float, generator: torch.Generator | None = None
) -> Image.Image:
    """Apply one Fast AutoAugment op with the file's magnitude conventions."""
    if op == "Cutout":
        return cutout(img, value * img.size[0], generator)
    if op == "Solarize":  # threshold on the 0..256 pixel scale, direct (no float round trip)
        return F.solarize(img, threshold=value)
    if op in ENHANCE_OPS:  # Fast AutoAugment's magnitude is the PIL enhance factor itself
        return apply_tv_op(img, op, value - 1.0)
    if op in ("TranslateX", "TranslateY"):  # a fraction of the side; torchvision wants pixels
        return apply_tv_op(img, op, translate_pixels(value, img.size[op == "TranslateY"]))
    return apply_tv_op(img, op, value)


def translate_pixels(value: float, side: int) -> int:
    """A translation of `value` x `side` pixels, rounded as Fast AutoAugment's nearest-neighbour
    PIL transform rounds its offset (in massrl's direction, a half goes down: 0.5 px moves
    nothing, -0.5 px one pixel): torchvision truncates, which shifted 32 px images 12 % less."""
    return math.ceil(value * side - 0.5)


def format_op(op: str, value: float) -> str:
    """A short label for pictures: 'Rotate(-12.3)', 'Equalize'."""
    return op if op in UNARY_OPS or op == "Identity" else f"{op}({value + 0.0:.3g})"  # no -0


class FastAutoAugment:
    """One random sub-policy per image; returns the image and the ops that actually fired."""

    def __init__(self, policy: str = "imagenet") -> None:
        self.policy = policy
        self.subpolicies = load_policy(policy)

    def __call__(
        self, img: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[Image.Image, list[OpDraw]]:
        drawn = draw_ops(self.subpolicies, generator)
        for op, value in drawn:
            img = apply_op(img, op, value, generator)
        return img, drawn

    def __repr__(self) -> str:
        return f"FastAutoAugment(policy={self.policy!r}, subpolicies={len(self.subpolicies)})"
