"""docs/extending.md's plugin, run as written: a method, a strategy on both backends and a backbone
of one's own, trained, evaluated in a fresh process from the checkpoint alone, and checked."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from massrl.config import ConfigError, build_config
from massrl.devices import augment_backend, auto_backend_note

DOC = Path(__file__).parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The doc's plugin file, under a name of its own (a module name is imported once)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    path = tmp_path_factory.mktemp("plugin") / "doc_plugin.py"
    path.write_text(blocks[0])
    return path


def _massrl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "massrl", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=600)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_a_plugin_method_strategy_and_backbone_train_and_evaluate(plugin, tiny, tmp_path):
    from massrl.cli import main

    # trained in this process; evaluated and continued in fresh ones, which import the plugin
    # from the checkpoint and the run's config alone
    run = tmp_path / "run_vicreg"
    assert main(["pretrain", f"plugins=[{plugin}]", "method=vicreg", "method_kwargs.sim_coeff=20",
                 "augment.strategies=[simclr,geometric]", "model.bn_per_view=true",
                 *tiny("vicreg")]) == 0
    summary = _summary(run)
    assert summary["method"] == "vicreg" and summary["epochs"] == 1
    saved = (run / "config.yaml").read_text()
    assert f"- {plugin}" in saved and "sim_coeff: 20" in saved
    # a fresh process reads the method from the checkpoint: the plugin is imported again
    knn = _massrl("knn", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "k=[5]",
                  f"output_dir={tmp_path / 'knn'}", cwd=tmp_path)
    assert knn.returncode == 0, knn.stderr[-2000:]
    # (its code runs: a checkpoint from elsewhere may name any file)
    assert knn.stderr.count(f"note: importing the plugins '{run / 'checkpoints' / 'last.ckpt'}' "
                            f"names: ['{plugin}']") == 1
    result = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert result["protocol"]["checkpoint"]["method"] == "vicreg"
    # the run's own config continues it: the plugin comes with it
    more = _massrl("pretrain", "-c", str(run / "config.yaml"), "resume=auto",
                   f"output_dir={run}", "trainer.max_epochs=2", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    assert _summary(run)["epochs"] == 2

    # the plugin's strategy on the batched engine, with its backbone
    assert main(["pretrain", f"plugins=[{plugin}]", "method=byol", "augment.backend=batched",
                 "augment.strategies=[geometric,randaugment]", "model.backbone=tiny_cnn",
                 "model.cifar_stem=false", "model.kwargs.channels=8",
                 *tiny("cnn", **{"model.width": "64"})]) == 0
    summary = _summary(tmp_path / "run_cnn")
    assert summary["knn_top1"] is not None and summary["runtime"]["augment_backend"] == "batched"


def test_a_plugin_imported_in_python_is_recorded_for_the_commands(plugin, tiny, tmp_path,
                                                                  capsys):
    """`import my_plugin` then pretrain() (docs/extending.md's way in Python) recorded no plugin:
    `massrl knn` refused the checkpoint ("unknown method 'vicreg'"), and so did a resume."""
    import importlib
    import sys

    from massrl.cli import main
    from massrl.plugins import METHODS, record_imported

    sys.path.insert(0, str(plugin.parent))
    try:
        importlib.import_module(plugin.stem)
    finally:
        sys.path.remove(str(plugin.parent))
    run = tmp_path / "run_vicreg"
    assert main(["pretrain", "method=vicreg", "augment.strategies=[simclr,geometric]",
                 *tiny("vicreg")]) == 0
    assert f"- {plugin}" in (run / "config.yaml").read_text()
    knn = _massrl("knn", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "k=[5]",
                  f"output_dir={tmp_path / 'knn'}", cwd=tmp_path)
    assert knn.returncode == 0, knn.stderr[-2000:]
    # a method registered in __main__ (a notebook cell) cannot be recorded: said
    from massrl.plugins import REGISTERED_BY

    METHODS["incell"] = METHODS["vicreg"]
    REGISTERED_BY["method:incell"] = "__main__"
    try:
        from massrl.config import build_config

        cfg = build_config(overrides=["method=vicreg"])
        cfg.method = "incell"
        assert record_imported(cfg).plugins == cfg.plugins
        assert "the method incell is registered in __main__" in capsys.readouterr().out
        # the module being imported is recorded, not where the class or function lives (review
        # 2: a re-exported class, a functools.partial) nor a helper of another package that
        # registers for it (review 3: a base class's __init_subclass__, an add() helper)
        (tmp_path / "reghelper_pkg").mkdir()
        (tmp_path / "reghelper_pkg" / "__init__.py").write_text(
            "from massrl.plugins import register_method\n"
            "def add(name, cls):\n    register_method(name)(cls)\n")
        (tmp_path / "userplug_rec.py").write_text(
            "import functools\nimport reghelper_pkg\n"
            "from massrl.plugins import METHODS, register_strategy\n"
            "reghelper_pkg.add('reexported', METHODS['vicreg'])\n"
            "register_strategy('partial', per_image=functools.partial(print))\n")
        sys.path.insert(0, str(tmp_path))
        try:
            importlib.import_module("userplug_rec")
        finally:
            sys.path.remove(str(tmp_path))
        cfg.method = "reexported"
        cfg.augment.strategies = ["simclr", "partial"]
        assert record_imported(cfg).plugins == [str(tmp_path / "userplug_rec.py")]
    finally:
        for name in ("incell", "reexported"):
            METHODS.pop(name, None)
        from massrl.plugins import STRATEGIES

        STRATEGIES.pop("partial", None)


def test_the_plugins_strategy_is_seeded_per_image_and_its_sampler_per_image(plugin):
    import torch
    from PIL import Image

    from massrl.augment.batched.draws import ImageDraws, new_seeds
    from massrl.augment.strategies import build_strategy

    cfg = build_config(overrides=[f"plugins=[{plugin}]", "augment.strategies=[geometric]"])
    strategy = build_strategy("geometric", cfg.augment, 0)
    image = Image.new("RGB", (16, 16), (200, 10, 10))
    labels = [strategy(image, torch.Generator().manual_seed(s))[1][0] for s in (0, 0, 1)]
    assert labels[0] == labels[1] != labels[2]
    sampler = __import__("doc_plugin").RandomRotationSampler(30.0)
    op, mag, aux = sampler.sample(ImageDraws(new_seeds((1000,), torch.Generator())), 16, False)
    assert op.shape == mag.shape == (1000, 1) and aux.shape == (1000, 1, 2)
    assert mag.abs().max() <= 30 and mag.std() > 10  # each image its own angle


@pytest.mark.parametrize("overrides,message", [
    (["method=simsiam"], "unknown method 'simsiam'"),
    (["method=vicrge", "plugins=[PLUGIN]"], "did you mean 'vicreg'?"),
    (["method=vicreg", "plugins=[PLUGIN]", "method_kwargs.sim_coef=1"],
     "method_kwargs.sim_coef: Extra inputs are not permitted"),
    (["method=vicreg", "plugins=[PLUGIN]", "method_kwargs.std_coeff=-1"],
     "method_kwargs.std_coeff: Input should be greater than or equal to 0"),
    (["method=byol", "method_kwargs.sim_coeff=1"], "method byol takes none"),
    (["augment.strategies=[geometrc]", "plugins=[PLUGIN]"], "did you mean 'geometric'?"),
    (["plugins=[no_such_module_xyz]"], "cannot import plugin 'no_such_module_xyz'"),
    (["plugins=[/nowhere/p.py]"], "plugin file /nowhere/p.py does not exist"),
])
def test_plugin_mistakes_are_config_errors(plugin, overrides, message):
    items = [o.replace("PLUGIN", str(plugin)) for o in overrides]
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(overrides=items)


def test_a_strategy_without_a_batched_sampler_is_refused_for_the_batched_backend(plugin):
    from massrl import plugins

    build_config(overrides=[f"plugins=[{plugin}]"])
    plugins.register_strategy("rotate_pil_only", per_image=lambda cfg, i: None)
    try:
        with pytest.raises(ConfigError, match="has no sampler for the batched engine"):
            build_config(overrides=["augment.strategies=[rotate_pil_only]",
                                    "augment.backend=batched"])
        # the default, auto, trains such a strategy with the per-image backend, also on the CPU
        cfg = build_config(overrides=["augment.strategies=[rotate_pil_only, simclr]",
                                      "trainer.accelerator=cpu"])
        assert cfg.augment.backend == "auto" and augment_backend(cfg) == "per_image"
        assert auto_backend_note(cfg) == ("augment.backend=auto: per_image (strategy "
                                          "rotate_pil_only has no sampler for the batched engine)")
        with pytest.raises(ValueError, match="massrl's own strategy"):
            plugins.register_strategy("simclr", per_image=lambda cfg, i: None)
        with pytest.raises(ValueError, match="registered twice"):
            plugins.register_strategy("rotate_pil_only", per_image=print)
    finally:
        plugins.STRATEGIES.pop("rotate_pil_only")


def test_a_checkpoint_whose_plugin_is_gone_says_so(plugin, tiny, tmp_path):
    import shutil

    moved = tmp_path / "gone_plugin.py"
    shutil.copy(plugin, moved)
    done = _massrl("pretrain", f"plugins=[{moved}]", "method=vicreg", *tiny("gone"),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    moved.unlink()
    knn = _massrl("knn", f"ckpt={tmp_path / 'run_gone' / 'checkpoints' / 'last.ckpt'}",
                  cwd=tmp_path)
    err = " ".join(knn.stderr.split())
    assert knn.returncode == 2 and f"was pre-trained with plugins ['{moved}'], which this " \
        f"massrl cannot import: plugin file {moved} does not exist" in err, err[-1500:]


def test_installed_plugins_load_only_for_a_name_massrl_does_not_know(monkeypatch):
    from massrl import plugins

    class Broken:
        name, value = "broken", "broken_pkg.plugin"

        def load(self):
            raise ImportError("no module named broken_pkg")

    monkeypatch.setattr(plugins, "entry_points", lambda group: [Broken()])
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    assert build_config(overrides=["method=byol"]).method == "byol"  # not imported
    with pytest.raises(ConfigError, match="the installed massrl plugin 'broken' "
                       r"\(broken_pkg.plugin\) failed to import: ImportError"):
        build_config(overrides=["method=simsiam"])


def test_a_plugin_file_named_like_another_module_is_refused(tmp_path):
    for name in ("json.py", "pytest.py"):  # already imported; importable from elsewhere
        (tmp_path / name).write_text("raise SystemExit('never imported')\n")
        with pytest.raises(ConfigError, match=f"its name '{name[:-3]}' is already the module"):
            build_config(overrides=[f"plugins=[{tmp_path / name}]"])
    # not imported yet, but the standard library's comes first on sys.path
    assert "tabnanny" not in sys.modules
    (tmp_path / "tabnanny.py").write_text("")
    with pytest.raises(ConfigError, match="the module 'tabnanny' imported from .* instead: "
                       "rename the file"):
        build_config(overrides=[f"plugins=[{tmp_path / 'tabnanny.py'}]"])
