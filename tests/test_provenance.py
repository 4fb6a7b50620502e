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
