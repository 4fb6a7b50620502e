import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

from massrl.config import ConfigError, build_config
from massrl.data import SSLDataModule
from massrl.methods import BYOL, MASSRL, build_method
from massrl.optim import cosine_tau


def _cfg(method="massrl", **over):
    items = {"model.width": 8, "model.proj_hidden_dim": 32, "model.proj_output_dim": 16,
             "model.pred_hidden_dim": 32, "data.batch_size": 8, "trainer.channels_last": False,
             "augment.strategies": "[simclr,randaugment]", "optimizer.warmup_epochs": 0}
    items.update(over)
    return build_config(overrides=[f"method={method}"] + [f"{k}={v}" for k, v in items.items()])


class _Views(Dataset):
    """Random 'views' with labels: enough to drive a training step."""

    def __init__(self, n: int = 32, v: int = 2) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, v, 3, 16, 16, generator=g)
        self.v = v

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"views": list(self.x[i]), "strategy": torch.arange(self.v) % 2,
                "crop": torch.arange(self.v), "label": i % 3}


def _fit(model, accumulate=1, batches=4, epochs=1, views=2):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accumulate_grad_batches=accumulate,
                        limit_train_batches=batches, limit_val_batches=0)
    trainer.fit(model, DataLoader(_Views(v=views), batch_size=8))
    return trainer


@pytest.mark.parametrize("method", ["byol", "simclr", "massrl"])
def test_each_method_trains_and_changes_the_backbone(method):
    torch.manual_seed(0)
    model = build_method(_cfg(method), num_classes=3)
    before = copy.deepcopy(model.backbone.state_dict())
    _fit(model)
    after = model.backbone.state_dict()
    changed = [k for k in before if before[k].dtype.is_floating_point
               and not torch.equal(before[k], after[k])]
    assert changed, "no backbone parameter moved"
    assert model.probe is not None and model.probe[-1].out_features == 3


def test_target_is_ema_and_not_trained_by_gradient():
    torch.manual_seed(0)
    # (tau 0.9: at 0.5, tau and 1 - tau are one number, and a swapped lerp weight passed)
    model = build_method(_cfg("byol", **{"loss.tau_base": 0.9}), num_classes=3)
    assert isinstance(model, BYOL)
    assert all(not p.requires_grad for p in model.target_parameters())
    target_before = [p.clone() for p in model.target_backbone.parameters()]
    online_before = [p.clone() for p in model.backbone.parameters()]
    _fit(model, batches=1)
    # one optimizer step, then target <- tau*target + (1-tau)*online_after, tau from the schedule
    tau = model.tau
    assert tau == pytest.approx(0.9)
    for tb, t, o in zip(target_before, model.target_backbone.parameters(),
                        model.backbone.parameters(), strict=True):
        assert torch.allclose(t, tau * tb + (1 - tau) * o, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(online_before, model.backbone.parameters(),
                                                      strict=True))


def test_ema_updates_once_per_optimizer_step_with_accumulation():
    model = build_method(_cfg("byol"), num_classes=3)
    calls = []
    original = model.ema_update
    model.ema_update = lambda tau: (calls.append(tau), original(tau))
    trainer = _fit(model, accumulate=2, batches=4)
    assert trainer.global_step == 2
    assert len(calls) == 2


def test_massrl_logs_cross_and_within_strategy_losses():
    model = build_method(_cfg("massrl", **{"augment.num_views": 4}), num_classes=3)
    assert isinstance(model, MASSRL)
    _fit(model, batches=1, views=4)
    # _Views gives strategies [0,1,0,1]: both kinds of pairs exist
    logged = model.trainer.logged_metrics
    assert "train/loss_cross_strategy_epoch" in logged
    assert "train/loss_within_strategy_epoch" in logged
    assert 0 <= float(logged["train/loss_cross_strategy_epoch"]) <= 4


def test_probe_ignores_unlabeled_images():
    model = build_method(_cfg("byol"), num_classes=3)
    feats = torch.randn(4, model.feat_dim)
    loss, acc = model._probe_step(feats, torch.full((4,), -1))
    # no labeled image: a zero loss that still reaches every probe parameter (under DDP each
    # rank's parameters must take part in the step), and no accuracy
    assert float(loss) == 0 and acc is None
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.probe.parameters())
    loss, acc = model._probe_step(feats, torch.tensor([0, -1, 2, -1]))
    assert float(loss) > 0 and 0 <= float(acc) <= 1
    # one labeled image (a batch of one): standardised by the running statistics, and learnt from
    before = model.probe[0].running_mean.clone()
    loss, acc = model._probe_step(feats, torch.tensor([-1, 1, -1, -1]))
    assert torch.isfinite(loss) and float(loss) > 0 and float(acc) in (0.0, 1.0)
    assert torch.equal(model.probe[0].running_mean, before)


def test_probe_learns_on_features_of_a_small_scale():
    """A young backbone's features have a std of a few hundredths around a common level: the
    probe standardises them, so that its lr moves it (a plain linear layer scored 15-65 % here
    after these 10 steps)."""
    torch.manual_seed(0)
    model = build_method(_cfg("byol"), num_classes=3)
    centres = torch.randn(3, model.feat_dim)
    labels = torch.arange(3).repeat(20)
    feats = 0.02 * (1 + 0.2 * centres[labels] + 0.5 * torch.randn(60, model.feat_dim))
    opt = torch.optim.SGD(model.probe.parameters(), lr=0.1, momentum=0.9)
    for _ in range(10):
        loss, _ = model._probe_step(feats, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert float((model.probe(feats).argmax(1) == labels).float().mean()) > 0.9


def test_a_resumed_fit_keeps_the_normalisation_of_its_data():
    """A resume may change data.mean/std: the model keeps the data it trains on now, which
    its next checkpoints record; a model loaded outside a fit takes the checkpoint's."""
    model = build_method(_cfg("byol"), num_classes=3)
    now = {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 16, "classes": None}
    model.normalization = dict(now)
    model.on_load_checkpoint({"massrl": {"data": {"mean": [0.3] * 3, "std": [0.4] * 3}}})
    assert model.normalization == now


def test_the_probe_standardiser_is_left_alone_by_sync_batchnorm():
    """Converted to SyncBatchNorm it would lose its warm start and wait in a collective for a
    rank whose batch held no labeled image."""
    model = build_method(_cfg("byol"), num_classes=3)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted.probe[0]).__name__ == "FeatureStandardiser"
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.backbone.modules())


def test_a_checkpoint_from_before_the_probe_standardiser_loads(capsys):
    model = build_method(_cfg("byol"), num_classes=3)
    state = {"state_dict": {k: v for k, v in model.state_dict().items()
                            if not k.startswith("probe.")}}
    old = torch.nn.Linear(model.feat_dim, 3)
    state["state_dict"].update({"probe.weight": old.weight, "probe.bias": old.bias})
    model.on_load_checkpoint(state)
    model.load_state_dict(state["state_dict"])  # (strict: every key in its place)
    assert torch.equal(model.probe[1].weight, old.weight)
    assert "predates" not in capsys.readouterr().out  # (no fit: nothing to say)


def test_a_resume_from_before_the_probe_standardiser_says_the_probe_restarts(capsys):
    """Its probe accuracy fell (16 % to 9 % in an old run's resume) without a word."""
    model = build_method(_cfg("byol"), num_classes=3)
    model.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    state = {"state_dict": {"probe.weight": torch.zeros(3, model.feat_dim),
                            "probe.bias": torch.zeros(3)}}
    model.on_load_checkpoint(state)
    assert "predates its feature standardiser" in capsys.readouterr().out


def test_checkpoint_holds_config_and_marker(tmp_path):
    model = build_method(_cfg("simclr"), num_classes=3)
    trainer = _fit(model, batches=1)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["method"] == "simclr"
    assert ckpt["massrl"]["backbone"]["width"] == 8
    assert any(k.startswith("backbone.") for k in ckpt["state_dict"])


def test_cpu_runs_leave_a_core_per_worker(monkeypatch):
    """Oversubscribed torch threads stall at every barrier: a CPU run takes cores - workers."""
    from massrl.train import set_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setattr("massrl.train.usable_cores", lambda: 8)
    try:
        set_cpu_threads(_cfg(**{"data.num_workers": 3, "trainer.accelerator": "cpu"}))
        assert torch.get_num_threads() == 5
        set_cpu_threads(_cfg(**{"data.num_workers": 3, "trainer.accelerator": "cpu",
                                "trainer.cpu_threads": 2}))
        assert torch.get_num_threads() == 2
        set_cpu_threads(_cfg(**{"data.num_workers": 0, "trainer.accelerator": "cpu"}))
        assert torch.get_num_threads() == 2  # no workers: left as it was
    finally:
        torch.set_num_threads(before)


def test_a_datamodule_gets_no_warning_about_the_modules_transfer_hooks():
    """The hooks are the module's on purpose; Lightning would warn about each with a datamodule."""
    import warnings

    from lightning.pytorch.trainer.connectors import data_connector

    model = build_method(_cfg())
    data_connector.warning_cache.clear()  # Lightning warns once per process
    with warnings.catch_warnings(record=True) as caught:
        selector = data_connector._DataHookSelector(model, L.LightningDataModule())
        for hook in ("on_before_batch_transfer", "on_after_batch_transfer"):
            assert selector.get_instance(hook) is model
    assert [str(w.message) for w in caught if "batch_transfer" in str(w.message)] == []
    # without massrl's filter the same call warns: the check above is not vacuous
    data_connector.warning_cache.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        selector.get_instance("on_before_batch_transfer")
    assert any("on_before_batch_transfer" in str(w.message) for w in caught)


def test_uint8_crops_without_an_augmenter_say_how_to_fix():
    """augment.backend=batched's crops reach a model that was given no augmenter."""
    model = build_method(_cfg(**{"augment.backend": "batched"}))
    model.trainer = L.Trainer(logger=False)  # (the hook asks the trainer whether it trains)
    batch = {"views": [torch.zeros(2, 3, 8, 8, dtype=torch.uint8)] * 2,
             "strategy": torch.zeros(2, 2, dtype=torch.long)}
    with pytest.raises(RuntimeError, match=r"no augmenter: .*model.use_data\(splits\)"):
        model.on_after_batch_transfer(batch, 0)


@pytest.mark.parametrize("method", ["byol", "simclr", "massrl"])
def test_trainer_compile_compiles_every_encoder_the_method_runs(method, monkeypatch):
    """The encoders carry the compute: BYOL/MASSRL's target encoder as well as the online one."""
    from massrl.train import compile_encoders

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model = build_method(_cfg(method), num_classes=3)
    compile_encoders(model)
    backbones = [m for name, m in model.named_children() if "backbone" in name]
    assert len(backbones) == (1 if method == "simclr" else 2)
    assert compiled == backbones


def test_bn_per_view_normalises_each_view_by_its_own_statistics():
    from massrl.methods.views import per_view

    bn = torch.nn.BatchNorm1d(4).train()
    x = torch.cat([torch.randn(8, 4), torch.randn(8, 4) * 5 + 3])  # two views, view-major
    separate = per_view(bn, x, 2, separately=True)
    assert torch.allclose(separate, torch.cat([bn(x[:8]), bn(x[8:])]))
    for view in separate.chunk(2):  # each view standardised on its own
        assert torch.allclose(view.mean(0), torch.zeros(4), atol=1e-5)
    assert not torch.allclose(per_view(bn, x, 2, separately=False), separate)


@pytest.mark.parametrize("method", ["byol", "simclr"])
def test_bn_per_view_runs_every_encoder_view_by_view(method):
    """model.bn_per_view: each encoder and head sees one view's batch at a time."""
    model = build_method(_cfg(method, **{"model.bn_per_view": "true"}), num_classes=3)
    sizes = []
    model.backbone.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    _fit(model, batches=1)
    assert sizes == [8, 8]  # a batch of 8 images, 2 views: two passes of 8, not one of 16


def test_bn_per_view_takes_a_batch_of_one_image_in_one_pass():
    """Batch norm cannot train on one value per channel: a batch shrunk to one image (the
    others undecodable, or data.batch_size=1) goes through in one pass, as without the flag."""
    from massrl.methods.views import per_view

    bn = torch.nn.BatchNorm1d(4).train()
    x = torch.randn(2, 4)  # two views of one image
    assert torch.allclose(per_view(bn, x, 2, separately=True), bn(x))


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, **kwargs)


@pytest.mark.parametrize(("limits", "expected"), [
    ({"max_epochs": -1, "max_steps": 10}, 10),  # max_steps alone: the run's length
    ({"max_epochs": 5, "max_steps": 6}, 6),     # max_steps ends the run first
    ({"max_epochs": 2, "max_steps": 100}, 8),   # 2 epochs of 4 steps end it first
])
@pytest.mark.parametrize("massrl_data", [True, False], ids=["SSLDataModule", "DataLoader"])
def test_the_lr_schedule_spans_the_trainers_run(limits, expected, massrl_data):
    """A Trainer(max_steps=...) in a loop of one's own (README's Python API): the cosine decay
    reaches its end at the last step, not after the first epoch (with massrl's datamodule it
    used to, leaving the lr at 0 for the rest of the run)."""
    cfg = _cfg("byol", **{"data.name": "digits", "data.subset": 32, "data.num_workers": 0,
                          "data.image_size": 16, "eval.knn_every": 0})
    model = build_method(cfg, num_classes=10)
    lrs = []
    original = model.after_optimizer_step
    model.after_optimizer_step = lambda skipped: (
        lrs.append(model.trainer.optimizers[0].param_groups[0]["lr"]), original(skipped))
    trainer = _trainer(limit_train_batches=4, **limits)
    if massrl_data:  # 32 images at batch 8: 4 steps an epoch
        trainer.fit(model, datamodule=SSLDataModule(cfg))
    else:
        trainer.fit(model, DataLoader(_Views(), batch_size=8))
    assert model.total_steps() == expected == len(lrs)
    assert all(lr > 0 for lr in lrs) and lrs == sorted(lrs, reverse=True)
    assert model.tau < model.cfg.loss.tau_final


def test_an_endless_trainer_is_told_the_schedule_needs_a_length():
    model = build_method(_cfg("byol"), num_classes=3)
    with pytest.raises(ConfigError, match="max_epochs or max_steps"):
        _trainer(max_epochs=-1).fit(model, DataLoader(_Views(), batch_size=8))


def test_gradient_clipping_leaves_the_online_probe_out():
    """The probe is a monitor: with gradient_clip_val set, its gradient must not shrink the
    backbone's steps (it was in the clipped norm), so training is the same without it."""
    torch.manual_seed(0)
    with_probe = build_method(_cfg("byol"), num_classes=3)
    without = build_method(_cfg("byol", **{"eval.probe": False}), num_classes=3)
    without.load_state_dict({k: v for k, v in with_probe.state_dict().items()
                             if not k.startswith("probe.")})
    start = copy.deepcopy(without.backbone)
    for model in (with_probe, without):
        _trainer(max_epochs=1, limit_train_batches=3, gradient_clip_val=0.05).fit(
            model, DataLoader(_Views(), batch_size=8))
    assert not torch.equal(start.conv1.weight, without.backbone.conv1.weight)
    for a, b in zip(with_probe.backbone.parameters(), without.backbone.parameters(),
                    strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("init_scale", [2.0**60, 1.0], ids=["overflows", "finite"])
def test_a_step_the_grad_scaler_skips_leaves_the_ema_target_alone(init_scale):
    """16-mixed: the GradScaler skips a step whose scaled gradients overflow; BYOL's target must
    not move towards the (unchanged) online network then. (Lightning turns 16-mixed on a CPU
    into bf16, so the plugin is given by hand; float16 autocast runs on CPUs too.)"""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    model = build_method(_cfg("byol", **{"loss.tau_base": 0.5, "eval.probe": False}),
                         num_classes=3)
    with torch.no_grad():  # a target unlike the online network, so that an EMA step shows
        for p in model.target_parameters():
            p.add_(torch.randn_like(p))
    target = [p.clone() for p in model.target_parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    _trainer(max_epochs=1, limit_train_batches=1,
             plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(
        model, DataLoader(_Views(), batch_size=8))
    moved = any(not torch.equal(a, b) for a, b in zip(target, model.target_parameters(),
                                                       strict=True))
    if init_scale > 1:
        assert scaler.get_scale() < init_scale, "the step did not overflow: the test is void"
        assert not moved
    else:
        assert scaler.get_scale() == init_scale and moved


@pytest.mark.parametrize("skip", [False, True])
def test_a_finite_loss_with_a_non_finite_gradient_is_not_stepped(skip):
    """The weights would turn NaN, and the next loss say so only after a checkpoint may have
    kept them: the step is refused (or skipped, trainer.skip_nonfinite) before the optimizer."""
    from massrl.resilience import NonFiniteLossError

    torch.manual_seed(0)
    model = build_method(_cfg("byol", **{"trainer.skip_nonfinite": skip}), num_classes=3)
    first = next(model.backbone.parameters())
    first.register_hook(lambda g: g * float("inf"))  # finite loss, inf/NaN gradient
    before = copy.deepcopy(model.state_dict())
    trainer = _trainer(max_epochs=1, limit_train_batches=2)
    if not skip:
        with pytest.raises(NonFiniteLossError, match="gradient became NaN/inf at optimizer step 0"):
            trainer.fit(model, DataLoader(_Views(), batch_size=8))
    else:  # (both steps of the epoch skipped: the run stops at its end, no longer learning)
        with pytest.raises(NonFiniteLossError, match="the last 2 optimizer steps, to the end of "
                                                     "epoch 1, were all skipped"):
            trainer.fit(model, DataLoader(_Views(), batch_size=8))
        assert model.skipped_nonfinite_steps == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before
               if "running" not in k and "num_batches" not in k)


def test_the_lr_decays_to_min_lr_ratio_of_its_peak_and_the_probes_stays():
    cfg = _cfg("byol", **{"optimizer.min_lr_ratio": 0.25})
    model = build_method(cfg, num_classes=3)
    lrs = []
    original = model.after_optimizer_step
    model.after_optimizer_step = lambda skipped: (
        lrs.append(model.trainer.optimizers[0].param_groups[0]["lr"]), original(skipped))
    _trainer(max_epochs=1, limit_train_batches=4).fit(model, DataLoader(_Views(), batch_size=8))
    groups = model.trainer.optimizers[0].param_groups
    assert len(lrs) == 4 and lrs == sorted(lrs, reverse=True)  # (no warm-up: lrs[0] = peak)
    assert groups[0]["lr"] == pytest.approx(0.25 * lrs[0])  # where the schedule ends
    assert groups[-1]["lr"] == cfg.eval.probe_lr


def test_skipped_steps_are_counted_once_whichever_check_found_them():
    """A NaN loss (step 0) and NaN/inf gradients of finite losses (steps 1, 2) in one epoch:
    three skipped steps (two log calls from two hooks overwrote each other's count)."""
    from massrl.resilience import gradients_finite

    torch.manual_seed(0)
    model = build_method(_cfg("byol", **{"trainer.skip_nonfinite": True}), num_classes=3)
    step = {"n": 0}
    ssl_step = model.ssl_step

    def nan_first(batch):
        out = ssl_step(batch)
        step["n"] += 1
        if step["n"] == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    model.ssl_step = nan_first
    next(model.backbone.parameters()).register_hook(
        lambda g: g * float("inf") if step["n"] in (2, 3) else g)
    trainer = _trainer(max_epochs=1, limit_train_batches=4)
    trainer.fit(model, DataLoader(_Views(), batch_size=8))
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 3
    assert model.skipped_nonfinite_steps == 3
    # (a parameter of no elements: its infinity norm would raise)
    assert gradients_finite(([torch.ones(3), torch.empty(0)], [])) == (True, True)
    assert gradients_finite(([torch.ones(3)], [torch.tensor([float("nan")])])) == (True, False)


def test_a_skipped_accumulation_window_keeps_the_batch_norm_statistics_of_its_start():
    """An inf gradient from the window's first micro-batch skips the window's step; the
    statistics go back to before the window, not to before its last micro-batch."""
    torch.manual_seed(0)
    model = build_method(_cfg("byol", **{"trainer.skip_nonfinite": True}), num_classes=3)
    calls = {"n": 0}

    def first_only(g):
        calls["n"] += 1
        return g * float("inf") if calls["n"] == 1 else g

    next(model.backbone.parameters()).register_hook(first_only)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _fit(model, accumulate=2, batches=2)  # (one step skipped: no divergence, goes on)
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if not torch.equal(before[k], after[k])][:3]


def test_settings_a_method_does_not_use_are_named(capsys):
    """loss.temperature under BYOL, loss.tau_* under SimCLR: accepted, changing nothing,
    without a word. The shipped configs set none."""
    from massrl.config import PACKAGE_CONFIGS
    from massrl.methods import METHODS

    simclr = build_config(config_file="fashion_mnist/simclr",
                          overrides=["loss.tau_base=0.5", "model.pred_hidden_dim=64"])
    assert METHODS["simclr"].ignored_settings(simclr) == ["model.pred_hidden_dim=64",
                                                          "loss.tau_base=0.5"]
    byol = build_config(config_file="fashion_mnist/byol", overrides=["loss.temperature=0.05"])
    assert METHODS["byol"].ignored_settings(byol) == ["loss.temperature=0.05"]
    for path in PACKAGE_CONFIGS.rglob("*.yaml"):
        cfg = build_config(config_file=path)
        assert METHODS[cfg.method].ignored_settings(cfg) == [], path


def _batch(b=6, v=2, size=16):
    g = torch.Generator().manual_seed(0)
    return {"views": [torch.randn(b, 3, size, size, generator=g) for _ in range(v)],
            "strategy": torch.arange(v).expand(b, v) % 2, "crop": torch.arange(v).expand(b, v),
            "label": torch.zeros(b, dtype=torch.long)}


def test_tau_follows_the_configured_final_value():
    model = build_method(_cfg("byol", **{"loss.tau_base": 0.5, "loss.tau_final": 0.95}),
                         num_classes=3)
    _fit(model, batches=4)
    # the last of 4 optimizer steps sets tau at step index 3 of 4
    assert model.tau == pytest.approx(cosine_tau(3, 4, 0.5, 0.95))


def test_target_batch_norm_statistics_are_the_online_ones_after_a_step():
    torch.manual_seed(0)
    model = build_method(_cfg("byol"), num_classes=3)
    _fit(model, batches=2)
    for online, target in ((model.backbone, model.target_backbone),
                           (model.projector, model.target_projector)):
        for a, b in zip(online.buffers(), target.buffers(), strict=True):
            assert torch.equal(a, b)


def test_byol_loss_is_predictor_of_online_vs_target_projection_of_the_same_image():
    """Reference written from the paper: p = q(g(f(x))), z' = g'(f'(x)); loss over the two
    ordered view pairs of each image. Catches a target that runs the online encoder, a skipped
    predictor and views paired across images."""
    torch.manual_seed(0)
    model = build_method(_cfg("byol"), num_classes=3).eval()
    with torch.no_grad():  # make target differ from online, as after training
        for p in [*model.target_backbone.parameters(), *model.target_projector.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    batch = _batch()
    loss = model.ssl_step(batch)["loss"]
    x = torch.cat(batch["views"])
    with torch.no_grad():
        p = model.predictor(model.projector(model.backbone(x))).chunk(2)
        t = model.target_projector(model.target_backbone(x)).chunk(2)
    cos = lambda a, b: (2 - 2 * F.cosine_similarity(a, b, dim=-1)).mean()  # noqa: E731
    expected = (cos(p[0], t[1]) + cos(p[1], t[0])) / 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_warmup_epochs_are_epochs_of_optimizer_steps():
    model = build_method(_cfg("byol", **{"optimizer.warmup_epochs": 1}), num_classes=3)
    lrs = []
    original = model.after_optimizer_step
    model.after_optimizer_step = lambda skipped: (
        lrs.append(model.trainer.optimizers[0].param_groups[0]["lr"]), original(skipped))
    _trainer(max_epochs=2, limit_train_batches=4).fit(model, DataLoader(_Views(), batch_size=8))
    assert lrs[0] == pytest.approx(lrs[3] / 4) and lrs[1] == pytest.approx(lrs[3] / 2)


def test_the_lr_scales_with_the_accumulated_global_batch():
    model = build_method(_cfg("byol", **{"optimizer.lr": 0.3}), num_classes=3)
    _fit(model, accumulate=2, batches=4)
    assert model.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(
        0.3 * 16 / 256)


def test_simclr_uses_the_configured_temperature():
    from massrl.losses import nt_xent
    torch.manual_seed(0)
    model = build_method(_cfg("simclr", **{"loss.temperature": 0.1}), num_classes=3).eval()
    model._trainer = type("T", (), {"world_size": 1})()  # ssl_step reads world_size only
    batch = _batch()
    loss = model.ssl_step(batch)["loss"]
    with torch.no_grad():
        z = model.projector(model.backbone(torch.cat(batch["views"])))
        z = z.reshape(2, -1, z.shape[-1]).transpose(0, 1)
    torch.testing.assert_close(loss.detach(), nt_xent(z, model.pair_mask(batch), 0.1))


class _HostReads(TorchDispatchMode):
    """The aten ops of a block that need tensor values on the host (on a GPU each waits for the
    device to finish all it was given): item / bool(), nonzero, boolean selection."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in ("_local_scalar_dense", "nonzero", "masked_select") or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["byol", "simclr", "massrl"])
def test_a_training_step_reads_the_device_few_times(method, monkeypatch):
    """Counted on the CPU (reads through item/bool, nonzero, boolean indexing and tolist; not
    copies to the CPU or torch.equal): an H200 run counted 14 waits for the device per massrl
    step (the loss checked twice, the probe's selection of labeled images 4, the per-kind loss
    logs 4, ...); now the loss is read once, a fully labeled batch once for the probe, the
    kinds once."""
    reads = _HostReads()
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        reads.seen.append("tolist")
        return real_tolist(self)

    def counted(self, batch, idx):
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        try:
            with reads:
                return real(self, batch, idx)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)

    cls = type(build_method(_cfg(method), num_classes=3))
    real = cls.training_step
    monkeypatch.setattr(cls, "training_step", counted)
    torch.manual_seed(0)
    _fit(build_method(_cfg(method), num_classes=3), batches=2)
    per_step = len(reads.seen) / 2
    # the loss's finiteness and the probe's labels (and, for BYOL-style pairs, the selection
    # of pairs; for massrl its two per-kind logs in one read)
    assert per_step == {"byol": 3, "simclr": 3, "massrl": 4}[method], reads.seen
