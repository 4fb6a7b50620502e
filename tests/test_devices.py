"""What the `auto` settings (workers, precision) become on each kind of machine, and their
validation."""

import subprocess
import sys

import pytest
import torch

from massrl.config import ConfigError, build_config
from massrl.devices import (
    MAX_WORKERS_PER_DEVICE,
    augment_backend,
    auto_backend_note,
    auto_num_workers,
    devices_per_node,
    resolve_num_workers,
    resolve_precision,
    run_num_workers,
    usable_cores,
)


@pytest.mark.parametrize(("cores", "expected"), [(1, 0), (2, 0), (4, 0), (8, 2), (16, 4), (64, 16)])
def test_cpu_training_keeps_small_machines_worker_free(cores: int, expected: int) -> None:
    assert auto_num_workers(on_cpu=True, cores=cores) == expected


@pytest.mark.parametrize(("cores", "devices", "expected"),
                         [(16, 1, 8), (16, 2, 7), (8, 8, 1), (4, 1, 3), (1, 1, 1), (128, 1, 8)])
def test_gpu_training_feeds_each_device(cores: int, devices: int, expected: int) -> None:
    got = auto_num_workers(on_cpu=False, cores=cores, devices=devices)
    assert got == expected and 1 <= got <= MAX_WORKERS_PER_DEVICE


@pytest.mark.parametrize(("devices", "expected"),
                         [(2, 2), ("4", 4), ([0, 3], 2), ("0,1,2", 3), (0, 1)])
def test_devices_per_node(devices: object, expected: int) -> None:
    assert devices_per_node(devices) == expected


@pytest.mark.parametrize(("backend", "accelerator", "cuda", "expected"), [
    ("auto", "cpu", True, "batched"), ("auto", "auto", False, "batched"),
    ("auto", "auto", True, "per_image"), ("auto", "gpu", True, "per_image"),
    ("per_image", "cpu", False, "per_image"), ("batched", "gpu", True, "batched")])
def test_augment_backend_auto_is_batched_on_the_cpu_only(monkeypatch, backend, accelerator, cuda,
                                                         expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = build_config(overrides=[f"augment.backend={backend}",
                                  f"trainer.accelerator={accelerator}"])
    assert cfg.augment.backend == backend  # (the config keeps what was asked)
    assert augment_backend(cfg) == expected
    note = auto_backend_note(cfg)  # the run's line says what auto became, and why
    if backend != "auto":
        assert note is None
    else:
        why = "training on the CPU" if expected == "batched" else "training on an accelerator"
        assert note.startswith(f"augment.backend=auto: {expected} ({why}")


def test_an_explicit_number_is_kept() -> None:
    assert resolve_num_workers(3, on_cpu=True) == 3
    assert resolve_num_workers("auto", on_cpu=True) == auto_num_workers(True, usable_cores())


def test_run_config_resolves_for_its_device() -> None:
    cpu = build_config(config_file="fashion_mnist/byol", overrides=["trainer.accelerator=cpu"])
    assert cpu.data.num_workers == "auto"  # the config keeps 'auto'; loaders resolve it
    assert run_num_workers(cpu) == auto_num_workers(True, usable_cores())
    two = build_config(config_file="fashion_mnist/byol",
                       overrides=["trainer.accelerator=cpu", "data.num_workers=2"])
    assert run_num_workers(two) == 2


@pytest.mark.parametrize("bad", ["-1", "many", "2.5"])
def test_bad_worker_counts_get_one_clear_message(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(config_file="fashion_mnist/byol", overrides=[f"data.num_workers={bad}"])
    text = str(err.value)
    assert "data.num_workers" in text and "whole number >= 0 or 'auto'" in text
    assert "literal" not in text  # not one line per branch of the union


def test_sync_batchnorm_is_off_on_the_cpu_with_a_notice(capsys) -> None:
    from massrl.devices import use_sync_batchnorm

    assert use_sync_batchnorm(True, "cpu") is False
    assert "off on the CPU" in capsys.readouterr().out
    assert use_sync_batchnorm(False, "cpu") is False and capsys.readouterr().out == ""
    assert use_sync_batchnorm(True, "gpu") is True


@pytest.mark.parametrize(("settings", "message"), [
    (["trainer.accelerator=gpu"], "trainer.accelerator=gpu, but torch sees no CUDA GPU here"),
    (["trainer.accelerator=cpu", "trainer.devices=[0]"],
     "Lightning cannot run trainer.accelerator=cpu trainer.devices=[0]"),
    # (a package Lightning needs for it: was an ImportError traceback)
    (["trainer.accelerator=tpu"], "Lightning cannot run trainer.accelerator=tpu"),
    # started on one machine only: it waited for the others, silently, forever
    (["trainer.num_nodes=2"], "trainer.num_nodes=2 needs the command started on each machine"),
    # processes started from inside fit: the summary said 0 epochs, metrics.csv was rewritten
    (["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn"],
     "trainer.strategy=ddp_spawn has Lightning start the run's processes from inside it"),
    (["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_fork"],
     "use trainer.strategy=ddp; docs/distributed.md"),
    # (what Lightning picks for several devices in a notebook: ddp_notebook)
    (["trainer.accelerator=cpu", "trainer.devices=2", "NOTEBOOK"],
     "trainer.strategy=auto has Lightning start the run's processes from inside it (fork)"),
])
def test_trainer_settings_this_machine_cannot_run_are_one_line_errors(tiny, tmp_path, capsys,
                                                                      monkeypatch, settings,
                                                                      message) -> None:
    """A GPU asked for on a machine without one, or device ids on the CPU: the reason and the
    fix in one line, and no run directory left behind."""
    import lightning  # noqa: F401 - imported unpatched (its first import reaches torch._dynamo)
    import torch

    from massrl.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (also on a GPU machine)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if "NOTEBOOK" in settings:
        monkeypatch.setattr("lightning.pytorch.trainer.connectors.accelerator_connector."
                            "_IS_INTERACTIVE", True)
        settings = [s for s in settings if s != "NOTEBOOK"]
    out = tmp_path / "run"
    args = [a for a in tiny("byol") if not a.startswith("output_dir=")]
    assert main(["pretrain", *args, *settings, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("massrl pretrain: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_srun_tasks_with_their_own_cores_do_not_divide_them_again(monkeypatch) -> None:
    """srun --cpus-per-task=6 on a 24-core node with 4 GPUs: each task's affinity mask holds its
    own 6 cores, which were divided among the GPUs already (it got 1 worker, not 5); processes
    that all see every core (torchrun, Lightning's own) still share them."""
    import massrl.devices as devices

    cfg = build_config(config_file="fashion_mnist/byol", overrides=["trainer.devices=4"])
    monkeypatch.setattr(devices, "trains_on_cpu", lambda accelerator: False)
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 24)
    for name in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
                 "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setattr(devices, "usable_cores", lambda: 6)
    assert run_num_workers(cfg) == 5
    monkeypatch.setattr(devices, "usable_cores", lambda: 24)  # every core visible
    assert run_num_workers(cfg) == 24 // 4 - 1
    # torchrun inside the job (or a container) limited to 16 cores: its 4 processes share them
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "7")
    monkeypatch.setattr(devices, "usable_cores", lambda: 16)
    assert run_num_workers(cfg) == 16 // 4 - 1


def _a_gpu(monkeypatch, emulated_only: bool) -> None:
    """A stand-in CUDA device: pre-Ampere (bf16 only by emulation) or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or not emulated_only)


@pytest.mark.parametrize(("emulated_only", "expected"), [(True, "16-mixed"),
                                                          (False, "bf16-mixed")])
def test_precision_auto_on_a_gpu_takes_bf16_only_where_it_is_native(monkeypatch, emulated_only,
                                                                    expected) -> None:
    """torch counts bf16 emulation (V100, T4) as support by default: `auto` chose a slow
    bf16 there instead of fp16."""
    _a_gpu(monkeypatch, emulated_only)
    assert resolve_precision("auto", "auto") == expected
    assert resolve_precision("32-true", "auto") == "32-true"


def test_precision_auto_before_a_forked_launch_asks_a_child_process(monkeypatch, capsys
                                                                    ) -> None:
    """Asking initialises CUDA, and Lightning refuses to fork (ddp_fork, a notebook's pick
    for several GPUs) once it is: a child process asks instead, with torch alone (a notebook's
    massrl may not import in a fresh process); no answer counts as no."""
    import massrl.devices as devices

    real_run = subprocess.run
    _a_gpu(monkeypatch, emulated_only=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", pytest.fail)  # not asked in here
    asked = []

    def child(cmd, **kwargs):
        asked.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="False\n", stderr="")

    monkeypatch.setattr(devices.subprocess, "run", child)
    assert resolve_precision("auto", "gpu", strategy="ddp_fork") == "16-mixed"
    assert asked and asked[0][0] == sys.executable and "massrl" not in asked[0][-1]
    # the query itself, in a fresh process of this machine (no GPU: False), answers
    answer = real_run([sys.executable, "-c", asked[0][-1]], capture_output=True, text=True,
                      timeout=120)
    assert answer.returncode == 0 and answer.stdout.strip() in ("True", "False"), answer.stderr

    def no_answer(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, 300)

    monkeypatch.setattr(devices.subprocess, "run", no_answer)
    assert resolve_precision("auto", "gpu", strategy="ddp_fork") == "16-mixed"
    assert "could not ask a child process" in capsys.readouterr().out
    monkeypatch.setattr(devices.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="ImportError"))  # a child that fails says so too
    assert resolve_precision("auto", "gpu", strategy="ddp_fork") == "16-mixed"
    assert "(it failed): 16-mixed" in capsys.readouterr().out


def test_a_resume_with_fewer_gpus_visible_restores_the_gpu_random_state_it_has(monkeypatch
                                                                                ) -> None:
    """Checkpoints kept every visible GPU's random state and a resume restored them all: with
    fewer GPUs visible (another machine, CUDA_VISIBLE_DEVICES) it failed on the missing ones.
    Now a checkpoint keeps the process's own GPU's, and an older one restores the entry of
    the GPU this process uses, if it has one."""
    from massrl.resilience import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", pytest.fail)
    state = rng_state()
    for saved, device, expected in (("one", 0, ["one"]), (["a", "b"], 1, ["b"]),
                                    (["a", "b"], 3, [])):
        restored.clear()
        monkeypatch.setattr(torch.cuda, "current_device", lambda d=device: d)
        set_rng_state({**state, "cuda": saved})
        assert restored == expected


@pytest.mark.parametrize(("macos_14", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_a_mac_with_accelerator_auto_is_set_up_for_its_gpu(monkeypatch, capsys, macos_14,
                                                           expected) -> None:
    """Lightning's `auto` trains on an Apple GPU (MPS): massrl sized the run for the CPU (no
    loader workers on 4 cores, precision from the CPU's bf16, CPU threads), and evaluations could
    not use the GPU at all. (MPS is simulated: its decisions, not its kernels.)"""
    from massrl.devices import trains_on_apple_gpu, trains_on_cpu, use_sync_batchnorm
    from massrl.eval.config import KnnEvalConfig
    from massrl.eval.features import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer",
                        lambda major, minor: macos_14 and major <= 14)
    assert not trains_on_cpu("auto") and trains_on_apple_gpu("auto")
    assert trains_on_cpu("cpu") and not trains_on_apple_gpu("cpu")
    assert resolve_precision("auto", "auto") == expected == resolve_precision("auto", "mps")
    import lightning  # (before 2.6 Lightning autocast "cuda" on an Apple GPU: fp32 then)

    monkeypatch.setattr(lightning, "__version__", "2.5.6")
    assert resolve_precision("auto", "auto") == "32-true"
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_precision("auto", "cpu") in ("bf16-mixed", "32-true")  # (the CPU's own)
    mac = build_config(config_file="fashion_mnist/byol")
    assert run_num_workers(mac) == auto_num_workers(False, usable_cores())
    assert use_sync_batchnorm(True, "auto") is False
    assert "off on an Apple GPU" in capsys.readouterr().out
    assert resolve_device("auto") == torch.device("mps") == resolve_device("mps")
    assert KnnEvalConfig(ckpt="c.ckpt", device="mps").device == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device=mps was asked for but torch sees no Apple GPU"):
        resolve_device("mps")
    assert resolve_device("auto") == torch.device("cpu") and trains_on_cpu("auto")
