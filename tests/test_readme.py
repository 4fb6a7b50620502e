"""The README's promises that can be checked in seconds: its Python API example runs, and its
test command is the one CI runs."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_api_example_runs(tmp_path, monkeypatch):
    code = README.split("## Python API")[1].split("```python\n")[1].split("```")[0]
    tiny = ('["data.name=digits", "data.image_size=16", "data.batch_size=32", "data.subset=128", '
            '"data.num_workers=0", "model.width=8", "trainer.max_epochs=1"]')
    code, n = re.subn(r'\["data\.subset=2000", "trainer\.max_epochs=1"\]', tiny, code)
    assert n == 1, "the README example changed: update this test"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["features"].shape == (8, scope["model"].feat_dim)
    assert torch.isfinite(scope["features"]).all()


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python3 -m pytest -q"
    assert f"```bash\n{command}\n```" in README
    assert command in ci
