"""Resuming a run: which checkpoint continues it, and the checks that refuse, before the run
directory changes, a resume that would not continue the same run (a frozen setting changed, the
model's parameters or the folder's files differ, another process count), or say what a resume
changes (other settings, the run's length)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from massrl.config import ConfigError, RunConfig, dotted_items, root_path
from massrl.finite import first_nonfinite
from massrl.run_dir import last_checkpoint, own_config_option

# what cannot change when a run is resumed: the checkpoint's tensors would not fit, the run
# would silently become another experiment (the seed draws the subset and the views), the
# optimizer's state would not fit, or (the global batch) the lr schedule and each process's
# place in the epoch would no longer match (the process count is checked apart)
FROZEN_KEYS = ("method", "seed", "data.name", "data.root", "data.subset", "data.image_size",
               "data.batch_size", "trainer.accumulate_grad_batches", "optimizer.name",
               "optimizer.exclude_bias_norm",
               "model.backbone", "model.cifar_stem", "model.width", "model.kwargs",
               "model.proj_hidden_dim", "model.proj_output_dim", "model.pred_hidden_dim")


def _unused_keys(*methods: str | None) -> set[str]:
    """Keys either method does not read: their change is no change of the model (SimCLR's
    predictor width)."""
    from massrl.methods import METHODS

    return {k for m in methods if m in METHODS for k in METHODS[m].UNUSED_KEYS}


def _comparable(key: str, value: Any, tree: dict) -> Any:
    """data.root as the folder it names, the dataset's default for none (resolved from here:
    resume from where the run started, or give the root absolute)."""
    if key != "data.root" or not (value is None or isinstance(value, str)):
        return value
    return root_path(value, _get(tree, "data.name"))


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def check_same_world_size(ckpt_path: Path, saved: int, now: int) -> None:
    """Refuse to resume with another number of processes: the global batch, the lr it scales
    and each process's place in the epoch would all change mid-run."""
    if saved != now:
        raise ConfigError(
            f"cannot resume from {ckpt_path}: it was trained by {saved} process(es), and this "
            f"run has {now} (trainer.devices x trainer.num_nodes, or the torchrun / srun process "
            "count). The global batch, its learning rate and each process's place in the epoch "
            f"would change mid-run: resume with {saved} process(es).")


def find_resume_checkpoint(cfg: RunConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: None for a fresh run."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = last_checkpoint(run_dir)
        if last.is_file():
            return last
        # the newest (by name, epoch-9 would come after epoch-10)
        others = sorted(last.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if others:  # (last.ckpt could not be written: a full disk) the run is not to start over
            raise ConfigError(
                f"resume=auto: {last.parent} holds no last.ckpt but {others[-1].name}: continue "
                f"from it with resume={others[-1]}, or start afresh in another output_dir")
        return None
    path = Path(cfg.resume)
    if not path.exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file. Use resume=auto with "
                          "output_dir=DIR to continue the run in DIR.")
    return path


def check_resume_compatible(cfg: RunConfig, ckpt_path: Path) -> dict:
    """Refuse to resume from a file that is not a massrl checkpoint, or with a config that
    changed what cannot change mid-run. Returns the checkpoint."""
    from massrl.eval.checkpoint import read_checkpoint

    try:
        ckpt = read_checkpoint(ckpt_path)
    except ConfigError as exc:  # (a truncated last.ckpt: a copy, or a crash outside massrl)
        others = sorted(p.name for p in Path(ckpt_path).parent.glob("*.ckpt")
                        if p.name != Path(ckpt_path).name)
        hint = (f" Continue from another checkpoint of the run with resume=PATH ("
                f"{', '.join(others)} in {Path(ckpt_path).parent})." if others else "")
        raise ConfigError(f"cannot resume: {exc}{hint}") from None
    saved = (ckpt.get("hyper_parameters") or {}).get("config")
    if saved is None:
        raise ConfigError(f"{ckpt_path} is not a massrl pre-training checkpoint: cannot resume")
    now = cfg.model_dump(mode="json")
    unused = _unused_keys(saved.get("method"), now["method"])
    changed = [f"{k}: {_get(saved, k)!r} in the checkpoint, {_get(now, k)!r} now"
               for k in FROZEN_KEYS
               if _comparable(k, _get(saved, k), saved) != _comparable(k, _get(now, k), now)
               and k not in unused]
    if changed:
        raise ConfigError(
            f"cannot resume from {ckpt_path}: the config changed what cannot change mid-run:\n  "
            + "\n  ".join(changed)
            + "\nStart a new run (another output_dir) or restore these values"
            + _own_config_hint(Path(ckpt_path)) + "."
        )
    if rank_zero_only.rank == 0:  # (said once, not by every process)
        if other := _other_changes(saved, now):
            print("note: resuming with settings changed since the checkpoint (the run's "
                  "earlier config.yaml is kept as config.before_resume_N.yaml): "
                  + "; ".join(other))
        if note := _length_change(saved, cfg):
            print(note)
    return ckpt


def _length_change(saved: dict, cfg: RunConfig) -> str | None:
    """The note for a resume that changes trainer.max_epochs: allowed (to train longer), but
    the schedules then follow another curve from here on."""
    before, after = (saved.get("trainer") or {}).get("max_epochs"), cfg.trainer.max_epochs
    if before is None or before == after:
        return None
    from massrl.methods import METHODS
    from massrl.methods.byol import BYOL

    # (a target network's τ follows the run's length too; a plugin method's note named BYOL's)
    method = METHODS.get(cfg.method)
    tau = " and the target's τ schedule" if method and issubclass(method, BYOL) else ""
    spans = "span" if tau else "spans"
    return (f"note: trainer.max_epochs {before} -> {after}: the lr schedule{tau} now {spans} "
            f"{after} epochs, so the lr jumps at the resumed step and the run will not equal a "
            f"{after}-epoch run from the start")


# what a resumed run is expected to change: where it runs, how long, how it reports
_RUN_KEYS = ("resume", "output_dir", "trainer.max_epochs", "trainer.progress_bar",
             "trainer.cpu_threads", "data.num_workers", "data.pin_memory",
             "data.persistent_workers")


_SAID_ELSEWHERE = (*_RUN_KEYS, *FROZEN_KEYS)


def _said_elsewhere(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in _SAID_ELSEWHERE)


def _other_changes(saved: dict, now: dict) -> list[str]:
    """The settings outside FROZEN_KEYS a resumed run changes (allowed, but said: resuming
    with a newer shipped config must not switch an augmentation off unseen). The saved config
    is read with this version's defaults for keys it did not have yet."""
    try:
        saved = RunConfig.model_validate(saved).model_dump(mode="json")
    except ValueError:  # an older layout: every newer key would read as a change
        return []
    then, new = _flat(saved), _flat(now)
    return [f"{k}: {then.get(k)!r} -> {new.get(k)!r}" for k in sorted(then.keys() | new.keys())
            if then.get(k) != new.get(k) and not _said_elsewhere(k)]


def _flat(tree: dict) -> dict[str, Any]:
    """Dotted keys of a config tree; an empty mapping adds none ({} -> {a: 1} reads as
    `x.a: None -> 1`)."""
    return {k: v for top, value in tree.items() for k, v in dotted_items(top, value) if v != {}}


def check_resume_fits(ckpt: dict, method: Any, ckpt_path: Path) -> None:
    """What FROZEN_KEYS cannot see, checked before the run directory changes (Lightning's own
    load would fail later, with config.yaml rewritten and metrics.csv moved aside): the files a
    folder's splits are drawn from, and the model's parameters (eval.probe, the number of
    classes, a plugin method's method_kwargs)."""
    bad = first_nonfinite((ckpt.get("state_dict") or {}).items())
    if bad is not None:  # (it stopped at once, blaming optimizer.lr: the weights were NaN before)
        raise ConfigError(
            f"cannot resume from {ckpt_path}: its weights hold NaN/inf (first: {bad}), the run "
            "had diverged when it was saved. Branch from an earlier checkpoint of the run into "
            "a new folder (resume=<run>/checkpoints/epoch-*.ckpt or best-knn-*.ckpt "
            "output_dir=<new folder>) with a lower optimizer.lr, or start anew.")
    problems = [*_changed_files(ckpt, method.data_files), *_changed_parameters(ckpt, method)]
    if problems:
        raise ConfigError(f"cannot resume from {ckpt_path}:\n  " + "\n  ".join(problems)
                          + "\nStart a new run (another output_dir) or restore what changed"
                          + _own_config_hint(Path(ckpt_path)) + ".")


def _changed_files(ckpt: dict, now: dict[str, Any]) -> list[str]:
    from massrl.data.folder import file_list_change

    saved = (ckpt.get("massrl") or {}).get("files") or {}  # (none in older checkpoints)
    changes = [(split, file_list_change(then, now.get(split))) for split, then in saved.items()]
    return [f"the files of the {split} split changed since the checkpoint ({change}): the run "
            "would not continue on the same images (a folder without val/ draws its held-out "
            "images from the same list, so some would have been trained on)"
            for split, change in changes if change]


def _changed_parameters(ckpt: dict, method: Any) -> list[str]:
    saved = {k: tuple(v.shape) for k, v in (ckpt.get("state_dict") or {}).items()
             if hasattr(v, "shape")}
    now = {k: tuple(v.shape) for k, v in method.state_dict().items()}
    if "probe.weight" in saved:  # the probe before its standardiser: on_load_checkpoint moves it
        for name in ("weight", "bias"):
            saved[f"probe.1.{name}"] = saved.pop(f"probe.{name}")
        saved.update({k: v for k, v in now.items() if k.startswith("probe.0.")})
    modules: dict[str, list[str]] = {}
    for key in sorted(saved.keys() | now.keys()):
        if saved.get(key) != now.get(key):
            then, new = saved.get(key), now.get(key)
            modules.setdefault(key.split(".")[0], []).append(
                "not in the checkpoint" if then is None else "not in this model" if new is None
                else f"{key} is {list(then)} in the checkpoint, {list(new)} now")
    what = {"probe": " (the online probe: eval.probe, or the number of classes)"}
    return [f"the model's '{name}' parameters differ{what.get(name, '')}: {diffs[0]}"
            for name, diffs in modules.items()]


def _own_config_hint(ckpt_path: Path) -> str:
    """The run's own config, which restores every value, when the checkpoint is in a run
    directory that has one."""
    run_dir = ckpt_path.parent.parent
    has_own = (run_dir / "config.yaml").is_file()
    return f" ({own_config_option(run_dir)} restores them all)" if has_own else ""


def epochs_done(ckpt: dict) -> int:
    """The epochs a checkpoint's run had trained through when it was saved: "processed", as an
    epoch-end save (EpochEndCheckpoint, in on_train_epoch_end) comes before Lightning counts
    the epoch "completed", and Lightning resumes such a checkpoint after that epoch."""
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", 0))
