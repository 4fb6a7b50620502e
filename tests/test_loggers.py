"""Weights & Biases logging (wandb.enabled=true), offline: the run's metrics reach it, a resumed
run continues the same W&B run, and a missing wandb package is explained."""

import json
import os
from pathlib import Path

import pytest
from conftest import run_python
from lightning.pytorch.loggers import WandbLogger

from massrl.cli import main


def _out(args: list[str]) -> Path:
    return Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])


def test_wandb_gets_the_metrics_and_a_resume_continues_its_run(tiny, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")  # (no network; `wandb sync` uploads later)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[tuple[str, dict]] = []
    log_metrics = WandbLogger.log_metrics

    def spy(self, metrics, step=None):
        logged.append((self.experiment.id, dict(metrics)))
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_metrics", spy)
    args = tiny("byol", **{"wandb.enabled": "true", "wandb.tags": "[ci]",
                           "trainer.log_every_n_steps": "1"})
    assert main(["pretrain", *args]) == 0
    out = _out(args)
    run_id = (out / "wandb_run_id").read_text().strip()
    assert {i for i, _ in logged} == {run_id}
    names = set().union(*(m for _, m in logged))
    assert {"train/loss_step", "val/knn_top1"} <= names
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    # the run directory is still what the command prints last
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run directory: {out}"

    logged.clear()
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2"]) == 0
    assert logged and {i for i, _ in logged} == {run_id}  # the same W&B run, continued
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


@pytest.mark.parametrize(("key", "module", "said"), [
    ("wandb.enabled=true", "wandb", "wandb.enabled=true needs the wandb package: pip install wandb "
                                    "(or pip install 'massrl[wandb]')"),
    ("eval.umap_every=1", "umap", "eval.umap_every=1 needs the umap-learn package: pip install "
                                  "umap-learn (or pip install 'massrl[umap]')"),
])
def test_a_missing_extra_is_said_before_the_run_starts(tiny, monkeypatch, capsys, key, module,
                                                       said):
    """Not at the first UMAP picture, an epoch into the run (a traceback, nothing saved)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    args = tiny("byol")
    assert main(["pretrain", *args, key]) == 2
    assert said in capsys.readouterr().err
    assert not _out(args).exists()  # no run directory left behind


def test_lightning_advert_is_dropped_and_other_notices_stay():
    import logging

    import lightning as L
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from massrl.loggers import hide_lightning_adverts

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(handler)
    try:
        hide_lightning_adverts()
        hide_lightning_adverts()  # idempotent
        L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  accelerator="cpu")
        rank_zero_info("a notice about the run")
        # lines that repeat massrl's own (the fit's end drew the live bar twice)
        rank_zero_info("`Trainer.fit` stopped: `max_epochs=1` reached.")
        rank_zero_info("Restoring states from the checkpoint path at /r/last.ckpt")
        rank_zero_info("Restored all states from the checkpoint at /r/last.ckpt")
    finally:
        log.removeHandler(handler)
    assert not any("litlogger" in m for m in seen)
    assert seen[-1] == "a notice about the run"
    assert any("GPU available" in m for m in seen)
    assert sum(type(f).__name__ == "_NoAdverts" for f in log.filters) == 1


def test_progress_written_to_a_file_is_one_line_per_epoch(tiny, capsys):
    """A batch job's log (stdout not a terminal) gets a line per epoch, not a live bar that
    shows nothing until the end."""
    args = tiny("byol", **{"trainer.progress_bar": "true", "trainer.max_epochs": "2"})
    assert main(["pretrain", "-c", "fashion_mnist/byol", *args]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("train/loss " in line and " images/s" in line for line in lines)
    assert all("val/knn_top1 " in line and "val/probe_top1 " in line for line in lines)


def test_data_whose_path_is_not_utf8_trains_and_logs_its_hyperparameters(tiny, tmp_path,
                                                                         capsys, monkeypatch):
    """Linux names are bytes: a data.root named in Latin-1 crashed TensorBoard's
    hyper-parameter record (protobuf strings must be UTF-8) at the start of training. An
    output_dir so named, under which TensorBoard cannot even open its file, is refused."""
    import os

    from conftest import class_folder

    from massrl.loggers import utf8_safe

    root = class_folder(tmp_path / os.fsdecode(b"caf\xe9"))
    args = [*tiny("byol"), "data.name=folder", f"data.root={root}", "data.subset=null",
            "data.eval_subset=null"]
    assert main(["pretrain", *args]) == 0
    out = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    assert list((out / "tensorboard").glob("events.*"))
    assert utf8_safe({"root": os.fsdecode(b"/d\xff"), "n": [1, "x"]}) == \
        {"root": "/d\\xff", "n": [1, "x"]}
    monkeypatch.chdir(tmp_path)  # (runs/<name> without output_dir)
    for where in (f"output_dir={root}", "name=" + os.fsdecode(b"r\xe9")):
        capsys.readouterr()
        args = [a for a in tiny("byol") if not a.startswith("output_dir=")]
        assert main(["pretrain", *args, where]) == 2
        assert "is not a UTF-8 name, under which TensorBoard cannot write" in \
            " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "runs").exists()


def test_the_live_bar_counts_epochs_from_one_as_the_other_outputs_do():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar

    from massrl.loggers import EpochBar

    # (the override replaces Lightning's own description: its name must still be Lightning's)
    assert "_get_train_description" in vars(RichProgressBar)
    bar = EpochBar()
    bar._trainer = SimpleNamespace(max_epochs=2)
    assert bar._get_train_description(0).strip() == "Epoch 1/2"
    assert bar._get_train_description(1).strip() == "Epoch 2/2"


def test_an_online_wandb_run_without_credentials_is_refused_before_it_starts(
        tiny, monkeypatch, tmp_path, capsys):
    """wandb raised its UsageError at the first log, inside training: a traceback, and a run
    folder left holding its lock and config."""
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.netrc, no settings file)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    args = tiny("byol", **{"wandb.enabled": "true"})
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    assert "wandb.enabled=true: no W&B credentials" in err and "WANDB_MODE=offline" in err
    assert "Traceback" not in err and not _out(args).exists()
    # a malformed key: W&B's refusal, in one line (review: a traceback, exit 1). (A process of
    # its own: wandb keeps the credentials it read first for the process's life.)
    code = ("from massrl.config import ConfigError\nfrom massrl.loggers import check_wandb_login\n"
            "try:\n    check_wandb_login()\nexcept ConfigError as exc:\n    print(exc)\n")
    refused = run_python(code, env={**os.environ, "WANDB_API_KEY": "abc"}).stdout
    assert refused.startswith("wandb.enabled=true: W&B refused the credentials here"), refused
    # `wandb offline` in the working folder is W&B's own switch: the run starts (review)
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    monkeypatch.chdir(tmp_path)
    from massrl.loggers import check_wandb_login

    check_wandb_login()  # (no refusal)
    # ...unless WANDB_MODE=online overrides it, as it does for W&B (review 2)
    monkeypatch.setenv("WANDB_MODE", "online")
    from massrl.config import ConfigError

    with pytest.raises(ConfigError, match="no W&B credentials"):
        check_wandb_login()
    # a WANDB_* variable W&B cannot read: one line, not pydantic's traceback (review 3)
    monkeypatch.setenv("WANDB_SILENT", "maybe")
    with pytest.raises(ConfigError, match=r"W&B's settings \(WANDB_\* variables"):
        check_wandb_login()

