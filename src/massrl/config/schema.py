"""Every config key, typed: the sections of a run's configuration and their rules."""

from __future__ import annotations

import os
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from massrl import plugins
from massrl.plugins import BUILTIN_METHODS, BUILTIN_STRATEGIES

STRATEGIES = BUILTIN_STRATEGIES
DATASETS = (
    "fashion_mnist", "digits", "cifar10", "cifar100", "stl10", "folder", "imagenet", "imagenet100",
)


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (which key, what is wrong, how to fix)."""


class Section(BaseModel):
    """A block of config keys: unknown keys are errors, and so is a boolean for a number, and
    an infinite or NaN number (optimizer.lr=inf trained until its first NaN loss)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: optimizer.lr=true would train at lr 1.0
        if isinstance(v, bool) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("is not a true/false setting (YAML reads true/false as a boolean)")
        return v


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_accepts_bool(a) for a in get_args(annotation))


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
    return _known(name, plugins.strategy_names(), "strategy")


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
        "probability: first view, second view (odd views with augment.asymmetric; without it "
        "every view takes the first)")
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
    backend: Literal["per_image", "batched"] = Field(
        "per_image", description="per_image: the pipeline in DataLoader workers; batched: workers "
        "crop, the strategies run on the whole batch on the training device")
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

    @model_validator(mode="after")
    def _batched_can_run(self) -> AugmentConfig:
        if self.backend == "batched":
            missing = [n for n in self.strategies
                       if n in plugins.STRATEGIES and plugins.STRATEGIES[n].batched is None]
            if missing:
                raise ValueError(f"strategy {', '.join(missing)} (a plugin's) has no sampler for "
                                 "the batched engine: set augment.backend=per_image, or register"
                                 " one (docs/extending.md)")
        return self

    @model_validator(mode="after")
    def _pairs_possible(self) -> AugmentConfig:
        """The loss averages over the selected view pairs: a layout that can never select one
        would train on nothing (a NaN loss at the first step)."""
        s, c, mode = len(self.strategies), self.num_crops, self.view_mode
        views = {"random": self.num_views, "per_strategy": s, "crops_x_strategies": s * c}[mode]
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


DATA_CACHE = Path("~/.cache/massrl")  # where datasets without a data.root live (and download)


def default_root(name: str) -> Path | None:
    """The folder a dataset is read from when data.root is not set (None: it needs one, or
    has no folder)."""
    if name in ("folder", "digits"):
        return None
    return DATA_CACHE.expanduser() / name if name.startswith("imagenet") else \
        DATA_CACHE.expanduser()


def root_path(root: str | None, name: str | None = None) -> Path | None:
    """A data.root as the folder it names, however spelled (relative, with ~, a trailing
    slash), and, given the dataset's name, the default folder for no root: two spellings of one
    folder compare equal."""
    if root is None:
        folder = default_root(name) if name is not None else None
        return None if folder is None else folder.resolve()
    return Path(root).expanduser().resolve()


class DataConfig(Section):
    name: Literal[DATASETS] = Field(  # type: ignore[valid-type]
        "fashion_mnist", description="dataset; folder: data.root, with or without class folders")
    root: str | None = Field(None, description="where the dataset lives (default: per dataset)")
    download: bool = Field(False, description="let torchvision download when a network exists")
    subset: int | None = Field(None, gt=0, description="seeded class-balanced subset of N images")
    eval_subset: int | None = Field(None, gt=0, description="subset of labeled splits (monitors)")
    image_size: int = Field(32, gt=0, description="crop size of every view")
    batch_size: int = Field(256, gt=0, description="per-device batch size")
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="DataLoader workers of each process; auto: 0 on a CPU with <= 4 "
        "cores, cores/4 on more; on GPUs cores/devices - 1 per GPU process, at most 8")
    pin_memory: bool = Field(True, description="page-locked batches (with a GPU only)")
    persistent_workers: bool = Field(True, description="keep workers between epochs")
    strict: bool = Field(False, description="fail on an undecodable image instead of skipping it")
    mean: tuple[float, float, float] | None = Field(None, description="default: the dataset's")
    std: tuple[float, float, float] | None = Field(None, description="default: the dataset's")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float] | None) -> Any:
        if v is not None and min(v) <= 0:
            raise ValueError("every channel's std must be positive (inputs are divided by it)")
        return v

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        # one message instead of one per branch of the int | "auto" union
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        try:
            n = int(str(v))
        except ValueError:
            n = -1
        if n < 0:
            raise ValueError("need a whole number >= 0 or 'auto'")
        return n


class ModelConfig(Section):
    backbone: str = Field("resnet18", description="timm model name")
    cifar_stem: bool = Field(True, description="3x3 stride-1 first conv, no max-pool")
    width: int = Field(64, gt=0, description="channels of the first stage (64 = standard ResNet)")
    proj_hidden_dim: int = Field(4096, gt=0, description="projector MLP hidden width")
    proj_output_dim: int = Field(256, gt=0, description="projection (embedding) size")
    pred_hidden_dim: int = Field(4096, gt=0, description="predictor MLP hidden width (BYOL, "
                                 "MASSRL)")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="more keyword arguments for timm.create_model, e.g. "
        "model.kwargs.patch_size=4 for a ViT on 32 px images")
    bn_per_view: bool = Field(
        False, description="each view through the encoders and heads on its own, so batch-norm"
        " statistics are per view (BYOL's and solo-learn's code); false: one pass over all "
        "views, their statistics pooled (SimCLR's code; faster)")


class LossConfig(Section):
    tau_base: float = Field(0.99, ge=0, le=1, description="EMA momentum at the first step")
    tau_final: float = Field(1.0, ge=0, le=1, description="EMA momentum at the last step")
    temperature: float = Field(0.2, gt=0, description="SimCLR NT-Xent temperature")


class OptimizerConfig(Section):
    name: Literal["lars", "sgd", "adamw"] = Field("lars", description="the optimizer")
    lr: float = Field(1.0, gt=0, description="base lr for batch 256 (scaled by global batch/256)")
    scale_lr: bool | Literal["sqrt"] = Field(
        True, description="true: lr x global batch / 256; sqrt: lr x sqrt(global batch / 256) "
        "(SimCLR's rule for small batches: lr 1.2 gives its 0.075 x sqrt(batch)); false: lr")

    @field_validator("scale_lr", mode="before")
    @classmethod
    def _scaling_rule(cls, v: Any) -> Any:
        named = {"linear": True, "none": False}
        if isinstance(v, str) and v in named:
            return named[v]
        if v is True or v is False or v == "sqrt":
            return v
        raise ValueError("is true (linear: lr x global batch / 256), sqrt or false")
    weight_decay: float = Field(1e-6, ge=0, description="not on biases and norm parameters")
    momentum: float = Field(0.9, ge=0, lt=1, description="lars / sgd momentum")
    trust_coefficient: float = Field(0.001, gt=0, description="LARS trust coefficient")
    trust_clip: bool = Field(False, description="LARS: no layer steps faster than the lr "
                             "(solo-learn's clip_lr)")
    warmup_epochs: float = Field(10, ge=0, description="linear warm-up, then cosine; "
                                 "fractions of an epoch allowed")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / peak lr of the cosine")
    exclude_bias_norm: bool = Field(True, description="biases and norms: no decay, no LARS")


class TrainerConfig(Section):
    max_epochs: int = Field(100, gt=0)
    accelerator: str = Field("auto", description="Lightning's: auto, cpu, gpu, ...")
    devices: int | str | list[int] = Field(
        "auto", description="Lightning's: a count, auto, or a list of device ids")
    num_nodes: int = Field(1, gt=0)
    strategy: str = Field("auto", description="Lightning's: auto, ddp, ...")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto = bf16-mixed where supported, else 32-true")
    accumulate_grad_batches: int = Field(1, gt=0)
    sync_batchnorm: bool = Field(False, description="BatchNorm statistics over every rank's "
                                 "batch (GPUs only)")
    channels_last: bool = Field(True, description="off on the CPU for models with strided 1x1 "
                                "convs of < 16 input channels (oneDNN bug; devices.py)")
    compile: bool = False
    gradient_clip_val: float | None = Field(
        None, ge=0, description="clip the gradient norm to this (null or 0: no clipping)")
    log_every_n_steps: int = Field(10, gt=0)
    limit_train_batches: int | float | None = Field(
        None, description="batches per epoch: a number, or a fraction in (0, 1] of the split")
    progress_bar: bool = True
    checkpoint_every_n_steps: int = Field(
        500, ge=0, description="also save last.ckpt every N optimizer steps (0 = epoch ends only)")
    skip_nonfinite: bool = Field(False, description="skip steps whose loss is NaN/inf")
    cpu_threads: int | None = Field(
        None, gt=0, description="torch threads of a CPU run (default: cores - data.num_workers)")
    retain_freed_memory: bool = Field(
        True, description="glibc keeps freed blocks up to 32 MiB for reuse: fewer page faults, "
                          "~10 % more images/s on a 2-core CPU (massrl/memory.py)")

    @field_validator("limit_train_batches")
    @classmethod
    def _batches_or_fraction(cls, v: int | float | None) -> int | float | None:
        if v is None or (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v <= 1):
            return v
        raise ValueError("must be a number of batches (>= 1) or a fraction in (0, 1]")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_names(cls, v: object) -> object:
        # Lightning's short forms (precision: 32 in YAML is an int) to the full names
        short = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
        v = short.get(str(v), v) if isinstance(v, int | str) else v
        if v in ("64-true", "bf16-true", "16-true"):  # (the probe, kNN and engine run float32)
            raise ValueError(f"{v} is not supported: massrl trains in 32-true or with mixed "
                             "precision (bf16-mixed, 16-mixed)")
        return v


class EvalConfig(Section):
    knn_every: int = Field(1, ge=0, description="online kNN monitor (and the probe's "
                           "validation) every N epochs (0 = off)")
    knn_k: int = Field(200, gt=0, description="online kNN neighbours")
    knn_temperature: float = Field(0.07, gt=0, description="online kNN vote temperature")
    probe: bool = Field(True, description="online linear probe on detached features")
    probe_lr: float = Field(0.1, gt=0, description="online linear probe's lr")
    umap_every: int | None = Field(None, gt=0, description="UMAP picture every N epochs")


class WandbConfig(Section):
    enabled: bool = Field(False, description="also log to Weights & Biases (pip install "
                          "'massrl[wandb]'; WANDB_MODE=offline logs without a network)")
    project: str = Field("massrl", description="W&B project")
    entity: str | None = Field(None, description="W&B team or user (default: your default)")
    tags: list[str] = Field(default_factory=list, description="W&B run tags")


class RunConfig(Section):
    name: str | None = Field(None, description="run name (default: <method>_<dataset>)")
    method: str = Field("massrl", description="the objective: "
                        f"{', '.join(BUILTIN_METHODS)}, or a plugin's (plugins)")
    method_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="a plugin method's own settings (which it checks), "
        "e.g. method_kwargs.lambd=0.005")
    plugins: list[str] = Field(
        default_factory=list, description="Python modules or .py files imported before the "
        "config is checked: they register methods, strategies, timm backbones "
        "(docs/extending.md)")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds torch, numpy, python and every view")
    output_dir: str | None = Field(None, description="everything of the run goes here")
    resume: str | None = Field(None, description="'auto' or a checkpoint path")
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        """First of all: what the plugins register is what method= and strategies= may name."""
        if isinstance(data, dict) and isinstance(data.get("plugins"), list):
            data = {**data, "plugins": plugins.import_plugins([str(p) for p in data["plugins"]])}
        return data

    @field_validator("output_dir")
    @classmethod
    def _utf8_output_dir(cls, v: str | None) -> str | None:
        try:
            os.fsencode(v or "").decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("is not valid UTF-8, and TensorBoard cannot write its logs under "
                             "such a path: choose a UTF-8 name") from None
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return _known(v, plugins.method_names(), "method")

    @model_validator(mode="after")
    def _method_kwargs_fit(self) -> RunConfig:
        """A plugin method's settings are checked by its KWARGS model; massrl's take none."""
        kwargs_model = getattr(plugins.METHODS.get(self.method), "KWARGS", None)
        if kwargs_model is None:
            if self.method_kwargs:
                raise ValueError(f"method_kwargs ({', '.join(self.method_kwargs)}) given, but "
                                 f"method {self.method} takes none")
            return self
        try:
            kwargs_model.model_validate(self.method_kwargs)
        except ValidationError as err:
            raise ValueError("; ".join(
                f"method_kwargs.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in err.errors())) from None
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"{self.method}_{self.data.name}"


def _known(name: str, known: tuple[str, ...], kind: str) -> str:
    if name in known:
        return name
    close = get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(f"unknown {kind} '{name}': {hint}choose from {', '.join(known)}, or "
                     "register your own in a plugin (docs/extending.md)")
