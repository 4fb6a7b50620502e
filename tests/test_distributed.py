"""Distributed correctness on CPU: two gloo processes against one process.

One `torch.multiprocessing.spawn` of 2 ranks runs every distributed scenario (process start-up
costs more than the scenarios themselves); each rank writes what it saw to a folder, and the
tests below compare that with single-process references computed here.

What is compared:
- gradient equivalence: the parameter update of one SGD step (no momentum, no lr scaling, fp32)
  with 2 ranks x batch B equals the update of 1 process x batch 2B. With SyncBN the reference is
  plain BN over the 2B images. Without SyncBN each rank's BN normalises over its own B images (all
  views), so the reference normalises each half of its batch separately ("ghost BN" over the same
  halves the ranks get); everything else — loss averaging, SimCLR's gathered negatives and their
  gradient, DDP's gradient averaging — is the real code path.
- torch's SyncBatchNorm (and DDP's check of it) only run on GPUs, so the ranks swap in a CPU
  SyncBN forward (all-reduced sums with autograd) with the same maths; what is under test is the
  methods' losses with BN statistics over the global batch, not torch's kernel.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from massrl.config import build_config
from massrl.data.datamodule import SSLDataModule
from massrl.data.loading import collate_skip_bad, labeled_images
from massrl.methods import build_method
from massrl.models.heads import FeatureStandardiser

WORLD = 2
B = 4  # per-rank batch of the equivalence runs
METHODS = ("byol", "massrl", "simclr")
BANK_SIZE, TEST_SIZE, BAD_INDEX = 23, 13, 5  # odd sizes: the DistributedSampler pads with repeats


def _cfg(method: str, **over: object):
    items = {"method": method, "model.width": 4, "model.proj_hidden_dim": 16,
             "model.proj_output_dim": 8, "model.pred_hidden_dim": 16, "data.batch_size": B,
             "data.image_size": 8, "data.num_workers": 0, "trainer.channels_last": False,
             "augment.strategies": "[simclr,randaugment]", "optimizer.name": "sgd",
             "optimizer.momentum": 0.0, "optimizer.weight_decay": 0.0, "optimizer.lr": 0.5,
             "optimizer.scale_lr": False, "optimizer.warmup_epochs": 0, "eval.knn_k": 5,
             "eval.probe_lr": 0.5, "loss.tau_base": 0.9}
    items.update(over)
    return build_config(overrides=[f"{k}={v}" for k, v in items.items()])


def _model(method: str, num_classes: int = 3, **over: object):
    torch.manual_seed(0)  # the same initial weights in every process
    return build_method(_cfg(method, **over), num_classes=num_classes)


class _Views(Dataset):
    """Fixed random two-view items with labels (identical in every process)."""

    def __init__(self, n: int = WORLD * B) -> None:
        self.x = torch.randn(n, 2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"views": list(self.x[i]), "strategy": torch.tensor([0, 1]),
                "crop": torch.tensor([0, 1]), "label": i % 3, "index": i}


class _EvalBase(Dataset):
    """(image, label) pairs with one undecodable item (None), as the datasets yield them."""

    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return None if i == BAD_INDEX else (self.x[i], i % 3)


def _eval_loaders() -> list[DataLoader]:
    return [DataLoader(labeled_images(_EvalBase(n, seed), torch.nn.Identity()), batch_size=4,
                       collate_fn=collate_skip_bad) for n, seed in ((BANK_SIZE, 2), (TEST_SIZE, 3))]


def _trainer(world: int, steps: int | None = 1, epochs: int = 1, sync_bn: bool = False,
             callbacks: list | None = None, val_batches: int | None = 0) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
        sync_batchnorm=sync_bn, precision="32-true", max_epochs=epochs,
        limit_train_batches=steps, limit_val_batches=val_batches, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _target_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("target_")}


# ---------------------------------------------------------------- CPU SyncBN (test stand-in)


def _cpu_sync_bn_forward(self: torch.nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """SyncBatchNorm's maths on CPU: per-channel sums all-reduced with autograd, so the gradient
    also flows through the other ranks' statistics, as in torch's CUDA kernel."""
    if not self.training:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)
    dims = [0, *range(2, x.dim())]
    c = x.shape[1]
    count = torch.tensor([x.numel() / c], dtype=x.dtype)
    stats = dist_nn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
    n = stats[-1]
    mean = stats[:c] / n
    var = stats[c:2 * c] / n - mean * mean
    with torch.no_grad():
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(var * n / (n - 1), self.momentum)
        self.num_batches_tracked.add_(1)
    shape = [1, c] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + self.eps)
    if self.affine:  # (the online probe's standardiser has no affine parameters)
        scale = self.weight * scale
    out = (x - mean.view(shape)) * scale.view(shape)
    return out + self.bias.view(shape) if self.affine else out


# ---------------------------------------------------------------- the 2-rank worker


class _RecordIndices(L.Callback):
    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())


def _digit_views(image) -> dict:
    """A cheap stand-in for MultiViewTransform (the sampler test needs indices, not views)."""
    from torchvision.transforms.functional import pil_to_tensor, resize

    t = resize(pil_to_tensor(image.convert("RGB")).float() / 255, [8, 8], antialias=True)
    return {"views": [t, t.flip(-1)], "strategy": torch.tensor([0, 1]),
            "crop": torch.tensor([0, 1])}


def _worker(rank: int, out: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    # a collective that does not match across ranks fails after a minute instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.nn.SyncBatchNorm.forward = _cpu_sync_bn_forward
    # DDP refuses SyncBatchNorm layers on CPU modules; the stand-in above runs there
    DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None
    result: dict = {}
    for method in METHODS:
        for sync_bn in (False, True):
            model, record = _model(method), _RecordIndices()
            _trainer(WORLD, sync_bn=sync_bn, callbacks=[record]).fit(
                model, DataLoader(_Views(), batch_size=B))
            result[("step", method, sync_bn)] = _params(model), record.seen[0]
    for sync_bn in (False, True):
        model = _model("massrl")
        _trainer(WORLD, steps=3, sync_bn=sync_bn).fit(
            model, DataLoader(_Views(4 * WORLD * B), batch_size=B))
        result[("ema", sync_bn)] = _target_state(model)
    result["knn"] = _validate(_model("simclr"))
    result["uneven"] = _simclr_uneven_step()
    result["sampler"], result["subset"] = _fit_datamodule(rank)
    result["nonfinite"] = _nonfinite_on_one_rank(rank)  # last: it ends a fit with an error
    torch.save(result, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


class _ViewsWithBadItem(_Views):
    def __getitem__(self, i: int) -> dict | None:
        return None if i == BAD_INDEX else super().__getitem__(i)


def _simclr_uneven_step() -> dict:
    """One SimCLR step where one rank lost an undecodable image (batches of B and B-1): the
    gathered negatives must be every good image of both ranks, once."""
    import massrl.methods.simclr as simclr

    seen = {}
    loss_fn = simclr.nt_xent

    def spy(z, mask, temperature, z_all=None, rank_offset=0):
        seen.update(rows=len(z), keys=z_all.detach().clone(), offset=rank_offset)
        return loss_fn(z, mask, temperature, z_all, rank_offset)

    simclr.nt_xent = spy
    try:
        model = _model("simclr")
        _trainer(WORLD).fit(model, DataLoader(_ViewsWithBadItem(), batch_size=B,
                                              collate_fn=collate_skip_bad))
    finally:
        simclr.nt_xent = loss_fn
    return {**seen, "params": _params(model)}


def _nonfinite_on_one_rank(rank: int) -> dict[bool, object]:
    """A NaN loss on rank 1 only, with trainer.skip_nonfinite true and false: every rank must
    skip the step, or every rank stop, rather than leave the others in a collective. Skipping
    is run for one one-step epoch (skipped, the run goes on: key True) and two (every step
    skipped in a row: the run stops at the end, key "twice")."""
    out: dict[object, object] = {}
    for skip in (True, "twice", False):
        model = _model("byol", **{"trainer.skip_nonfinite": bool(skip)})
        step = model.ssl_step

        def poisoned(batch: dict, step=step) -> dict:
            res = step(batch)
            res["loss"] = res["loss"] * (float("nan") if rank == 1 else 1.0)
            return res

        model.ssl_step = poisoned
        before = _params(model)
        try:
            _trainer(WORLD, epochs=2 if skip == "twice" else 1).fit(
                model, DataLoader(_Views(), batch_size=B))
            out[skip] = ("trained", all(torch.equal(before[n], p)
                                        for n, p in _params(model).items()))
        except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
            out[skip] = type(exc).__name__
            out[(skip, "message")] = str(exc)[:600]
            out[(skip, "unchanged")] = all(torch.equal(before[n], p)
                                           for n, p in _params(model).items())
    return out


def _validate(model) -> dict:
    """The online monitors' metrics and the gathered (features, labels) of bank and test."""
    gathered = []
    gather = model._gather
    model._gather = lambda outs: gathered.append(gather(outs)) or gathered[-1]
    trainer = _trainer(WORLD if dist.is_initialized() else 1, val_batches=None)
    trainer.validate(model, dataloaders=_eval_loaders(), verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"metrics": metrics, "bank": gathered[0], "test": gathered[1]}


def _fit_datamodule(rank: int) -> tuple[dict[int, list[int]], dict]:
    """Two epochs through SSLDataModule's training loader; the subset is loaded after seeding
    each rank's global RNGs differently, so only cfg.seed may decide it."""
    L.seed_everything(100 + rank, verbose=False)
    cfg = _cfg("byol", **{"data.name": "digits", "data.subset": 40, "eval.knn_every": 0})
    dm = SSLDataModule(cfg, train_transform=_digit_views)
    dm.setup("fit")
    subset = {"indices": list(dm.splits.train.indices), "targets": list(dm.splits.train.targets)}
    L.seed_everything(cfg.seed, verbose=False)  # as massrl.train.pretrain does on every rank
    record = _RecordIndices()
    _trainer(WORLD, steps=None, epochs=2, callbacks=[record]).fit(_model("byol", 10), datamodule=dm)
    return record.seen, subset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(out, _free_port()), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------- single-process references


def _ghost_bn(original):
    """BN whose batch statistics are taken per rank-half of the batch, as unsynced DDP does.
    Rows are view-major ([V*2B]: all views are one backbone pass), so a half is every view of
    its B images."""

    def forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return original(self, x)
        v = x.shape[0] // (WORLD * B)
        xs = x.reshape(v, WORLD, B, *x.shape[1:])
        halves = [original(self, xs[:, r].reshape(v * B, *x.shape[1:])) for r in range(WORLD)]
        return torch.stack([h.reshape(v, B, *x.shape[1:]) for h in halves], 1).reshape(x.shape)

    return forward


def _reference_step(method: str, sync_bn: bool, order: list[int], monkeypatch
                    ) -> dict[str, torch.Tensor]:
    """One step on the whole batch, its items in `order` (rank 0's, then rank 1's: Lightning's
    DistributedSampler shuffles training data)."""
    if not sync_bn:
        monkeypatch.setattr(_BatchNorm, "forward", _ghost_bn(_BatchNorm.forward))
    # the online probe's standardiser takes each rank's statistics, synced batch-norm or not
    monkeypatch.setattr(FeatureStandardiser, "forward", _ghost_bn(FeatureStandardiser.forward))
    model = _model(method)
    _trainer(1).fit(model, DataLoader(_Views(), batch_size=WORLD * B, sampler=order))
    monkeypatch.undo()
    return _params(model)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("sync_bn", [False, True], ids=["bn", "syncbn"])
@pytest.mark.parametrize("method", METHODS)
def test_one_step_on_two_ranks_equals_one_step_on_the_whole_batch(ranks, method, sync_bn,
                                                                   monkeypatch):
    before = _params(_model(method))
    shards = [result[("step", method, sync_bn)][1] for result in ranks]
    assert sorted(shards[0] + shards[1]) == list(range(WORLD * B))
    expected = _reference_step(method, sync_bn, shards[0] + shards[1], monkeypatch)
    for r, result in enumerate(ranks):
        got = result[("step", method, sync_bn)][0]
        assert got.keys() == expected.keys()
        for name in expected:
            delta_ref, delta = expected[name] - before[name], got[name] - before[name]
            torch.testing.assert_close(delta, delta_ref, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, r=r: f"rank {r}, {n}: {m}")
    moved = [n for n in before if not torch.equal(before[n], expected[n])]
    assert any(n.startswith("backbone.") for n in moved) and any("probe" in n for n in moved)


@pytest.mark.parametrize("sync_bn", [False, True], ids=["bn", "syncbn"])
def test_ema_target_is_identical_on_all_ranks(ranks, sync_bn):
    target0, target1 = ranks[0][("ema", sync_bn)], ranks[1][("ema", sync_bn)]
    initial = _target_state(_model("massrl"))
    params = {n for n, _ in _model("massrl").named_parameters() if n.startswith("target_")}
    assert params and not all(torch.equal(initial[n], target0[n]) for n in params)
    # without SyncBN each rank's BN running statistics (which the target copies) are its own
    # until DDP broadcasts rank 0's at the next forward; the target's weights never differ
    names = sorted(target0) if sync_bn else sorted(params)
    for name in names:
        assert torch.equal(target0[name], target1[name]), name


def test_online_monitors_cover_the_whole_split_once(ranks):
    ref = _validate(_model("simclr"))
    for name, size in (("bank", BANK_SIZE), ("test", TEST_SIZE)):
        assert len(ref[name][0]) == size - 1  # the undecodable item is skipped
    for r, result in enumerate(ranks):
        for split in ("bank", "test"):
            feats, labels = result["knn"][split]
            torch.testing.assert_close(feats, ref[split][0], rtol=1e-5, atol=1e-6)
            assert torch.equal(labels, ref[split][1]), (r, split)
        for key in ("val/knn_top1", "val/knn_top5", "val/probe_top1"):
            assert result["knn"]["metrics"][key] == pytest.approx(ref["metrics"][key]), (r, key)


def test_training_sampler_shards_without_overlap_and_reshuffles(ranks):
    epochs = [[r["sampler"][e] for r in ranks] for e in (0, 1)]
    for shards in epochs:
        assert len(shards[0]) == len(shards[1]) == 40 // WORLD  # 40 images, batch 4: no padding
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(40))
    assert epochs[0][0] != epochs[1][0], "the same order in both epochs: set_epoch not applied"


def test_subset_is_the_same_on_every_rank(ranks):
    cfg = _cfg("byol", **{"data.name": "digits", "data.subset": 40})
    dm = SSLDataModule(cfg)
    dm.setup()
    expected = {"indices": list(dm.splits.train.indices),
                "targets": list(dm.splits.train.targets)}
    assert len(expected["indices"]) == 40
    for result in ranks:
        assert result["subset"] == expected


def test_simclr_gathers_uneven_batches(ranks):
    """A rank that skipped an undecodable image still exchanges negatives with the others."""
    first, second = (r["uneven"] for r in ranks)
    assert sorted([first["rows"], second["rows"]]) == [B - 1, B]
    assert first["offset"] == 0 and second["offset"] == first["rows"]
    assert len(first["keys"]) == len(second["keys"]) == WORLD * B - 1
    assert torch.equal(first["keys"], second["keys"])  # the same global batch, in rank order
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name


def test_nonfinite_loss_on_one_rank_stops_every_rank(ranks):
    # reaching here at all means no rank was left waiting in a collective
    for result in ranks:
        assert result["nonfinite"][False] == "NonFiniteLossError", result["nonfinite"]


def test_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(ranks):
    # skipped on every rank, the weights as they were; two epochs of it: each rank stops at
    # the same epoch's end (none left waiting in a collective)
    for result in ranks:
        assert result["nonfinite"][True] == ("trained", True), result["nonfinite"]
        assert result["nonfinite"]["twice"] == "NonFiniteLossError", result["nonfinite"]
        assert "were all skipped" in result["nonfinite"][("twice", "message")]
        assert result["nonfinite"][("twice", "unchanged")]


def test_the_command_line_on_two_cpu_processes_speaks_once(tmp_path):
    """`massrl pretrain trainer.devices=2` (Lightning starts the second process): one run
    directory, one summary table and each notice once (every rank printed its own)."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "massrl", "pretrain", "-c", "fashion_mnist/byol",
           "data.name=digits", "data.image_size=16", "data.subset=128", "data.eval_subset=64",
           "data.batch_size=16", "model.width=8", "model.proj_hidden_dim=32",
           "model.pred_hidden_dim=32", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
           "trainer.progress_bar=false", "trainer.precision=32-true", f"output_dir={out}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1
    assert result.stdout.count("data.num_workers=auto") == 1
    assert result.stdout.count("byol on digits") == 1
    assert "sync_dist=True" not in result.stderr  # rank 0's share by design, documented
    import json

    assert json.loads((out / "summary.json").read_text())["runtime"]["world_size"] == 2
