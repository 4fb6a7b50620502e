"""The run directory: which folder a pre-training run writes into, made once for all its
processes, and what a resumed run keeps of the interrupted one."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from massrl.config import ConfigError, RunConfig
from massrl.files import write_text

try:
    import fcntl
except ImportError:  # not on a POSIX system: runs go unguarded
    fcntl = None  # type: ignore[assignment]

# the run directory of the command, for the processes Lightning starts for DDP
RUN_DIR_ENV = "MASSRL_RUN_DIR"


def last_checkpoint(run_dir: str | Path) -> Path:
    """Where a run keeps the checkpoint it continues from (whether it holds one or not)."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def make_run_dir(cfg: RunConfig) -> tuple[Path, Path | None]:
    """Make the run directory (output_dir, the launching process's, or the next free
    runs/<name>/version_N, claimed atomically: two runs started at once take two) and put it in
    the environment, so the processes Lightning starts for DDP (which re-run the command) use
    the same one. Also returns the outermost folder made for it (None: none was, or processes
    started apart share it), which a run that stops before training removes again."""
    run_dir = choose_run_dir(cfg)
    if run_dir is None:
        run_dir, made = _claim_next_version(Path("runs") / cfg.run_name)
    else:
        check_utf8_name(run_dir)
        made = None if launched_apart() else outermost_missing(run_dir.resolve())
        run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir, made


def _claim_next_version(base: Path) -> tuple[Path, Path | None]:
    n = 0
    while True:
        run_dir = base / f"version_{n}"
        n += 1
        if run_dir.exists():
            continue
        check_utf8_name(run_dir)
        made = outermost_missing(run_dir.resolve())
        try:
            run_dir.mkdir(parents=True)  # (fails when another run took the name meanwhile)
        except FileExistsError:
            continue
        return run_dir, made


def check_utf8_name(run_dir: Path) -> None:
    """TensorBoard opens its files by UTF-8 names only: a run folder whose path holds other
    bytes (a Latin-1 name, from output_dir, name or the working directory) is refused before
    it is made, not a traceback at the start of training."""
    path = run_dir.absolute()
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ConfigError(f"the run folder {shown} is not a UTF-8 name, under which TensorBoard "
                          "cannot write its logs: choose output_dir (or name) in UTF-8") from None


def choose_run_dir(cfg: RunConfig) -> Path | None:
    """output_dir if given, else the directory of the run that started this process, else None
    (the next free runs/<name>/version_N, which make_run_dir claims)."""
    if cfg.output_dir:
        run_dir = Path(cfg.output_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"output_dir {run_dir} is a file: name a folder for the run")
        return run_dir
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if launched_apart():
        # processes started apart (torchrun, srun) would each pick a directory of their own
        raise ConfigError("a run launched as several processes (torchrun, srun) needs "
                          "output_dir=DIR, the same on every process")
    return None


@contextlib.contextmanager
def run_lock(run_dir: Path, rank: int) -> Iterator[None]:
    """Hold `<run_dir>/.lock` while the run lasts (rank 0 only: the others are the same run), so
    that a second run into the directory, started by mistake or requeued while the first still
    runs, is refused instead of interleaving its files with the first one's."""
    if rank != 0 or fcntl is None:
        yield
        return
    lock = run_dir / ".lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another massrl run is writing into {run_dir} (it holds {lock}): "
                              "let it finish, or choose another output_dir") from None
        except OSError:  # a filesystem without locks: the run goes unguarded
            pass
        yield


def refuse_a_used_folder(run_dir: Path, holds_a_run: bool) -> None:
    """A new run (resume not set, or resume=auto finding nothing) would overwrite the record of
    the run in `run_dir`: its checkpoints (`holds_a_run`), or the summary.json of a finished
    run whose checkpoints were deleted to save space. A folder with a config.yaml alone (a run
    that failed before training) may be run again."""
    if holds_a_run:
        raise ConfigError(f"output_dir {run_dir} already holds a run (checkpoints/last.ckpt): "
                          "continue it with resume=auto, or choose another output_dir")
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"output_dir {run_dir} already holds a finished run (summary.json, "
                          "its checkpoints gone: nothing to resume): a new run would overwrite "
                          "its config, metrics and summary. Choose another output_dir")


def launched_apart() -> bool:
    """Whether this process is one of several started apart (torchrun, srun, or one command
    per machine with Lightning's NODE_RANK and MASTER_ADDR)."""
    return (max(int(os.environ.get(v) or 1) for v in ("WORLD_SIZE", "SLURM_NTASKS")) > 1
            or bool(os.environ.get("NODE_RANK") and os.environ.get("MASTER_ADDR")))


def another_machines_first_process() -> bool:
    """A process started by hand on machine NODE_RANK > 0 (Lightning's own multi-machine
    launch): before the Trainer exists, Lightning's rank reads 0 there, as on the first machine,
    and it would take the run directory's lock and write the run's files as rank 0."""
    node = os.environ.get("NODE_RANK") or "0"
    started_apart = any(os.environ.get(v) for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))
    return node.isdigit() and int(node) > 0 and not started_apart


def outermost_missing(path: Path) -> Path | None:
    """The outermost folder on the way to `path` that does not exist yet (None: it exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def remove_new_run_dir(run_dir: Path, new_folder: Path | None) -> None:
    """Remove the run directory a run made (`new_folder`: the outermost folder it had to make
    for it, None when it made none), and those of its parents it made that are empty."""
    if new_folder is None:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    remove_empty_folders(run_dir.parent, new_folder)


def remove_empty_folders(folder: Path, made: Path | None) -> None:
    """Remove `folder` and its parents up to `made` (the outermost folder a run made for it;
    None: it made none) while they are empty: another run may have written beside it."""
    while made is not None and (folder == made or made in folder.parents):
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent


def own_config_option(run_dir: Path | str) -> str:
    """`-c <run_dir>/config.yaml`, quoted for a shell: the option that repeats every setting a
    run ran with."""
    return f"-c {shlex.quote(str(Path(run_dir) / 'config.yaml'))}"


def keep_previous_record(run_dir: Path, resumed_step: int, config_text: str) -> None:
    """A resumed run rewrites config.yaml and metrics.csv: keep the interrupted sessions' beside
    them, as `*.before_resume_N.*` (the config only when the resume changed a setting)."""
    n = 1
    while any(run_dir.glob(f"*.before_resume_{n}.*")):
        n += 1
    config = run_dir / "config.yaml"
    with contextlib.suppress(OSError, yaml.YAMLError):
        if _settings(config.read_text()) != _settings(config_text):
            write_text(run_dir / f"config.before_resume_{n}.yaml", config.read_text())
    _keep_previous_metrics(run_dir, resumed_step, n)


def _settings(config_text: str) -> dict:
    """A config.yaml's settings, without `resume` and `output_dir` (which a resumed run sets:
    the directory is the same, written out)."""
    tree = yaml.safe_load(config_text)
    if not isinstance(tree, dict):
        return {}
    return {k: v for k, v in tree.items() if k not in ("resume", "output_dir")}


def _keep_previous_metrics(run_dir: Path, resumed_step: int, n: int) -> None:
    """Lightning's CSV logger rewrites metrics.csv: keep the interrupted part beside it, up to
    the checkpoint the run resumes from (the rows of later steps, which the resumed run repeats,
    would be there twice)."""
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return
    with open(metrics, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if not row.get("step") or int(row["step"]) < resumed_step]
    if not rows:  # (a resume from the run's start: nothing of the earlier session to keep)
        metrics.unlink()
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=reader.fieldnames or [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(run_dir / f"metrics.before_resume_{n}.csv", text.getvalue())
    metrics.unlink()


def _rebased_summary(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A summary's paths in the run's folder as it is now: a moved folder's named the old one,
    which may be gone."""
    then, now = summary.get("run_dir"), os.path.abspath(run_dir)
    if not isinstance(then, str) or os.path.abspath(then) == now:
        return summary
    then = then.rstrip(os.sep)
    for key in ("run_dir", "last_checkpoint", "best_checkpoint"):
        path = summary.get(key)
        if isinstance(path, str) and (path == then or path.startswith(then + os.sep)):
            summary[key] = now + path[len(then):]
    return summary


def finished_already(cfg: RunConfig, run_dir: Path, ckpt: Path, done: int) -> dict[str, Any]:
    """Resuming a run that has trained all its epochs: nothing to do, and its summary stays."""
    print(f"nothing to train: {ckpt} has completed {done} epochs, trainer.max_epochs="
          f"{cfg.trainer.max_epochs}. Raise trainer.max_epochs to train longer.")
    with contextlib.suppress(OSError, ValueError):  # (none, or an unreadable one)
        summary = json.loads((run_dir / "summary.json").read_text())
        # (one damaged by hand, `{}` or `[]`, is no summary: the command prints its fields)
        if isinstance(summary, dict) and {"method", "dataset", "run_dir"} <= summary.keys():
            return _rebased_summary(summary, run_dir)
    print(f"{run_dir / 'summary.json'} is missing or unreadable: `massrl knn ckpt={ckpt}` "
          "measures the final model")
    return {"method": cfg.method, "dataset": cfg.data.name, "epochs": done,
            "run_dir": str(run_dir), "last_checkpoint": str(ckpt)}
