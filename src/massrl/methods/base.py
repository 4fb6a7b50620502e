"""The shared LightningModule: backbone, online monitors, optimizer and schedule.

A method subclass implements `ssl_step(batch)` (its loss) and, if it has one, what it does after
each optimizer step. Everything else — the online linear probe on detached features, logging,
checkpoint state — lives here; the validation-time monitors (kNN, probe accuracy, UMAP) in
monitors.py, skipped steps and the optimizer step in step_skipping.py, the optimizer, lr schedule
and clipping in optimisation.py, the run's length in run_length.py.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from massrl import __version__
from massrl.augment import pair_mask
from massrl.config import ConfigError, RunConfig
from massrl.data.folder import file_list_digest
from massrl.data.sampler import sample_seed, seed_torch
from massrl.devices import augment_backend, use_channels_last
from massrl.epoch_clock import EpochClock
from massrl.methods.monitors import OnlineMonitors
from massrl.methods.optimisation import Optimisation
from massrl.methods.step_skipping import StepSkipping
from massrl.models import build_backbone
from massrl.models.backbones import feature_dim
from massrl.models.heads import linear_head
from massrl.optim import take_hyperparameters
from massrl.provenance import running_commit
from massrl.resilience import check_finite, rng_state, set_rng_state

if TYPE_CHECKING:
    from massrl.data import DatasetSplits


def quiet_hook_notice() -> None:
    """The batch-transfer hooks live on the module on purpose (the batched augmenter and the
    channels-last layout belong to the model's device), also when a datamodule feeds it: keep
    Lightning from warning about each. (Adding the same filter again replaces it.)"""
    warnings.filterwarnings(
        "ignore", r".*overridden `on_(before|after)_batch_transfer` in `LightningModule` but "
        r"have passed in a `LightningDataModule`")


class SSLMethod(OnlineMonitors, StepSkipping, Optimisation, L.LightningModule):
    """Base of every method. Batches are dicts: views (list of [B,3,S,S]), strategy [B,V],
    crop [B,V], label [B] (-1 = unlabeled), skipped (bad files dropped from the batch)."""

    def __init__(self, config: dict | RunConfig, num_classes: int | None = None,
                 strategy_names: list[str] | None = None) -> None:
        super().__init__()
        quiet_hook_notice()
        cfg = config if isinstance(config, RunConfig) else RunConfig.model_validate(config)
        self._check_class(cfg.method)
        self.save_hyperparameters({"config": cfg.model_dump(mode="json"),
                                   "num_classes": num_classes,
                                   "strategy_names": strategy_names})
        self.cfg = cfg
        self.num_classes = num_classes
        self.strategy_names = strategy_names or list(cfg.augment.strategies)
        self.backbone, self.backbone_spec = build_backbone(
            cfg.model.backbone, cfg.model.cifar_stem, cfg.model.width, cfg.data.image_size,
            cfg.model.kwargs)
        self.feat_dim = feature_dim(self.backbone)
        # standardised features, as the offline linear head's: a narrow or young backbone's
        # features have a std of a few hundredths, on which a plain linear layer at the probe's
        # lr stayed near chance for epochs
        self.probe = (linear_head(self.feat_dim, num_classes)
                      if cfg.eval.probe and num_classes else None)
        self._val_outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self._clock = EpochClock()
        self.umap_seconds = 0.0  # (left out of the epoch's time: epoch_clock.py)
        self._images_this_epoch = 0
        self._skipped_this_epoch = 0
        self.images_seen = 0
        self._bad_images: set[int] = set()  # training-split indices of undecodable files
        # the input normalisation of the data this model is trained on (set by use_data);
        # recorded in checkpoints so evaluation and export can reproduce it
        self.normalization: dict[str, Any] = {}
        self.data_files: dict[str, Any] = {}  # (set by use_data)
        self.own_splits = False  # trained on pretrain(splits=...): no dataset a name loads
        # augment.backend=batched: the strategies run here on the device (made by use_data)
        self.augmenter: Any = None
        # channels-last batches, as the model (train.py may turn it off: devices.py)
        self.channels_last = cfg.trainer.channels_last
        self.method_kwargs = self.KWARGS.model_validate(cfg.method_kwargs) if self.KWARGS else None
        self._init_step_skipping()

    # ------------------------------------------------------------------ method interface

    # config keys the method does not read (a change of them is no change of its model)
    UNUSED_KEYS: tuple[str, ...] = ()
    # the modules that carry the compute, compiled in place by trainer.compile
    ENCODERS: tuple[str, ...] = ("backbone",)
    # a plugin method's own settings (config method_kwargs): a pydantic model checks them, and
    # self.method_kwargs is its instance (None for a method without any)
    KWARGS: ClassVar[type[BaseModel] | None] = None

    @classmethod
    def ignored_settings(cls, cfg: RunConfig) -> list[str]:
        """UNUSED_KEYS the config sets away from their defaults ("key=value"): set for another
        method, they change nothing, which a run says at its start."""
        def value(tree: Any, key: str) -> Any:
            for part in key.split("."):
                tree = getattr(tree, part)
            return tree

        default = RunConfig()
        return [f"{k}={value(cfg, k)}" for k in cls.UNUSED_KEYS
                if value(cfg, k) != value(default, k)]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's, leaving the caller's random streams as they were (building the model
        draws its initial weights from torch's). `SSLMethod.load_from_checkpoint(path)` builds
        the checkpoint's own method (MASSRL, BYOL, SimCLR or a plugin's)."""
        method = cls
        if cls is SSLMethod:  # (the file is read twice: once for its method's name)
            from massrl.eval.checkpoint import checkpoint_config, load_weights_only, read_checkpoint
            from massrl.methods import METHODS

            if isinstance(checkpoint_path, str | os.PathLike):
                ckpt = read_checkpoint(checkpoint_path)
            else:  # a file object: read, then put back where it was
                where = checkpoint_path.tell()
                ckpt = load_weights_only(checkpoint_path, "the checkpoint file")
                checkpoint_path.seek(where)
            method = METHODS[checkpoint_config(ckpt).method]
        with torch.random.fork_rng(devices=[]):
            return super(SSLMethod, method).load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def _check_class(self, method: str) -> None:
        """A registered method's class takes its own method's config only: MASSRL's
        load_from_checkpoint of a BYOL run built a MASSRL that said byol, and BYOL's of a
        SimCLR run failed on a long list of missing keys. (Unregistered subclasses are free.)"""
        from massrl.methods import METHODS

        wanted = METHODS.get(method)
        if wanted is not None and type(self) in set(METHODS.values()) and wanted is not type(self):
            raise ConfigError(
                f"a {type(self).__name__} cannot take a {method} config or checkpoint: use "
                f"{wanted.__name__} (massrl.methods.build_method(config) picks it; "
                f"{wanted.__name__}.load_from_checkpoint(path) for a checkpoint)")

    @classmethod
    def check_global_batch(cls, cfg: RunConfig, images: int) -> None:
        """Raise ConfigError when a global batch of `images` cannot train this method."""

    def ssl_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return at least {"loss", "feats"}: feats are the backbone features of the first view
        ([B, F]) used by the online probe; other entries are logged under train/."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def pair_mask(self, batch: dict) -> torch.Tensor:
        return pair_mask(batch["strategy"], batch["crop"], self.cfg.augment.pairs)

    def use_data(self, splits: DatasetSplits) -> None:
        """Train on these splits (massrl.data.DatasetSplits): record their normalisation, which
        checkpoints keep for evaluation and export, and for augment.backend=batched make the
        augmenter that normalises with it."""
        self.normalization = {"mean": list(splits.mean), "std": list(splits.std),
                              "image_size": self.cfg.data.image_size, "classes": splits.classes,
                              "native_size": splits.native_size}  # (the test transform's)
        # a folder's file list, which its train / held-out split is drawn from (resume checks it)
        self.data_files = {name: file_list_digest(ds) for name, ds in
                           (("train", splits.train), ("test", splits.test)) if ds is not None}
        self._make_augmenter(splits.mean, splits.std)

    def _make_augmenter(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The batched engine (augment.backend=batched, or auto on the CPU), normalising as the
        data's per-image and evaluation transforms do: made anew for data of other statistics
        (a loaded checkpoint trained on other images)."""
        if augment_backend(self.cfg) != "batched":
            return
        from massrl.augment.batched import BatchedAugmenter
        from massrl.data.eval_transform import channel_stats

        kept = self.augmenter
        if isinstance(kept, BatchedAugmenter) and (kept.normaliser.mean, kept.normaliser.std) \
                == channel_stats(mean, std):
            return
        if kept is None or isinstance(kept, BatchedAugmenter):  # (one of the user's own stays)
            self.augmenter = BatchedAugmenter(self.cfg.augment, mean, std)

    def setup(self, stage: str) -> None:
        # fitted from Python with a massrl datamodule: take its data, as `massrl pretrain` does
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "splits"):
            if not self.normalization:
                self.use_data(dm.splits)
            else:  # a loaded checkpoint trained on: its normalisation kept, the engine made
                self._make_augmenter(dm.splits.mean, dm.splits.std)  # for the data it sees
        if self.channels_last and self.trainer.strategy.root_device.type == "cpu":
            # (massrl pretrain has decided already; a Trainer of the user's own has not, and
            # channels-last batches would crash oneDNN on a narrow ResNet: devices.py)
            self.channels_last = use_channels_last(True, "cpu", self)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.augmenter is not None and self.trainer.training:
            from massrl.augment.batched import plan_batch

            # read and planned on the host, where reading is free (see batched/plan.py)
            batch = plan_batch(batch, self.augmenter, self.device)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        views = batch.get("views") if isinstance(batch, dict) else None
        if views and views[0].dtype == torch.uint8 and self.augmenter is None:
            if augment_backend(self.cfg) == "batched":
                fix = "fit it with massrl's SSLDataModule, or call model.use_data(splits)"
            else:  # (the datamodule's config is not the model's: an old checkpoint's, say)
                fix = ("its config's backend resolves to per_image: build the datamodule from "
                       "the model's config, SSLDataModule(model.cfg)")
            raise RuntimeError("the batch holds uint8 crops (its datamodule's augment.backend "
                               f"resolves to batched) but the model has no augmenter: {fix}")
        if self.augmenter is not None and self.trainer.training:
            from massrl.augment.batched import augment_batch

            batch = augment_batch(batch, self.augmenter)
        if self.channels_last and isinstance(batch, dict):
            fmt = torch.channels_last
            if "views" in batch:
                batch["views"] = [v.contiguous(memory_format=fmt) for v in batch["views"]]
            if "image" in batch:
                batch["image"] = batch["image"].contiguous(memory_format=fmt)
        return batch

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # marks the file as massrl's, for evaluation / export commands
        checkpoint["massrl"] = {"version": __version__, "commit": running_commit(),
                                "backbone": self.backbone_spec.to_dict(),
                                "data": dict(self.normalization),
                                "files": self.data_files,
                                "own_splits": self.own_splits,
                                "images_seen": self.images_seen,
                                "world_size": self.trainer.world_size,
                                "skipped_files": self.skipped_files,
                                "skipped_nonfinite_steps": self.skipped_nonfinite_steps,
                                "bad_images": sorted(self._bad_images),
                                "rng": rng_state()}
        # in the standard layout (a channels-last run's weights were strided: safetensors and
        # other tools that take a checkpoint's state_dict refused them); a resume copies them
        # back into the model's own layout
        weights = checkpoint.get("state_dict") or {}
        for name, tensor in weights.items():
            if torch.is_tensor(tensor):
                weights[name] = tensor.contiguous()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        weights = checkpoint.get("state_dict", {})
        if self.probe is not None and "probe.weight" in weights:
            # a checkpoint from before the probe had its standardiser: the linear layer's
            # weights move to their new place; the standardiser starts afresh
            for name in ("weight", "bias"):
                weights[f"probe.1.{name}"] = weights.pop(f"probe.{name}")
            for name, value in self.probe[0].state_dict().items():
                weights.setdefault(f"probe.0.{name}", value)
            if self._trainer is not None:  # a resumed fit: its probe figures start lower
                self.print("note: this checkpoint's online probe predates its feature "
                           "standardiser, which starts afresh: the probe's accuracy needs some "
                           "epochs to recover (kNN and the backbone are unaffected)")
        state = checkpoint.get("massrl", {})
        self.images_seen = state.get("images_seen", 0)
        self.skipped_nonfinite_steps = state.get("skipped_nonfinite_steps", 0)
        self._bad_images = set(state.get("bad_images", ()))
        if not self.normalization:  # (a resumed fit has its data's already: setup)
            self.normalization = dict(state.get("data", {}))
        # the random streams continue a resumed fit only: `load_from_checkpoint` (no trainer)
        # leaves the caller's process as it was seeded
        if "rng" in state and self._trainer is not None:
            set_rng_state(state["rng"])

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._bad_images.update(batch.get("skipped_index", ()))
        self._skipped_this_epoch += int(batch.get("skipped", 0))
        # every image of the batch failed to decode (on some rank): skip the step
        if not self._on_every_rank("views" in batch):
            return self._skip_step()
        # a step that may be skipped must leave the batch-norm statistics as they were too: a
        # forward through NaN activations makes them NaN, and every later feature with them
        if self.cfg.trainer.skip_nonfinite and self._kept is None:  # (at a window's start)
            self._kept = [b.clone() for b in self.buffers()]
        out = self.ssl_step(batch)
        loss = out.pop("loss")
        # (the loss read once: on a GPU every read of a value waits for the device)
        if not self._on_every_rank(bool(torch.isfinite(loss))):  # stop or skip on all ranks
            loss = loss.detach() * float("nan")
            if not check_finite(loss, self.global_step, self.current_epoch + 1,
                                self.cfg.trainer.skip_nonfinite):
                self._nonfinite = True  # (counted where the step is skipped: optimizer_step)
                self._restore_buffers()
                return self._skip_step()
        feats = out.pop("feats")
        b = batch["label"].shape[0]
        log = {f"train/{k}": v.detach() for k, v in out.items()}
        log["train/loss"] = loss.detach()
        if self.probe is not None:
            probe_loss, probe_acc = self._probe_step(feats.detach(), batch["label"])
            loss = loss + probe_loss
            if probe_acc is not None:
                log["train/probe_loss"] = probe_loss.detach()
                log["train/probe_acc"] = probe_acc
        self.log_dict(log, on_step=True, on_epoch=True, prog_bar=False, batch_size=b,
                      sync_dist=False)
        self.log("loss", log["train/loss"], prog_bar=True, on_step=True, on_epoch=False,
                 logger=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True,
                 on_epoch=False, batch_size=b)
        self._images_this_epoch += b
        # (added to images_seen once the optimizer step trains: per step, exact across a resume)
        self._images_of_step += b * self.trainer.world_size
        return loss

    def _probe_step(self, feats: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        known = labels >= 0
        if labels.numel() and bool(known.all()):  # (all labeled, the usual case: one read)
            logits = self.probe(feats.float())
            return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()
        logits = self.probe(feats[known].float())
        if not bool(known.any()):
            # a zero loss through the probe all the same: under DDP every rank's parameters
            # must take part in the step, also on a rank whose batch held no labeled image
            return logits.sum() * 0.0, None
        loss = F.cross_entropy(logits, labels[known])
        acc = (logits.argmax(1) == labels[known]).float().mean()
        return loss, acc

    @property
    def skipped_files(self) -> int:
        """Distinct training images that failed to decode so far (each file once)."""
        return len(self._bad_images)

    def on_train_start(self) -> None:
        self._clock.start(self)  # a run resumed mid-epoch has no epoch start
        if self.trainer.ckpt_path and self.trainer.lr_scheduler_configs:
            # Lightning restored the checkpoint's lr, weight decay, momentum, ... with the
            # optimizer's state: a resume with optimizer.lr=... changed was said and recorded,
            # but trained on at the old values
            fresh = self.configure_optimizers()
            take_hyperparameters(self.trainer.optimizers[0],
                                 self.trainer.lr_scheduler_configs[0].scheduler,
                                 fresh["optimizer"], fresh["lr_scheduler"]["scheduler"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # a stochastic layer (dropout, drop-path, a plugin's torch.rand) draws from its batch's
        # own stream: the same whatever the worker count (without workers, the data pipeline
        # reseeds this process per image) and after a resume
        step = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        seed = sample_seed(self.cfg.seed ^ 0x5EED, step, self.global_rank)
        seed_torch(seed, self.device)

    def on_train_epoch_start(self) -> None:
        self._clock.start(self)
        self._images_this_epoch = self._skipped_this_epoch = 0

    def on_train_epoch_end(self) -> None:
        # batches came, and not one image of them decoded, on any rank: stop rather than train
        # nothing to the end (a run resumed after its epoch's last batch sees no batch at all)
        if self._on_every_rank(self._images_this_epoch == 0 and self._skipped_this_epoch > 0):
            from massrl.data import UnusableDataError

            raise UnusableDataError(
                f"no training image could be decoded in epoch {self.current_epoch}: all "
                f"{self._skipped_this_epoch} were skipped (see the warnings above). Check "
                f"data.root and the files' format")
        self._end_epoch_of_skips()
        if self.trainer.world_size > 1:  # each rank met its own bad files: count their union
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, sorted(self._bad_images))
            self._bad_images = set().union(*gathered)
        seconds = max(self._clock.seconds(self), 1e-9)
        images = self._images_this_epoch * self.trainer.world_size
        self.log_dict({"throughput/images_per_s": images / seconds,
                       "throughput/epoch_seconds": seconds,
                       "data/skipped_files": float(self.skipped_files)}, sync_dist=False)
