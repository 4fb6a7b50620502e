"""The README's promises that can be checked in seconds: its Python API example runs, and its
test command is the one CI runs."""

import re
from pathlib import Path

import pytest
import torch

from massrl.augment.batched import BatchedAugmenter

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("backend", ["auto", "per_image", "batched"])
def test_python_api_example_runs(backend, tmp_path, monkeypatch):
    code = README.split("## Python API")[1].split("```python\n")[1].split("```")[0]
    tiny = ('["data.name=digits", "data.image_size=16", "data.batch_size=32", "data.subset=128", '
            f'"data.num_workers=0", "model.width=8", "trainer.max_epochs=1", '
            f'"augment.backend={backend}"]')
    code, n = re.subn(r'\["data\.subset=2000", "trainer\.max_epochs=1"\]', tiny, code)
    assert n == 1, "the README example changed: update this test"
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["features"].shape == (8, scope["model"].feat_dim)
    assert torch.isfinite(scope["features"]).all()
    model, dm = scope["model"], scope["dm"]
    # the model took the data's normalisation (checkpoints keep it) and, batched, an augmenter
    assert model.normalization["mean"] == list(dm.splits.mean)
    assert (model.augmenter is not None) == (backend != "per_image")  # (auto: the CPU's engine)
    assert list(tmp_path.iterdir()) == []  # nothing left in the working directory


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python3 -m pytest -q -n auto"
    assert f"```bash\n{command}\n```" in README
    assert command in ci


def test_the_tests_also_run_without_pytest_xdist():
    """README: without -n they run one at a time. The conftest's xdist hook made pytest refuse
    the whole suite where xdist is not loaded ("unknown hook")."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist",
                           "-p", "no:cacheprovider", "--collect-only", "tests/test_losses.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _readme_block(section: str) -> str:
    return README.split(section)[1].split("```python\n")[1].split("```")[0]


def test_batched_engine_example_runs_and_its_plan_line_too():
    """The standalone engine example: normalised float views, the same for the same seeds; and
    the GPU sentence's plan, here on the CPU with the device's (whole-batch) mode."""
    scope: dict = {}
    exec(compile(_readme_block("### The batched augmentation engine in a loop of your own"),
                 "README.md", "exec"), scope)
    views, crops, strategy, seeds = (scope[k] for k in ("views", "crops", "strategy", "seeds"))
    assert [tuple(v.shape) for v in views] == [(64, 3, 32, 32)] * 2
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    again = scope["aug"](crops, strategy, seeds=seeds)
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    other = scope["aug"](crops, strategy, seeds=seeds + 1)
    assert not torch.equal(views[0], other[0])

    sentence = README.split("draw the plan on the\nhost")[1].split("\n\n")[0].replace("\n", " ")
    plan_code, call_code = re.findall(r"`([^`]+)`", sentence)
    device_like = BatchedAugmenter(scope["cfg"], mean=[0.485, 0.456, 0.406],
                                   std=[0.229, 0.224, 0.225], grouped=False)
    scope.update(aug=device_like, torch=torch)
    exec(plan_code.replace('"cuda"', '"cpu"'), scope)
    planned = eval(call_code.replace(".cuda()", ".cpu()"), scope)
    for x, y in zip(planned, views, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_the_layout_names_every_module_and_package():
    """A contributor's map: it had fallen 14 modules behind the source."""
    layout = README.split("## Layout")[1].split("```")[1]
    src = ROOT / "src" / "massrl"
    names = [p.name for p in src.glob("*.py") if not p.name.startswith("__")]
    names += [p.name + "/" for p in src.iterdir() if (p / "__init__.py").is_file()]
    names += [p.name for p in (src / "methods").glob("*.py") if not p.name.startswith("__")]
    missing = [n for n in names if not re.search(rf"(^|[\s/,]){re.escape(n)}", layout, re.M)]
    assert len(names) > 30 and not missing, f"README's Layout does not name {missing}"
