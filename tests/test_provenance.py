"""What summary.json and result.json record beside a run's config: package versions and the
massrl source's git commit."""

import subprocess

import torch

import massrl.provenance as provenance


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t",
                           *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_commit_is_the_massrl_checkouts_not_an_enclosing_projects(tmp_path, monkeypatch):
    """massrl installed into a project's ignored .venv: `git -C` climbs to the project's
    repository, whose commit says nothing of massrl's source."""
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    _git(tmp_path, "add", ".gitignore")
    _git(tmp_path, "commit", "-qm", "project")
    installed = tmp_path / ".venv" / "massrl" / "provenance.py"
    installed.parent.mkdir(parents=True)
    installed.write_text("# a copy\n")
    monkeypatch.setattr(provenance, "__file__", str(installed))
    provenance.source_commit.cache_clear()
    assert provenance.source_commit() is None
    # a checkout of massrl itself: its commit, and whether its files changed since
    checkout = tmp_path / "checkout"
    source = checkout / "massrl" / "provenance.py"
    source.parent.mkdir(parents=True)
    source.write_text("# massrl\n")
    _git(checkout, "init", "-q")
    _git(checkout, "add", ".")
    _git(checkout, "commit", "-qm", "massrl")
    monkeypatch.setattr(provenance, "__file__", str(source))
    provenance.source_commit.cache_clear()
    head = _git(checkout, "rev-parse", "HEAD")
    assert provenance.source_commit() == head
    source.write_text("# massrl, edited\n")
    provenance.source_commit.cache_clear()
    assert provenance.source_commit() == head + "+changes"
    provenance.source_commit.cache_clear()


def test_package_versions_name_the_installed_ones():
    versions = provenance.package_versions()
    assert torch.__version__.startswith(versions["torch"])
    assert versions["lightning"] and versions["massrl"]


def test_checkpoints_record_the_code_that_wrote_them_and_a_resume_by_other_code_says_so(
        tiny, monkeypatch, capsys):
    """Every version was 0.1.0: nothing told which code trained a checkpoint, nor that a run was
    continued by another (its figures then differ); result.json named only the evaluation's."""
    import json

    import massrl.methods.base as base
    from massrl.cli import main

    def commit(value):  # (where the checkpoint hook and the resume note read it)
        monkeypatch.setattr(provenance, "running_commit", lambda: value)
        monkeypatch.setattr(base, "running_commit", lambda: value)

    commit("a" * 40)
    args = ["-c", "fashion_mnist/byol", *tiny("byol")]
    out = args[-1].split("=", 1)[1]
    assert main(["pretrain", *args]) == 0
    ckpt = torch.load(f"{out}/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["massrl"]["commit"] == "a" * 40
    assert main(["knn", f"ckpt={out}/checkpoints/last.ckpt", "device=cpu",
                 f"output_dir={out}/knn"]) == 0
    checkpoint = json.loads(open(f"{out}/knn/result.json").read())["protocol"]["checkpoint"]
    assert checkpoint["massrl_commit"] == "a" * 40 and checkpoint["massrl_version"]
    commit("b" * 40 + "+changes")
    capsys.readouterr()
    assert main(["pretrain", *args, "resume=auto", "trainer.max_epochs=2"]) == 0
    assert (f"note: the checkpoint was written by massrl {'a' * 12}, this is {'b' * 12}+changes"
            in capsys.readouterr().out)
    assert provenance.code_change_note({"massrl": {"commit": None}}) is None  # (unknown: none)
