"""A diverged model is said by name where it shows: in a run's validation, a resume and every
evaluation (they scored its NaN features 0.00 % with exit code 0, and a run saved its NaN model as
'best' before stopping, saying the earlier checkpoints were kept)."""

import json
from pathlib import Path

import pytest
import torch
from test_eval_commands import make_checkpoint

from massrl.cli import main


def _byol(tiny, **extra: str) -> list[str]:
    return ["-c", "fashion_mnist/byol", *tiny("byol", **extra)]


def _out(args: list[str]) -> Path:
    return Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])


def _damaged(path: Path, scale: float | None = None) -> Path:
    """A checkpoint whose first conv's weights are NaN, or (scale) finite but huge."""
    ckpt = torch.load(path, weights_only=False)
    key = next(k for k in ckpt["state_dict"] if k.startswith("backbone.") and "conv" in k)
    weight = ckpt["state_dict"][key]
    if scale is None:
        weight.view(-1)[0] = float("nan")
    else:
        weight.mul_(scale)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("command", ["knn", "linear", "umap", "export"])
def test_an_evaluation_of_nan_weights_names_them(tmp_path, command, capsys):
    ckpt = _damaged(make_checkpoint(tmp_path / "nan.ckpt"))
    out = tmp_path / command
    args = [command, f"ckpt={ckpt}", f"output_dir={out}", "device=cpu"]
    if command != "export":
        args.append(f"cache_dir={tmp_path / 'cache'}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "hold NaN/inf (first: conv1.weight)" in err and "earlier checkpoint" in err
    assert not (out / "result.json").exists() and not list(out.glob("*.pt"))


def test_an_evaluation_of_weights_that_overflow_names_the_features(tmp_path, capsys):
    ckpt = _damaged(make_checkpoint(tmp_path / "huge.ckpt"), scale=1e38)
    assert main(["knn", f"ckpt={ckpt}", f"output_dir={tmp_path / 'knn'}", "device=cpu",
                 f"cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert "gives NaN/inf features for" in err and "train images" in err


def test_nan_features_in_a_validation_stop_the_run_before_its_checkpoints(tiny, monkeypatch,
                                                                         capsys):
    from massrl.methods.monitors import OnlineMonitors

    real = OnlineMonitors.validation_step

    def nan_in_the_second_epoch(self, batch, batch_idx, dataloader_idx=0):
        real(self, batch, batch_idx, dataloader_idx)
        if self.current_epoch == 1 and not self.trainer.sanity_checking:
            self._val_outputs[dataloader_idx][-1][0][0] = float("nan")

    monkeypatch.setattr(OnlineMonitors, "validation_step", nan_in_the_second_epoch)
    args = _byol(tiny, **{"trainer.max_epochs": "3"})
    assert main(["pretrain", *args]) == 1
    err = capsys.readouterr().err
    assert "features became NaN/inf in the validation after epoch 2 (optimizer step 8)" in err
    checkpoints = _out(args) / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 4
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-knn-0.ckpt", "last.ckpt"]


def test_nan_features_after_training_or_with_step_checkpoints_say_what_last_ckpt_holds(
        tiny, monkeypatch, capsys):
    """The validation after training (eval.knn_every left the last epoch out) found last.ckpt
    saved already, and step checkpoints may be newer than the last validation: "stopped
    without saving this epoch's checkpoints" was not true there."""
    from lightning.pytorch.trainer.states import TrainerFn

    from massrl.methods.monitors import OnlineMonitors

    real = OnlineMonitors.validation_step

    def nan_after_fit(self, batch, batch_idx, dataloader_idx=0):
        real(self, batch, batch_idx, dataloader_idx)
        if self.trainer.state.fn == TrainerFn.VALIDATING:
            self._val_outputs[dataloader_idx][-1][0][0] = float("nan")

    monkeypatch.setattr(OnlineMonitors, "validation_step", nan_after_fit)
    args = _byol(tiny, **{"trainer.max_epochs": "3", "eval.knn_every": "2"})
    assert main(["pretrain", *args]) == 1
    err = capsys.readouterr().err
    assert "in the validation after training (optimizer step 12)" in err
    assert "checkpoints/last.ckpt holds this final model" in err
    from massrl.resilience import check_validation_features

    with pytest.raises(Exception, match="one saved by trainer.checkpoint_every_n_steps"):
        check_validation_features([torch.full((2, 3), float("nan"))], 2, 8, saved_by_step=True)
    with pytest.raises(Exception, match=r"holds this final model\. Usual"):  # (no best saved)
        check_validation_features([torch.full((2, 3), float("nan"))], 2, 8, after_fit=True,
                                  best_saved=False)


def test_a_resume_from_nan_weights_names_them_not_the_learning_rate(tiny, capsys):
    args = _byol(tiny)
    assert main(["pretrain", *args]) == 0
    summary = (_out(args) / "summary.json").read_text()
    _damaged(_out(args) / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    assert main(["pretrain", *args, "trainer.max_epochs=2", "resume=auto"]) == 2
    err = capsys.readouterr().err
    assert "its weights hold NaN/inf (first: backbone." in err and "output_dir=<new" in err
    assert (_out(args) / "summary.json").read_text() == summary
    assert json.loads(summary)["epochs"] == 1


def test_skipped_steps_are_said_counted_and_an_epoch_of_nothing_but_skips_stops(tiny, monkeypatch,
                                                                              capsys):
    """trainer.skip_nonfinite=true skipped every step of a run, which exited 0 with kNN 0.00 %
    and no word (the count was in metrics.csv only); images_seen counted gradient-skipped
    steps' images but not loss-skipped ones'."""
    import massrl.methods.byol as byol

    real, calls = byol.byol_per_pair, {"n": 0, "bad": {2}}

    def nan_on_some(p, z):
        calls["n"] += 1
        loss = real(p, z)
        return loss * float("nan") if calls["n"] in calls["bad"] else loss

    monkeypatch.setattr(byol, "byol_per_pair", nan_on_some)
    args = _byol(tiny, **{"trainer.skip_nonfinite": "true"})
    assert main(["pretrain", *args]) == 0
    out = capsys.readouterr().out
    assert "note: 1 of 4 optimizer steps of epoch 1 were skipped for a NaN/inf loss" in out
    assert "skipped_nonfinite_steps" in out  # (the table shows it where there were some)
    summary = json.loads((_out(args) / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == 1 and summary["images_seen"] == 3 * 32

    calls["n"], calls["bad"] = 0, set(range(1, 100))
    args = _byol(tiny, **{"trainer.skip_nonfinite": "true", "output_dir": str(_out(args)) + "2"})
    assert main(["pretrain", *args]) == 1
    err = capsys.readouterr().err
    assert "the last 4 optimizer steps, to the end of epoch 1, were all skipped" in err
    assert "no longer learns" in err


def test_a_diverging_online_probe_restarts_and_pre_training_goes_on(tiny, capsys):
    """Its NaN gradient stopped the run blaming optimizer.lr (with skip_nonfinite: skipped every
    step); the probe is a monitor."""
    args = _byol(tiny, **{"eval.probe_lr": "1e38", "trainer.max_epochs": "2",
                          "optimizer.name": "sgd"})
    assert main(["pretrain", *args]) == 0
    out = capsys.readouterr().out
    assert "note: the online probe's gradient became NaN/inf at optimizer step" in out
    assert "eval.probe_lr (now 1e+38)" in out
    summary = json.loads((_out(args) / "summary.json").read_text())
    assert summary["images_seen"] == 2 * 4 * 32 and summary["skipped_nonfinite_steps"] == 0
    state = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())


def test_a_diverging_linear_or_fine_tuning_stops_naming_its_lr(tmp_path, capsys):
    """It trained on to the last epoch at loss nan and reported its best epoch, exit code 0;
    now exit 1, as pre-training's NaN loss (it was 2, the status of a refused input)."""
    ckpt = make_checkpoint(tmp_path / "tiny.ckpt")
    common = [f"ckpt={ckpt}", "device=cpu", "epochs=3", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["linear", *common, "features_cached=true", "lr=1e38",
                 f"output_dir={tmp_path / 'lin'}"]) == 1
    err = capsys.readouterr().err
    assert "the loss became" in err and "training diverged" in err and "lr (now 1e+38)" in err
    assert not (tmp_path / "lin" / "result.json").exists()
    assert main(["linear", *common, "finetune=true", "label_fraction=0.5", "lr=1e38",
                 "backbone_lr=0.1", "data.eval_subset=100", f"output_dir={tmp_path / 'ft'}"]) == 1
    assert "lr (now 1e+38) or backbone_lr (now 0.1)" in capsys.readouterr().err


def test_a_frozen_linear_head_trains_on_batches_of_one(tmp_path, capsys):
    """batch_size=1 skipped every batch (loss 0.0000, chance accuracy): only fine-tuning's
    batch-norm cannot train on one image."""
    ckpt = make_checkpoint(tmp_path / "tiny.ckpt")
    assert main(["linear", f"ckpt={ckpt}", "device=cpu", "epochs=1", "batch_size=1",
                 "features_cached=true", "data.eval_subset=50", f"cache_dir={tmp_path / 'c'}",
                 f"output_dir={tmp_path / 'lin'}"]) == 0
    result = json.loads((tmp_path / "lin" / "result.json").read_text())
    assert result["results"]["history"][0]["loss"] > 0


def test_records_write_nan_as_null():
    from massrl.files import json_text

    assert json.loads(json_text({"loss": float("nan"), "x": [1.0, float("inf")], "n": 2})) == \
        {"loss": None, "x": [1.0, None], "n": 2}


@pytest.mark.parametrize("sixteen_mixed", [False, True])
def test_a_diverging_probe_restarts_also_under_a_grad_scaler(sixteen_mixed):
    """Under 16-mixed the probe's NaN gradient made the GradScaler skip every later step (the
    model froze, exit 0): the probe restarts there too, and the model trains on."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision
    from test_methods import _cfg, _Views
    from torch.utils.data import DataLoader

    from massrl.methods import build_method

    torch.manual_seed(0)
    model = build_method(_cfg("byol", **{"eval.probe_lr": 1e38, "optimizer.name": "sgd"}),
                         num_classes=3)
    before = next(model.backbone.parameters()).detach().clone()
    plugins = [MixedPrecision("16-mixed", "cpu")] if sixteen_mixed else []
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, plugins=plugins,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DataLoader(_Views(), batch_size=8))
    assert not torch.equal(next(model.backbone.parameters()), before)
    if sixteen_mixed:  # (a scale halved at every skipped step: 65536 after 8 steps taken)
        assert trainer.precision_plugin.scaler.get_scale() >= 2.0 ** 14
    assert all(torch.isfinite(p).all() for p in model.probe.parameters())
