"""What the device-dependent `auto` settings become on the machine a run starts on.

`data.num_workers=auto` (the default) is resolved where a loader is built, never written back into
the config: a checkpoint's config then still says `auto`, and evaluating it on another machine
picks that machine's value.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import torch
from torch import nn

# DataLoader workers per accelerator, at most: beyond this, worker start-up and memory grow while
# a GPU step at the sizes massrl trains is rarely waiting on more than this many decoders
MAX_WORKERS_PER_DEVICE = 8


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what SLURM or taskset granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def trains_on_cpu(accelerator: str) -> bool:
    """Whether a run with this trainer.accelerator computes on the CPU (Lightning's `auto`
    picks a CUDA GPU, else an Apple GPU, else the CPU)."""
    if accelerator != "auto":
        return accelerator == "cpu"
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def trains_on_apple_gpu(accelerator: str) -> bool:
    """Whether a run with this trainer.accelerator computes on an Apple GPU (MPS)."""
    return (accelerator in ("auto", "gpu", "mps") and not torch.cuda.is_available()
            and torch.backends.mps.is_available())


def check_accelerator(accelerator: str) -> None:
    """A GPU asked for where torch sees none: say so, before anything is sized for one."""
    from massrl.config import ConfigError

    apple_gpu = accelerator == "gpu" and torch.backends.mps.is_available()  # (Lightning's "gpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not apple_gpu:
        raise ConfigError(
            f"trainer.accelerator={accelerator}, but torch sees no CUDA GPU here "
            "(torch.cuda.is_available() is False: no GPU, no driver, or a CPU-only torch "
            "build). Use trainer.accelerator=auto (the GPU where there is one, else the CPU) "
            "or trainer.accelerator=cpu.")


def devices_per_node(devices: Any) -> int:
    """Accelerators one node drives for trainer.devices (int, list of ids, '0,1', 'auto', -1)."""
    if isinstance(devices, list):
        return max(1, len(devices))
    text = str(devices).strip()
    if "," in text:
        return max(1, len([d for d in text.split(",") if d.strip()]))
    if text in ("auto", "-1"):
        return max(1, torch.cuda.device_count())
    return max(1, int(text)) if text.isdigit() else 1


def auto_num_workers(on_cpu: bool, cores: int, devices: int = 1) -> int:
    """DataLoader workers for `data.num_workers=auto`.

    - CPU training on <= 4 cores: 0. The augmentation runs between steps in the training process;
      a worker would take a core from torch's threads, which wait for each other after every op
      (measured on 2 cores, default job: 187 images/s with 0 workers, 124 with 1 worker + 1 thread).
    - CPU training on more cores: one worker per 4 cores. Per-image augmentation at 32 px costs
      about a fifth of a CPU step there, so a quarter of the cores keeps the rest fed.
    - On accelerators: every core but one per device feeds it, up to MAX_WORKERS_PER_DEVICE.
    """
    if on_cpu:
        return 0 if cores <= 4 else cores // 4
    per_device = cores // max(1, devices)
    return max(1, min(MAX_WORKERS_PER_DEVICE, per_device - 1))


def resolve_num_workers(value: int | str, on_cpu: bool, devices: int = 1) -> int:
    """data.num_workers as a number: `value` itself, or what `auto` means here."""
    if value == "auto":
        return auto_num_workers(on_cpu, usable_cores(), devices)
    return int(value)


def run_num_workers(cfg: Any) -> int:
    """data.num_workers of a pre-training RunConfig as a number, for the device it trains on."""
    t = cfg.trainer
    on_cpu = trains_on_cpu(t.accelerator)
    return resolve_num_workers(cfg.data.num_workers, on_cpu, 1 if on_cpu or own_cores_only()
                               else devices_per_node(t.devices))


def augment_backend(cfg: Any) -> str:
    """augment.backend of a RunConfig as it runs: `auto` becomes batched when training on the CPU
    (its numba kernels: 10-31 % faster end to end on 2 cores at 32 px, at level quality) and
    per_image on an accelerator, where the engine's work takes the accelerator's time (on an
    H200, 3.5-8 % of a ResNet-50 BYOL step at 224 px) while DataLoader workers that keep up cost
    it none (docs/augment_throughput.md), or where a plugin's strategy has no sampler for the
    engine."""
    return cfg.augment.backend if cfg.augment.backend != "auto" else _auto_backend(cfg)[0]


def _auto_backend(cfg: Any) -> tuple[str, str]:
    """What augment.backend=auto runs, and why."""
    from massrl.plugins import without_engine_sampler

    missing = without_engine_sampler(cfg.augment.strategies)
    if missing:
        return "per_image", f"strategy {', '.join(missing)} has no sampler for the batched engine"
    if trains_on_cpu(cfg.trainer.accelerator):
        return "batched", "training on the CPU"
    return "per_image", ("training on an accelerator: DataLoader workers augment; "
                         "augment.backend=batched moves the strategies onto the device")


def auto_backend_note(cfg: Any) -> str | None:
    """The run's line saying what augment.backend=auto became (None: the backend was named)."""
    if cfg.augment.backend != "auto":
        return None
    backend, why = _auto_backend(cfg)
    return f"augment.backend=auto: {backend} ({why})"


def own_cores_only() -> bool:
    """Whether this process's affinity mask already is its own share of the machine: a task
    srun started with --cpus-per-task (its cores are not the node's, to divide among the GPUs
    again), as opposed to Lightning's or torchrun's processes, which share one set of cores
    (the machine's, or a job's or container's)."""
    env = os.environ
    srun_task = ("SLURM_PROCID" in env and "TORCHELASTIC_RUN_ID" not in env
                 and int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1) > 1)
    return srun_task and usable_cores() < (os.cpu_count() or 1)


# oneDNN's channels-last backward of a strided 1x1 convolution with fewer input channels than its
# register block writes past its buffer (uxlfoundation/oneDNN#6035, open): on this project's CPU a
# ResNet of model.width < 16 segfaults from 64 px (8 channels into a stride-2 shortcut)
ONEDNN_1X1_MIN_CHANNELS = 16


def channels_last_hazards(model: nn.Module) -> list[str]:
    """The convolutions of `model` that channels-last training on the CPU may crash in."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
            and m.in_channels < ONEDNN_1X1_MIN_CHANNELS]


def use_sync_batchnorm(requested: bool, accelerator: str) -> bool:
    """trainer.sync_batchnorm as it can run: torch's SyncBatchNorm synchronises CUDA tensors only
    (on CPU ranks it raises), so a CPU run keeps each rank's own statistics, with a notice."""
    if requested and (trains_on_cpu(accelerator) or trains_on_apple_gpu(accelerator)):
        where = "the CPU" if trains_on_cpu(accelerator) else "an Apple GPU"
        print(f"trainer.sync_batchnorm: off on {where} (torch's SyncBatchNorm runs on CUDA GPUs "
              "only); each rank normalises over its own batch")
        return False
    return requested


def use_channels_last(requested: bool, accelerator: str, model: nn.Module) -> bool:
    """trainer.channels_last as it can run: off on the CPU for models with hazards (a notice
    says so); the config keeps what was asked, as with num_workers=auto."""
    if not requested or not trains_on_cpu(accelerator):
        return requested
    hazards = channels_last_hazards(model)
    if hazards:
        named = ", ".join(hazards[:2]) + (", ..." if len(hazards) > 2 else "")
        print(f"trainer.channels_last: off for this model on the CPU: {len(hazards)} strided 1x1 "
              f"convolution(s) with < {ONEDNN_1X1_MIN_CHANNELS} input channels ({named}) "
              "crash oneDNN's channels-last backward (uxlfoundation/oneDNN#6035); "
              f"model.width >= {ONEDNN_1X1_MIN_CHANNELS} avoids it")
    return not hazards


def resolve_precision(precision: str, accelerator: str, strategy: str = "auto") -> str:
    """'auto' -> bf16 mixed precision where the hardware computes it natively, else fp32 on the
    CPU and fp16 mixed on GPUs without bf16 (V100, T4: torch counts its slow emulation there
    as support). On an Apple GPU bf16 where it autocasts (macOS 14, torch and Lightning 2.6),
    else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if _gpu_computes_bf16(_launch_forks(strategy)) else "16-mixed"
    if trains_on_apple_gpu(accelerator):
        return "bf16-mixed" if _apple_gpu_autocasts_bf16() else "32-true"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def _apple_gpu_autocasts_bf16() -> bool:
    """bf16 autocast on an Apple GPU needs macOS 14, torch 2.6 (MPS bf16 autocast) and
    Lightning 2.6 (before, its mixed precision autocast "cuda" there: a warning, and fp32)."""
    import lightning
    from packaging.version import Version

    new_enough = all(Version(v).release >= (2, 6) for v in (torch.__version__,
                                                             lightning.__version__))
    return new_enough and torch.backends.mps.is_macos_or_newer(14, 0)


def refuse_launch_from_inside(trainer: Any, strategy: str) -> None:
    """Processes Lightning starts from inside fit (ddp_spawn, ddp_fork, ddp_notebook: its pick
    for several devices in a notebook) run the epochs where the process that called pretrain()
    does not see them: its summary said 0 epochs and no kNN, and the validation after training,
    launched again, rewrote metrics.csv. A script starts one process per device instead."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    from massrl.config import ConfigError

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _MultiProcessingLauncher):
        where = (" (in a notebook, Lightning's pick for several devices: run a script or "
                 "`massrl pretrain` instead)" if strategy == "auto" else "")
        raise ConfigError(
            f"trainer.strategy={strategy} has Lightning start the run's processes from inside it "
            f"({launcher._start_method}), whose epochs, summary and metrics massrl cannot "
            f"gather: use trainer.strategy=ddp{where}; docs/distributed.md")


def _launch_forks(strategy: str) -> bool:
    """Whether Lightning will start the run's processes by forking this one (ddp_fork, and its
    pick for several GPUs in a notebook), which it refuses once CUDA is initialised here."""
    from lightning.fabric.utilities.imports import _IS_INTERACTIVE

    return strategy in ("ddp_fork", "ddp_notebook") or (strategy == "auto" and _IS_INTERACTIVE)


def _gpu_computes_bf16(ask_a_child: bool) -> bool:
    """Whether the first GPU computes bf16 natively. Asking initialises CUDA in the asking
    process: before a forked launch a child process asks instead (torch alone: a notebook's
    massrl may not be importable from a fresh process); no answer counts as no."""
    if not ask_a_child or torch.cuda.is_initialized():
        return native_bf16()
    query = ("import inspect, torch; f = torch.cuda.is_bf16_supported; print(f(False) if "
             "'including_emulation' in inspect.signature(f).parameters else f())")
    try:
        answer = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True,
                                timeout=300, check=False)
        said = answer.stdout.strip() if answer.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        said = type(exc).__name__
    if said not in ("True", "False"):
        print(f"note: precision=auto could not ask a child process whether the GPU computes "
              f"bf16 ({said or 'it failed'}): 16-mixed; set trainer.precision to choose")
    return said == "True"


def native_bf16() -> bool:
    """torch.cuda.is_bf16_supported without the emulation torch >= 2.4 counts by default."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4: no emulation counted, no argument
        return torch.cuda.is_bf16_supported()
