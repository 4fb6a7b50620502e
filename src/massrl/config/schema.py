"""Every config key, typed: the sections of a run's configuration and their rules (the
augment.* section in augment.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from massrl import plugins
from massrl.config.augment import AugmentConfig
from massrl.config.section import Section, UserPath, known_name
from massrl.plugins import BUILTIN_METHODS

DATASETS = (
    "fashion_mnist", "digits", "cifar10", "cifar100", "stl10", "folder", "imagenet", "imagenet100",
)


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
    root: UserPath | None = Field(None,
                                  description="where the dataset lives (default: per dataset)")
    labels: Literal["auto", "folders", "none"] = Field(
        "auto", description="data.name=folder: auto = sub-folders that hold images directly are "
        "classes, else unlabeled; folders = each sub-folder is a class, images at any depth "
        "(torchvision's ImageFolder); none = unlabeled (folders sorted by date or event)")
    download: bool = Field(False, description="let torchvision download when a network exists")
    subset: int | None = Field(None, gt=0, description="seeded class-balanced subset of N images")
    eval_subset: int | None = Field(None, gt=0, description="subset of labeled splits (monitors)")
    image_size: int = Field(32, gt=0, description="crop size of every view (pixels, >= 8 to "
                            "train)")
    batch_size: int = Field(256, gt=0, description="per-device batch size")
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="DataLoader workers of each process; auto: 0 on a CPU with <= 4 "
        "cores, cores/4 on more; on GPUs cores/devices - 1 per GPU process, at most 8")
    pin_memory: bool = Field(True, description="page-locked batches (with a GPU only)")
    persistent_workers: bool = Field(True, description="keep workers between epochs")
    strict: bool = Field(False, description="fail on an undecodable image instead of skipping it")
    mean: tuple[float, float, float] | None = Field(None, description="default: the dataset's")
    std: tuple[float, float, float] | None = Field(None, description="default: the dataset's")

    @model_validator(mode="after")
    def _labels_of_a_folder(self) -> DataConfig:
        if self.labels != "auto" and self.name != "folder":
            raise ValueError(f"labels={self.labels} applies to name=folder ({self.name} has "
                             "its own labels)")
        return self

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
    tau_base: float = Field(0.99, ge=0, le=1, description="EMA target's momentum at the "
                            "first step (BYOL, MASSRL)")
    tau_final: float = Field(1.0, ge=0, le=1, description="EMA target's momentum at the last "
                             "step (BYOL, MASSRL)")
    # (below ~1e-38 the logits' 1/T is inf in float32: NaN at the first step, blamed on the lr)
    temperature: float = Field(0.2, ge=1e-4, description="SimCLR NT-Xent temperature")


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
        "auto", description="auto = bf16-mixed where computed natively, else 32-true on a "
        "CPU, 16-mixed on a GPU")
    accumulate_grad_batches: int = Field(1, gt=0)
    sync_batchnorm: bool = Field(False, description="BatchNorm statistics over every rank's "
                                 "batch (GPUs only)")
    channels_last: bool = Field(True, description="off on the CPU for models with strided 1x1 "
                                "convs of < 16 input channels (oneDNN bug; devices.py)")
    compile: bool = Field(False, description="torch.compile the encoders (the first steps "
                          "compile; worth it for long GPU runs)")
    gradient_clip_val: float | None = Field(
        None, ge=0, description="clip the gradient norm to this (null or 0: no clipping)")
    log_every_n_steps: int = Field(10, gt=0, description="optimizer steps between logged "
                                   "step metrics (metrics.csv, TensorBoard, W&B)")
    limit_train_batches: int | float | None = Field(
        None, description="batches per epoch: a number, or a fraction in (0, 1] of the split")
    progress_bar: bool = Field(True, description="a live bar in a terminal, one line per epoch "
                               "written to a file; false: neither")
    checkpoint_every_n_steps: int = Field(
        500, ge=0, description="also save last.ckpt every N optimizer steps (0 = epoch ends only)")
    keep_every_n_epochs: int = Field(
        0, ge=0, description="also keep checkpoints/epoch-E.ckpt every N epochs (E counted from "
        "0, as in best-knn-E; 0 = none), to evaluate a run across its training")
    skip_nonfinite: bool = Field(False, description="skip steps whose loss is NaN/inf")
    cpu_threads: int | None = Field(
        None, gt=0, description="torch threads of a CPU run (default: with DataLoader "
        "workers, the cores they leave; without, torch's own: every core, or OMP_NUM_THREADS)")
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
    knn_bank: int | None = Field(
        None, gt=0, description="online kNN's bank: a seeded class-balanced subset of this "
        "many labeled training images (null: all that data.eval_subset keeps). Every rank "
        "holds the bank's features: 1.28M ImageNet ResNet-50 ones are 10 GB, and the check "
        "needs about twice that")
    probe: bool = Field(True, description="online linear probe on detached features")
    probe_lr: float = Field(0.1, gt=0, description="online linear probe's lr, constant (a "
                            "parameter group of optimizer.name's optimizer, so an AdamW lr "
                            "under adamw)")
    umap_every: int | None = Field(None, ge=0, description="UMAP picture of the test "
                                   "features every N epochs, at a kNN check (a multiple of "
                                   "knn_every; null or 0 = off)")



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
    output_dir: UserPath | None = Field(None, description="everything of the run goes here")
    resume: UserPath | None = Field(None, description="'auto' or a checkpoint path")
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

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return known_name(v, plugins.method_names(v), "method")

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


def check_training_settings(cfg: RunConfig) -> None:
    """Settings a run refuses to train with, checked when it starts (not by the schema, which
    also reads the configs of checkpoints written before these checks: they must still load,
    evaluate and export)."""
    from massrl.config.section import ConfigError

    e = cfg.eval
    problems = []
    # the UMAP picture is drawn from a validation's features: without a validation in its
    # epoch none was drawn, silently
    if e.umap_every and not e.knn_every:
        problems.append(f"eval.umap_every={e.umap_every} draws at the kNN checks, which "
                        "eval.knn_every=0 turns off: set eval.knn_every too")
    elif e.umap_every and e.umap_every % e.knn_every:
        problems.append(f"eval.umap_every={e.umap_every} draws at the kNN checks, every "
                        f"eval.knn_every={e.knn_every} epochs: make it a multiple of "
                        f"{e.knn_every}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def mean_scale_problem(mean: Any) -> str | None:
    """What is wrong with a data.mean given on the 0-255 scale (images are scaled to [0, 1]
    first: every input came out near -2), or None."""
    values = mean if isinstance(mean, list | tuple) else [mean]
    if not any(isinstance(v, int | float) and abs(v) > 1 for v in values):
        return None
    return (f"data.mean={mean} looks like 0-255 values: give mean and std on the [0, 1] scale "
            "(divide by 255)")


def check_training_data(cfg: RunConfig, saved: dict | None) -> None:
    """The data settings a run refuses to train with, once it is known whether it continues a
    checkpoint (`saved`: its stored config): a run that trained so before may continue with
    the same value (and its checkpoints evaluate as they did); a fresh one, a resume=auto that
    found nothing, or a resume that sets it anew may not."""
    from massrl.config.section import ConfigError

    before = (saved or {}).get("data") or {}
    problems = []
    # a few colours per view, and bf16 gradients overflowed
    if cfg.data.image_size < 8 and before.get("image_size") != cfg.data.image_size:
        problems.append(f"data.image_size={cfg.data.image_size}: train at 8 px or more")
    mean = cfg.data.mean
    if mean is not None and (problem := mean_scale_problem(list(mean))) and \
            before.get("mean") != list(mean):
        problems.append(problem)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
