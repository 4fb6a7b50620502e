"""The augment.* keys: strategies, views, crops and each strategy's settings."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from massrl import plugins
from massrl.config.section import Section, known_name
from massrl.plugins import BUILTIN_STRATEGIES


class RandAugmentConfig(Section):
    num_ops: int = Field(2, ge=0, description="RandAugment N: ops applied per image")
    magnitude: int = Field(9, ge=0, description="RandAugment M, 0..num_magnitude_bins-1")
    # The paper's M=9 is on a 0..10 scale (11 bins); torchvision's default 31 bins would make
    # M=9 only 30% of each op's range.
    num_magnitude_bins: int = Field(11, ge=2, description="bins of the magnitude scale")

    @model_validator(mode="after")
    def _magnitude_in_range(self) -> RandAugmentConfig:
        if self.magnitude >= self.num_magnitude_bins:
            raise ValueError(
                f"magnitude={self.magnitude} must be < num_magnitude_bins={self.num_magnitude_bins}"
            )
        return self


Probability = Annotated[float, Field(ge=0, le=1)]


def _known_strategy(name: str) -> str:
    return known_name(name, plugins.strategy_names(name), "strategy")


StrategyName = Annotated[str, AfterValidator(_known_strategy)]


class SimCLRColourConfig(Section):
    """The simclr strategy's colour pipeline. Defaults: BYOL's (jitter 0.4/0.4/0.2/0.1, blur
    1.0/0.1, solarize 0.0/0.2); SimCLR's own is jitter 0.8/0.8/0.8/0.2, blur 0.5 on both
    views, no solarize, and CIFAR-size recipes (solo-learn's, lightly's) switch blur off."""

    jitter: tuple[float, float, float, float] = Field(
        (0.4, 0.4, 0.2, 0.1), description="ColorJitter brightness, contrast, saturation, hue: "
        "factors drawn from [1-x, 1+x] (at least 0), hue shift from [-hue, hue]")
    jitter_p: Probability = Field(0.8, description="probability of the colour jitter")
    grayscale_p: Probability = Field(0.2, description="probability of grayscale")
    blur_p: tuple[Probability, Probability] = Field(
        (1.0, 0.1), description="Gaussian blur (sigma 0.1-2, kernel a tenth of the side) "
        "probability: first view, second view (odd views with augment.asymmetric, odd crops in "
        "crops_x_strategies; per_strategy's one simclr view and, without asymmetric, every view "
        "take the first)")
    solarize_p: tuple[Probability, Probability] = Field(
        (0.0, 0.2), description="solarize (threshold 128) probability: first view, second view")

    @field_validator("jitter")
    @classmethod
    def _jitter_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if min(v) < 0:
            raise ValueError("jitter strengths must be >= 0 (0 switches one off)")
        if v[3] > 0.5:
            raise ValueError(f"hue={v[3]} must be <= 0.5 (a shift of half the colour circle)")
        return v

    def first_and_second(self, second: bool) -> tuple[float, float]:
        """(blur p, solarize p) of a first or a second view."""
        return self.blur_p[int(second)], self.solarize_p[int(second)]


class AugmentConfig(Section):
    strategies: list[StrategyName] = Field(
        default_factory=lambda: ["simclr", "randaugment", "autoaugment", "fastautoaugment"],
        min_length=1,
        description="augmentation strategies views are drawn from: "
        f"{', '.join(BUILTIN_STRATEGIES)}, or a plugin's (plugins)",
    )
    view_mode: Literal["random", "per_strategy", "crops_x_strategies"] = Field(
        "random", description="random: num_views views, a strategy drawn per view; per_strategy: "
        "a view per strategy; crops_x_strategies: num_crops crops x every strategy")
    num_views: int = Field(2, ge=2, description="views per image in view_mode=random")
    num_crops: int = Field(2, ge=1, description="shared crops in view_mode=crops_x_strategies")
    pairs: Literal["all", "cross_strategy", "within_strategy", "cross_crop"] = Field(
        "all", description="which ordered view pairs enter the loss"
    )
    crop: Literal["rrc", "uniform"] = Field(
        "rrc", description="rrc: RandomResizedCrop (crop_scale); uniform: the paper's square crop "
        "(uniform_crop_range)")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="rrc area scale range")
    uniform_crop_range: tuple[float, float] = Field(
        (0.5, 1.0), description="uniform crop side as a fraction of the shorter side"
    )
    randaugment: RandAugmentConfig = Field(default_factory=RandAugmentConfig)
    autoaugment_policy: Literal["imagenet", "cifar10", "svhn"] = Field(
        "imagenet", description="AutoAugment's searched policy")
    fastautoaugment_policy: Literal["imagenet", "cifar10", "svhn"] = Field(
        "imagenet", description="Fast AutoAugment's searched policy")
    simclr: SimCLRColourConfig = Field(default_factory=SimCLRColourConfig)
    # BYOL's asymmetric simclr pipeline: odd views take simclr.blur_p[1] / solarize_p[1]
    asymmetric: bool = Field(True, description="simclr views alternate between the first and "
                             "the second view's blur/solarize probabilities (BYOL's asymmetry)")
    backend: Literal["auto", "per_image", "batched"] = Field(
        "auto", description="per_image: the pipeline in DataLoader workers; batched: workers "
        "crop, the strategies run on the whole batch on the training device; auto: batched when "
        "training on the CPU (faster end to end there), per_image on a GPU (set batched where "
        "the workers cannot keep up: large or many views, few cores per GPU) and for plugin "
        "strategies without an engine sampler")
    cpu_kernels: Literal["auto", "numba", "torch"] = Field(
        "auto", description="batched backend on the CPU: each op as a fused numba kernel (auto: "
        "when numba is installed; numba: required) or as torch ops")
    compile: bool = Field(
        False, description="batched backend, whole-batch mode (the GPU's): run the ops through "
        "torch.compile, which fuses each op family's passes; the first batch compiles")

    @field_validator("crop_scale", "uniform_crop_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1] <= 1):
            raise ValueError("need 0 < low <= high <= 1")
        return v

    @field_validator("strategies")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        twice = sorted({s for s in v if v.count(s) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once: name each strategy once "
                             "(more views of one strategy: view_mode=random with num_views)")
        return v

    @property
    def views_per_image(self) -> int:
        """How many views view_mode makes of each image."""
        s = len(self.strategies)
        return {"random": self.num_views, "per_strategy": s,
                "crops_x_strategies": self.num_crops * s}[self.view_mode]

    @model_validator(mode="after")
    def _batched_can_run(self) -> AugmentConfig:
        if self.backend == "batched":
            missing = plugins.without_engine_sampler(self.strategies)
            if missing:
                raise ValueError(f"strategy {', '.join(missing)} (a plugin's) has no sampler for "
                                 "the batched engine: set augment.backend=per_image (or auto, "
                                 "which picks it), or register one (docs/extending.md)")
        return self

    @model_validator(mode="after")
    def _pairs_possible(self) -> AugmentConfig:
        """The loss averages over the selected view pairs: a layout that can never select one
        would train on nothing (a NaN loss at the first step)."""
        s, c, mode = len(self.strategies), self.num_crops, self.view_mode
        views = self.views_per_image
        shared = mode == "random" or (mode == "crops_x_strategies" and c >= 2)
        needs = {
            "all": (True, ""),
            "cross_strategy": (s >= 2, "at least 2 strategies"),
            "within_strategy": (shared, "views that share a strategy (view_mode=random, or "
                                "crops_x_strategies with num_crops >= 2)"),
            "cross_crop": (mode != "crops_x_strategies" or c >= 2, "num_crops >= 2"),
        }
        ok, what = needs[self.pairs] if views >= 2 else (False, "at least 2 views per image")
        if not ok:
            crops = f", num_crops={c}" if mode == "crops_x_strategies" else ""
            raise ValueError(f"augment.pairs={self.pairs} selects no view pair with view_mode="
                             f"{mode}, {s} strateg{'y' if s == 1 else 'ies'}{crops}: it needs "
                             f"{what}")
        return self
