"""Runs that survive interruption: atomic checkpoints, SIGKILL/SIGTERM and resume, NaN losses,
and resuming with a changed config."""

import csv
import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_python

from massrl.cli import main
from massrl.resilience import AtomicCheckpointIO, CheckpointWriteError

# 256 digits, batch 32 -> 8 optimizer steps per epoch, 2 epochs; last.ckpt every 3 steps
RUN = {"data.subset": "256", "trainer.max_epochs": "2", "trainer.checkpoint_every_n_steps": "3"}

# A subprocess that runs `massrl` and sends itself a signal right after optimizer step KILL_AT.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # as in this test process: the same float reduction order
    from lightning.pytorch.callbacks import Callback
    import massrl.train as train

    class Kill(Callback):
        # KILL_AT: after optimizer step N; KILL_BATCH: after training batch N (of the run);
        # KILL_IN_VAL: at the first validation batch of epoch N
        def kill(self):
            rank = os.environ.get("KILL_RANK")  # only this DDP rank is signalled
            if rank is not None and int(os.environ.get("LOCAL_RANK", 0)) != int(rank):
                return
            sig = getattr(signal, os.environ["KILL_SIGNAL"])
            for _ in range(2 if os.environ.get("KILL_TWICE") else 1):
                if os.environ.get("KILL_GROUP"):  # as a terminal's Ctrl-C: workers get it too
                    os.killpg(os.getpgid(0), sig)
                else:
                    os.kill(os.getpid(), sig)

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == int(os.environ.get("KILL_AT", -1)):
                self.kill()
            if trainer.fit_loop.total_batch_idx + 1 == int(os.environ.get("KILL_BATCH", -1)):
                self.kill()

        def on_validation_batch_end(self, trainer, *args):
            if trainer.current_epoch == int(os.environ.get("KILL_IN_VAL", -1)):
                self.kill()

    build = train.build_trainer
    def patched(*a, **k):
        trainer, parts = build(*a, **k)
        trainer.callbacks.insert(0, Kill())
        return trainer, parts
    train.build_trainer = patched
    if os.environ.get("KILL_API"):  # a script of one's own: pretrain() without sys.exit
        from massrl.config import build_config
        args = sys.argv[1:]  # pretrain -c CONFIG OVERRIDES...
        train.pretrain(build_config(config_file=args[2], overrides=args[3:]))
    else:
        from massrl.cli import main
        sys.exit(main(sys.argv[1:]))
""")


def _interrupted(args: list[str], at: int | None, sig: str, **env_extra: str
                 ) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": str(at if at is not None else -1), "KILL_SIGNAL": sig,
           **env_extra}
    return subprocess.run([sys.executable, "-c", KILLER, "pretrain", *args], env=env,
                          capture_output=True, text=True, timeout=600, start_new_session=True)


def _byol(tiny, **extra: str) -> list[str]:
    return ["-c", "fashion_mnist/byol", *tiny("byol", **extra)]


def _backbone(run_dir: Path) -> dict:
    sd = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith(("backbone.", "target_backbone."))}


def _assert_same_backbones(reference: Path, run: Path, what: str = "") -> None:
    """The online and target backbones of two runs' last.ckpt agree (on the CPU with one thread
    a resumed run is bit-identical; the tolerance allows for other float orders)."""
    ref, res = _backbone(reference), _backbone(run)
    for k in ref:
        if ref[k].dtype.is_floating_point:
            assert torch.allclose(ref[k], res[k], atol=1e-6), (what, k)


def _continue_command(stderr: str, said: str) -> list[str]:
    """The arguments of the `massrl pretrain ...` command a stopped run printed after `said`."""
    line = next(line for line in stderr.splitlines() if said in line)
    return shlex.split(line.split(said, 1)[1].removeprefix("massrl pretrain "))


def _tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps of a scalar as TensorBoard shows it, over all of the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def _out(args: list[str]) -> Path:
    return Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tiny):
    reference = _byol(tiny, **RUN)
    assert main(["pretrain", *reference]) == 0
    ref_dir = _out(reference)
    # the step and epoch-end saves share one last.ckpt, the newest (no last-v1.ckpt beside it)
    assert [p.name for p in (ref_dir / "checkpoints").glob("last*")] == ["last.ckpt"]
    last = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 16

    args = _byol(tiny, **RUN, output_dir=str(ref_dir.parent / "killed"))
    killed = _interrupted(args, at=11, sig="SIGKILL")  # epoch 1, mid-epoch; last save at step 9
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 9
    assert main(["pretrain", *args, "resume=auto"]) == 0

    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    summary = json.loads((_out(args) / "summary.json").read_text())
    # the resumed run saw the same images with the same views, in the same order, and the
    # sampler position, optimizer, scheduler, EMA and RNG states were restored: on the CPU with
    # one thread the result is bit-identical (the tolerance allows for other float orders)
    assert summary["images_seen"] == ref_summary["images_seen"] == 512
    # the resumed session's clock and speed: from the restored step on (7 steps of 32 images)
    assert 0 < summary["train_seconds"] <= summary["wall_seconds"]
    assert summary["images_per_s"] * summary["train_seconds"] == pytest.approx(224, rel=0.01)
    with open(_out(args) / "metrics.csv") as f:
        epoch_seconds = [float(row["throughput/epoch_seconds"]) for row in csv.DictReader(f)
                         if row["throughput/epoch_seconds"]]
    assert epoch_seconds and all(0 < t <= summary["wall_seconds"] for t in epoch_seconds)
    assert summary["knn_top1"] == pytest.approx(ref_summary["knn_top1"], abs=1e-6)
    _assert_same_backbones(ref_dir, _out(args))
    assert list(_out(args).glob("metrics.before_resume_1.csv"))
    assert not list(_out(args).glob("config.before_resume_*"))  # the same settings: no copy


def test_a_resume_from_an_epochs_end_with_loader_workers_trains_the_next_epoch(tiny):
    """From a checkpoint saved at an epoch's end, with DataLoader workers: Lightning builds the
    first iterator before it sets the sampler's epoch, and workers draw their indices at once, so
    the resumed run replayed epoch 0's order and views (runs are worker-count independent, so
    the uninterrupted reference may use none)."""
    epoch_saves = {**RUN, "trainer.checkpoint_every_n_steps": "0"}
    reference = _byol(tiny, **epoch_saves)
    assert main(["pretrain", *reference]) == 0
    args = _byol(tiny, **epoch_saves, **{"data.num_workers": "1"},
                 output_dir=str(_out(reference).parent / "killed_at_epoch_end"))
    killed = _interrupted(args, at=9, sig="SIGKILL")  # one step into epoch 1
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 8
    assert main(["pretrain", *args, "resume=auto"]) == 0
    _assert_same_backbones(_out(reference), _out(args))


def test_a_signal_in_an_epoch_of_one_optimizer_step_stops_at_its_end(tiny):
    """accumulate_grad_batches = the epoch's batches: its only step is its last, where the stop
    waits for the validation; it stops with the epoch-end checkpoint (it used to wait for a step
    that never came, and train on to the end)."""
    run = {**RUN, "trainer.accumulate_grad_batches": "8", "trainer.checkpoint_every_n_steps": "0"}
    reference = _byol(tiny, **run)
    assert main(["pretrain", *reference]) == 0
    args = _byol(tiny, **run, output_dir=str(_out(reference).parent / "one_step_epochs"))
    result = _interrupted(args, None, "SIGTERM", KILL_BATCH="3")
    assert result.returncode == 143, result.stderr[-2000:]
    assert "SIGTERM: last.ckpt saved at optimizer step 1" in result.stdout
    assert main(["pretrain", *args, "resume=auto"]) == 0
    _assert_same_backbones(_out(reference), _out(args))


@pytest.mark.parametrize("env", [{"KILL_BATCH": "16"}, {"KILL_IN_VAL": "1"}],
                         ids=["last_step", "last_validation"])
def test_a_signal_at_the_runs_last_step_or_validation_lets_it_finish(tiny, env):
    """Training is done: the run writes its summary and exits 0 (it kept an older checkpoint
    and exited 143, to train the last epoch again after a requeue)."""
    args = _byol(tiny, **RUN)
    result = _interrupted(args, None, "SIGTERM", **env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((_out(args) / "summary.json").read_text())["images_seen"] == 512


def test_stochastic_layers_draw_the_same_with_any_worker_count_and_after_a_resume(tiny):
    """Drop-path in the backbone: its draws came from the process's global stream, which the
    data pipeline reseeds per image without workers and a resumed loader advances: runs with
    0 and 1 worker differed, and so did a resumed one."""
    run = {**RUN, "model.kwargs.drop_path_rate": "0.2"}
    none = _byol(tiny, **run)
    assert main(["pretrain", *none]) == 0
    one = _byol(tiny, **run, **{"data.num_workers": "1"},
                output_dir=str(_out(none).parent / "one_worker"))
    killed = _interrupted(one, at=5, sig="SIGTERM")
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert main(["pretrain", *one, "resume=auto"]) == 0
    _assert_same_backbones(_out(none), _out(one))


@pytest.mark.parametrize("sig, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_script_calling_pretrain_exits_with_the_signals_status(tiny, sig, status):
    """A script of one's own that calls massrl.train.pretrain exits as the command does when a
    signal stops the run: it exited 0, and a scheduler or `train.py && eval.py` took the
    stopped run for a finished one."""
    args = _byol(tiny, **RUN)
    result = _interrupted(args, at=3, sig=sig, KILL_API="1")
    assert result.returncode == status, result.stderr[-2000:]
    assert torch.load(_out(args) / "checkpoints" / "last.ckpt",
                      weights_only=False)["global_step"] in (3, 4)


def test_a_finished_run_leaves_the_processs_signal_handlers_as_they_were(tiny):
    """massrl.train.pretrain in a process of one's own: SIGTERM must stop it again afterwards
    (the finished trainer's handler stayed, and swallowed it)."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    assert main(["pretrain", *_byol(tiny)]) == 0
    assert {s: signal.getsignal(s) for s in before} == before


# where a signal lands before training: the run's own setup, or inside Lightning's fit (its
# setup, a checkpoint's restore) before Preemption takes the signals at the training's start
SIGNALLED_AT = {"setup": ("massrl.train", "find_resume_checkpoint"),
                "fit": ("massrl.methods.SSLMethod", "configure_optimizers")}


@pytest.mark.parametrize("where, sig", [("setup", "SIGTERM"), ("setup", "SIGUSR1"),
                                        ("fit", "SIGTERM"), ("resume", "SIGTERM")])
def test_a_stop_signal_before_training_says_so_and_removes_its_new_folder(tiny, where, sig):
    """The signal's default action killed the process without a word, leaving a folder that
    held only .lock (or config.yaml and more, inside fit). (A process of its own: without the
    fix the signal kills the process running the test.) A resumed run's folder stays, and the
    command says how to continue it (review 2: it said "nothing was trained")."""
    args = _byol(tiny)
    if where == "resume":  # (stopped as Lightning restores its checkpoint, inside fit)
        assert main(["pretrain", *args]) == 0
        args, where = [*args, "resume=auto", "trainer.max_epochs=2"], "fit"
    holder, name = SIGNALLED_AT[where]
    module, _, cls = holder.partition(".methods.")
    code = textwrap.dedent(f"""
        import os, signal, sys
        import massrl.methods, massrl.train
        from massrl.cli import main
        holder = {f"massrl.methods.{cls}" if cls else module}
        real = getattr(holder, {name!r})
        def signalled(*a, **k):
            os.kill(os.getpid(), signal.{sig})
            return real(*a, **k)
        setattr(holder, {name!r}, signalled)
        code = main(["pretrain", *sys.argv[1:]])
        print("rc", code, signal.getsignal(signal.{sig}) == signal.SIG_DFL)
    """)
    done = run_python(code, *args)
    assert done.stdout.split()[-3:] == ["rc", "143", "True"], done.stderr[-2000:]
    assert f"stopped by {sig} while the run was being set up" in done.stderr
    if "resume=auto" in args:
        assert "its last.ckpt is kept; continue with: massrl pretrain" in done.stderr
        assert (_out(args) / "checkpoints" / "last.ckpt").is_file()
    else:
        assert not _out(args).exists()


def test_a_ctrl_c_as_lightning_sets_up_is_an_interrupt_and_leaves_ctrl_c_working(
        tiny, monkeypatch, capsys):
    """Before training starts (a checkpoint being restored, devices set up) Lightning answered
    Ctrl-C with SystemExit(1) and left SIGINT ignored: IPython could no longer be interrupted,
    the command exited 1 without a word, and the new folder stayed."""
    import signal

    from massrl.methods import SSLMethod

    configure = SSLMethod.configure_optimizers

    def interrupted(self):
        os.kill(os.getpid(), signal.SIGINT)
        return configure(self)

    monkeypatch.setattr(SSLMethod, "configure_optimizers", interrupted)
    before = signal.getsignal(signal.SIGINT)
    args = _byol(tiny)
    assert main(["pretrain", *args]) == 130
    assert "massrl pretrain: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before and not _out(args).exists()


def test_a_ctrl_c_in_the_final_validation_keeps_the_finished_runs_summary(
        tiny, monkeypatch, capsys):
    """The validation after training (eval.knn_every left the last epoch unmeasured): a Ctrl-C
    there lost summary.json, and a resume then had none to show."""
    import signal

    from massrl.methods import SSLMethod

    step = SSLMethod.validation_step

    def interrupted(self, *args, **kwargs):
        if self.trainer.state.fn == "validate":
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SSLMethod, "validation_step", interrupted)
    args = _byol(tiny, **{"eval.knn_every": "5"})
    assert main(["pretrain", *args]) == 0
    assert "stopped in the validation after training, which was skipped" in \
        capsys.readouterr().err
    summary = json.loads((_out(args) / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["knn_top1"] is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_in_the_final_validation_keeps_the_finished_runs_summary(tiny, sig):
    """(review 2) SIGTERM there lost summary.json and said the resumed run would repeat steps;
    SIGUSR1 killed the process silently. (A process of its own: see above.)"""
    args = _byol(tiny, **{"eval.knn_every": "5"})
    code = textwrap.dedent(f"""
        import os, signal, sys
        from massrl.methods import SSLMethod
        from massrl.cli import main
        step = SSLMethod.validation_step
        def signalled(self, *a, **k):
            if self.trainer.state.fn == "validate":
                os.kill(os.getpid(), signal.{sig})
            return step(self, *a, **k)
        SSLMethod.validation_step = signalled
        print("rc", main(["pretrain", *sys.argv[1:]]))
    """)
    done = run_python(code, *args)
    assert done.stdout.split()[-2:] == ["rc", "0"], done.stderr[-2000:]
    assert "stopped in the validation after training" in done.stderr
    assert "repeats the steps" not in done.stdout + done.stderr
    assert json.loads((_out(args) / "summary.json").read_text())["epochs"] == 1


def test_a_stopped_run_says_where_and_how_to_continue_to_a_python_caller(tmp_path):
    """In IPython a Ctrl-C showed a bare 'SIGTERMException'."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from massrl.stop_signals import name_the_stop

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    exc = SIGTERMException()
    name_the_stop(exc, tmp_path, SimpleNamespace(by_ctrl_c=True, signal_name="SIGINT"))
    assert exc.code == 130 and exc.run_dir == tmp_path
    assert str(exc) == (f"Ctrl-C: the run in {tmp_path} stopped with checkpoints/last.ckpt "
                        f"saved; continue it with resume=auto output_dir={tmp_path}")


def test_a_signal_to_the_process_group_with_loader_workers_saves_and_stops(tiny):
    """A scheduler or `timeout` signals the whole group, DataLoader workers included: a worker
    that died of it failed the run's next batch ("DataLoader worker is killed by signal")."""
    args = _byol(tiny, **RUN, **{"data.num_workers": "1"})
    result = _interrupted(args, at=5, sig="SIGTERM", KILL_GROUP="1")
    assert result.returncode == 143, result.stderr[-2000:]
    assert "SIGTERM: last.ckpt saved at optimizer step 5" in result.stdout


def test_pretraining_loader_workers_ignore_sigterm_and_sigusr1():
    """(SLURM's --signal=USR1 reaches the workers as SIGTERM does; the main process, which
    treats both alike, is tested above and in the DDP tests.)"""
    code = ("import signal\n"
            "from massrl.data.loading import run_worker_init_fn\n"
            "run_worker_init_fn(0)\n"
            "print([signal.getsignal(s) == signal.SIG_IGN\n"
            "       for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)])\n")
    out = run_python(code, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True, True, True]"


def _interrupted_ddp(tiny, tmp_path: Path, **env: str
                     ) -> tuple[list[str], subprocess.CompletedProcess]:
    """A 2-process CPU DDP run of KILLER (see _interrupted), its signals set by `env`."""
    script = tmp_path / "killer.py"  # (Lightning starts rank 1 by re-running this file)
    script.write_text(KILLER)
    args = _byol(tiny, **RUN, **{"trainer.accelerator": "cpu", "trainer.devices": "2",
                                 "trainer.strategy": "ddp", "data.batch_size": "16"})
    result = subprocess.run([sys.executable, str(script), "pretrain", *args],
                            env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=300, start_new_session=True)
    return args, result


def test_sigterm_to_every_process_of_a_ddp_run_saves_and_stops(tiny, tmp_path):
    """`timeout`, a killed process group or a scheduler signal every rank: Lightning's handler
    ran a collective inside the signal handler, which met another collective, and the run
    hung until killed. Now all ranks stop after the same step, with last.ckpt saved there."""
    args, result = _interrupted_ddp(tiny, tmp_path, KILL_AT="5", KILL_SIGNAL="SIGTERM",
                                    KILL_GROUP="1")
    assert result.returncode == 143, result.stderr[-2000:]
    saved = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 5  # signalled at the end of step 5: every rank stops there
    assert f"SIGTERM: last.ckpt saved at optimizer step {saved['global_step']}" in result.stdout


def test_ctrl_c_in_a_ddp_run_stops_every_process_at_one_step_with_a_checkpoint(tiny, tmp_path):
    """A terminal's Ctrl-C reaches every process, each at its own point: the run stopped at
    once with nothing saved. Now the processes agree on a step as for SIGTERM and save there."""
    args, result = _interrupted_ddp(tiny, tmp_path, KILL_AT="5", KILL_SIGNAL="SIGINT",
                                    KILL_GROUP="1", KILL_RANK="0")
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.count("Ctrl-C: stopping after this step") == 1  # (said by rank 0)
    saved = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] in (5, 6)  # the step after the Ctrl-C's, at the latest
    assert "stopped by Ctrl-C. Continue with: " in result.stderr


def test_sigterm_to_one_ddp_process_in_validation_stops_every_process_together(tiny, tmp_path):
    """Rank 1 alone signalled at its first validation batch: it stopped there while rank 0
    validated on into the gather of the features, which then failed ("Connection closed by
    peer"). Now the ranks agree after each validation batch and stop at the same one."""
    _, result = _interrupted_ddp(tiny, tmp_path, KILL_IN_VAL="0", KILL_SIGNAL="SIGUSR1",
                                 KILL_RANK="1")
    assert result.returncode == 143, result.stderr[-2000:]
    assert "SIGUSR1 during validation" in result.stdout  # (said by rank 0, told by rank 1)
    assert "Connection closed" not in result.stderr


def test_sigterm_saves_a_checkpoint_requeues_on_slurm_and_the_run_continues(tiny, tmp_path,
                                                                            capsys):
    # a stand-in `scontrol` that records how it was called
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    scontrol.chmod(0o755)
    args = _byol(tiny, **{**RUN, "trainer.checkpoint_every_n_steps": "0"})
    result = _interrupted(args, at=5, sig="SIGTERM", SLURM_JOB_ID="4242",
                          PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 143, result.stderr[-2000:]
    assert "resume=auto" in result.stderr
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    ckpt = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5  # saved on SIGTERM, not at an epoch end
    capsys.readouterr()
    # with its output in a file, as a requeued job's: the progress is a line per epoch, the
    # first one of the epoch resumed in its middle (3 steps of 32 images)
    assert main(["pretrain", *args, "resume=auto", "trainer.progress_bar=true"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"], lines
    summary = json.loads((_out(args) / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["images_seen"] == 512


@pytest.mark.parametrize("workers", ["0", "1"])
def test_ctrl_c_stops_at_the_next_step_with_a_checkpoint_and_says_how_to_continue(tiny,
                                                                                 workers):
    """Lightning exits at once on Ctrl-C, with nothing saved and no hint: massrl stops at the
    next step boundary as on SIGTERM, and names the run directory. The Ctrl-C goes to the
    whole process group, as a terminal sends it: DataLoader workers must live on."""
    args = _byol(tiny, **{**RUN, "trainer.checkpoint_every_n_steps": "4",
                          "data.num_workers": workers})
    result = _interrupted(args, at=5, sig="SIGINT", KILL_GROUP="1")
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Ctrl-C: stopping after this step" in result.stderr
    assert "Received SIGTERM" not in result.stdout + result.stderr  # Lightning's, for our own
    command = _continue_command(result.stderr, "stopped by Ctrl-C. Continue with: ")
    assert command == ["-c", str(_out(args) / "config.yaml"), "resume=auto",
                       f"output_dir={_out(args)}"]
    ckpt = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] in (5, 6)  # the step after the Ctrl-C's, at the latest
    # resumed with another checkpoint cadence: Lightning's notice on the periodic save's
    # callback state (which holds nothing needed) is not shown
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # the printed command continues the run: the run's own config holds its settings
        assert main(["pretrain", *command, "trainer.checkpoint_every_n_steps=0"]) == 0
    assert not [w for w in seen if "callbacks used to create" in str(w.message)]
    assert json.loads((_out(args) / "summary.json").read_text())["images_seen"] == 512


def test_sigterm_in_a_window_at_an_epochs_end_or_in_validation_resumes_exactly(tiny):
    """Inside a gradient-accumulation window (its gradients are in no checkpoint) the run trains
    on to the step's end and saves there; at an epoch's last step it stops after the epoch's
    validation, with the epoch-end checkpoint; during validation (which Lightning would not
    rerun) it stops after the current batch and keeps the last checkpoint, and the resumed run
    repeats the steps since. Each resumed run reaches the uninterrupted run's result, each step
    logged once."""
    run = {**RUN, "trainer.accumulate_grad_batches": "2",  # 4 optimizer steps per epoch
           "trainer.log_every_n_steps": "1"}
    reference = _byol(tiny, **run)
    assert main(["pretrain", *reference]) == 0
    ref_dir = _out(reference)
    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    # batch 11: epoch 1, inside the window of batches 11-12 (step 6); batch 8: epoch 0's last,
    # whose validation runs, then the epoch-end save (step 4); in epoch 0's validation: the
    # every-3-steps save of step 3 is kept (in the last epoch's the run would finish)
    for name, env, said, step in (
            ("window", {"KILL_BATCH": "11"}, "SIGTERM: last.ckpt saved at optimizer step 6", 6),
            ("epoch_end", {"KILL_BATCH": "8"}, "SIGTERM: last.ckpt saved at optimizer step 4", 4),
            ("val", {"KILL_IN_VAL": "0"}, "SIGTERM during validation: last.ckpt is kept", 3)):
        args = _byol(tiny, **run, output_dir=str(ref_dir.parent / name))
        result = _interrupted(args, None, "SIGTERM", **env)
        assert result.returncode == 143, result.stderr[-2000:]
        assert said in result.stdout, (name, result.stdout[-500:])
        kept = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
        assert kept["global_step"] == step
        assert main(["pretrain", *args, "resume=auto"]) == 0
        before, after = (list(csv.DictReader(open(_out(args) / f))) for f in (
            "metrics.before_resume_1.csv", "metrics.csv"))
        assert max(int(r["step"]) for r in before) < step <= min(int(r["step"]) for r in after)
        logged = _tensorboard_steps(_out(args), "lr")  # TensorBoard shows each step once too
        assert logged == sorted(set(logged)) and len(logged) == ref_summary["epochs"] * 4
        summary = json.loads((_out(args) / "summary.json").read_text())
        assert summary["images_seen"] == ref_summary["images_seen"] == 512
        assert summary["knn_top1"] == pytest.approx(ref_summary["knn_top1"], abs=1e-6)
        assert Path(summary["best_checkpoint"]).name == Path(ref_summary["best_checkpoint"]).name
        _assert_same_backbones(ref_dir, _out(args), name)


def test_the_summary_measures_the_final_model_when_knn_every_skips_the_last_epoch(tiny):
    """eval.knn_every=2, 3 epochs: after training one more validation measures the final model
    (the summary had the epoch-2 figures, or none when knn_every > max_epochs), also when the
    session that ends the run was resumed."""
    run = {"eval.knn_every": "2", "trainer.max_epochs": "3"}
    reference = _byol(tiny, **run)
    assert main(["pretrain", *reference]) == 0
    ref = json.loads((_out(reference) / "summary.json").read_text())
    args = _byol(tiny, **run, output_dir=str(_out(reference).parent / "resumed"))
    killed = _interrupted(args, at=9, sig="SIGKILL")  # 4 steps per epoch: early in epoch 3
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert main(["pretrain", *args, "resume=auto"]) == 0
    summary = json.loads((_out(args) / "summary.json").read_text())
    assert ref["knn_after_epochs"] == summary["knn_after_epochs"] == 3
    # the best kNN is best_checkpoint's (epoch 2), not the validation's after training
    with open(_out(reference) / "metrics.csv") as f:
        during = [float(r["val/knn_top1"]) for r in csv.DictReader(f) if r["val/knn_top1"]]
    assert ref["best_knn_top1"] == pytest.approx(during[0]) and "best-knn-1" in \
        ref["best_checkpoint"]
    never = _byol(tiny, **{"eval.knn_every": "5"}, output_dir=str(_out(reference).parent / "n"))
    assert main(["pretrain", *never]) == 0
    once = json.loads((_out(never) / "summary.json").read_text())
    assert once["knn_after_epochs"] == 1 and once["knn_top1"] is not None
    assert once["best_knn_top1"] is None and once["best_checkpoint"] is None
    assert once["probe_top1"] is not None
    assert summary["knn_top1"] == pytest.approx(ref["knn_top1"], abs=1e-6)
    assert summary["probe_top1"] == pytest.approx(ref["probe_top1"], abs=1e-6)


def test_resume_with_a_changed_backbone_is_refused(tiny, capsys):
    args = _byol(tiny, **{"trainer.max_epochs": "1"})
    assert main(["pretrain", *args]) == 0
    assert main(["pretrain", *args, "resume=auto", "model.width=16"]) == 2
    err = capsys.readouterr().err
    assert "model.width: 8 in the checkpoint, 16 now" in err
    own = _out(args) / "config.yaml"
    assert f"or restore these values (-c {own} restores them all)" in " ".join(err.split())
    # another method is named; SimCLR's lack of a predictor is not listed as a change
    assert main(["pretrain", *args, "resume=auto", "method=simclr",
                 "model.pred_hidden_dim=64"]) == 2
    err = capsys.readouterr().err
    assert "method: 'byol' in the checkpoint, 'simclr' now" in err
    assert "pred_hidden_dim" not in err
    # other images (the sampler's position would point elsewhere) or another size
    assert main(["pretrain", *args, "resume=auto", "data.subset=64", "data.image_size=24"]) == 2
    err = capsys.readouterr().err
    assert "data.subset: 128 in the checkpoint, 64 now" in err
    assert "data.image_size: 16 in the checkpoint, 24 now" in err
    # another global batch: the lr schedule and the sampler's position would not match
    assert main(["pretrain", *args, "resume=auto", "data.batch_size=16",
                 "trainer.accumulate_grad_batches=2"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size: 32 in the checkpoint, 16 now" in err
    assert "trainer.accumulate_grad_batches: 1 in the checkpoint, 2 now" in err
    assert main(["pretrain", *args, "resume=auto", "seed=1", "optimizer.name=adamw"]) == 2
    err = capsys.readouterr().err
    assert "seed: 0 in the checkpoint, 1 now" in err
    assert "optimizer.name: 'lars' in the checkpoint, 'adamw' now" in err
    # other parameter groups: the optimizer's state would not load (a traceback, after
    # config.yaml was rewritten and metrics.csv moved aside)
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2",
                 "optimizer.exclude_bias_norm=false"]) == 2
    assert "optimizer.exclude_bias_norm: True in the checkpoint, False now" in \
        capsys.readouterr().err


def test_a_resume_trains_at_the_optimizer_settings_it_names(tiny, capsys):
    """Lightning restored the checkpoint's lr, weight decay, momentum and probe lr with the
    optimizer's state: the resume note and config.yaml named the new values, the run trained
    on at the old ones."""
    args = _byol(tiny, **{"trainer.max_epochs": "1"})
    assert main(["pretrain", *args]) == 0
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2", "optimizer.lr=0.008",
                 "optimizer.weight_decay=0.5", "optimizer.momentum=0.5",
                 "eval.probe_lr=0.25"]) == 0
    assert "optimizer.lr: 1.0 -> 0.008" in capsys.readouterr().out
    ckpt = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    peak = 0.008 * 32 / 256  # (optimizer.scale_lr: per 256 images)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == pytest.approx([peak, peak, 0.25])
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0, 0.0]  # (no decay: biases, norms)
    assert {g["momentum"] for g in groups} == {0.5}
    # at the run's end the cosine has come down from the new peak, not the old one
    assert max(g["lr"] for g in groups[:2]) <= peak and groups[2]["lr"] == 0.25


def test_resume_with_another_number_of_processes_is_refused(tiny, capsys):
    """A checkpoint records how many processes trained it; resuming with another count is
    refused before training, and the run's files stay as they were (the picture is drawn
    again, the same)."""
    args = _byol(tiny, **{"trainer.max_epochs": "1"})
    assert main(["pretrain", *args]) == 0
    last = _out(args) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["massrl"]["world_size"] == 1
    ckpt["massrl"]["world_size"] = 2  # as if written by a 2-process run
    torch.save(ckpt, last)
    before = {p.name: p.read_bytes() for p in _out(args).iterdir() if p.is_file()}
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {last}: it was trained by 2 process(es), and this run has 1" \
        in err and "resume with 2 process(es)" in err
    assert {p.name: p.read_bytes() for p in _out(args).iterdir() if p.is_file()} == before


@pytest.mark.parametrize("epochs, every", [("1", "3"), ("2", "0")])
def test_resuming_a_finished_run_trains_nothing_and_keeps_its_summary(tiny, capsys, epochs,
                                                                      every):
    # (every=0: the last save is the epoch-end one, made before Lightning counts the epoch
    # as completed; the run was resumed as 1 of 2 epochs done and its summary overwritten)
    args = _byol(tiny, **{"trainer.max_epochs": epochs,
                          "trainer.checkpoint_every_n_steps": every})
    assert main(["pretrain", *args]) == 0
    summary = (_out(args) / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["pretrain", *args, "resume=auto"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert (_out(args) / "summary.json").read_bytes() == summary
    (_out(args) / "summary.json").unlink()  # a run killed after its last save
    assert main(["pretrain", *args, "resume=auto"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    # a summary.json damaged by hand is no summary (they raised AttributeError and KeyError)
    own_config = ["-c", str(_out(args) / "config.yaml"), "resume=auto"]
    for damaged in ("[1, 2]", "{}"):
        (_out(args) / "summary.json").write_text(damaged)
        assert main(["pretrain", *own_config]) == 0
        out = capsys.readouterr().out
        assert "nothing to train" in out and f"run directory: {_out(args)}" in out
        assert f"{_out(args) / 'summary.json'} is missing or unreadable" in out


@pytest.mark.parametrize("damage", ["truncated", "empty", "directory", "last"])
def test_resume_from_a_damaged_checkpoint_is_explained(tiny, capsys, tmp_path, damage):
    args = _byol(tiny, **{"trainer.max_epochs": "1"})
    assert main(["pretrain", *args]) == 0
    last = _out(args) / "checkpoints" / "last.ckpt"
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        bad.write_bytes(last.read_bytes()[:5000])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "last":  # the run's own last.ckpt, damaged outside massrl: the others offered
        last.write_bytes(last.read_bytes()[:5000])
        bad = "auto"
    else:
        bad = _out(args)
    capsys.readouterr()
    assert main(["pretrain", *args, f"resume={bad}", "trainer.max_epochs=2"]) == 2
    err = capsys.readouterr().err
    expected = {"truncated": "is truncated or not a PyTorch checkpoint",
                "empty": "is an empty file", "directory": f"Did you mean {last}?",
                "last": "Continue from another checkpoint of the run with resume=PATH "
                        f"(best-knn-0.ckpt in {last.parent})"}[damage]
    assert expected in err and "Traceback" not in err


def test_resume_auto_needs_output_dir():
    assert main(["pretrain", "resume=auto", "data.name=digits"]) == 2


def test_resume_from_a_missing_file_is_explained(tiny, capsys):
    assert main(["pretrain", *tiny(), "resume=/nope/last.ckpt"]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(tiny, monkeypatch, capsys):
    import massrl.methods.byol as byol

    real = byol.byol_per_pair
    calls = {"n": 0}

    def nan_on_third(p, z):
        calls["n"] += 1
        loss = real(p, z)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(byol, "byol_per_pair", nan_on_third)
    args = _byol(tiny, **{"trainer.checkpoint_every_n_steps": "1"})
    assert main(["pretrain", *args]) == 1
    out = capsys.readouterr().err
    assert "at optimizer step 2 (epoch 1)" in out and "optimizer.lr" in out
    ckpt = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # the last good checkpoint is kept

    calls["n"] = 0
    skip = _byol(tiny, **{"trainer.skip_nonfinite": "true", "output_dir": str(_out(args)) + "s"})
    assert main(["pretrain", *skip]) == 0
    assert json.loads((_out(skip) / "summary.json").read_text())["epochs"] == 1


def test_atomic_checkpoint_keeps_the_previous_file_on_a_full_disk(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*intact"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_new_run_into_a_run_directory_is_refused(tiny, capsys):
    """A second run into an output_dir that holds one would overwrite its checkpoints, metrics
    and summary: it is refused, pointing at resume=auto."""
    args = _byol(tiny)
    assert main(["pretrain", *args]) == 0
    summary = (_out(args) / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {_out(args)} already holds a run" in err and "resume=auto" in err
    assert (_out(args) / "summary.json").read_bytes() == summary
    # a finished run whose checkpoints were deleted to save space: its record stays too
    shutil.rmtree(_out(args) / "checkpoints")
    assert main(["pretrain", *args]) == 2
    assert f"output_dir {_out(args)} already holds a finished run (summary.json, its " \
        "checkpoints gone" in capsys.readouterr().err
    assert (_out(args) / "summary.json").read_bytes() == summary
    # resume=auto finds nothing to resume there: refused too (review: it trained a new run over
    # it, as every SLURM resubmission passes resume=auto); and so is another run's checkpoint
    other = _byol(tiny, output_dir=str(_out(args)) + "_other")
    assert main(["pretrain", *other]) == 0
    for resume in ("auto", str(_out(other) / "checkpoints" / "last.ckpt")):
        capsys.readouterr()
        assert main(["pretrain", *args, f"resume={resume}", "trainer.max_epochs=2"]) == 2
        assert "already holds a" in capsys.readouterr().err
        assert (_out(args) / "summary.json").read_bytes() == summary
    # a folder with a config.yaml alone (a run that failed before training) is run again
    (_out(args) / "summary.json").unlink()
    assert main(["pretrain", *args]) == 0


def test_an_output_dir_that_is_a_file_is_explained(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["pretrain", *_byol(tiny, output_dir=str(blocker))]) == 2
    assert f"output_dir {blocker} is a file: name a folder" in capsys.readouterr().err


def test_a_second_ctrl_c_stops_at_once_and_says_how_to_continue(tiny):
    args = _byol(tiny, **{**RUN, "trainer.checkpoint_every_n_steps": "4"})
    result = _interrupted(args, at=5, sig="SIGINT", KILL_TWICE="1")
    assert result.returncode == 130, result.stderr[-2000:]
    assert _continue_command(result.stderr, "stopped at once by a second Ctrl-C. Continue "
                             "from the last checkpoint with: ")[-1] == f"output_dir={_out(args)}"
    ckpt = torch.load(_out(args) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # the periodic save before the Ctrl-Cs; none since
    assert main(["pretrain", *args, "resume=auto"]) == 0


def test_a_second_ctrl_c_before_any_checkpoint_says_the_run_starts_over(tiny):
    """It said "Continue from the last checkpoint" when there was none."""
    args = _byol(tiny, **{**RUN, "trainer.checkpoint_every_n_steps": "0"})
    result = _interrupted(args, at=2, sig="SIGINT", KILL_TWICE="1")
    assert result.returncode == 130, result.stderr[-2000:]
    assert not (_out(args) / "checkpoints" / "last.ckpt").exists()
    said = "stopped at once by a second Ctrl-C. No checkpoint was saved yet: massrl pretrain "
    assert said in result.stderr and "starts the run again from the beginning" in result.stderr


def test_a_runs_own_config_resumes_that_run_from_any_folder(tiny, tmp_path, monkeypatch,
                                                           capsys):
    """config.yaml kept output_dir as typed: `-c ../a/run/config.yaml resume=auto` from
    another folder said "no checkpoint in run yet" and trained a new run there."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    args = [*_byol(tiny), "output_dir=run"]  # relative, as typed
    assert main(["pretrain", *args]) == 0
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert main(["pretrain", "-c", "../a/run/config.yaml", "resume=auto",
                 "trainer.max_epochs=2"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "a" / "run"
    assert f"resume=auto: continuing the run in {run_dir}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["run_dir"] == str(run_dir)
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert not (tmp_path / "b" / "run").exists()


def test_a_moved_run_keeps_its_best_checkpoint_and_says_where_it_is_now(tiny, tmp_path, capsys):
    """Lightning reloads its best-kNN record only from the folder it saved it in: a run
    resumed after its folder moved named a later, worse epoch best (both files kept), and a
    finished moved run's summary named the old folder's paths."""
    args = _byol(tiny, **{"trainer.max_epochs": "2"})
    assert main(["pretrain", *args]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(_out(args), moved)
    shutil.rmtree(_out(args))
    assert main(["pretrain", "-c", str(moved / "config.yaml"), "resume=auto",
                 "trainer.max_epochs=4"]) == 0
    summary = json.loads((moved / "summary.json").read_text())
    with open(moved / "metrics.csv") as f:
        knn = [float(r["val/knn_top1"]) for r in csv.DictReader(f) if r.get("val/knn_top1")]
    with open(moved / "metrics.before_resume_1.csv") as f:
        knn += [float(r["val/knn_top1"]) for r in csv.DictReader(f) if r.get("val/knn_top1")]
    assert len(knn) == 4 and summary["best_knn_top1"] == pytest.approx(max(knn))
    best = sorted(p.name for p in (moved / "checkpoints").glob("best-knn-*.ckpt"))
    assert len(best) == 1 and summary["best_checkpoint"] == str(moved / "checkpoints" / best[0])
    # checkpoints of earlier runs hold the record under Lightning's class name: still found
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer.call import _call_callbacks_load_state_dict

    from massrl.resilience import RunCheckpoint

    kwargs = {"dirpath": str(moved), "monitor": "val/knn_top1", "mode": "max"}
    assert RunCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key
    # and under our own class name, as main's checkpoints held it for a while
    callback = RunCheckpoint(**kwargs)
    saved = dict(ModelCheckpoint(**kwargs).state_dict(), best_model_score=torch.tensor(0.5))
    key = callback._legacy_state_key
    assert key.startswith("RunCheckpoint{")
    _call_callbacks_load_state_dict(type("T", (), {"callbacks": [callback]})(),
                                    {"callbacks": {key: saved}})
    assert float(callback.best_model_score) == 0.5
    again = tmp_path / "again"
    shutil.move(moved, again)
    capsys.readouterr()
    assert main(["pretrain", "-c", str(again / "config.yaml"), "resume=auto",
                 "trainer.max_epochs=4"]) == 0
    assert f"run directory: {again}" in capsys.readouterr().out


def test_a_resume_from_an_earlier_checkpoint_into_the_runs_folder_is_refused(tiny, capsys):
    """resume=<run>/checkpoints/<an earlier one> into the run's own folder replaced its
    last.ckpt, summary.json and later checkpoints: the run's final model was gone. Refused,
    before anything changes, pointing at a branch into a new folder."""
    args = _byol(tiny, **{"trainer.keep_every_n_epochs": "1"})
    assert main(["pretrain", *args]) == 0
    assert main(["pretrain", *args, "trainer.max_epochs=2", "resume=auto"]) == 0
    run = _out(args)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    capsys.readouterr()
    assert main(["pretrain", *args, "trainer.max_epochs=2",
                 f"resume={run / 'checkpoints' / 'epoch-0.ckpt'}"]) == 2
    assert "is another checkpoint of the run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_a_branch_into_a_new_folder_says_so_in_a_line(tiny, tmp_path, capsys):
    """resume=<a run's checkpoint> output_dir=<a new folder>: Lightning's warning named two
    paths and `best_model_score`; massrl says what it means."""
    import warnings

    args = _byol(tiny)
    assert main(["pretrain", *args]) == 0
    branch = tmp_path / "branch"
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["pretrain", *args, "trainer.max_epochs=2", f"output_dir={branch}",
                     f"resume={_out(args) / 'checkpoints' / 'last.ckpt'}"]) == 0
    assert not [w for w in seen if "dirpath has changed" in str(w.message)]
    assert f"note: a branch of that run into {branch}" in capsys.readouterr().out
    assert json.loads((branch / "summary.json").read_text())["epochs"] == 2


def test_resume_accepts_the_same_folder_spelled_another_way(tiny, tmp_path, monkeypatch, capsys):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "pics" / c).mkdir(parents=True)
        for i in range(40):
            Image.new("RGB", (16, 16), (6 * i, 120 * (c == "b"), 90)).save(
                tmp_path / "pics" / c / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    args = _byol(tiny, **{"data.name": "folder", "data.root": "pics", "data.subset": "null"})
    assert main(["pretrain", *args]) == 0
    capsys.readouterr()
    again = [a for a in args if not a.startswith("data.root=")] + [f"data.root={tmp_path}/pics/"]
    assert main(["pretrain", *again, "resume=auto"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    assert main(["pretrain", *args[:-1], f"data.root={tmp_path / 'other'}",
                 "resume=auto"]) == 2  # another folder is refused
    assert "data.root: 'pics' in the checkpoint" in capsys.readouterr().err


def test_a_second_run_into_a_directory_in_use_is_refused(tiny, capsys):
    """While a run holds its directory, another one into it (started by mistake, or a requeued
    job) stops at once instead of interleaving its metrics and checkpoints."""
    import fcntl

    args = _byol(tiny)
    out = _out(args)
    out.mkdir(parents=True)
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the first run holds it
        assert main(["pretrain", *args]) == 2
        assert f"another massrl run is writing into {out}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert main(["pretrain", *args]) == 0  # once it is free


def test_resuming_a_finished_run_whose_summary_is_unreadable(tiny, capsys):
    """summary.json left empty (a full disk when it was written): the finished run says how to
    measure the model instead of crashing on the file."""
    args = _byol(tiny)
    assert main(["pretrain", *args]) == 0
    (_out(args) / "summary.json").write_text("")
    capsys.readouterr()
    assert main(["pretrain", *args, "resume=auto"]) == 0
    out = capsys.readouterr().out
    assert "summary.json is missing or unreadable: `massrl knn ckpt=" in out


def test_a_refused_resume_through_a_path_with_dotdot_keeps_the_run(tiny, capsys):
    """`missing/../run` names the existing run: a refused resume must not take it for a folder
    the failed start made (and remove it)."""
    args = _byol(tiny)
    assert main(["pretrain", *args]) == 0
    out = _out(args)
    others = [a for a in args if not a.startswith("output_dir=")]
    odd = out.parent / "missing" / ".." / out.name
    assert main(["pretrain", *others, f"output_dir={odd}", "resume=auto", "seed=1"]) == 2
    assert "seed: 0 in the checkpoint, 1 now" in capsys.readouterr().err
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "summary.json").is_file()


def _run_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def test_resume_that_would_not_take_the_checkpoints_weights_is_refused_first(tiny, capsys):
    """eval.probe is no frozen key, but a probe switched on or off changes the model's
    parameters: refused before config.yaml or metrics.csv change, so the run's own config
    still continues it."""
    args = _byol(tiny, **{"trainer.max_epochs": "1", "eval.probe": "false"})
    assert main(["pretrain", *args]) == 0
    before = _run_files(_out(args))
    capsys.readouterr()
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2",
                 "eval.probe=true"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the model's 'probe' parameters differ (the online probe: eval.probe, or the " \
        "number of classes): not in the checkpoint" in err and "Traceback" not in err
    assert _run_files(_out(args)) == before
    assert main(["pretrain", "-c", str(_out(args) / "config.yaml"), "resume=auto",
                 f"output_dir={_out(args)}", "trainer.max_epochs=2"]) == 0


def test_resume_after_a_folders_files_changed_is_refused(tiny, tmp_path, capsys):
    """A folder without val/ is split into train and held-out from its file list: with files
    added, the held-out images would include some the checkpoint was trained on."""
    from conftest import class_folder
    from PIL import Image

    root = class_folder(tmp_path / "pics", per_class=40)
    args = _byol(tiny, **{"trainer.max_epochs": "1", "data.name": "folder",
                          "data.root": str(root), "data.subset": "null",
                          "data.eval_subset": "null"})
    assert main(["pretrain", *args]) == 0
    Image.new("RGB", (16, 16)).save(root / "a" / "new.png")
    before = _run_files(_out(args))
    capsys.readouterr()
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the files of the test split changed since the checkpoint (16 then, 17 now)" in err
    assert "the files of the train split changed since the checkpoint (64, but not the same " \
        "ones)" in err
    # (only the picture of a few training images is drawn again, from the folder as it is)
    assert _run_files(_out(args)).keys() == before.keys()
    assert {k: v for k, v in _run_files(_out(args)).items() if k != "augmentations.png"} == \
        {k: v for k, v in before.items() if k != "augmentations.png"}
    (root / "a" / "new.png").unlink()  # as it was: the run continues
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2"]) == 0


def test_resume_from_another_runs_checkpoint_into_a_run_directory_is_refused(tiny, capsys):
    first = _byol(tiny, **{"trainer.max_epochs": "1"})
    second = [*first[:-1], f"output_dir={_out(first).parent / 'second'}"]
    assert main(["pretrain", *first]) == 0 and main(["pretrain", *second]) == 0
    before = _run_files(_out(second)) | _run_files(_out(second) / "checkpoints")
    capsys.readouterr()
    other = _out(first) / "checkpoints" / "last.ckpt"
    assert main(["pretrain", *second, f"resume={other}", "trainer.max_epochs=2"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"output_dir {_out(second)} already holds a run, and resume={other} is another " \
        "run's checkpoint" in err
    assert _run_files(_out(second)) | _run_files(_out(second) / "checkpoints") == before


def test_a_skipped_step_leaves_weights_and_optimizer_state_as_they_were(tiny, monkeypatch):
    """trainer.skip_nonfinite: the step with a NaN loss changes nothing; LARS's momentum moved
    when the step only ran at lr 0 (buffer = 0.9 buffer + weight decay x weights), and its
    forward moved the batch-norm statistics."""
    import copy

    import lightning as L

    import massrl.methods.byol as byol
    from massrl.config import build_config
    from massrl.data import SSLDataModule
    from massrl.methods import build_method

    real, calls = byol.byol_per_pair, {"n": 0}

    def nan_on_second(p, z):
        calls["n"] += 1
        return real(p, z) * (float("nan") if calls["n"] == 2 else 1.0)

    monkeypatch.setattr(byol, "byol_per_pair", nan_on_second)
    states = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            optimizer = trainer.optimizers[0]
            weights = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            states.append(copy.deepcopy((weights, optimizer.state_dict()["state"])))

    overrides = [*tiny("byol"), "eval.probe=false", "trainer.skip_nonfinite=true",
                 "optimizer.weight_decay=0.1"]
    cfg = build_config(config_file="fashion_mnist/byol", overrides=overrides)
    dm = SSLDataModule(cfg)
    model = build_method(cfg, num_classes=dm.num_classes)
    L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Record()]).fit(model, dm)
    (weights0, opt0), (weights1, opt1), (weights2, _) = states
    # the skipped step: weights and batch-norm statistics (a NaN forward would poison them)
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    momentum = [k for k in opt0 if "momentum_buffer" in opt0[k]]
    assert momentum and all(torch.equal(opt0[k]["momentum_buffer"], opt1[k]["momentum_buffer"])
                            for k in momentum)
    assert not all(torch.equal(weights1[k], weights2[k]) for k in weights1)  # then it trains


def test_a_finished_epoch_writes_last_ckpt_once(tiny, monkeypatch):
    """Lightning's step-checkpoint callback wrote last.ckpt again when training ended, right
    after the epoch-end save: twice the room on a nearly full disk, where it failed the run."""
    saved = []
    real = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, *args, **kwargs):
        saved.append(Path(path).name)
        return real(self, checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    assert main(["pretrain", *_byol(tiny)]) == 0  # 4 steps, fewer than checkpoint_every_n_steps
    assert saved == ["best-knn-0.ckpt", "last.ckpt"]


def test_resume_auto_without_last_ckpt_names_the_runs_other_checkpoint(tiny, capsys):
    """A full disk failed last.ckpt after the epoch's best-kNN save: resume=auto started the
    run over. It now points at the checkpoint there, which continues the run."""
    args = _byol(tiny, **{"trainer.max_epochs": "1"})
    assert main(["pretrain", *args]) == 0
    ckpts = _out(args) / "checkpoints"
    (ckpts / "last.ckpt").unlink()
    capsys.readouterr()
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2"]) == 2
    best = ckpts / "best-knn-0.ckpt"
    assert f"holds no last.ckpt but best-knn-0.ckpt: continue from it with resume={best}" in \
        " ".join(capsys.readouterr().err.split())
    assert main(["pretrain", *args, f"resume={best}", "trainer.max_epochs=2"]) == 0
    assert json.loads((_out(args) / "summary.json").read_text())["epochs"] == 2


def test_resume_auto_without_last_ckpt_names_the_newest_checkpoint(tiny, capsys):
    """Picked by name, epoch-9.ckpt came after epoch-10.ckpt: following the advice rewound
    the run and replaced the newer one."""
    args = _byol(tiny, **{"trainer.max_epochs": "1"})
    assert main(["pretrain", *args]) == 0
    ckpts = _out(args) / "checkpoints"
    (ckpts / "last.ckpt").rename(ckpts / "epoch-10.ckpt")
    shutil.copy(ckpts / "epoch-10.ckpt", ckpts / "epoch-9.ckpt")
    os.utime(ckpts / "epoch-9.ckpt", (1, 1))  # the older one
    capsys.readouterr()
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2"]) == 2
    assert "holds no last.ckpt but epoch-10.ckpt" in capsys.readouterr().err


def test_a_runs_checkpoints_folder_may_be_a_link_to_another_disk(tiny, tmp_path):
    """resume=auto of a run whose checkpoints/ links elsewhere (a scratch disk) was refused as
    "another run's checkpoint" (the resolved path lies outside the run's folder)."""
    args = _byol(tiny, **{"trainer.max_epochs": "1"})
    assert main(["pretrain", *args]) == 0
    scratch = tmp_path / "scratch"
    (_out(args) / "checkpoints").rename(scratch)
    (_out(args) / "checkpoints").symlink_to(scratch)
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2"]) == 0
    assert json.loads((_out(args) / "summary.json").read_text())["epochs"] == 2


def test_a_resume_says_which_other_settings_changed(tiny, capsys):
    """Settings outside the frozen keys may change on resume, but not unseen: a newer shipped
    config switching the CIFAR blur off mid-run is named."""
    args = _byol(tiny, **{"trainer.max_epochs": "1"})
    assert main(["pretrain", *args]) == 0
    capsys.readouterr()
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2",
                 "augment.simclr.blur_p=[0.0,0.0]", "loss.tau_base=0.98"]) == 0
    out = capsys.readouterr().out.splitlines()
    note = next(line for line in out if line.startswith("note: resuming"))
    assert note == "note: resuming with settings changed since the checkpoint (the run's " \
        "earlier config.yaml is kept as config.before_resume_N.yaml): " \
        "augment.simclr.blur_p: [1.0, 0.1] -> [0.0, 0.0]; loss.tau_base: 0.99 -> 0.98"
    # training longer is allowed, and said to bend the schedule from here on
    assert any(line.startswith("note: trainer.max_epochs 1 -> 2: the lr schedule and the "
                               "target's τ schedule now span 2 epochs") for line in out)
    from massrl.config import build_config
    from massrl.resume import _length_change

    simclr = build_config(config_file="fashion_mnist/simclr", overrides=["trainer.max_epochs=3"])
    assert "the lr schedule now spans 3" in _length_change({"trainer": {"max_epochs": 1}}, simclr)
    # the run's record keeps what the first session ran with (re-running it from its own
    # config.yaml gave another model)
    run = _out(args)
    first = (run / "config.before_resume_1.yaml").read_text()
    assert "tau_base: 0.99" in first and "max_epochs: 1" in first
    assert "tau_base: 0.98" in (run / "config.yaml").read_text()
    assert (run / "metrics.before_resume_1.csv").is_file()


def test_the_resume_note_names_a_plugin_methods_changed_settings():
    from massrl.config import RunConfig
    from massrl.resume import _other_changes

    saved = RunConfig().model_dump(mode="json")
    now = {**saved, "method_kwargs": {"lambd": 0.5}, "method": saved["method"]}
    assert _other_changes(saved, now) == ["method_kwargs.lambd: None -> 0.5"]
    assert _other_changes({**saved, "gone_key": 1}, now) == []  # an older layout: no note


def test_the_earlier_config_is_kept_only_when_a_resume_changed_a_setting(tmp_path):
    """The printed continue command writes out output_dir and resume=auto: the same run, no
    copy; another setting: the earlier config.yaml is kept beside the new one."""
    from massrl.config import RunConfig, to_yaml
    from massrl.run_dir import keep_previous_record

    first = RunConfig.model_validate({"output_dir": None})
    (tmp_path / "config.yaml").write_text(to_yaml(first))
    same = RunConfig.model_validate({"output_dir": str(tmp_path), "resume": "auto"})
    keep_previous_record(tmp_path, 0, to_yaml(same))
    assert not list(tmp_path.glob("config.before_resume_*"))
    other = RunConfig.model_validate({"output_dir": str(tmp_path), "resume": "auto",
                                      "loss": {"tau_base": 0.9}})
    keep_previous_record(tmp_path, 0, to_yaml(other))
    assert (tmp_path / "config.before_resume_1.yaml").read_text() == to_yaml(first)


def test_without_sigusr1_the_stop_signals_are_sigterm_alone():
    """Windows has no SIGUSR1: every run crashed at its start, and every loader worker."""
    code = (
        "import signal\n"
        "del signal.SIGUSR1\n"
        "from massrl.data.loading import STOP_SIGNALS, run_worker_init_fn\n"
        "from massrl.resilience import Preemption\n"
        "assert STOP_SIGNALS == (signal.SIGTERM,)\n"
        "run_worker_init_fn(0)\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "p = Preemption(None)\n"
        "p.on_train_start(object(), None)\n"
        "assert signal.getsignal(signal.SIGTERM) == p._on_signal\n"
        "print('ok')\n"
    )
    out = run_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
